"""A run's life around the loop: `train()`, what `gptlab train` does, callable from Python.

`train()` opens the data, checks the run directory, optionally starts from other weights
(`init_from`), trains with the signal handlers and trackers installed, and draws the loss
plot. Its pieces are public: `gptlab finetune` (gptlab.finetune.run) lives the same life with
another objective.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from gptlab.config.schema import RunConfig, corpus_bpe_size
from gptlab.data.corpus import open_corpus, prepared_manifest
from gptlab.data.tokenizer import BPETokenizer, from_identity
from gptlab.errors import GptlabError
from gptlab.interop.runs import Run, open_base
from gptlab.observe.plot import plot_run
from gptlab.observe.trackers import check_installed, open_trackers
from gptlab.runtime import dist as dist_lib
from gptlab.train.loop import Trainer
from gptlab.train.objectives import LanguageModeling
from gptlab.train.resolve import resolve

Notify = Callable[[dict[str, Any]], None]

# What a run writes into its directory: a new run must find none of them there.
RUN_FILES = ("config.json", "tokenizer.json", "metrics.jsonl", "loss-plot.pdf", "loss-plot.png")
# Model fields `init_from` lets the user change: they do not shape the weights.
INIT_FROM_FREE = ("drop_rate", "attention")


@dataclass
class TrainResult:
    """What `train()` leaves: where, how it ended, with which config, and the loss plot."""

    run_dir: Path
    end: dict[str, Any]  # the run's "end" record: reason, step, tokens, val_loss, checkpoint
    config: RunConfig  # as trained: the data's tokenizer and vocabulary, init_from's model
    plot: Path | None  # the loss plot's PNG (global rank 0; None when nothing was evaluated)
    is_main: bool  # global rank 0 of a torchrun job (the only one that wrote files)


def train(
    cfg: RunConfig | None = None,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    init_from: str | None = None,
    on_event: Notify | None = None,
    name: str | None = None,
    **settings: Any,
) -> TrainResult:
    """What `gptlab train` does: train `cfg` (or the `settings` of resolve()) into `out`
    (default runs/NAME-TIME) and draw its loss plot. `resume` continues the run in `out`;
    `init_from` (a gptlab run, a Hugging Face folder or hub id) starts from its weights and
    model config; `on_event` receives every record (rank 0 only). SIGINT/SIGTERM stop it
    after the current step with a checkpoint saved."""
    notify = rank0_notes(on_event)
    resolved = resolve(cfg, out=out, resume=resume, init_from=init_from, **settings)
    notify(resolved.record())
    cfg, name, model_keys = resolved.config, name or resolved.name, resolved.model_keys
    check_installed(cfg.train.trackers)  # a missing extra is said now, not after the data loads
    run_dir = new_run_dir(out, resume, name)
    source = None
    if init_from is not None:
        cfg, source = open_init_source(cfg, init_from, model_keys, notify)
    recorded = _recorded_corpus_bpe(cfg, run_dir) if resume else None
    cfg, corpus, init_weights = _open_data(cfg, source, init_from, notify, recorded)
    source = None  # init_weights holds what is needed of it
    trainer = Trainer(
        cfg,
        LanguageModeling(corpus, cfg.train.token_dropout),
        run_dir,
        resume=resume,
        on_event=on_event,
        init_weights=init_weights,
    )
    init_weights = None  # free the source's weights: the model holds them now
    return run_trainer(trainer)


def run_trainer(
    trainer: Trainer, after: Callable[[Trainer, dict[str, Any]], dict[str, Any]] | None = None
) -> TrainResult:
    """Run `trainer` to its end as the commands do (runs/latest, trackers, signals), then
    `after(trainer, end)` (the end record, amended) while the job is still up, then the plot."""
    if trainer.dist.is_main:
        point_latest(trainer.run_dir)
    trackers = []
    tc = trainer.cfg.train
    if tc.trackers and trainer.dist.is_main:
        trackers = open_trackers(
            tc.trackers,
            trainer.run_dir,
            trainer.cfg.to_dict(),
            trainer.state.step,
            tc.tracker_project,
        )
        view = trainer.on_event

        def all_of_them(record: dict[str, Any]) -> None:
            view(record)
            for tracker in trackers:
                tracker(record)

        trainer.on_event = all_of_them
    try:
        with stop_on_signals(trainer):
            end = trainer.run()
    finally:
        for tracker in trackers:
            tracker.close()
    if after is not None:
        end = after(trainer, end)
    # Only after a clean end: a rank that raised exits without waiting on the others.
    dist_lib.shutdown()
    plot = None
    if trainer.dist.is_main:
        with contextlib.suppress(GptlabError):  # no evaluation yet: no plot
            plot = plot_run(trainer.run_dir)
    return TrainResult(trainer.run_dir, end, trainer.cfg, plot, trainer.dist.is_main)


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGINT/SIGTERM ask the trainer to save and stop after its step; a second SIGINT aborts."""

    def handler(signum, frame):
        if trainer.stop_reason and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_reason = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def rank0_notes(on_event: Notify | None) -> Notify:
    """`on_event` for the notes sent before training starts, on global rank 0 only."""
    if on_event is not None and dist_lib.detect().is_main:
        return on_event
    return lambda record: None


