"""The Trainer: one loop for every run, what varies between runs in its components.

`Trainer` is the walk-through's loop (`gptlab.train.walkthrough`) grown up. `run()` reads top
to bottom: one optimizer step, the guard against non-finite steps, then each component asked
whether it is due: a "train" record (report), an evaluation or sample (evaluator), a
checkpoint (checkpointer). What the run learns is its objective's business (objectives).
Every event becomes a record in metrics.jsonl and is passed to `on_event`: the library
prints nothing. The data order is a pure function of (seed, epoch) (or stored in the
checkpoints) and checkpoints carry every RNG state, so resuming is bit-exact (CPU, fp32).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptlab.atomic import write_json
from gptlab.config.schema import RunConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.model.gpt import (
    GPTModel,
    flops_per_token,
    use_activation_checkpointing,
    use_fast_dropout,
)
from gptlab.observe.metrics import MetricsLog, truncate_metrics
from gptlab.runtime import dist as dist_lib
from gptlab.runtime.device import peak_flops, resolve_device, resolve_runtime, to_device
from gptlab.train import budget as budget_lib
from gptlab.train.average import WeightAverage
from gptlab.train.checkpointer import Checkpointer, TrainState
from gptlab.train.evaluator import Evaluator
from gptlab.train.objectives import Objective
from gptlab.train.optim import build_optimizer, set_lr
from gptlab.train.report import TrainLog, start_fields
from gptlab.train.resume import check_resume

# Why a run stops, in the order ranks settle on one when they differ (the last wins).
STOP_REASONS = ("epochs", "max_steps", "max_time", "budget", "nonfinite", "SIGTERM", "SIGINT")


class Trainer:
    """Trains a GPTModel on `objective` into `run_dir`; `on_event(record)` receives every
    metrics record, `init_weights(model)` sets the new model's weights before training, and
    `clock()` (seconds) times the steps (tests give a fake one to drive a time budget)."""

    def __init__(
        self,
        cfg: RunConfig,
        objective: Objective,
        run_dir: str | Path,
        resume: bool = False,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        init_weights: Callable[[nn.Module], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.cfg = cfg.validate()
        self.objective, self.clock = objective, clock
        self.run_dir = Path(run_dir)
        self.on_event = on_event or (lambda record: None)
        self.stop_reason: str | None = None  # set by signal handlers or guards
        tc, rc, identity = cfg.train, cfg.runtime, objective.tokenizer.identity()
        resume_from = (
            check_resume(self.run_dir, cfg, identity, objective.fingerprint) if resume else None
        )
        _check_vocab(cfg, objective.tokenizer.n_vocab)
        # Under torchrun: join the job, one GPU per local rank.
        self.dist = dist_lib.setup(resolve_device(rc.device), rc.dist_timeout)
        self.device = self.dist.device
        self.rt = resolve_runtime(rc, self.device, self.dist.world_size)
        if self.dist.enabled and rc.parallel == "fsdp" and self.rt.precision == "fp16":
            raise GptlabError(
                "fp16 needs a gradient scaler that FSDP2 shards do not support here; "
                "use --precision bf16 (or fp32) with --parallel fsdp"
            )
        self.budget = _time_budget(tc)
        self.train_loader, self.val_loader = objective.loaders(self.cfg, self.dist.world_size)
        self.accum, self.steps_per_epoch, self.total_steps = step_layout(
            self.cfg, len(self.train_loader), self.train_loader.num_windows, self.dist.world_size
        )
        self._build_model(init_weights)
        self.batches = DeviceBatches(
            self.train_loader, self.device, self.steps_per_epoch, self.accum
        )
        self.evaluator = Evaluator(self.cfg, objective, self.budget)
        self.checkpointer = Checkpointer(self.cfg, self.run_dir, self.dist, objective, self.budget)
        self.state = TrainState()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.resumed_from: Path | None = None
        self.resume_changes: list[tuple[str, Any, Any]] = []
        if resume_from is not None:
            self._restore(*resume_from)
        if self.dist.is_main:  # one writer per job
            write_json(self.run_dir / "config.json", self.cfg.to_dict(), indent=1)
            write_json(self.run_dir / "tokenizer.json", identity)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if self.dist.is_main else None
        self.peak, self.peak_source = peak_flops(self.device, self.rt.dtype)
        self.flops_per_token = flops_per_token(cfg.model)
        self.log = TrainLog(tc.log_every)

    # ---------------------------------------------------------------- set-up

    def _build_model(self, init_weights: Callable[[nn.Module], None] | None) -> None:
        """Model, parallel wrapper, optimizer, scaler and loss, seeded as the walk-through's."""
        tc, rc, rt = self.cfg.train, self.cfg.runtime, self.rt
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        self.model = GPTModel(self.cfg.model).to(self.device)
        if init_weights is not None:
            init_weights(self.model)  # e.g. GPT-2's (train --init-from); a resume loads its own
        self.objective.prepare(self.model, self.cfg)  # which parameters train
        use_fast_dropout(self.model, rt.fast_dropout)  # only CPU tensors take the fast path
        use_activation_checkpointing(self.model, rc.activation_checkpointing)
        # DDP wrapper or FSDP2 shards (in place, so the optimizer comes after)
        self.parallel_model = dist_lib.parallelize(self.model, rc.parallel, self.dist)
        self.optimizer = build_optimizer(self.model, tc, self.device, rt.muon_dtype)
        self.average = WeightAverage(self.model, tc.ema)  # train.ema; a no-op at 0
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=rt.precision == "fp16")
        self.loss_fn = self.objective.loss_fn(self.parallel_model, rt.chunked_loss, rt.compiled)
        self.train_model = (
            torch.compile(self.parallel_model) if rt.compiled else self.parallel_model
        )
        # Non-finite steps are skipped on the device where the fused AdamW kernel can do it
        # (not with fp16's GradScaler, which has its own skip), else after a host check.
        self._fused_can_skip = (
            self.dist.world_size == 1
            and bool(self.optimizer.defaults.get("fused"))
            and getattr(self.optimizer, "_step_supports_amp_scaling", False)
        )

    def _restore(self, ckpt: Path, changes: list[tuple[str, Any, Any]]) -> None:
        self.checkpointer.load(self, ckpt)
        # A run stopped by the guard is usually resumed with a lower lr: a fresh count.
        self.state.bad_steps = 0
        self.resumed_from, self.resume_changes = ckpt, changes
        if self.dist.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)

    # ---------------------------------------------------------------- the loop

    def run(self) -> dict[str, Any]:
        """Train until a limit, a signal or a guard stops it; returns the final 'end' record."""
        if self.resumed_from is not None:
            changed = [f"{k}: {a!r} -> {b!r}" for k, a, b in self.resume_changes]
            self.emit("resume", checkpoint=str(self.resumed_from), changed=changed)
        self.emit("start", **start_fields(self))
        self.model.train()
        self.checkpointer.start_clock()
        evaluator, checkpointer = self.evaluator, self.checkpointer
        first = True
        while (reason := self.done()) is None:
            loss, norm = self._timed_step(first)
            first = False
            if not self._guard(loss, norm):
                continue  # rolled back to a checkpoint: its counters replace this step's
            step = self.state.step
            if self.log.due(step, lambda: self.done() is not None):
                self.emit("train", **self.log.fields(self, loss, norm))
            if evaluator.loss_due(self.state):
                evaluator.evaluate(self)
            if evaluator.tasks_due(step):
                evaluator.evaluate_tasks(self)
            if self.epoch_ended():
                self.emit("epoch", epoch=step // self.steps_per_epoch)
                evaluator.sample(self)
            if checkpointer.due(step, self.state.bad_steps):
                checkpointer.save_periodic(self, evaluator.last_val)
        return self._finish(reason)

    def done(self) -> str | None:
        """Why training should stop now, or None; the same on every rank."""
        here = self.stop_reason or _limit_reached(
            self.cfg.train, self.state, self.total_steps, self.budget
        )
        return self.dist.agree_on_reason(here, STOP_REASONS)

    def _timed_step(self, first: bool) -> tuple[float, float]:
        """One timed step; a compiled run's first step (it compiles) is reported on its own."""
        st = self.state
        t0 = self.clock()
        tokens_before = st.tokens_seen
        compiling = first and self.rt.compiled
        try:
            loss, norm = self.train_step()
        except Exception as e:
            if compiling and (failure := _compile_failure(e)) is not None:
                raise failure from None
            raise
        dist_lib.maybe_fail_for_test(self.dist, st.step)
        dt = self.clock() - t0  # the step's one host read has synchronised the device
        st.train_time += dt
        if self.budget is not None and not compiling:
            st.budget_time += _agreed_seconds(self.dist, dt)
            st.budget_steps += 1
        if compiling:
            self.emit("compile", seconds=round(dt, 2))
            self.log.reset()
        else:
            self.log.add(st.tokens_seen - tokens_before, loss)
        return loss, norm

    def _guard(self, loss: float, norm: float) -> bool:
        """Report an odd step; after `max_bad_steps` non-finite ones, roll back (False) or stop."""
        tc, st = self.cfg.train, self.state
        spike = st.observe_loss(loss)
        if st.bad_steps:  # this step was non-finite and skipped
            self.emit("nonfinite", loss=loss, grad_norm=norm, consecutive=st.bad_steps)
            if st.bad_steps >= tc.max_bad_steps:
                if tc.on_nonfinite == "rollback" and self._rollback():
                    return False
                self.stop_reason = "nonfinite"
        elif not math.isfinite(norm):
            self.emit("overflow", grad_norm=norm, scale=self.scaler.get_scale())
        elif spike:
            self.emit("spike", loss=loss, ema=st.loss_ema)
        return True

    def _rollback(self) -> bool:
        """Back to the latest checkpoint with half the learning rate (False: none to go to)."""
        from_step = self.state.step
        ckpt = self.checkpointer.rollback(self)
        if ckpt is None:
            return False
        # The steps after the checkpoint are redone: their records would be duplicates.
        if self.metrics is not None:
            self.metrics.close()
            truncate_metrics(self.metrics.path, self.state.step)
            self.metrics = MetricsLog(self.metrics.path)
        self.emit(
            "rollback", checkpoint=str(ckpt), from_step=from_step, lr_scale=self.state.lr_scale
        )
        return True

    def _finish(self, reason: str) -> dict[str, Any]:
        """A final evaluation, sample and checkpoint (only the checkpoint after a signal or
        the guard), and the "end" record."""
        st = self.state
        if reason not in ("nonfinite", "SIGINT", "SIGTERM"):
            self.evaluator.finish(self)
        try:
            path = self.checkpointer.save(self, self.evaluator.last_val, reason=reason)
        except GptlabError as e:  # only rank 0 writes, so only rank 0 gets here
            self.emit("checkpoint_failed", error=str(e), final=True)
            self.metrics.close()
            raise
        # Leave together: a rank that exited first with a non-zero status (a signal stop)
        # would make torchrun kill rank 0 while it writes the final checkpoint.
        self.dist.barrier()
        end = self.emit(
            "end",
            reason=reason,
            epoch=self.epoch_progress,
            tokens=st.tokens_seen,
            train_time=st.train_time,
            val_loss=self.evaluator.last_val,
            best_val=st.best_val,
            skipped_steps=st.skipped_steps,
            checkpoint=str(path),
        )
        if self.metrics is not None:
            self.metrics.close()
        return end

    # ---------------------------------------------------------------- events and progress

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write the record {event, step, **fields} (global rank 0) and return it."""
        record = {"event": event, "step": self.state.step, **fields}
        if self.dist.is_main:  # logs, plots and the progress bar come from global rank 0
            self.metrics.write(record)
            self.on_event(record)
        return record

    @property
    def epoch_progress(self) -> float:
        return self.state.step / self.steps_per_epoch

    def epoch_ended(self) -> bool:
        return self.state.step % self.steps_per_epoch == 0

    # ---------------------------------------------------------------- one step

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over `accum` micro-batches; returns (loss, grad_norm)."""
        tc, st = self.cfg.train, self.state
        epoch, in_epoch = divmod(st.step, self.steps_per_epoch)
        progress = None
        if self.budget is not None:  # the time budget's progress this step runs at
            progress = self.budget.progress(st.budget_time, st.budget_steps, st.step)
        set_lr(self.optimizer, st.step, tc, self.total_steps, st.lr_scale, progress)
        loss_sum = torch.zeros((), device=self.device)
        # This rank's share of the step's micro-batches.
        mine = dist_lib.micro_batch_indices(
            in_epoch, self.accum, self.dist.rank, self.dist.world_size
        )
        for m, index in enumerate(mine):
            x, y = self.batches.get(epoch, index)
            # ranks exchange gradients once per step, after their last micro-batch
            with dist_lib.grad_sync(self.parallel_model, m == len(mine) - 1):
                with self.rt.autocast():
                    loss = self.loss_fn(x, y) / len(mine)
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        loss_sum = self.dist.mean(loss_sum)  # the whole step's loss, the same on every rank
        self.scaler.unscale_(self.optimizer)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        grad_norm = dist_lib.grad_norm_value(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        )
        loss_val, norm_val, good, overflow = apply_update(
            self.optimizer,
            self.scaler,
            loss_sum,
            grad_norm,
            self._fused_can_skip and not self.scaler.is_enabled(),
            lambda: self.batches.prefetch(st.step + 1),
        )
        # a skipped step keeps the last good weights; the guard in run() decides what next
        st.bad_steps = 0 if good else st.bad_steps + 1
        st.skipped_steps += overflow if good else 1
        self.optimizer.zero_grad(set_to_none=True)
        self.average.update()
        st.step += 1
        if progress is not None:
            st.progress.append(progress)
        st.tokens_seen += self.accum * x.numel()
        return loss_val, norm_val


class DeviceBatches:
    """The training batches on the device; on CUDA, `prefetch(step)` copies a step's first
    batch while the step before computes."""

    def __init__(self, loader: Any, device: torch.device, steps_per_epoch: int, accum: int):
        self.loader, self.device = loader, device
        self.steps_per_epoch, self.accum = steps_per_epoch, accum
        self.pending: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None

    def get(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index` of `epoch` (inputs, targets) on the device (prefetched when it was)."""
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == (epoch, index):
            return pending[1], pending[2]
        x, y = self.loader.batch(epoch, index)
        return to_device(x, self.device), to_device(y, self.device)

    def prefetch(self, step: int) -> None:
        if self.device.type == "cuda":
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            x, y = self.get(epoch, in_epoch * self.accum)
            self.pending = ((epoch, in_epoch * self.accum), x, y)


def apply_update(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss_sum: torch.Tensor,
    grad_norm: torch.Tensor,
    skip_on_device: bool,
    while_queued: Callable[[], None],
) -> tuple[float, float, bool, bool]:
    """Step unless the loss or gradient is non-finite; returns (loss, grad_norm) read with
    one host sync, whether the step was good (applied, or an fp16 overflow the scaler skips)
    and whether it was such an overflow. With `skip_on_device` the fused AdamW kernel skips
    a non-finite step itself, so the update is queued first and `while_queued()` runs
    meanwhile."""
    if skip_on_device:
        finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        optimizer.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        while_queued()
    loss_val, norm_val = torch.stack((loss_sum.float(), grad_norm.float())).tolist()  # one sync
    # fp16: overflowing gradients are routine while the scaler searches for its scale;
    # scaler.step skips such a step by itself and halves the scale. Only when the scale
    # is already below 1 is an infinite gradient a sign of real trouble.
    overflow = (
        scaler.is_enabled()
        and math.isfinite(loss_val)
        and not math.isfinite(norm_val)
        and scaler.get_scale() >= 1.0
    )
    good = math.isfinite(loss_val) and (math.isfinite(norm_val) or overflow)
    if good and not skip_on_device:
        scaler.step(optimizer)
        scaler.update()
    elif not good and scaler.is_enabled():
        scaler.update()
    return loss_val, norm_val, good, overflow


def step_layout(
    cfg: RunConfig, n_batches: int, n_windows: int, world_size: int
) -> tuple[int, int, int]:
    """(micro-batches per step in the whole job, steps per epoch, total steps or 0) for a
    loader of `n_batches` batches of `n_windows` windows."""
    tc = cfg.train
    if n_batches == 0:
        raise GptlabError(
            f"the training split has {n_windows} windows, fewer than one batch "
            f"({tc.batch_size}); lower --train.batch_size or use more text"
        )
    # Each rank runs accum / world_size micro-batches of a step.
    T = cfg.model.context_length
    accum = dist_lib.accum_per_rank(tc.batch_tokens, tc.batch_size * T, world_size) * world_size
    steps_per_epoch = n_batches // accum
    if steps_per_epoch == 0:
        raise GptlabError(
            f"one optimizer step needs {accum} batches but an epoch has {n_batches}; "
            "lower --train.batch_tokens"
        )
    total = steps_per_epoch * tc.epochs if tc.epochs else 0
    if tc.max_steps:
        total = min(total, tc.max_steps) if total else tc.max_steps
    return accum, steps_per_epoch, total


def _compile_failure(e: Exception) -> GptlabError | None:
    """A torch.compile failure (no C++ compiler, a corrupt cache) as one line that says how
    to go on; None for an error of another kind."""
    if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
        return None
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return GptlabError(
        f"torch.compile failed ({first_line[:200]}); train without it (--compile off), "
        "or clear the compiler cache (rm -rf /tmp/torchinductor_$USER) and retry"
    )


def _limit_reached(
    tc: TrainConfig, st: TrainState, total_steps: int, budget: budget_lib.TimeBudget | None
) -> str | None:
    if total_steps and st.step >= total_steps:
        return "max_steps" if tc.max_steps and st.step >= tc.max_steps else "epochs"
    if budget is not None:
        return "budget" if budget.spent(st.budget_time, st.budget_steps, st.step) else None
    if tc.max_time and st.train_time >= tc.max_time:
        return "max_time"
    return None


def _agreed_seconds(dist: dist_lib.Dist, dt: float) -> float:
    """A step's seconds, the same on every rank (their mean) so that all follow one schedule."""
    if dist.world_size == 1:
        return dt
    return float(dist.mean(torch.tensor(dt, device=dist.device, dtype=torch.float64)))


def _time_budget(tc: TrainConfig) -> budget_lib.TimeBudget | None:
    """The run's time budget (None for steps), replaying train.replay_schedule when set."""
    if tc.budget != "time":
        return None
    if not tc.replay_schedule:
        return budget_lib.TimeBudget(tc.max_time)
    seconds, replay = budget_lib.read_schedule(tc.replay_schedule)
    return budget_lib.TimeBudget(seconds or tc.max_time, replay)


def _check_vocab(cfg: RunConfig, n_vocab: int) -> None:
    if cfg.model.vocab_size < n_vocab:
        raise GptlabError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({n_vocab}); set --model.vocab_size {n_vocab}"
        )
