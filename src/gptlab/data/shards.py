"""A prepared corpus on disk (the directory `gptlab prepare` writes; prepare.py lists its
files): `ShardWriter` writes one split's token shards, `read_manifest` and `open_split` read
them back, memory-mapped, several shards as one array (`ShardedTokens`) without loading them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.errors import GptlabError

MANIFEST = "manifest.json"
PREPARED_FORMAT = "gptlab-prepared"
PROGRESS = "progress.json"
# a ShardWriter's attributes that a checkpoint records, in order
_STATE = "shards cur_tokens documents tokens bytes pieces last_doc last_piece".split()


def is_prepared(source: str) -> bool:
    """True when `source` is a directory written by `gptlab prepare` (it holds manifest.json)."""
    return (Path(source).expanduser() / MANIFEST).is_file()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a prepared directory, checked for its format."""
    path = Path(directory).expanduser() / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GptlabError(
            f"cannot read {str(path)!r} ({e}); prepare the data again with `gptlab prepare`"
        ) from None
    if manifest.get("format") != PREPARED_FORMAT:
        raise GptlabError(f"{str(path)!r} is not a gptlab prepare manifest")
    return manifest


class ShardedTokens:
    """Several memory-mapped token shards read as one 1-D array, touching only the pages asked
    for: `len()`, an int, a slice (a view over the same files) and integer arrays of any shape
    (windows may straddle shards)."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = [s for s in shards if len(s)]
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.bounds = np.concatenate([[0], np.cumsum(lengths)])  # shard k holds [b[k], b[k+1])
        self.dtype = self.shards[0].dtype if self.shards else np.dtype(np.uint16)
        self.shape = (int(self.bounds[-1]),)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[np.arange(start, stop, step)]
            parts = []
            for k, s in enumerate(self.shards):
                lo, hi = max(start, self.bounds[k]), min(stop, self.bounds[k + 1])
                if lo < hi:
                    parts.append(s[lo - self.bounds[k] : hi - self.bounds[k]])
            return ShardedTokens(parts)
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"index {key} out of range for {n} tokens")
            k = int(np.searchsorted(self.bounds, i, side="right")) - 1
            return self.shards[k][i - self.bounds[k]]
        idx = np.asarray(key, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"index out of range for {n} tokens")
        flat = idx.ravel()
        out = np.empty(flat.shape, dtype=self.dtype)
        which = np.searchsorted(self.bounds, flat, side="right") - 1
        for k in np.unique(which):
            m = which == k
            out[m] = self.shards[k][flat[m] - self.bounds[k]]
        return out.reshape(idx.shape)

    def __array__(self, dtype=None, copy=None):
        """All tokens in one in-memory array (only for small corpora)."""
        arr = np.concatenate([np.asarray(s) for s in self.shards]) if self.shards else np.empty(0)
        return arr.astype(dtype or self.dtype, copy=False)


def open_split(directory: str | Path, split: str, manifest: dict[str, Any] | None = None):
    """One split ("train" or "val") of a prepared directory: a np.memmap for a single shard,
    else a ShardedTokens; sizes are checked against the manifest (checksums by --verify)."""
    directory = Path(directory).expanduser()
    manifest = manifest or read_manifest(directory)
    dtype = np.dtype(manifest["dtype"])
    shards = []
    for sh in manifest["splits"][split]["shards"]:
        path = directory / sh["file"]
        try:
            size = path.stat().st_size
        except OSError:
            raise GptlabError(
                f"shard {str(path)!r} is missing; prepare the data again with `gptlab prepare`"
            ) from None
        if size != sh["tokens"] * dtype.itemsize:
            raise GptlabError(
                f"shard {str(path)!r} has {size} bytes, the manifest says "
                f"{sh['tokens'] * dtype.itemsize}; prepare the data again"
            )
        shards.append(np.memmap(path, dtype=dtype, mode="r"))
    return shards[0] if len(shards) == 1 else ShardedTokens(shards)


def prepared_manifest(source: str) -> dict[str, Any] | None:
    """The manifest when `source` is a directory written by `gptlab prepare`, else None."""
    return read_manifest(source) if is_prepared(source) else None


class ShardWriter:
    """Appends one split's tokens to shards of at most `shard_tokens` tokens, `<|endoftext|>`
    wherever the text does not run on, keeping the counts a checkpoint needs."""

    def __init__(
        self,
        directory: Path,
        split: str,
        dtype: np.dtype,
        shard_tokens: int,
        eot: int,
        state: dict[str, Any] | None = None,
    ):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens, self.eot = shard_tokens, eot
        st = state or {}
        self.shards: list[dict[str, Any]] = list(st.get("shards", []))
        self.cur_tokens: int = st.get("cur_tokens", 0)
        self.documents: int = st.get("documents", 0)
        self.tokens: int = st.get("tokens", 0)
        self.bytes: int = st.get("bytes", 0)
        self.pieces: int = st.get("pieces", 0)
        self.last_doc: int = st.get("last_doc", -1)
        self.last_piece: int = st.get("last_piece", -1)
        self._f = None
        self._hash = hashlib.sha256()
        if self.cur_tokens:  # resume: drop what was written after the checkpoint, re-hash the rest
            path = self._path()
            keep = self.cur_tokens * dtype.itemsize
            if not path.is_file() or path.stat().st_size < keep:
                raise GptlabError(
                    f"{str(path)!r} is shorter than {PROGRESS} records; delete "
                    f"{str(directory)!r} and prepare again"
                )
            self._f = open(path, "r+b")
            self._f.truncate(keep)
            while chunk := self._f.read(1 << 22):
                self._hash.update(chunk)
            self._f.seek(keep)
        self.shards_closed = 0

    def _path(self) -> Path:
        return self.directory / f"{self.split}-{len(self.shards):06d}.bin"

    def add(self, doc: int, piece: int, tokens: np.ndarray, n_bytes: int) -> None:
        """Append tokens of piece `piece` of document `doc`: more of the last piece, the piece
        after it (the text runs on), or text that starts a new stretch after `<|endoftext|>`."""
        self.bytes += n_bytes
        if not len(tokens):
            return
        if doc != self.last_doc or not 0 <= piece - self.last_piece <= 1:
            if self.documents:
                self._write(np.array([self.eot], dtype=self.dtype))
            self.documents += 1
        self.pieces += piece != self.last_piece
        self.last_doc, self.last_piece = doc, piece
        self._write(tokens)

    def _write(self, arr: np.ndarray) -> None:
        self.tokens += len(arr)
        while len(arr):
            if self._f is None:
                self._f = open(self._path(), "wb")
                self._hash = hashlib.sha256()
            part = arr[: self.shard_tokens - self.cur_tokens]
            data = part.tobytes()
            self._f.write(data)
            self._hash.update(data)
            self.cur_tokens += len(part)
            arr = arr[len(part) :]
            if self.cur_tokens == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self.sync()
        self.close()
        name = self._path().name
        self.shards.append(
            {"file": name, "tokens": self.cur_tokens, "sha256": self._hash.hexdigest()}
        )
        self.cur_tokens = 0
        self.shards_closed += 1

    def sync(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())

    def finish(self) -> None:
        if self._f is not None and self.cur_tokens:
            self._close_shard()
        self.close()
        keep = {s["file"] for s in self.shards}
        for stray in self.directory.glob(f"{self.split}-*.bin"):  # left by an interrupted run
            if stray.name not in keep:
                stray.unlink()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def state(self) -> dict[str, Any]:
        """What a checkpoint records, for a writer to resume from."""
        return {k: getattr(self, k) for k in _STATE}

    def summary(self) -> dict[str, Any]:
        """The split's entry in the manifest."""
        return {k: getattr(self, k) for k in ("documents", "pieces", "tokens", "bytes", "shards")}
