"""What a training run says about itself between evaluations: its "start" record and its
"train" records, each with the mean loss and the throughput since the one before.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from gptlab.model import lora
from gptlab.model.gpt import count_parameters
from gptlab.runtime.device import peak_memory_mib
from gptlab.train.optim import MuonAdamW

if TYPE_CHECKING:
    from gptlab.train.loop import Trainer


def start_fields(trainer: Trainer) -> dict[str, Any]:
    """The "start" record's fields: what runs, where, on what, for how long."""
    t, tc, rt = trainer, trainer.cfg.train, trainer.rt
    replay = t.budget.replay if t.budget is not None else None
    return dict(
        params=count_parameters(t.model),
        trainable=lora.count_trainable(t.model)[0],
        device=str(t.device),
        precision=rt.precision,
        compiled=rt.compiled,
        world_size=t.dist.world_size,
        parallel=t.dist.mode,
        chunked_loss=rt.chunked_loss,
        fast_dropout=rt.fast_dropout,
        host_memory=rt.host_memory,
        accum=t.accum,
        batch_tokens=t.accum * tc.batch_size * t.cfg.model.context_length,
        steps_per_epoch=t.steps_per_epoch,
        total_steps=t.total_steps,
        **t.objective.sizes(),
        budget=tc.budget,
        budget_s=tc.max_time if tc.budget == "time" else None,
        replay_steps=len(replay) if replay else None,
        threads=torch.get_num_threads(),
        peak_flops=t.peak,
        peak_source=t.peak_source,
    )


class TrainLog:
    """When a "train" record is due (every `log_every` steps, after the first and the last),
    and its fields, from the steps since the last one."""

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.reset()

    def reset(self) -> None:
        """Start a new window (after a record, or a compiling first step)."""
        self.t0, self.tokens, self.steps, self.loss = time.perf_counter(), 0, 0, 0.0

    def add(self, tokens: int, loss: float) -> None:
        """Count a step's tokens and loss in the window."""
        self.tokens += tokens
        self.steps += 1
        self.loss += loss if math.isfinite(loss) else 0.0

    def due(self, step: int, stopping: Callable[[], bool]) -> bool:
        """Whether a record is due after `step` (`stopping()` is asked last: under torchrun
        it asks every rank)."""
        return step % self.log_every == 0 or step == 1 or stopping()

    def fields(self, trainer: Trainer, loss: float, norm: float) -> dict[str, Any]:
        """The "train" record's fields after a step of `loss` and gradient norm `norm`."""
        t, st = trainer, trainer.state
        elapsed = time.perf_counter() - self.t0
        tps = self.tokens / elapsed if elapsed > 0 and self.steps else 0.0
        opt = t.optimizer
        muon = {"muon_lr": opt.muon.param_groups[0]["lr"]} if isinstance(opt, MuonAdamW) else {}
        fields = dict(
            epoch=t.epoch_progress,
            tokens=st.tokens_seen,
            loss=self.loss / self.steps if self.steps else loss,
            lr=opt.param_groups[0]["lr"],
            **muon,
            grad_norm=norm,
            tokens_per_s=tps,
            mfu=tps * t.flops_per_token / (t.peak * t.dist.world_size),
            peak_mem_mib=peak_memory_mib(t.device),
            elapsed=st.train_time,
            **({"progress": st.progress[-1]} if st.progress else {}),
        )
        self.reset()
        return fields
