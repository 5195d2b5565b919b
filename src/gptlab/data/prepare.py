"""`gptlab prepare`: corpora bigger than memory, tokenized in parallel into token shards.

The output directory holds manifest.json (tokenizer identity, dtype, settings, how the split
was made; per split its documents, pieces, tokens, bytes and shards with SHA-256 checksums),
train-000000.bin ... and val-000000.bin ... (raw token ids, uint16 or uint32 when ids exceed
65,535, at most `shard_tokens` each) and, only while unfinished, progress.json.

The split's unit is a piece: a document, or a part of a long one (cuts.py). By default
pieces are sized so that validation gets about ten of at least 256 bytes: a 20 KB story is
cut into paragraphs, while the documents of a large corpus stay whole. Piece n goes to
validation by a golden-ratio sequence started by the seed (PIECE_RULE), which spreads
evenly (at val_ratio 0.1 any 13 consecutive pieces hold one) and depends on nothing but the
inputs and the seed. Within a split, consecutive pieces of a document are joined as they
were; anything else is separated by `<|endoftext|>`, as `load_corpus` joins documents.

Documents are streamed in chunks that tokenize exactly as the whole; the main process reads
and writes while worker processes tokenize, a few batches in flight, so memory stays
bounded. Progress is checkpointed at batch boundaries (shards fsynced, then progress.json
replaced atomically); a re-run truncates the open shards to the checkpoint and continues
from the recorded input position, byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from gptlab import __version__
from gptlab.atomic import write_json
from gptlab.data.shards import MANIFEST, PREPARED_FORMAT, PROGRESS, ShardWriter, read_manifest
from gptlab.data.sources import (
    START,
    Chunk,
    Source,
    decode_chunks,
    expand_inputs,
    raise_bad,
    read_chunks,
    reader_config,
)
from gptlab.data.tokenizer import ENDOFTEXT, CharTokenizer, from_identity, get_tokenizer
from gptlab.errors import GptlabError

FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 24  # 16M tokens: 32 MiB per uint16 shard
BATCH_BYTES = 1 << 20  # a worker task holds about this much text
MAX_EXAMPLES = 10  # skipped records named in the manifest
VAL_PIECES = 10  # the default piece size gives validation about this many pieces ...
AUTO_MIN_PIECE_BYTES = 256  # ... but no smaller than this: about a paragraph
GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio
_MASK = (1 << 64) - 1
PIECE_CUT = (
    "a document longer than piece_bytes is cut at the first paragraph break at least "
    "piece_bytes into the piece, else the first line break at least 2x, else the first "
    "space at least 3x; 0: documents whole"
)
PIECE_RULE = (
    "piece n (from 0, over all inputs) goes to validation when "
    "(splitmix64(seed) + n * 0x9E3779B97F4A7C15) mod 2**64 < val_ratio * 2**64"
)


def auto_piece_bytes(sources: list[Source], val_ratio: float) -> int:
    """The default piece size: about VAL_PIECES validation pieces of at least
    AUTO_MIN_PIECE_BYTES; 0 (whole) without validation or when an input's size is unknown."""
    if val_ratio == 0 or any(s.kind in ("hf", "builtin") for s in sources):
        return 0
    total = sum(s.bytes for s in sources)
    return max(AUTO_MIN_PIECE_BYTES, math.ceil(total * val_ratio / VAL_PIECES))


