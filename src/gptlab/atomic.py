"""Writing a small file so that a reader (or a crash) sees the old one or the whole new one:
a temporary file beside it, fsynced, then renamed over it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> Path:
    """`obj` as JSON (floats as repr, so they read back exactly) at `path`, atomically.
    An OSError (a full or read-only disk) propagates, with the temporary file removed and
    the old file untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
