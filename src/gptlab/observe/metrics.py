"""Run metrics: one JSON record per event in `metrics.jsonl`, the single source for plots and
summaries (so they survive crashes and resumes). Records carry an `event` ("start",
"train", "eval", "sample", "epoch", "checkpoint", "end", ...) and their `step`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gptlab.atomic import write_text
from gptlab.errors import GptlabError


class MetricsLog:
    """Appends records to a JSONL file, one flushed line each."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self._f.write(json.dumps(record, allow_nan=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file; a last line cut short by a crash is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def run_records(run_dir: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The records (only `event`'s, if given) of the run in `run_dir`; a GptlabError if none."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise GptlabError(f"{str(run_dir)!r} has no metrics.jsonl: is it a gptlab run directory?")
    return [r for r in read_metrics(path) if event is None or r.get("event") == event]


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop records logged after `step`, atomically; returns how many."""
    path = Path(path)
    if not path.exists():
        return 0
    records = read_metrics(path)
    keep = [r for r in records if r.get("step", 0) <= step]
    if len(keep) == len(records):
        return 0
    write_text(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in keep))
    return len(records) - len(keep)