def _splitmix64(x: int) -> int:
    z = (x + GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def piece_split(seed: int, pieces: np.ndarray, val_ratio: float) -> np.ndarray:
    """True where piece n goes to validation (PIECE_RULE, in exact 64-bit arithmetic); its
    low discrepancy gives even a few pieces a validation share."""
    offset = np.uint64(_splitmix64(seed & _MASK))
    threshold = np.uint64(min(int(val_ratio * 2.0**64), _MASK))
    with np.errstate(over="ignore"):
        x = offset + np.asarray(pieces, dtype=np.uint64) * np.uint64(GOLDEN)
    return x < threshold


def _tasks(
    sources: list[Source], pos: dict[str, int], cfg: dict[str, Any]
) -> Iterator[tuple[list[Chunk], dict[str, int], int]]:
    """Batches of chunks for the workers: (chunks, position after them, input bytes read)."""
    chunks: list[Chunk] = []
    size = consumed = 0
    cur = pos
    for chunk, after, n in read_chunks(sources, pos, cfg):
        cur = after
        consumed += n
        if chunk is None:
            continue
        chunks.append(chunk)
        size += len(chunk.payload) if chunk.kind in "tsj" else BATCH_BYTES
        if size >= BATCH_BYTES:
            yield chunks, dict(cur), consumed
            chunks, size, consumed = [], 0, 0
    if chunks or consumed:
        yield chunks, dict(cur), consumed


_WORKER: dict[str, Any] = {}


def _init_worker(identity: dict[str, Any] | None, dtype: str, cfg: dict[str, Any]) -> None:
    # each worker is one process; the tokenizers library must not start its own threads here
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(
        tokenizer=from_identity(identity) if identity else None, dtype=np.dtype(dtype), cfg=cfg
    )


def _run_task(task: list[Chunk]) -> dict[str, Any]:
    """One task's texts' tokens concatenated, with per-text lengths, documents and pieces."""
    d = decode_chunks(task, _WORKER["cfg"])
    tok, dtype = _WORKER["tokenizer"], _WORKER["dtype"]
    arrays = [np.array(tok.encode(t, allowed_special={ENDOFTEXT}), dtype=dtype) for t in d.texts]
    return {
        "docs": np.asarray(d.docs, dtype=np.int64),
        "new_piece": np.asarray(d.new_piece, dtype=bool),
        "lengths": np.array([len(a) for a in arrays], dtype=np.int64),
        "bytes": np.array([len(t.encode("utf-8")) for t in d.texts], dtype=np.int64),
        "tokens": np.concatenate(arrays) if arrays else np.empty(0, dtype),
        "errors": d.errors,
    }


def _chars_task(task: list[Chunk]) -> dict[str, Any]:
    """The characters of one task's documents (the first pass of a char tokenizer)."""
    d = decode_chunks(task, _WORKER["cfg"])
    chars: set[str] = {c for t in d.texts for c in t.replace(ENDOFTEXT, "")}
    return {"chars": chars, "errors": d.errors}


class _Pool:
    """Runs tasks in worker processes (or this one when workers == 1), yielding results in
    order with at most `2 * workers` tasks in flight."""

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
            yield from ((fn(t[0]), t) for t in tasks)
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
    piece_bytes: int | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_seconds: float = 5.0,
    _stop_after_tasks: int | None = None,
) -> dict[str, Any]:
    """Tokenize `inputs` into token shards in `out`; returns the manifest (see module doc).

    `tokenizer`: gpt2, char or a trained tokenizer.json. `workers`: default all cores, 1 runs
    here. `piece_bytes`: None sizes it from the inputs, 0 keeps documents whole. An unfinished
    preparation with the same settings is continued, a finished one returned. `on_event` gets
    "start", "progress", "shard" and "end" records. `_stop_after_tasks` (tests) stops as a
    crash would.
    """
    on_event = on_event or (lambda record: None)
    workers = workers or os.cpu_count() or 1
    _check_arguments(val_ratio, shard_tokens, workers)
    sources = expand_inputs(inputs)
    if piece_bytes is None:
        piece_bytes = auto_piece_bytes(sources, val_ratio)
    cfg = reader_config(text_field, doc_separator, hf_split, hf_config, piece_bytes)
    settings = {"inputs": [asdict(s) for s in sources], "tokenizer": tokenizer, **cfg}
    settings.update(val_ratio=val_ratio, seed=seed, shard_tokens=shard_tokens, skip_bad=skip_bad)
    out = Path(out).expanduser()
    finished, progress = _existing(out, settings, tokenizer)
    if finished is not None:
        on_event({"event": "finished_already", "manifest": finished})
        return finished
    if progress is not None:
        tok = from_identity(progress["tokenizer"])
    else:
        tok = _resolve_tokenizer(tokenizer, sources, cfg, workers, on_event)
    out.mkdir(parents=True, exist_ok=True)
    job = _Job(out, settings, sources, cfg, tok, progress)
    on_event(job.start_record(workers))
    if progress is None:
        job.checkpoint(job.position)
    if not _run(job, workers, on_event, checkpoint_seconds, _stop_after_tasks):
        return {}
    manifest = job.finish()
    on_event({"event": "end", "manifest": manifest})
    return manifest


