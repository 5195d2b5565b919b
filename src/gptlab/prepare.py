"""`gptlab prepare`: corpora bigger than memory, tokenized in parallel into token shards.

Inputs are files (`.txt`/`.md`, `.jsonl` with a text field, `.parquet` with a text column),
directories and globs of them, the built-in `shakespeare`, or Hugging Face datasets
(`hf:NAME`, streamed; needs the `datasets` package and the network). The output directory:

    manifest.json          tokenizer identity, dtype, settings, per split: documents, tokens,
                           UTF-8 bytes and the shard list with SHA-256 checksums
    train-000000.bin ...   raw token ids (uint16, or uint32 when ids exceed 65,535),
    val-000000.bin ...     each shard at most `shard_tokens` tokens
    progress.json          only while unfinished: what a re-run needs to continue

How it stays bounded and exact:
- Documents are streamed: text files are read in 1 MiB pieces cut just before an ASCII space
  or newline that follows a visible character. GPT-2's split pattern (which the trained BPEs
  share) never joins text across such a point, so the pieces tokenize exactly as the whole
  document would. jsonl lines, parquet row groups and dataset rows are read one at a time.
- The main process only reads and writes; worker processes tokenize batches of pieces. At
  most a few batches are in flight, so memory does not grow with the corpus.
- Each document goes to train or validation by a hash of (seed, document index): the same
  inputs and seed always give the same split, and no document is in both. Within a split,
  documents are separated by `<|endoftext|>`, as `load_corpus` joins them.
- Progress is checkpointed at batch boundaries (shard files fsynced, then progress.json
  replaced atomically). A re-run truncates the open shards to the checkpoint and continues
  from the recorded input position, so the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.data import (
    BUILTIN_CORPORA,
    MANIFEST,
    PREPARED_FORMAT,
    TEXT_SUFFIXES,
    find_files,
    read_manifest,
    shakespeare_plays,
)
from gptlab.errors import GptlabError
from gptlab.tokenizer import ENDOFTEXT, CharTokenizer, from_identity, get_tokenizer

FORMAT_VERSION = 1
PROGRESS = "progress.json"
SPLITS = ("train", "val")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
DEFAULT_SHARD_TOKENS = 1 << 24  # 16M tokens: 32 MiB per uint16 shard
CHUNK_BYTES = 1 << 20  # text files are read in pieces of at most this many bytes
BATCH_BYTES = 1 << 20  # a worker task holds about this much text
MAX_EXAMPLES = 10  # skipped records named in the manifest
_VISIBLE_ASCII = range(0x21, 0x7F)


# --------------------------------------------------------------------------- inputs


@dataclass
class Source:
    """One input: a file, a built-in corpus or a Hugging Face dataset."""

    kind: str  # "text" | "jsonl" | "parquet" | "builtin" | "hf"
    name: str  # absolute path, built-in name or dataset name
    bytes: int = 0  # size on disk (progress and change detection); 0 when unknown
    mtime_ns: int = 0


def _file_source(path: Path) -> Source:
    suffix = path.suffix.lower()
    kind = (
        "text"
        if suffix in TEXT_SUFFIXES
        else "jsonl"
        if suffix in JSONL_SUFFIXES
        else "parquet"
        if suffix in PARQUET_SUFFIXES
        else None
    )
    if kind is None:
        raise GptlabError(
            f"{str(path)!r}: unsupported file type {suffix or '(none)'!r}; "
            f"use {', '.join(SUPPORTED_SUFFIXES)} files"
        )
    st = path.stat()
    return Source(kind, str(path.resolve()), st.st_size, st.st_mtime_ns)


def expand_inputs(inputs: list[str]) -> list[Source]:
    """The sources named by `inputs`, in order: files, directories (searched recursively,
    sorted), globs (sorted), `shakespeare`, or `hf:NAME`. A file named twice is read once."""
    if not inputs:
        raise GptlabError("no inputs: give files, directories, globs, shakespeare or hf:NAME")
    sources: list[Source] = []
    for item in inputs:
        if item.startswith("hf:"):
            if not item[3:]:
                raise GptlabError("hf: needs a dataset name, e.g. hf:roneneldan/TinyStories")
            sources.append(Source("hf", item[3:]))
            continue
        path = Path(item).expanduser()
        if item in BUILTIN_CORPORA and not path.exists():
            sources.append(Source("builtin", item))
        elif (files := find_files(item, SUPPORTED_SUFFIXES)) is not None:
            sources += [_file_source(p) for p in files]
        else:
            raise GptlabError(
                f"input {item!r} not found: give files, directories or globs of "
                f"{', '.join(SUPPORTED_SUFFIXES)}, shakespeare, or hf:NAME"
            )
    seen, unique = set(), []
    for s in sources:
        if (s.kind, s.name) not in seen:
            seen.add((s.kind, s.name))
            unique.append(s)
    return unique


def document_split(seed: int, doc_indices: np.ndarray, val_ratio: float) -> np.ndarray:
    """True where a document goes to validation: splitmix64(seed, index) / 2**64 < val_ratio.

    A pure function of (seed, document index), vectorised: the same inputs always split the
    same way, whatever the batching, the worker count or an interruption.
    """
    with np.errstate(over="ignore"):
        x = np.asarray(doc_indices, dtype=np.uint64) + np.uint64(
            (seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        )
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < val_ratio


def _safe_cut(data: bytes, limit: int) -> int:
    """Where to end a text piece within data[:limit]: just before an ASCII space or newline that
    follows a visible ASCII character (GPT-2's pattern never joins text across that point).
    Without one, the last whitespace, else the last UTF-8 character boundary."""
    i = limit
    while i > 1:
        i = max(data.rfind(b" ", 1, i), data.rfind(b"\n", 1, i))
        if i <= 0:
            break
        if data[i - 1] in _VISIBLE_ASCII:
            return i
    for ws in (b"\n", b" ", b"\t"):
        j = data.rfind(ws, 1, limit)
        if j > 0:
            return j
    i = limit
    while i > 1 and 0x80 <= data[i] < 0xC0:  # step back over UTF-8 continuation bytes
        i -= 1
    return i


# A reader yields (item, position after it, input bytes consumed). An item is
# (kind, payload, document index, source index, where) or None when only the position moves:
#   "t": UTF-8 bytes of a text piece (where: byte offset)   "s": a str document (where: row)
#   "j": a raw jsonl line (where: line number)               "x": an error message (where: row)
#   "p": (path, row group, column) (where: first row)        multiple documents from one item


def _read_source(
    src_idx: int, src: Source, pos: dict[str, int], cfg: dict[str, Any]
) -> Iterator[tuple[tuple | None, dict[str, int], int]]:
    doc, offset, line = pos["doc"], pos["offset"], pos["line"]

    def at(o: int, ln: int, d: int) -> dict[str, int]:
        return {"src": src_idx, "offset": o, "line": ln, "doc": d}

    end = {"src": src_idx + 1, "offset": 0, "line": 0}
    if src.kind == "text":
        sep = cfg["doc_separator"].encode() if cfg["doc_separator"] else None
        with open(src.name, "rb") as f:
            while True:
                f.seek(offset)
                data = f.read(CHUNK_BYTES)
                if sep is not None:
                    j = data.find(sep)
                    if j >= 0:
                        item = ("t", data[:j], doc, src_idx, offset) if j else None
                        offset += j + len(sep)
                        doc += 1
                        yield item, at(offset, 0, doc), j + len(sep)
                        continue
                if len(data) < CHUNK_BYTES:  # the rest of the file ends the document
                    item = ("t", data, doc, src_idx, offset) if data else None
                    yield item, {**end, "doc": doc + 1}, len(data)
                    return
                cut = _safe_cut(data, len(data) - (len(sep) - 1 if sep else 0))
                yield ("t", data[:cut], doc, src_idx, offset), at(offset + cut, 0, doc), cut
                offset += cut
    elif src.kind == "jsonl":
        with open(src.name, "rb") as f:
            f.seek(offset)
            for raw in f:
                line += 1
                offset += len(raw)
                if not raw.strip():
                    yield None, at(offset, line, doc), len(raw)
                    continue
                yield ("j", raw, doc, src_idx, line), at(offset, line, doc + 1), len(raw)
                doc += 1
        yield None, {**end, "doc": doc}, 0
    elif src.kind == "parquet":
        pf = _parquet_file(src.name, cfg["text_field"])
        for rg in range(offset, pf.num_row_groups):
            meta = pf.metadata.row_group(rg)
            item = ("p", (src.name, rg, cfg["text_field"]), doc, src_idx, line)
            yield item, at(rg + 1, line + meta.num_rows, doc + meta.num_rows), meta.total_byte_size
            doc += meta.num_rows
            line += meta.num_rows
        yield None, {**end, "doc": doc}, 0
    elif src.kind == "builtin":
        plays = shakespeare_plays()
        for i in range(offset, len(plays)):
            yield ("s", plays[i], doc, src_idx, i), at(i + 1, 0, doc + 1), len(plays[i])
            doc += 1
        yield None, {**end, "doc": doc}, 0
    elif src.kind == "hf":
        field = cfg["text_field"]
        for row, record in enumerate(_hf_stream(src.name, cfg, offset), start=offset):
            text = record.get(field) if isinstance(record, dict) else None
            item = (
                ("s", text, doc, src_idx, row)
                if isinstance(text, str)
                else ("x", _field_problem(record, field), doc, src_idx, row)
            )
            yield item, at(row + 1, 0, doc + 1), len(text) if isinstance(text, str) else 0
            doc += 1
        yield None, {**end, "doc": doc}, 0
    else:  # pragma: no cover - expand_inputs makes only the kinds above
        raise AssertionError(src.kind)


def _field_problem(record: Any, field: str) -> str:
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if field not in record:
        keys = ", ".join(list(record)[:5])
        return f"missing field {field!r} (fields: {keys}); choose one with --text-field"
    return f"field {field!r} is {type(record[field]).__name__}, not a string"


def _parquet_file(path: str, column: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GptlabError(
            f"{path!r}: reading .parquet needs the `pyarrow` package: pip install pyarrow"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError kinds
        raise GptlabError(f"{path!r} is not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise GptlabError(
            f"{path!r} has no column {column!r} (columns: {', '.join(names[:8])}); "
            "choose one with --text-field"
        )
    return pf


def _hf_stream(name: str, cfg: dict[str, Any], skip: int):
    try:
        import datasets
    except ImportError:
        raise GptlabError(
            f"hf:{name} needs the `datasets` package: pip install datasets (and the network)"
        ) from None
    try:
        ds = datasets.load_dataset(name, cfg["hf_config"], split=cfg["hf_split"], streaming=True)
        if skip:
            ds = ds.skip(skip)
        yield from ds
    except GptlabError:
        raise
    except Exception as e:  # offline, unknown name, gated: the library has many exception kinds
        first = (str(e).splitlines() or [""])[0][:160]
        raise GptlabError(
            f"cannot stream Hugging Face dataset {name!r} ({type(e).__name__}: {first}); "
            "check the name, --hf-split and the network (offline machines cannot use hf:)"
        ) from None


def _tasks(
    sources: list[Source], pos: dict[str, int], cfg: dict[str, Any]
) -> Iterator[tuple[list[tuple], dict[str, int], int]]:
    """Batches of items for the workers: (items, position after them, input bytes read)."""
    items: list[tuple] = []
    size = consumed = 0
    cur = dict(pos)
    for src_idx in range(pos["src"], len(sources)):
        start = cur if cur["src"] == src_idx else {"offset": 0, "line": 0, "doc": cur["doc"]}
        for item, after, n in _read_source(src_idx, sources[src_idx], start, cfg):
            cur = after
            consumed += n
            if item is None:
                continue
            items.append(item)
            size += len(item[1]) if item[0] in "tsj" else BATCH_BYTES
            if size >= BATCH_BYTES:
                yield items, dict(cur), consumed
                items, size, consumed = [], 0, 0
    if items or consumed:
        yield items, dict(cur), consumed


# --------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(identity: dict[str, Any] | None, dtype: str, text_field: str) -> None:
    # each worker is one process; the tokenizers library must not start its own threads here
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(
        tokenizer=from_identity(identity) if identity else None,
        dtype=np.dtype(dtype),
        text_field=text_field,
    )


def _texts_of(task: list[tuple]) -> tuple[list[int], list[str], list[tuple[int, int, str, bool]]]:
    """Decode a task's items into (document indices, texts, errors). An error is
    (source index, where, message, skippable)."""
    docs: list[int] = []
    texts: list[str] = []
    errors: list[tuple[int, int, str, bool]] = []
    field = _WORKER["text_field"]
    for kind, payload, doc, src, where in task:
        if kind == "t":
            try:
                texts.append(payload.decode("utf-8"))
            except UnicodeDecodeError as e:
                errors.append((src, where + e.start, "is not UTF-8 text", False))
                continue
            docs.append(doc)
        elif kind == "s":
            docs.append(doc)
            texts.append(payload)
        elif kind == "x":
            errors.append((src, where, payload, True))
        elif kind == "j":
            try:
                record = json.loads(payload)
            except ValueError as e:
                errors.append((src, where, f"malformed JSON ({e})", True))
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                errors.append((src, where, _field_problem(record, field), True))
                continue
            docs.append(doc)
            texts.append(text)
        elif kind == "p":
            path, rg, column = payload
            import pyarrow.parquet as pq

            values = pq.ParquetFile(path).read_row_group(rg, columns=[column]).column(0)
            for i, text in enumerate(values.to_pylist()):
                if isinstance(text, str):
                    docs.append(doc + i)
                    texts.append(text)
                else:
                    what = "null" if text is None else type(text).__name__
                    errors.append((src, where + i, f"column {column!r} is {what}", True))
    return docs, texts, errors


def _run_task(task: list[tuple]) -> dict[str, Any]:
    """Tokenize one task: all its documents' tokens concatenated, with per-document lengths."""
    docs, texts, errors = _texts_of(task)
    tok, dtype = _WORKER["tokenizer"], _WORKER["dtype"]
    arrays = [np.array(tok.encode(t, allowed_special={ENDOFTEXT}), dtype=dtype) for t in texts]
    return {
        "docs": np.asarray(docs, dtype=np.int64),
        "lengths": np.array([len(a) for a in arrays], dtype=np.int64),
        "bytes": np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64),
        "tokens": np.concatenate(arrays) if arrays else np.empty(0, dtype),
        "errors": errors,
    }


