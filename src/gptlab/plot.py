"""The loss plot: training and validation loss against epochs, with tokens seen on a second
x-axis, written as `loss-plot.pdf` and `loss-plot.png`. Uses matplotlib's object API (no
pyplot state, no GUI), so it works headless and inside training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gptlab.errors import GptlabError
from gptlab.metrics import read_metrics


def plot_losses(
    epochs_seen: Sequence[float],
    tokens_seen: Sequence[float],
    train_losses: Sequence[float],
    val_losses: Sequence[float],
    out_dir: str | Path | None = ".",
) -> Figure:
    """Draw the walk-through's loss plot; save it as loss-plot.pdf/.png in `out_dir`
    (unless None) and return the figure (Jupyter displays it)."""
    fig = Figure(figsize=(5, 3))
    ax1 = fig.add_subplot()
    ax1.plot(list(epochs_seen), list(train_losses), label="Training loss")
    ax1.plot(list(epochs_seen), list(val_losses), linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    # The second x-axis shares the data: plotting invisibly aligns tokens with epochs.
    ax2 = ax1.twiny()
    ax2.plot(list(tokens_seen), list(train_losses), alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "loss-plot.pdf")
        fig.savefig(out / "loss-plot.png", dpi=150)
    return fig


def plot_run(run_dir: str | Path) -> Path:
    """Redraw a run's loss plot from its metrics.jsonl; returns the PNG's path."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise GptlabError(f"{str(run_dir)!r} has no metrics.jsonl: is it a gptlab run directory?")
    evals = [r for r in read_metrics(path) if r.get("event") == "eval"]
    if not evals:
        raise GptlabError(
            f"{str(path)!r} has no evaluations yet; train longer than train.eval_freq steps"
        )
    plot_losses(
        [r["epoch"] for r in evals],
        [r["tokens"] for r in evals],
        [r["train_loss"] for r in evals],
        [r["val_loss"] for r in evals],
        run_dir,
    )
    return run_dir / "loss-plot.png"