def _check_arguments(val_ratio: float, shard_tokens: int, workers: int) -> None:
    # piece_bytes is checked by reader_config
    if not 0.0 <= val_ratio < 1.0:
        raise GptlabError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    if shard_tokens < 1:
        raise GptlabError(f"--shard-tokens must be 1 or more, got {shard_tokens}")
    if workers < 1:
        raise GptlabError(f"--workers must be 1 or more, got {workers}")


def _existing(
    out: Path, settings: dict[str, Any], tokenizer: str
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the manifest of a finished preparation in `out`, the progress of an unfinished one),
    each checked against `settings`; (None, None) for a new or empty directory."""
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        _check_same(out, manifest.get("settings", {}), settings, finished=True)
        if tokenizer != "char" and manifest["tokenizer"] != get_tokenizer(tokenizer).identity():
            raise GptlabError(
                f"{str(out)!r} was prepared with another version of tokenizer {tokenizer!r}; "
                "choose another --out or delete it"
            )
        return manifest, None
    progress_path = out / PROGRESS
    if not progress_path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise GptlabError(
                f"{str(out)!r} is not empty and holds no preparation; choose an empty or new --out"
            )
        return None, None
    try:
        progress = json.loads(progress_path.read_text(encoding="utf-8"))
    except ValueError:
        raise GptlabError(
            f"{str(progress_path)!r} is damaged; delete {str(out)!r} and prepare again"
        ) from None
    _check_same(out, progress["settings"], settings, finished=False)
    if tokenizer != "char" and progress["tokenizer"] != get_tokenizer(tokenizer).identity():
        raise GptlabError(
            f"tokenizer {tokenizer!r} changed since the interrupted preparation in "
            f"{str(out)!r}; delete it or choose another --out"
        )
    return None, progress


def _resolve_tokenizer(
    name: str, sources: list[Source], cfg: dict[str, Any], workers: int, on_event
) -> Any:
    if name != "char":
        return get_tokenizer(name)
    # A char vocabulary is every character of the corpus: one streaming pass to collect them.
    pool = _Pool(workers, (None, "uint32", cfg))
    chars: set[str] = set()
    try:
        for res, _ in pool.map(_chars_task, _tasks(sources, START, cfg)):
            chars |= res["chars"]
    finally:
        pool.close()
    if not chars:
        raise GptlabError("the inputs hold no text to build a char tokenizer from")
    on_event({"event": "chars", "n_chars": len(chars)})
    return CharTokenizer(chars)


class _Job:
    """One preparation under way: settings, tokenizer, the split writers, the input position
    and counters. `checkpoint` saves what a re-run continues from; `finish` the manifest."""

    def __init__(self, out, settings, sources, cfg, tok, progress: dict[str, Any] | None):
        self.out, self.settings, self.sources, self.cfg, self.tok = out, settings, sources, cfg, tok
        self.identity = tok.identity()
        self.dtype = np.dtype(np.uint16 if tok.n_vocab <= 65536 else np.uint32)
        p = progress or {}
        self.resumed = progress is not None
        self.position: dict[str, int] = p.get("position", dict(START))
        self.skipped: dict[str, Any] = p.get("skipped", {"count": 0, "examples": []})
        self.pieces: int = p.get("pieces", 0)  # pieces begun so far, over all inputs
        args = (self.dtype, settings["shard_tokens"], tok.eot_token)
        self.writers = {s: ShardWriter(out, s, *args, p.get("splits", {}).get(s)) for s in SPLITS}
        self.total_bytes = sum(s.bytes for s in sources)
        pos = self.position
        self.done_bytes = sum(s.bytes for s in sources[: pos["src"]])
        if pos["src"] < len(sources) and sources[pos["src"]].kind != "parquet":
            self.done_bytes += pos["offset"]

    def write(self, res: dict[str, Any], consumed: int) -> None:
        """Add one task's result: skip or raise its errors, assign its pieces to the splits."""
        for message in raise_bad(self.sources, res["errors"], self.settings["skip_bad"]):
            self.skipped["count"] += 1
            if len(self.skipped["examples"]) < MAX_EXAMPLES:
                self.skipped["examples"].append(message)
        pieces = self.pieces + np.cumsum(res["new_piece"], dtype=np.int64) - 1
        self.pieces += int(res["new_piece"].sum())
        val = piece_split(self.settings["seed"], pieces, self.settings["val_ratio"]).tolist()
        ends = np.cumsum(res["lengths"]).tolist()
        tokens, n_bytes, lengths = res["tokens"], res["bytes"].tolist(), res["lengths"].tolist()
        for k, (doc, piece) in enumerate(zip(res["docs"].tolist(), pieces.tolist(), strict=True)):
            w = self.writers["val" if val[k] else "train"]
            w.add(doc, piece, tokens[ends[k] - lengths[k] : ends[k]], n_bytes[k])
        self.done_bytes += consumed

    def checkpoint(self, position: dict[str, int]) -> None:
        for w in self.writers.values():
            w.sync()
        self.position = position
        state = {
            "settings": self.settings,
            "tokenizer": self.identity,
            "position": position,
            "pieces": self.pieces,
            "splits": {s: w.state() for s, w in self.writers.items()},
            "skipped": self.skipped,
        }
        write_json(self.out / PROGRESS, state, indent=1)

    def start_record(self, workers: int) -> dict[str, Any]:
        return {
            "event": "start",
            "resumed": self.resumed,
            "total_bytes": self.total_bytes,
            "done_bytes": self.done_bytes,
            "tokens": self.tokens(),
            "workers": workers,
            "dtype": self.dtype.name,
            "n_vocab": self.tok.n_vocab,
        }

    def progress_record(self) -> dict[str, Any]:
        return {
            "event": "progress",
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "tokens": self.tokens(),
            "documents": sum(w.documents for w in self.writers.values()),
        }

    def tokens(self) -> int:
        return sum(w.tokens for w in self.writers.values())

    def close(self) -> None:
        for w in self.writers.values():
            w.close()

    def finish(self) -> dict[str, Any]:
        """Close the shards, write manifest.json, drop progress.json; returns the manifest."""
        for w in self.writers.values():
            w.finish()
        s = self.settings
        manifest = {
            "format": PREPARED_FORMAT,
            "version": FORMAT_VERSION,
            "gptlab_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tokenizer": self.identity,
            "tokenizer_name": s["tokenizer"],
            "n_vocab": self.tok.n_vocab,
            "eot_token": self.tok.eot_token,
            "dtype": self.dtype.name,
            "seed": s["seed"],
            "val_ratio": s["val_ratio"],
            "split": {
                "unit": "piece",
                "piece_bytes": s["piece_bytes"],
                "pieces": self.pieces,
                "cut": PIECE_CUT,
                "rule": PIECE_RULE,
            },
            "settings": s,
            "splits": {name: w.summary() for name, w in self.writers.items()},
            "skipped": self.skipped,
        }
        write_json(self.out / MANIFEST, manifest, indent=1)
        (self.out / PROGRESS).unlink(missing_ok=True)
        return manifest


def _run(
    job: _Job, workers: int, on_event, checkpoint_seconds: float, stop_after: int | None
) -> bool:
    """Read, tokenize in the workers, write, checkpoint; False when stopped by `stop_after`
    (as a crash would, leaving only the last checkpoint)."""
    pool = _Pool(workers, (job.identity, job.dtype.name, job.cfg))
    last_ckpt = time.monotonic()
    completed = False
    try:
        tasks = _tasks(job.sources, job.position, job.cfg)
        for n_task, (res, (_, after, consumed)) in enumerate(pool.map(_run_task, tasks), start=1):
            job.write(res, consumed)
            if stop_after is not None and n_task >= stop_after:
                return False
            closed = sum(w.shards_closed for w in job.writers.values())
            if closed or time.monotonic() - last_ckpt >= checkpoint_seconds:
                job.checkpoint(after)
                last_ckpt = time.monotonic()
                for s, w in job.writers.items():
                    if w.shards_closed:
                        on_event({"event": "shard", "split": s, "shards": len(w.shards)})
                    w.shards_closed = 0
            on_event(job.progress_record())
        completed = True
    finally:
        pool.close()
        if not completed:  # the checkpoint in progress.json is what a re-run continues from
            job.close()
    return True


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