def _chars_task(task: list[tuple]) -> dict[str, Any]:
    """The characters of one task's documents (the first pass of a char tokenizer)."""
    _, texts, errors = _texts_of(task)
    chars: set[str] = set()
    for t in texts:
        chars.update(t.replace(ENDOFTEXT, ""))
    return {"chars": chars, "errors": errors}


class _Pool:
    """Runs tasks in worker processes (or in this process when workers == 1), yielding results
    in submission order with at most `2 * workers` tasks in flight."""

    def __init__(self, workers: int, initargs: tuple):
        self.workers = workers
        self.pool = None
        if workers > 1:
            methods = multiprocessing.get_all_start_methods()
            # fork starts workers in milliseconds; spawn elsewhere (macOS, Windows)
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=initargs)
        else:
            _init_worker(*initargs)

    def map(self, fn: Callable, tasks: Iterator[tuple]) -> Iterator[tuple[Any, tuple]]:
        if self.pool is None:
            for t in tasks:
                yield fn(t[0]), t
            return
        pending: collections.deque = collections.deque()
        for t in tasks:
            pending.append((self.pool.apply_async(fn, (t[0],)), t))
            while len(pending) >= 2 * self.workers:
                res, t0 = pending.popleft()
                yield res.get(), t0
        while pending:
            res, t0 = pending.popleft()
            yield res.get(), t0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# --------------------------------------------------------------------------- shard writers


