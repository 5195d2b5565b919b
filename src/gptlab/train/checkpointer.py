"""A run's checkpoints: when one is due, what it holds, and reading it back.

A checkpoint holds the weights the objective keeps, the optimizer, the scaler, the
`TrainState`, every RNG state and the data position: all that a bit-exact resume, or a
rollback after a non-finite streak, needs. Its files' format is gptlab.interop.checkpoint's.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gptlab.config.schema import RunConfig
from gptlab.errors import GptlabError
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.model.gpt import GPTModel
from gptlab.runtime import dist as dist_lib
from gptlab.train import budget as budget_lib
from gptlab.train.objectives import Objective
from gptlab.train.resume import check_data_layout, rng_state, set_rng_state

if TYPE_CHECKING:
    from gptlab.train.loop import Trainer

MAX_ROLLBACKS = 3  # train.on_nonfinite = "rollback" gives up (and stops) after this many
HISTORY_KEYS = ("step", "epoch", "tokens", "train_loss", "val_loss")  # one entry per evaluation


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry besides weights and optimizer."""

    step: int = 0  # optimizer steps done (a skipped non-finite step counts: its data was used)
    tokens_seen: int = 0
    train_time: float = 0.0  # seconds spent training, summed over resumes
    # train.budget = "time": the step seconds counted against the budget (a compiling first
    # step is not), how many steps they are, and the progress each step ran at (its schedule)
    budget_time: float = 0.0
    budget_steps: int = 0
    progress: list[float] = field(default_factory=list)
    bad_steps: int = 0  # consecutive non-finite steps
    skipped_steps: int = 0
    lr_scale: float = 1.0  # halved by each non-finite rollback (train.on_nonfinite = "rollback")
    rollbacks: int = 0
    best_val: float = float("inf")
    loss_ema: float = float("nan")
    history: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in HISTORY_KEYS})

    def observe_loss(self, loss: float) -> bool:
        """Fold a step's loss into the running average; True when it is well above it."""
        ema = self.loss_ema
        spike = math.isfinite(ema) and math.isfinite(loss) and loss > 1.5 * ema + 0.5
        if math.isfinite(loss):
            self.loss_ema = loss if not math.isfinite(ema) else 0.9 * ema + 0.1 * loss
        return spike


