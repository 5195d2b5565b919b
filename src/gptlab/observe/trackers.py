"""Experiment trackers fed the same records as metrics.jsonl: TensorBoard, Weights & Biases
and Trackio, each an optional extra (`gptlab train --tracker NAME`).

metrics.jsonl stays the single source: each tracker is one more `on_event` consumer on
rank 0 (`__call__(record)`, `close()`), logging the same names (`scalars`). A resume keeps
logging to the same tracker run, whose id RUN_DIR/trackers.json keeps.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import secrets
from pathlib import Path
from typing import Any

from gptlab.atomic import write_text
from gptlab.config.schema import tracker_names
from gptlab.errors import GptlabError
from gptlab.observe.metrics import run_records

TRAIN_SCALARS = ("loss", "lr", "muon_lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mib")
# The module each tracker imports, to tell a missing extra before training starts.
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
STATE_FILE = "trackers.json"


def _missing(name: str) -> GptlabError:
    return GptlabError(f"--tracker {name} needs its extra: pip install 'gptlab[{name}]'")


def check_installed(names: str) -> None:
    """Raise the install hint for the first tracker in `names` not installed; imports nothing."""
    for name in tracker_names(names):
        if importlib.util.find_spec(MODULES[name]) is None:
            raise _missing(name)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers by the names trackers log them under (train/loss, loss/val, ...)."""
    ev, out = record.get("event"), {}
    if ev == "train":
        out = {f"train/{k}": record[k] for k in TRAIN_SCALARS if _number(record.get(k))}
        if _number(record.get("tokens")):
            out["train/tokens_seen"] = record["tokens"]
    elif ev == "eval":
        out = {"loss/train": record["train_loss"], "loss/val": record["val_loss"]}
    elif ev == "tasks":
        if _number(record.get("core")):
            out["tasks/core"] = record["core"]
        for task, scores in (record.get("tasks") or {}).items():
            for key, v in scores.items():
                if _number(v):
                    out[f"tasks/{task}/{key}"] = v
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class TensorBoardWriter:
    """Writes records as TensorBoard scalars and text; `purge_step` drops those logged from it."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self.log_dir = Path(log_dir)
        self._w = SummaryWriter(str(self.log_dir), purge_step=purge_step)

    def __call__(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for key, value in scalars(record).items():
            self._w.add_scalar(key, value, step)
        if record.get("event") == "sample":
            self._w.add_text("sample", record["text"], step)
        elif record.get("event") == "end":
            self._w.flush()

    def close(self) -> None:
        self._w.close()


class WandbTracker:
    """Logs records to a Weights & Biases run (WANDB_MODE=offline: a local one under WANDB_DIR)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, state: dict):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        state.setdefault("id", secrets.token_hex(4))
        try:
            self._run = wandb.init(
                project=project,
                id=state["id"],
                name=run_dir.name,
                config=config,
                resume="allow",
                dir=os.environ.get("WANDB_DIR") or str(run_dir),
                # our progress bar owns the terminal: no console capture, no banner
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as e:  # no login, no network: wandb's own errors, one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise GptlabError(
                f"wandb could not start a run ({first[:200]}); run `wandb login`, or set "
                "WANDB_MODE=offline to write a local run that `wandb sync` uploads later"
            ) from None

    def __call__(self, record: dict[str, Any]) -> None:
        values: dict[str, Any] = scalars(record)
        if record.get("event") == "sample":
            values = {"sample": record["text"]}
        if values:
            self._run.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        self._run.finish()


class TrackioTracker:
    """Logs records to a local Trackio project (under TRACKIO_DIR; `trackio show` draws it)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, state: dict):
        try:
            import trackio
        except ImportError:
            raise _missing("trackio") from None
        self._trackio = trackio
        state.setdefault("name", f"{run_dir.name}-{secrets.token_hex(3)}")
        with contextlib.redirect_stdout(io.StringIO()):  # its banner would break our view
            self._run = trackio.init(
                project=project, name=state["name"], config=config, resume="allow", embed=False
            )

    def __call__(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            self._run.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self._trackio.finish()


def open_trackers(
    names: str, run_dir: str | Path, config: dict[str, Any], step: int, project: str = "gptlab"
) -> list:
    """The trackers `names` lists, started for the run in `run_dir` at `step` (0: a new run)."""
    run_dir = Path(run_dir)
    path = run_dir / STATE_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        saved = {}
    out: list = []
    try:
        for name in tracker_names(names):
            state = saved.setdefault(name, {})
            if name == "tensorboard":
                # a resume from `step` redoes what came after it (metrics.jsonl keeps <= step)
                purge = step + 1 if step else None
                out.append(TensorBoardWriter(run_dir / "tensorboard", purge_step=purge))
            elif name == "wandb":
                out.append(WandbTracker(run_dir, config, project, state))
            else:
                out.append(TrackioTracker(run_dir, config, project, state))
    except BaseException:
        for tracker in out:
            tracker.close()
        raise
    write_text(path, json.dumps(saved, indent=1))
    return out


def write_run(run_dir: str | Path, log_dir: str | Path | None = None) -> Path:
    """Replay a run's metrics.jsonl into TensorBoard files in `log_dir`, which it returns."""
    run_dir = Path(run_dir)
    records = run_records(run_dir)
    log_dir = Path(log_dir) if log_dir else run_dir / "tensorboard"
    writer = TensorBoardWriter(log_dir, purge_step=0)
    for record in records:
        writer(record)
    writer.close()
    return log_dir
