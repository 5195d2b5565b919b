"""The loss plot (training and validation loss against epochs, tokens seen on a second
x-axis: loss-plot.pdf/.png), and from metrics.jsonl alone the learning rate (lr.png),
throughput (throughput.png), task scores (tasks.png) and several runs' losses against tokens
(compare.png). matplotlib's object API (no pyplot state, no GUI) works headless."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gptlab.errors import GptlabError
from gptlab.observe.metrics import run_records


def plot_losses(
    epochs_seen: Sequence[float],
    tokens_seen: Sequence[float],
    train_losses: Sequence[float],
    val_losses: Sequence[float],
    out_dir: str | Path | None = ".",
) -> Figure:
    """The walk-through's loss plot as a figure (Jupyter displays it), also saved as
    loss-plot.pdf/.png in `out_dir` unless that is None."""
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
    if out_dir is None:
        fig.tight_layout()
    else:
        _save(fig, Path(out_dir), "loss-plot")
    return fig


class NoEvaluations(GptlabError):
    """A run with no evaluation logged yet (a command plotting several runs goes on)."""


def plot_run(run_dir: str | Path) -> Path:
    """Redraw a run's loss plot from its metrics.jsonl; returns the PNG's path."""
    run_dir = Path(run_dir)
    evals = run_records(run_dir, "eval")
    if not evals:
        path = run_dir / "metrics.jsonl"
        raise NoEvaluations(
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


def _save(fig: Figure, out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.pdf")
    fig.savefig(out_dir / f"{stem}.png", dpi=150)
    return out_dir / f"{stem}.png"


def plot_lr(run_dir: str | Path) -> Path | None:
    """The learning rate against steps, as lr.png/.pdf in the run; None without train records."""
    run_dir = Path(run_dir)
    train = [r for r in run_records(run_dir, "train") if "lr" in r]
    if not train:
        return None
    fig = Figure(figsize=(5, 3))
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set_xlabel("Step")
    ax.set_ylabel("Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _save(fig, run_dir, "lr")


def plot_throughput(run_dir: str | Path) -> Path | None:
    """Tokens/s (and MFU) against steps, as throughput.png/.pdf; None without speeds."""
    run_dir = Path(run_dir)
    train = [r for r in run_records(run_dir, "train") if r.get("tokens_per_s")]
    if not train:
        return None
    steps = [r["step"] for r in train]
    fig = Figure(figsize=(5, 3))
    ax = fig.add_subplot()
    ax.plot(steps, [r["tokens_per_s"] for r in train], label="tokens/s")
    ax.set_xlabel("Step")
    ax.set_ylabel("Tokens per second")
    if all("mfu" in r for r in train):
        # MFU is tokens/s times a constant (flops per token / peak): a second scale, not a line
        factor = 100 * train[-1]["mfu"] / train[-1]["tokens_per_s"]
        lo, hi = ax.get_ylim()
        ax2 = ax.twinx()
        ax2.set_ylim(lo * factor, hi * factor)
        ax2.set_ylabel("MFU (%)")
    return _save(fig, run_dir, "throughput")


def plot_compare(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Several runs' val loss (solid) and train loss (faint) against tokens, as compare.png."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    drawn = 0
    for n, run in enumerate(run_dirs):
        run = Path(run)
        color = f"C{n % 10}"
        train = [r for r in run_records(run, "train") if "loss" in r]
        evals = run_records(run, "eval")
        if train:
            ax.plot(
                [r["tokens"] for r in train], [r["loss"] for r in train], color=color, alpha=0.3
            )
        if evals:
            ax.plot(
                [r["tokens"] for r in evals],
                [r["val_loss"] for r in evals],
                color=color,
                label=f"{run.resolve().name} (val)",
            )
        drawn += bool(train or evals)
    if not drawn:
        raise GptlabError("none of these runs has logged a loss yet; train them longer")
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Loss (faint: training)")
    ax.legend(loc="upper right", fontsize="small")
    return _save(fig, Path(out_dir), "compare")


def plot_tasks(run_dir: str | Path) -> Path | None:
    """Task scores and the core (bold) against steps, as tasks.png; None without any."""
    run_dir = Path(run_dir)
    records = run_records(run_dir, "tasks")
    if not records:
        return None
    fig = Figure(figsize=(5, 3))
    ax = fig.add_subplot()
    steps = [r["step"] for r in records]
    names = list(dict.fromkeys(n for r in records for n in r["tasks"]))
    for name in names:
        pts = [(r["step"], r["tasks"][name]["centred"]) for r in records if name in r["tasks"]]
        ax.plot([s for s, _ in pts], [v for _, v in pts], alpha=0.6, label=name)
    ax.plot(steps, [r["core"] for r in records], color="black", linewidth=2, label="core")
    ax.axhline(0.0, color="grey", linewidth=0.5)  # chance
    ax.set_xlabel("Step")
    ax.set_ylabel("Centred score (0 = chance)")
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, run_dir, "tasks")