class Checkpointer:
    """Saves (every train.checkpoint_every steps and minutes) and restores a Trainer's run in
    `run_dir`/checkpoints. Every rank calls it alike; only global rank 0 writes files."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        dist: dist_lib.Dist,
        objective: Objective,
        budget: budget_lib.TimeBudget | None,
    ):
        tc = cfg.train
        self.run_dir, self.dist, self.objective, self.budget = run_dir, dist, objective, budget
        self.every, self.every_minutes = tc.checkpoint_every, tc.checkpoint_every_minutes
        self.keep_last = tc.keep_last
        self.last_time = time.monotonic()  # of the last periodic save, or the loop's start

    def start_clock(self) -> None:
        """Count train.checkpoint_every_minutes from now."""
        self.last_time = time.monotonic()

    def due(self, step: int, bad_steps: int) -> bool:
        """Whether a periodic save is due after `step` (the same on every rank)."""
        minutes_due = bool(self.every_minutes) and self.dist.any(
            time.monotonic() - self.last_time >= 60 * self.every_minutes
        )
        steps_due = bool(self.every) and step % self.every == 0
        # Not in the middle of a non-finite streak: a rollback must find good weights.
        return (steps_due or minutes_due) and not bad_steps

    def save_periodic(self, trainer: Trainer, val_loss: float | None) -> None:
        """A periodic save; one that fails (a full disk) is reported and training goes on."""
        try:
            self.save(trainer, val_loss)
        except GptlabError as e:
            trainer.emit("checkpoint_failed", error=str(e))
        self.last_time = time.monotonic()

    def save(
        self, trainer: Trainer, val_loss: float | None = None, reason: str = "periodic"
    ) -> Path:
        """Write a checkpoint and emit its record; returns its path (elsewhere than rank 0: the
        run directory)."""
        if self.dist.sharded:  # gather the shards into the single-process format
            weights, optimizer_state = dist_lib.full_state(trainer.model, trainer.optimizer)
        if not self.dist.is_main:
            return self.run_dir
        if self.dist.sharded:
            model = self._cpu_model(trainer.cfg)
            model.load_state_dict(weights)
        else:
            model, optimizer_state = trainer.model, trainer.optimizer.state_dict()
        state = self._training_state(trainer, optimizer_state)
        with trainer.average.applied():  # the run's weights are the average (train.ema)
            path = ckpt_lib.save_checkpoint(
                self.run_dir,
                trainer.state.step,
                self.objective.saved_weights(model),
                self._meta(trainer, val_loss),
                state,
                self.keep_last,
            )
        if self.budget is not None:  # the schedule train.replay_schedule replays
            budget_lib.write_schedule(self.run_dir, self.budget.seconds, trainer.state.progress)
        trainer.emit("checkpoint", path=str(path), reason=reason)
        return path

    def _meta(self, trainer: Trainer, val_loss: float | None) -> dict[str, Any]:
        return {
            "config": trainer.cfg.to_dict(),
            "tokenizer": self.objective.tokenizer.identity(),
            "data_fingerprint": self.objective.fingerprint,
            "tokens_seen": trainer.state.tokens_seen,
            "val_loss": val_loss,
        }

    @staticmethod
    def _training_state(trainer: Trainer, optimizer_state: dict[str, Any]) -> dict[str, Any]:
        t, st = trainer, trainer.state
        return {
            "optimizer": optimizer_state,
            "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else None,
            "trainer": asdict(st),
            "rng": rng_state(),
            "raw_weights": t.average.raw_weights() or None,  # train.ema: training's weights
            # Where the data stream stands: a seeded loader's order is a pure function of
            # (seed, epoch); a dataloader one adds the current epoch's drawn order.
            "data": {
                "loader": t.train_loader.state_dict(),
                "epoch": st.step // t.steps_per_epoch,
                "batch_in_epoch": st.step % t.steps_per_epoch * t.accum,
                "steps_per_epoch": t.steps_per_epoch,
                "accum": t.accum,
                "seed": t.cfg.train.seed,
                "shuffle": t.cfg.data.shuffle,
            },
            # The schedule is lr_at(step, config, total_steps): these make it reproducible.
            "schedule": {"total_steps": t.total_steps, "lr": t.optimizer.param_groups[0]["lr"]},
        }

    def load(self, trainer: Trainer, ckpt: Path) -> None:
        """Weights, optimizer, scaler, counters and RNG states from `ckpt` into `trainer`."""
        if not self.dist.sharded:
            saved = self.objective.saved_weights(trainer.model)
            keys = set(saved) if isinstance(saved, dict) else None
            ckpt_lib.load_weights(trainer.model, ckpt, trainer.device, keys)
        st = ckpt_lib.load_state(ckpt)
        try:
            data = st.get("data")
            check_data_layout(data, trainer.steps_per_epoch, trainer.accum)
            trainer.train_loader.load_state_dict((data or {}).get("loader", {}))
            if self.dist.sharded:
                self._load_sharded(trainer, ckpt, st["optimizer"])
            else:
                trainer.optimizer.load_state_dict(st["optimizer"])
            if st.get("scaler"):
                trainer.scaler.load_state_dict(st["scaler"])
            trainer.state = TrainState(**st["trainer"])
            set_rng_state(st["rng"])
            trainer.average.restore(st.get("raw_weights"))
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise GptlabError(
                f"training state in {str(ckpt)!r} does not fit this run ({str(e).splitlines()[0]}); "
                "start a new run"
            ) from None

    @staticmethod
    def _cpu_model(cfg: RunConfig) -> nn.Module:
        """An unsharded GPTModel in host memory, allocated but not initialised."""
        with torch.device("meta"):
            model = GPTModel(cfg.model)
        return dist_lib.materialize(model, torch.device("cpu"))

    def _load_sharded(self, trainer: Trainer, ckpt: Path, optimizer_state: dict[str, Any]) -> None:
        """Load a consolidated checkpoint into FSDP2 shards (rank 0 reads and broadcasts)."""
        weights: dict[str, torch.Tensor] = {}
        if self.dist.is_main:
            full = self._cpu_model(trainer.cfg)
            ckpt_lib.load_weights(full, ckpt)
            weights = full.state_dict()
        dist_lib.load_full_state(trainer.model, trainer.optimizer, weights, optimizer_state)

    def rollback(self, trainer: Trainer) -> Path | None:
        """Reload the latest checkpoint with half the learning rate; returns it, or None."""
        ckpt = ckpt_lib.latest_checkpoint(self.run_dir, missing_ok=True)
        if ckpt is None or trainer.state.rollbacks >= MAX_ROLLBACKS:
            return None
        rollbacks, lr_scale = trainer.state.rollbacks + 1, trainer.state.lr_scale * 0.5
        self.load(trainer, ckpt)
        st = trainer.state
        st.rollbacks, st.lr_scale, st.bad_steps = rollbacks, lr_scale, 0
        return ckpt
