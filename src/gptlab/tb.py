"""An optional TensorBoard view of a run, fed from the same records as metrics.jsonl.

metrics.jsonl stays the single source: `TensorBoardWriter` is one more `on_event` consumer
during training (`gptlab train --tensorboard`), and `write_run` replays a finished run's
metrics.jsonl into event files (`gptlab plot --tensorboard`). Needs the `tensorboard` package,
which gptlab does not require.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError
from gptlab.metrics import read_metrics

TRAIN_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mib")


class TensorBoardWriter:
    """Writes metrics records as TensorBoard scalars and text under `log_dir`.

    `purge_step` (a resumed run's step) drops events a previous attempt logged after it,
    as the trainer does with metrics.jsonl.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GptlabError(
                "--tensorboard needs the `tensorboard` package: pip install tensorboard"
            ) from None
        self.log_dir = Path(log_dir)
        self._w = SummaryWriter(str(self.log_dir), purge_step=purge_step)

    def __call__(self, record: dict[str, Any]) -> None:
        ev, step = record.get("event"), int(record.get("step", 0))
        if ev == "train":
            for key in TRAIN_SCALARS:
                if isinstance(record.get(key), (int, float)):
                    self._w.add_scalar(f"train/{key}", record[key], step)
            if "tokens" in record:
                self._w.add_scalar("train/tokens_seen", record["tokens"], step)
        elif ev == "eval":
            self._w.add_scalar("loss/train", record["train_loss"], step)
            self._w.add_scalar("loss/val", record["val_loss"], step)
        elif ev == "sample":
            self._w.add_text("sample", record["text"], step)
        elif ev == "end":
            self._w.flush()

    def close(self) -> None:
        self._w.close()


def write_run(run_dir: str | Path, log_dir: str | Path | None = None) -> Path:
    """Replay a run's metrics.jsonl into TensorBoard event files (default RUN_DIR/tensorboard);
    returns the log directory. Earlier events there are replaced."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise GptlabError(f"{str(run_dir)!r} has no metrics.jsonl: is it a gptlab run directory?")
    log_dir = Path(log_dir) if log_dir else run_dir / "tensorboard"
    writer = TensorBoardWriter(log_dir, purge_step=0)
    for record in read_metrics(path):
        writer(record)
    writer.close()
    return log_dir