def new_run_dir(out: str | Path | None, resume: bool, name: str) -> Path:
    """The run directory (default runs/NAME-TIME): a resume needs one, a new run a fresh one."""
    if resume and out is None:
        raise GptlabError("--resume needs --out RUN_DIR: the run to continue")
    run_dir = (
        Path(out) if out is not None else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if run_dir.exists() and not run_dir.is_dir():
        raise GptlabError(
            f"--out {str(run_dir)!r} is a file, not a directory; choose another --out"
        )
    taken = [] if resume else [name for name in RUN_FILES if (run_dir / name).exists()]
    ckpts = run_dir / "checkpoints"
    if not resume and ckpts.is_dir() and any(ckpts.iterdir()):
        taken.insert(0, "checkpoints/")
    if taken:
        raise GptlabError(
            f"{str(run_dir)!r} already holds {', '.join(taken)}, which a new run would overwrite; "
            "add --resume to continue that run, or choose another --out"
        )
    return run_dir


def point_latest(run_dir: Path) -> None:
    """Make runs/latest point at this run (failures are harmless)."""
    if run_dir.parent.name != "runs":
        return
    link = run_dir.parent / "latest"
    with contextlib.suppress(OSError):
        tmp = run_dir.parent / f".latest-{os.getpid()}"
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, link)


def open_init_source(
    cfg: RunConfig, src: str, model_keys: tuple[str, ...], notify: Notify
) -> tuple[RunConfig, Run]:
    """(cfg with the source's model config, the opened source) for `init_from` = `src`;
    of the `model_keys` the user set, only INIT_FROM_FREE may be."""
    fixed = [k for k in model_keys if k not in INIT_FROM_FREE]
    if fixed:
        raise GptlabError(
            f"--init-from takes the model config from the source; model.{fixed[0]} cannot be set "
            f"(only {', '.join('model.' + k for k in INIT_FROM_FREE)})"
        )
    notify({"event": "init_from", "source": src})
    source = open_base(src)  # a LoRA run's adapters merged in
    if source.config.model.num_classes:
        raise GptlabError(
            f"--init-from {src!r} is a classifier (gptlab finetune): it has no language-model "
            "head to start from; use its base model"
        )
    changes = {k: getattr(cfg.model, k) for k in model_keys}
    cfg = replace(cfg, model=replace(source.config.model, **changes))
    return cfg.validate(), source


def _recorded_corpus_bpe(cfg: RunConfig, run_dir: Path) -> BPETokenizer | None:
    """The tokenizer a resumed `bpe:N` run recorded (its cache may be gone), else None."""
    if corpus_bpe_size(cfg.data.tokenizer) is None:
        return None
    try:
        identity = json.loads((run_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # check_resume reports what is missing
    return from_identity(identity) if identity.get("type") == "bpe" else None


def _open_data(
    cfg: RunConfig,
    source: Run | None,
    init_from: str | None,
    notify: Notify,
    tokenizer: BPETokenizer | None = None,
):
    """(cfg completed by its data, the corpus, the function that loads the source's weights
    or None); `tokenizer` replaces the one data.tokenizer names."""
    manifest = prepared_manifest(cfg.data.source)
    tok_name = manifest["tokenizer_name"] if manifest else cfg.data.tokenizer
    notify(
        {
            "event": "loading",
            "source": cfg.data.source,
            "prepared": bool(manifest),
            "tokenizer": tok_name,
        }
    )
    cfg, corpus = open_corpus(cfg, manifest, size_vocab=source is None, tokenizer=tokenizer)
    if source is None:
        return cfg, corpus, None
    theirs, ours = source.tokenizer_identity, corpus.tokenizer.identity()
    if ours != theirs:
        kind = theirs.get("type")
        raise GptlabError(
            f"--init-from: {init_from!r} was trained with a {kind} tokenizer"
            + (" of another vocabulary" if ours.get("type") == kind else "")
            + f" but this data uses a {ours.get('type')} one; use data tokenized the same way"
        )
    weights = source.model.state_dict()

    def init_weights(model: nn.Module) -> None:
        model.load_state_dict(weights)

    return cfg, corpus, init_weights
