"""Writing a file so that a reader (or a crash) sees the old one or the whole new one: a
temporary file beside it, fsynced, renamed over it, and the folder fsynced so the rename
survives a power cut. Every small file a run writes goes through here. An OSError (a full
disk) propagates with the temporary file removed and the old file untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def replacing(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A temporary file to fill ("w": text, "wb": bytes) that replaces `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> Path:
    """`text` at `path` (UTF-8, no newline added), atomically; returns the path."""
    with replacing(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> Path:
    """`obj` as JSON and a newline at `path`, atomically; returns the path."""
    with replacing(path) as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
    return Path(path)


def fsync_file(path: str | Path) -> None:
    """Flush a file written by other means to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the file system allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync directories
    finally:
        os.close(fd)