class _SplitWriter:
    """Appends one split's token stream to shards of at most `shard_tokens` tokens, inserting
    `<|endoftext|>` between documents, and keeps the counts a checkpoint needs."""

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
        self.last_doc: int = st.get("last_doc", -1)
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

    def add(self, doc: int, tokens: np.ndarray, n_bytes: int) -> None:
        """Append a piece of document `doc` (a new document or the continuation of the last)."""
        self.bytes += n_bytes
        if not len(tokens):
            return
        if doc != self.last_doc:
            if self.documents:
                self._write(np.array([self.eot], dtype=self.dtype))
            self.documents += 1
            self.last_doc = doc
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
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
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
        elif self._f is not None:
            self._f.close()
            self._f = None
        keep = {s["file"] for s in self.shards}
        for stray in self.directory.glob(f"{self.split}-*.bin"):  # left by an interrupted run
            if stray.name not in keep:
                stray.unlink()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def state(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "cur_tokens": self.cur_tokens,
            "documents": self.documents,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "last_doc": self.last_doc,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "shards": self.shards,
        }


def _atomic_json(path: Path, obj: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- prepare


class _Stop(Exception):
    """Raised by the test hook that simulates an interruption."""


def _resolve_tokenizer(
    name: str, sources: list[Source], cfg: dict[str, Any], workers: int, on_event
) -> Any:
    if name != "char":
        return get_tokenizer(name)
    # A char vocabulary is every character of the corpus: one streaming pass to collect them.
    pool = _Pool(workers, (None, "uint32", cfg["text_field"]))
    chars: set[str] = set()
    start = {"src": 0, "offset": 0, "line": 0, "doc": 0}
    try:
        for res, _ in pool.map(_chars_task, _tasks(sources, start, cfg)):
            chars |= res["chars"]
    finally:
        pool.close()
    if not chars:
        raise GptlabError("the inputs hold no text to build a char tokenizer from")
    on_event({"event": "chars", "n_chars": len(chars)})
    return CharTokenizer(chars)


def prepare(
    inputs: list[str],
    out: str | Path,
    tokenizer: str = "gpt2",
    *,
    text_field: str = "text",
    val_ratio: float = 0.1,
    seed: int = 1337,
    workers: int | None = None,
    skip_bad: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    doc_separator: str | None = None,
    hf_split: str = "train",
    hf_config: str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_seconds: float = 5.0,
    _stop_after_tasks: int | None = None,
) -> dict[str, Any]:
    """Tokenize `inputs` into token shards in `out`; returns the manifest (see module doc).

    `tokenizer` is gpt2, char or the path of a trained tokenizer.json. `workers` tokenizer
    processes (default: all cores; 1 runs in this process). A directory holding an unfinished
    preparation with the same inputs and settings is continued; a finished one is returned
    as it is. `on_event(record)` receives "start", "progress", "shard" and "end" records.
    `_stop_after_tasks` (tests) stops abruptly after that many tasks, as a crash would.
    """
    on_event = on_event or (lambda record: None)
    if not 0.0 <= val_ratio < 1.0:
        raise GptlabError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    if shard_tokens < 1:
        raise GptlabError(f"--shard-tokens must be 1 or more, got {shard_tokens}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise GptlabError(f"--workers must be 1 or more, got {workers}")
    if doc_separator == "":
        raise GptlabError("--doc-separator is empty; give the text that separates documents")
    sources = expand_inputs(inputs)
    out = Path(out).expanduser()
    settings = {
        "inputs": [asdict(s) for s in sources],
        "tokenizer": tokenizer,
        "text_field": text_field,
        "doc_separator": doc_separator,
        "val_ratio": val_ratio,
        "seed": seed,
        "shard_tokens": shard_tokens,
        "skip_bad": skip_bad,
        "hf_split": hf_split,
        "hf_config": hf_config,
    }
    cfg = {k: settings[k] for k in ("text_field", "doc_separator", "hf_split", "hf_config")}

    progress_path, manifest_path = out / PROGRESS, out / MANIFEST
    if manifest_path.is_file():
        manifest = read_manifest(out)
        _check_same(out, manifest.get("settings", {}), settings, finished=True)
        if tokenizer != "char" and manifest["tokenizer"] != get_tokenizer(tokenizer).identity():
            raise GptlabError(
                f"{str(out)!r} was prepared with another version of tokenizer {tokenizer!r}; "
                "choose another --out or delete it"
            )
        on_event({"event": "finished_already", "manifest": manifest})
        return manifest
    progress = None
    if progress_path.is_file():
        try:
            progress = json.loads(progress_path.read_text(encoding="utf-8"))
        except ValueError:
            raise GptlabError(
                f"{str(progress_path)!r} is damaged; delete {str(out)!r} and prepare again"
            ) from None
        _check_same(out, progress["settings"], settings, finished=False)
    elif out.is_dir() and any(out.iterdir()):
        raise GptlabError(
            f"{str(out)!r} is not empty and holds no preparation; choose an empty or new --out"
        )

    if progress is not None:
        tok = from_identity(progress["tokenizer"])
        if tokenizer != "char" and progress["tokenizer"] != get_tokenizer(tokenizer).identity():
            raise GptlabError(
                f"tokenizer {tokenizer!r} changed since the interrupted preparation in "
                f"{str(out)!r}; delete it or choose another --out"
            )
    else:
        tok = _resolve_tokenizer(tokenizer, sources, cfg, workers, on_event)
    identity = tok.identity()
    dtype = np.dtype(np.uint16 if tok.n_vocab <= 65536 else np.uint32)
    out.mkdir(parents=True, exist_ok=True)

    pos = progress["position"] if progress else {"src": 0, "offset": 0, "line": 0, "doc": 0}
    skipped = progress["skipped"] if progress else {"count": 0, "examples": []}
    writers = {
        s: _SplitWriter(
            out, s, dtype, shard_tokens, tok.eot_token, progress["splits"][s] if progress else None
        )
        for s in SPLITS
    }
    total_bytes = sum(s.bytes for s in sources)
    done_bytes = sum(s.bytes for s in sources[: pos["src"]]) + (
        pos["offset"] if pos["src"] < len(sources) and sources[pos["src"]].kind != "parquet" else 0
    )

    def checkpoint(position: dict[str, int]) -> None:
        for w in writers.values():
            w.sync()
        _atomic_json(
            progress_path,
            {
                "settings": settings,
                "tokenizer": identity,
                "position": position,
                "splits": {s: w.state() for s, w in writers.items()},
                "skipped": skipped,
            },
        )

    on_event(
        {
            "event": "start",
            "resumed": progress is not None,
            "total_bytes": total_bytes,
            "done_bytes": done_bytes,
            "tokens": sum(w.tokens for w in writers.values()),
            "workers": workers,
            "dtype": dtype.name,
            "n_vocab": tok.n_vocab,
        }
    )
    if progress is None:
        checkpoint(pos)
    pool = _Pool(workers, (identity, dtype.name, text_field))
    last_ckpt = time.monotonic()
    completed = False
    try:
        for n_task, (res, (_, after, consumed)) in enumerate(
            pool.map(_run_task, _tasks(sources, pos, cfg)), start=1
        ):
            for src, where, message, skippable in res["errors"]:
                where_text = _where(sources[src], where)
                if not (skip_bad and skippable):
                    hint = "; fix it or pass --skip-bad to skip such records" if skippable else ""
                    raise GptlabError(f"{where_text}: {message}{hint}")
                skipped["count"] += 1
                if len(skipped["examples"]) < MAX_EXAMPLES:
                    skipped["examples"].append(f"{where_text}: {message}")
            val = document_split(seed, res["docs"], val_ratio).tolist()
            ends = np.cumsum(res["lengths"]).tolist()
            tokens, n_bytes = res["tokens"], res["bytes"].tolist()
            for k, (doc, n) in enumerate(
                zip(res["docs"].tolist(), res["lengths"].tolist(), strict=True)
            ):
                w = writers["val" if val[k] else "train"]
                w.add(doc, tokens[ends[k] - n : ends[k]], n_bytes[k])
            done_bytes += consumed
            if _stop_after_tasks is not None and n_task >= _stop_after_tasks:
                raise _Stop
            closed = sum(w.shards_closed for w in writers.values())
            if closed or time.monotonic() - last_ckpt >= checkpoint_seconds:
                checkpoint(after)
                last_ckpt = time.monotonic()
                for s, w in writers.items():
                    if w.shards_closed:
                        on_event({"event": "shard", "split": s, "shards": len(w.shards)})
                    w.shards_closed = 0
            on_event(
                {
                    "event": "progress",
                    "done_bytes": done_bytes,
                    "total_bytes": total_bytes,
                    "tokens": sum(w.tokens for w in writers.values()),
                    "documents": sum(w.documents for w in writers.values()),
                }
            )
        completed = True
    except _Stop:
        return {}
    finally:
        pool.close()
        if not completed:  # the checkpoint in progress.json is what a re-run continues from
            for w in writers.values():
                w.close()

    for w in writers.values():
        w.finish()
    import gptlab

    manifest = {
        "format": PREPARED_FORMAT,
        "version": FORMAT_VERSION,
        "gptlab_version": gptlab.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": identity,
        "tokenizer_name": tokenizer,
        "n_vocab": tok.n_vocab,
        "eot_token": tok.eot_token,
        "dtype": dtype.name,
        "seed": seed,
        "val_ratio": val_ratio,
        "settings": settings,
        "splits": {s: w.summary() for s, w in writers.items()},
        "skipped": skipped,
    }
    _atomic_json(manifest_path, manifest)
    progress_path.unlink(missing_ok=True)
    on_event({"event": "end", "manifest": manifest})
    return manifest


def _where(src: Source, where: int) -> str:
    if src.kind == "jsonl":
        return f"{src.name}:{where}"
    if src.kind == "text":
        return f"{src.name}: byte {where}"
    if src.kind == "hf":
        return f"hf:{src.name}: row {where}"
    return f"{src.name}: row {where}"


def _check_same(out: Path, old: dict[str, Any], new: dict[str, Any], finished: bool) -> None:
    what = "a finished" if finished else "an unfinished"
    for key in new:
        if old.get(key) != new[key]:
            detail = "inputs changed on disk or differ" if key == "inputs" else f"{key} differs"
            raise GptlabError(
                f"{str(out)!r} holds {what} preparation with other settings ({detail}); "
                "use another --out, or delete it to start over"
            )


def verify(directory: str | Path) -> list[str]:
    """Re-hash every shard of a prepared directory; returns the problems found (empty: fine)."""
    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    problems = []
    for split in SPLITS:
        for sh in manifest["splits"][split]["shards"]:
            path = directory / sh["file"]
            h = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
            except OSError as e:
                problems.append(f"{sh['file']}: {e.strerror}")
                continue
            if h.hexdigest() != sh["sha256"]:
                problems.append(f"{sh['file']}: checksum differs from the manifest")
    return problems


def iter_texts(
    inputs: list[str],
    text_field: str = "text",
    doc_separator: str | None = None,
    skip_bad: bool = False,
    hf_split: str = "train",
    hf_config: str | None = None,
) -> Iterator[str]:
    """The texts of `inputs` as `prepare` reads them (long documents in pieces), streamed in
    this process: what `gptlab tokenizer train` learns from."""
    sources = expand_inputs(inputs)
    cfg = {
        "text_field": text_field,
        "doc_separator": doc_separator,
        "hf_split": hf_split,
        "hf_config": hf_config,
    }
    _init_worker(None, "uint32", text_field)
    start = {"src": 0, "offset": 0, "line": 0, "doc": 0}
    for task, _, _ in _tasks(sources, start, cfg):
        _, texts, errors = _texts_of(task)
        for src, where, message, skippable in errors:
            if not (skip_bad and skippable):
                hint = "; fix it or pass --skip-bad to skip such records" if skippable else ""
                raise GptlabError(f"{_where(sources[src], where)}: {message}{hint}")
        yield from texts
