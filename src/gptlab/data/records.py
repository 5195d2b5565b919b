"""Records: JSON objects read from a file or a Hugging Face dataset, the one reader behind
finetune data and task items; corpora (sources.py) stream through the same helpers.

A source is `hf:NAME[:CONFIG][@SPLIT]` (a Hugging Face dataset; needs `datasets` and the
network; inline parts win over `--hf-split`, `--hf-config`), a `.parquet` file (one record a
row; needs `pyarrow`), or any other file: one JSON array when its text starts with `[`, else
one JSON object per line (.jsonl), blank lines skipped. Every problem is one line naming its
place: `FILE:LINE`, `FILE[I]` (an array's record), `FILE: row I` or `hf:NAME: row I`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError

Record = tuple[str, dict[str, Any]]  # (where, the JSON object)


class BadRecord(ValueError):
    """A record's problem, said without its place: the caller names the file and line."""


def as_object(record: Any) -> dict[str, Any]:
    """`record` when it is a JSON object (a dict); BadRecord otherwise."""
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(record).__name__}")
    return record


def parse_record(raw: str | bytes) -> dict[str, Any]:
    """The JSON object on one .jsonl line; BadRecord when it is malformed or not an object."""
    try:
        record = json.loads(raw)
    except ValueError as e:  # a JSONDecodeError, or a UnicodeDecodeError from bytes
        raise BadRecord(f"malformed JSON ({e})") from None
    return as_object(record)


def parquet_file(path: str | Path, column: str | None = None):
    """pyarrow's ParquetFile at `path`, checked to hold `column` (the text field) when given."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GptlabError(
            f"{str(path)!r}: reading .parquet needs the `pyarrow` package: pip install pyarrow"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError kinds
        raise GptlabError(f"{str(path)!r} is not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if column is not None and column not in names:
        raise GptlabError(
            f"{str(path)!r} has no column {column!r} (columns: {', '.join(names[:8])}); "
            "choose one with --text-field"
        )
    return pf


def hf_spec(source: str, split: str, config: str | None = None) -> tuple[str, str | None, str]:
    """(name, configuration, split) of `hf:NAME[:CONFIG][@SPLIT]`, defaulting to the args."""
    rest, _, inline_split = source.removeprefix("hf:").partition("@")
    name, _, inline_config = rest.partition(":")
    if not name:
        raise GptlabError("hf: needs a dataset name, e.g. hf:roneneldan/TinyStories")
    return name, inline_config or config, inline_split or split


def hf_rows(
    source: str, split: str, config: str | None = None, skip: int = 0, streaming: bool = True
) -> Iterator[Any]:
    """The rows of the Hugging Face dataset `source` (see `hf_spec`) from row `skip` on,
    streamed or downloaded first; any failure of the library is one GptlabError line."""
    name, config, split = hf_spec(source, split, config)
    try:
        import datasets
    except ImportError:
        raise GptlabError(
            f"hf:{name} needs the `datasets` package: pip install datasets (and the network)"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
        if skip:
            ds = ds.skip(skip)
        yield from ds
    except GptlabError:
        raise
    except Exception as e:  # offline, unknown name, gated: the library has many exception kinds
        first = (str(e).splitlines() or [""])[0][:160]
        raise GptlabError(
            f"cannot read Hugging Face dataset {name!r} ({type(e).__name__}: {first}); check "
            "hf:NAME[:CONFIG][@SPLIT] (or --hf-split, --hf-config) and the network (offline "
            "machines cannot use hf:)"
        ) from None


def read_records(
    source: str | Path, split: str = "train", config: str | None = None
) -> list[Record]:
    """(where, record) for every record of `source` (see the module doc), in order; a
    missing file, a bad record and no records are GptlabErrors naming the place."""
    source = str(source)
    if source.startswith("hf:"):
        rows = hf_rows(source, split, config, streaming=False)
        records = _objects((f"{source}: row {i}", r) for i, r in enumerate(rows))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise GptlabError(
                f"{source!r} not found; give a .jsonl, .json or .parquet file of records, "
                "or hf:NAME"
            )
        if path.suffix.lower() == ".parquet":
            rows = parquet_file(path).read().to_pylist()
            records = _objects((f"{path}: row {i}", r) for i, r in enumerate(rows))
        else:
            records = _json_records(path)
    if not records:
        raise GptlabError(f"{source!r} holds no records; give one JSON object per line")
    return records


def _objects(rows: Iterable[tuple[str, Any]]) -> list[Record]:
    out = []
    for where, row in rows:
        try:
            out.append((where, as_object(row)))
        except BadRecord as e:
            raise GptlabError(f"{where}: {e}; fix or remove that record") from None
    return out


def _json_records(path: Path) -> list[Record]:
    """The records of a JSON array file or a .jsonl file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(f"{path}: byte {e.start}: is not UTF-8 text; save it as UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise GptlabError(
                f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix it, or write one record "
                "per line (.jsonl)"
            ) from None
        return _objects((f"{path}[{i}]", r) for i, r in enumerate(items))
    out = []
    for n, line in enumerate(text.split("\n"), start=1):  # JSON Lines: lines end at \n only
        if line.strip():
            try:
                out.append((f"{path}:{n}", parse_record(line)))
            except BadRecord as e:
                raise GptlabError(f"{path}:{n}: {e}; fix or remove that line") from None
    return out


def detect_format(
    records: Sequence[Record], formats: Mapping[str, Collection[str]], flag: str
) -> str:
    """The first of `formats` (name -> the fields that tell it) whose fields the first record
    has; else a GptlabError naming the record, the formats and `flag`, which names one."""
    where, record = records[0]
    for name, fields in formats.items():
        if all(f in record for f in fields):
            return name
    known = "; ".join(f"{name} ({', '.join(fields)})" for name, fields in formats.items())
    raise GptlabError(
        f"{where}: cannot tell the format from its fields {sorted(record)}; records of "
        f"{known} are known, or name the format with {flag}"
    )
