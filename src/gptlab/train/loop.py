"""Training: the `Trainer` and `train()`.

`Trainer` is the walk-through's loop (`gptlab.train.walkthrough`) grown up. `run()` reads top to bottom: one optimizer step
(`train_step`: micro-batches under autocast, backward, clip, step), the guard against
non-finite steps, then the periodic work (log, evaluate, sample, checkpoint), each behind a
small check of whether it is due. Every event becomes one record in metrics.jsonl and is
passed to an `on_event` callback, which is how the CLI draws its progress bar: the library
itself prints nothing. Device and precision choices come from `gptlab.runtime.device`; what a
resume may change, and the random state it restores, from `gptlab.train.resume`.

`train()` is what `gptlab train` does, callable from Python: it opens the data, checks the
run directory, optionally starts from other weights, trains, and draws the loss plot.

Exact resume: the data order is a pure function of (seed, epoch) (or, with data.order
"dataloader", the walk-through's drawn order, which checkpoints store), sampling uses its
own generator, and checkpoints carry the optimizer and every RNG state, so a run resumed
from step k repeats the uninterrupted run's steps k+1, k+2, ... bit for bit (CPU, fp32).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptlab.config.schema import RunConfig, corpus_bpe_size, tracker_names
from gptlab.data.corpus import Corpus, make_loaders, open_corpus, prepared_manifest
from gptlab.data.tokenizer import BPETokenizer, from_identity
from gptlab.errors import GptlabError
from gptlab.evals.loss import calc_loss_loader, evaluate_model
from gptlab.evals.tasks import load_suite, run_suite
from gptlab.finetune.data import FinetuneData, classification_accuracy, set_trainable
from gptlab.infer.sampling import (
    generate,
    text_to_token_ids,
    token_ids_to_text,
)
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.interop.runs import Run, open_base
from gptlab.model import lora
from gptlab.model.gpt import (
    GPTModel,
    count_parameters,
    flops_per_token,
    use_activation_checkpointing,
    use_fast_dropout,
)
from gptlab.model.loss import make_loss_fn
from gptlab.observe.metrics import MetricsLog, truncate_metrics
from gptlab.observe.plot import plot_run
from gptlab.observe.trackers import check_installed, open_trackers
from gptlab.runtime import dist as dist_lib
from gptlab.runtime.device import (
    peak_flops,
    peak_memory_mib,
    resolve_device,
    resolve_runtime,
    to_device,
)
from gptlab.train import budget as budget_lib
from gptlab.train.optim import MuonAdamW, build_optimizer, set_lr
from gptlab.train.resume import check_data_layout, check_resume, rng_state, set_rng_state

# --------------------------------------------------------------------------- the CLI trainer


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
    history: dict[str, list[float]] = field(
        default_factory=lambda: {
            "step": [],
            "epoch": [],
            "tokens": [],
            "train_loss": [],
            "val_loss": [],
        }
    )

    def observe_loss(self, loss: float) -> bool:
        """Fold a step's loss into the running average; True when it is a spike (well above
        the average so far)."""
        ema = self.loss_ema
        spike = math.isfinite(ema) and math.isfinite(loss) and loss > 1.5 * ema + 0.5
        if math.isfinite(loss):
            self.loss_ema = loss if not math.isfinite(ema) else 0.9 * ema + 0.1 * loss
        return spike


# Why a run stops, in the order ranks settle on one when they differ (the last wins).
STOP_REASONS = ("epochs", "max_steps", "max_time", "budget", "nonfinite", "SIGTERM", "SIGINT")
MAX_ROLLBACKS = 3  # train.on_nonfinite = "rollback" gives up (and stops) after this many


class _Window:
    """Tokens, steps and summed loss since the last "train" record: its throughput and mean."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0, self.tokens, self.steps, self.loss = time.perf_counter(), 0, 0, 0.0

    def add(self, tokens: int, loss: float) -> None:
        self.tokens += tokens
        self.steps += 1
        self.loss += loss if math.isfinite(loss) else 0.0

    def mean_loss(self, last: float) -> float:
        return self.loss / self.steps if self.steps else last

    def tokens_per_s(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return self.tokens / elapsed if elapsed > 0 and self.steps else 0.0


class Trainer:
    """Trains a GPTModel on a Corpus into a run directory.

    `on_event(record)` receives every metrics record as it is written (the CLI renders them).
    `init_weights(model)`, when given, sets the new model's weights before training starts
    (not on resume): how `gptlab train --init-from` starts from GPT-2 or another run.

    `corpus` may be `FinetuneData` instead (`gptlab finetune`): its examples make the
    batches, its loss (masked, or the classifier's) is the step's and the evaluations',
    and `finetune.train_blocks` chooses the trainable parameters. The loop is the same.

    `clock()` (seconds) times the steps; tests give a fake one to drive a time budget.
    """

    def __init__(
        self,
        cfg: RunConfig,
        corpus: Corpus,
        run_dir: str | Path,
        resume: bool = False,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        init_weights: Callable[[nn.Module], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.cfg = cfg.validate()
        self.clock = clock
        self.corpus = corpus
        self.run_dir = Path(run_dir)
        self.on_event = on_event or (lambda record: None)
        self.stop_reason: str | None = None  # set by signal handlers or guards
        self.task = corpus if isinstance(corpus, FinetuneData) else None
        self.lora = self.task is not None and cfg.finetune.lora_rank > 0
        tc = cfg.train
        identity = corpus.tokenizer.identity()
        resume_from = (
            check_resume(self.run_dir, cfg, identity, corpus.fingerprint) if resume else None
        )
        _check_vocab(cfg, corpus)
        # Under torchrun: join the job, one GPU per local rank (a single process: no-op).
        self.dist = dist_lib.setup(resolve_device(tc.device), tc.dist_timeout)
        self.device = self.dist.device
        self.rt = resolve_runtime(tc, self.device, self.dist.world_size)
        if self.dist.enabled and tc.parallel == "fsdp" and self.rt.precision == "fp16":
            raise GptlabError(
                "fp16 needs a gradient scaler that FSDP2 shards do not support here; "
                "use --precision bf16 (or fp32) with --parallel fsdp"
            )
        self.budget = _time_budget(tc)
        self._build_loaders()
        # A LoRA run's checkpoints hold only its adapters: the base's weights load on resume too.
        self._build_model(None if resume and not self.lora else init_weights)
        self._check_start_context()
        # read and checked now: a missing suite file fails here, not at the first evaluation
        self.suite = load_suite(tc.eval_tasks) if tc.eval_tasks else None
        self._tasks_step = -1  # the step of the last task evaluation
        self.state = TrainState()
        self.sample_gen_seed = tc.seed
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.resumed_from: Path | None = None
        self.resume_changes: list[tuple[str, Any, Any]] = []
        if resume_from is not None:
            self._restore(*resume_from)
        if self.dist.is_main:  # one writer per job
            (self.run_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
            (self.run_dir / "tokenizer.json").write_text(json.dumps(identity))
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if self.dist.is_main else None
        self.peak, self.peak_source = peak_flops(self.device, self.rt.dtype)
        self.flops_per_token = flops_per_token(cfg.model)

    # ---------------------------------------------------------------- set-up

    def _build_loaders(self) -> None:
        """The loaders, the micro-batches per step and the step counts; clear errors when
        the text is too short for them."""
        tc, mc, corpus = self.cfg.train, self.cfg.model, self.corpus
        T = mc.context_length
        if self.task is not None:
            self.train_loader, self.val_loader = self.task.loaders(tc.batch_size, tc.seed)
        else:
            self.train_loader, self.val_loader = make_loaders(
                self.cfg, corpus, self.dist.world_size
            )
        for split, loader, tokens in (
            ("training", self.train_loader, corpus.train),
            ("validation", self.val_loader, corpus.val),
        ):
            if loader.num_windows == 0:
                raise GptlabError(
                    f"the {split} split has {len(tokens)} tokens, fewer than one context window "
                    f"({T + 1}); use more text or a smaller --model.context_length"
                )
        if len(self.train_loader) == 0:
            raise GptlabError(
                f"the training split has {self.train_loader.num_windows} windows, fewer than one batch "
                f"({tc.batch_size}); lower --train.batch_size or use more text"
            )
        # Micro-batches per optimizer step in the whole job; each rank runs accum / world_size.
        world = self.dist.world_size
        self.accum = dist_lib.accum_per_rank(tc.batch_tokens, tc.batch_size * T, world) * world
        self.steps_per_epoch = len(self.train_loader) // self.accum
        if self.steps_per_epoch == 0:
            raise GptlabError(
                f"one optimizer step needs {self.accum} batches but an epoch has {len(self.train_loader)}; "
                "lower --train.batch_tokens"
            )
        total = self.steps_per_epoch * tc.epochs if tc.epochs else 0
        if tc.max_steps:
            total = min(total, tc.max_steps) if total else tc.max_steps
        self.total_steps = total  # 0 when only wall time limits the run

    def _build_model(self, init_weights: Callable[[nn.Module], None] | None) -> None:
        """Model, parallel wrapper, optimizer, scaler and loss function, seeded as the
        walk-through seeds its model (so `torch.manual_seed(seed)` gives the same weights)."""
        tc, rt = self.cfg.train, self.rt
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        self.model = GPTModel(self.cfg.model).to(self.device)
        if init_weights is not None:
            init_weights(self.model)  # e.g. GPT-2's (train --init-from); a resume loads its own
        if self.task is not None:
            set_trainable(self.model, self.cfg.finetune.train_blocks)
        if self.lora:  # frozen base, trainable adapters (and a classifier's head)
            lora.prepare(self.model, self.cfg.finetune)
        use_fast_dropout(self.model, rt.fast_dropout)  # only CPU tensors take the fast path
        use_activation_checkpointing(self.model, tc.activation_checkpointing)
        # DDP wrapper or FSDP2 shards (in place, so the optimizer comes after); a single
        # process gets self.model back.
        self.parallel_model = dist_lib.parallelize(self.model, tc.parallel, self.dist)
        self.optimizer = build_optimizer(self.model, tc, self.device, rt.muon_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=rt.precision == "fp16")
        if self.task is not None:
            self.loss_fn = self._task_loss_fn(rt.compiled)
        else:
            self.loss_fn = make_loss_fn(self.parallel_model, rt.chunked_loss, rt.compiled)
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
        self._pending: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None

    def _task_loss_fn(self, compiled: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return self.task.loss(self.parallel_model, inputs, targets)

        return torch.compile(loss_fn) if compiled else loss_fn

    @property
    def _batch_loss(self):
        """The evaluations' loss: calc_loss_batch's (None), or the finetuning task's."""
        return None if self.task is None else self.task.loss

    def _check_start_context(self) -> None:
        # Fail now, not at the first sample an epoch later: a char vocabulary may lack some
        # of the prompt's characters, and that error would kill the run before its save.
        try:
            text_to_token_ids(self.cfg.train.start_context, self.corpus.tokenizer)
        except GptlabError as e:
            raise GptlabError(
                f"train.start_context cannot be encoded ({e}); set --train.start_context"
            ) from None

    # ---------------------------------------------------------------- resume

    def _restore(self, ckpt: Path, changes: list[tuple[str, Any, Any]]) -> None:
        self._load_training_state(ckpt)
        # A run stopped by the guard is usually resumed with a lower lr: a fresh count.
        self.state.bad_steps = 0
        self.resumed_from = ckpt
        self.resume_changes = changes
        if self.dist.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)

    def _load_training_state(self, ckpt: Path) -> None:
        """Weights, optimizer, scaler, counters and RNG states from `ckpt` (config already checked)."""
        if not self.dist.sharded:
            keys = set(lora.trained_state_dict(self.model)) if self.lora else None
            ckpt_lib.load_weights(self.model, ckpt, self.device, keys)
        st = ckpt_lib.load_state(ckpt)
        try:
            data = st.get("data")
            check_data_layout(data, self.steps_per_epoch, self.accum)
            self.train_loader.load_state_dict((data or {}).get("loader", {}))
            if self.dist.sharded:
                self._load_sharded(ckpt, st["optimizer"])
            else:
                self.optimizer.load_state_dict(st["optimizer"])
            if st.get("scaler"):
                self.scaler.load_state_dict(st["scaler"])
            self.state = TrainState(**st["trainer"])
            set_rng_state(st["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise GptlabError(
                f"training state in {str(ckpt)!r} does not fit this run ({str(e).splitlines()[0]}); "
                "start a new run"
            ) from None

    def _cpu_model(self) -> nn.Module:
        """An unsharded GPTModel in host memory, allocated but not initialised (to be loaded)."""
        with torch.device("meta"):
            model = GPTModel(self.cfg.model)
        return dist_lib.materialize(model, torch.device("cpu"))

    def _load_sharded(self, ckpt: Path, optimizer_state: dict[str, Any]) -> None:
        """Load a consolidated checkpoint into FSDP2 shards: rank 0 reads the weights and
        broadcasts them; every rank keeps its shard of them and of the optimizer state."""
        weights: dict[str, torch.Tensor] = {}
        if self.dist.is_main:
            full = self._cpu_model()
            ckpt_lib.load_weights(full, ckpt)
            weights = full.state_dict()
        dist_lib.load_full_state(self.model, self.optimizer, weights, optimizer_state)

    def _rollback(self) -> bool:
        """Reload the latest checkpoint and halve the learning rate after a non-finite streak;
        False (stop instead) when there is no checkpoint or the rollbacks are used up."""
        ckpt = ckpt_lib.latest_checkpoint(self.run_dir, missing_ok=True)
        if ckpt is None or self.state.rollbacks >= MAX_ROLLBACKS:
            return False
        from_step, rollbacks = self.state.step, self.state.rollbacks + 1
        lr_scale = self.state.lr_scale * 0.5
        self._load_training_state(ckpt)
        self.state.rollbacks, self.state.lr_scale, self.state.bad_steps = rollbacks, lr_scale, 0
        # The steps after the checkpoint are redone: their records would be duplicates.
        if self.metrics is not None:
            self.metrics.close()
            truncate_metrics(self.metrics.path, self.state.step)
            self.metrics = MetricsLog(self.metrics.path)
        self.emit("rollback", checkpoint=str(ckpt), from_step=from_step, lr_scale=lr_scale)
        return True

    # ---------------------------------------------------------------- events

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "step": self.state.step, **fields}
        if self.dist.is_main:  # logs, plots and the progress bar come from global rank 0
            self.metrics.write(record)
            self.on_event(record)
        return record

    @property
    def epoch_progress(self) -> float:
        return self.state.step / self.steps_per_epoch

    # ---------------------------------------------------------------- periodic work

    def evaluate(self) -> tuple[float, float]:
        with self.rt.autocast():
            train_loss, val_loss = evaluate_model(
                self.train_model,
                self.train_loader,
                self.val_loader,
                self.device,
                self.cfg.train.eval_iter,
                self.dist,
                self._batch_loss,
            )
            extra = self._eval_accuracy()
        st = self.state
        for key, value in (
            ("step", st.step),
            ("epoch", self.epoch_progress),
            ("tokens", st.tokens_seen),
            ("train_loss", train_loss),
            ("val_loss", val_loss),
        ):
            st.history[key].append(value)
        st.best_val = min(st.best_val, val_loss)
        self.emit(
            "eval",
            epoch=self.epoch_progress,
            tokens=st.tokens_seen,
            train_loss=train_loss,
            val_loss=val_loss,
            **extra,
        )
        return train_loss, val_loss

    def evaluate_tasks(self) -> dict[str, Any]:
        """Score train.eval_tasks' suite on the model as it is (eval mode, no gradients; its
        mode restored) and emit the "tasks" record, with the seconds it took. The random state is put back as it
        was, so a run with task evaluations trains exactly as one without."""
        rng = rng_state()
        t0 = time.perf_counter()
        with self.rt.autocast():
            report = run_suite(
                self.model,
                self.corpus.tokenizer,
                self.suite,
                context_length=self.cfg.model.context_length,
                batch_size=self.cfg.train.batch_size,
                device=self.device,
                dist=self.dist,
                max_items=self.cfg.train.task_eval_items or None,
            )
        set_rng_state(rng)
        self._tasks_step = self.state.step
        seconds = round(time.perf_counter() - t0, 3)  # what the evaluation adds to the run
        return self.emit(
            "tasks",
            suite=report["suite"],
            tasks=report["tasks"],
            core=report["core"],
            seconds=seconds,
        )

    def _eval_accuracy(self) -> dict[str, float]:
        """A classifier's train and validation accuracy on eval_iter batches (else nothing)."""
        if self.task is None or not self.task.is_classifier:
            return {}
        n = self.cfg.train.eval_iter
        return {
            split + "_acc": classification_accuracy(self.train_model, loader, self.device, n)
            for split, loader in (("train", self.train_loader), ("val", self.val_loader))
        }

    def full_validation_loss(self) -> float:
        self.model.eval()
        with torch.no_grad(), self.rt.autocast():
            loss = calc_loss_loader(
                self.val_loader, self.train_model, self.device, None, self.dist, self._batch_loss
            )
        self.model.train()
        return loss

    def sample(self) -> str:
        tc = self.cfg.train
        tok = self.corpus.tokenizer
        if self.task is not None and self.task.sample_ids is None:
            return ""  # a classifier writes no text
        self.model.eval()
        if self.task is not None:  # the model's answer to the first validation prompt
            idx = torch.tensor([self.task.sample_ids], device=self.device)
        else:
            idx = text_to_token_ids(tc.start_context, tok).to(self.device)
        # Its own generator: sampling never shifts the training run's random stream.
        gen = torch.Generator(device=self.device).manual_seed(self.sample_gen_seed)
        with self.rt.autocast():
            out = generate(
                self.model,
                idx,
                tc.sample_tokens,
                temperature=0.8,
                top_k=40,
                generator=gen,
                vocab_limit=tok.n_vocab,
            )
        self.model.train()
        text = token_ids_to_text(out.cpu(), tok)
        self.emit("sample", epoch=self.epoch_progress, text=text)
        return text

    def save(self, val_loss: float | None = None, reason: str = "periodic") -> Path:
        """Write a checkpoint (every rank calls this; rank 0 writes it and returns its path,
        the others return the run directory)."""
        if self.dist.sharded:  # gather the shards into the single-process format
            weights, optimizer_state = dist_lib.full_state(self.model, self.optimizer)
        if not self.dist.is_main:
            return self.run_dir
        if self.dist.sharded:
            model = self._cpu_model()
            model.load_state_dict(weights)
        else:
            model, optimizer_state = self.model, self.optimizer.state_dict()
        if self.lora:  # what trains; the base is named in the config
            model = lora.trained_state_dict(model)
        path = ckpt_lib.save_checkpoint(
            self.run_dir,
            self.state.step,
            model,
            self._meta(val_loss),
            self._training_state(optimizer_state),
            self.cfg.train.keep_last,
        )
        if self.budget is not None:  # what train.replay_schedule replays
            budget_lib.write_schedule(self.run_dir, self.budget.seconds, self.state.progress)
        self.emit("checkpoint", path=str(path), reason=reason)
        return path

    def _meta(self, val_loss: float | None) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "tokenizer": self.corpus.tokenizer.identity(),
            "data_fingerprint": self.corpus.fingerprint,
            "tokens_seen": self.state.tokens_seen,
            "val_loss": val_loss,
        }

    def _training_state(self, optimizer_state: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint holds besides weights and meta: all a resume needs."""
        return {
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "trainer": asdict(self.state),
            "rng": rng_state(),
            # Where the data stream stands. A seeded loader's order is a pure function of
            # (seed, epoch), so these numbers are the sampler's whole state; a dataloader
            # one adds the current epoch's drawn order.
            "data": {
                "loader": self.train_loader.state_dict(),
                "epoch": self.state.step // self.steps_per_epoch,
                "batch_in_epoch": self.state.step % self.steps_per_epoch * self.accum,
                "steps_per_epoch": self.steps_per_epoch,
                "accum": self.accum,
                "seed": self.cfg.train.seed,
                "shuffle": self.cfg.data.shuffle,
            },
            # The schedule is lr_at(step, config, total_steps): these make it reproducible.
            "schedule": {
                "total_steps": self.total_steps,
                "lr": self.optimizer.param_groups[0]["lr"],
            },
        }

    def _save_quietly(self, val_loss: float | None) -> None:
        """A periodic save that fails (full disk) is reported and training goes on."""
        try:
            self.save(val_loss)
        except GptlabError as e:
            self.emit("checkpoint_failed", error=str(e))

    # ---------------------------------------------------------------- is it due?

    def done(self) -> str | None:
        """Why training should stop now, or None. Under torchrun every rank gets the same
        answer (a signal or the clock may reach one rank first)."""
        return self.dist.agree_on_reason(self._stop_reason_here(), STOP_REASONS)

    def _stop_reason_here(self) -> str | None:
        tc = self.cfg.train
        if self.stop_reason:
            return self.stop_reason
        if self.total_steps and self.state.step >= self.total_steps:
            return "max_steps" if tc.max_steps and self.state.step >= tc.max_steps else "epochs"
        if self.budget is not None:
            st = self.state
            return "budget" if self.budget.spent(st.budget_time, st.budget_steps, st.step) else None
        if tc.max_time and self.state.train_time >= tc.max_time:
            return "max_time"
        return None

    def _log_due(self) -> bool:
        step = self.state.step
        return step % self.cfg.train.log_every == 0 or step == 1 or self.done() is not None

    def _eval_due(self) -> bool:
        # After the first step and every eval_freq steps: the walk-through's global_step
        # (0-based) % eval_freq == 0. A time budget with eval_every_frac: after the first
        # step and each time progress passes a multiple of it, the same count on any machine.
        every, progress = self.cfg.train.eval_every_frac, self.state.progress
        if self.budget is not None and every:
            return len(progress) == 1 or budget_lib.crossed(progress[-2], progress[-1], every)
        return (self.state.step - 1) % self.cfg.train.eval_freq == 0

    def _task_eval_due(self) -> bool:
        every = self.cfg.train.task_eval_every
        return self.suite is not None and bool(every) and self.state.step % every == 0

    def _epoch_ended(self) -> bool:
        return self.state.step % self.steps_per_epoch == 0

    def _checkpoint_due(self) -> bool:
        tc = self.cfg.train
        # Decided together: under FSDP2 a save needs every rank.
        minutes_due = bool(tc.checkpoint_every_minutes) and self.dist.any(
            time.monotonic() - self._last_ckpt_time >= 60 * tc.checkpoint_every_minutes
        )
        steps_due = bool(tc.checkpoint_every) and self.state.step % tc.checkpoint_every == 0
        # Not in the middle of a non-finite streak: a rollback must find good weights.
        return (steps_due or minutes_due) and not self.state.bad_steps

    # ---------------------------------------------------------------- one step

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over `accum` micro-batches; returns (loss, grad_norm)."""
        tc = self.cfg.train
        epoch, in_epoch = divmod(self.state.step, self.steps_per_epoch)
        # every group follows the schedule from its own peak; a rollback's scale lowers all
        progress = self._progress()
        set_lr(self.optimizer, self.state.step, tc, self.total_steps, self.state.lr_scale, progress)
        loss_sum = torch.zeros((), device=self.device)
        # This rank's share of the step's micro-batches (all of them in a single process).
        mine = dist_lib.micro_batch_indices(
            in_epoch, self.accum, self.dist.rank, self.dist.world_size
        )
        for m, index in enumerate(mine):
            x, y = self._batch(epoch, index)
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
        loss_val, norm_val = self._update(loss_sum, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        if progress is not None:
            self.state.progress.append(progress)
        self.state.tokens_seen += self.accum * x.numel()
        return loss_val, norm_val

    def _progress(self) -> float | None:
        """The time budget's progress the next step runs at (None: budget = steps)."""
        if self.budget is None:
            return None
        st = self.state
        return self.budget.progress(st.budget_time, st.budget_steps, st.step)

    def _update(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> tuple[float, float]:
        """Apply the optimizer step unless the loss or gradient is non-finite (then count
        it); returns (loss, grad_norm) as floats, read with one host sync."""
        skip_on_device = self._fused_can_skip and not self.scaler.is_enabled()
        if skip_on_device:
            # The fused kernel skips a non-finite step by itself (the flag GradScaler uses),
            # so the update is queued before the host waits for the loss: no idle device.
            finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
            self.optimizer.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            self._prefetch(self.state.step + 1)
        loss_val, norm_val = torch.stack((loss_sum.float(), grad_norm.float())).tolist()  # one sync
        # fp16: overflowing gradients are routine while the scaler searches for its scale;
        # scaler.step skips such a step by itself and halves the scale. Only when the scale
        # is already below 1 is an infinite gradient a sign of real trouble.
        overflow = (
            self.scaler.is_enabled()
            and math.isfinite(loss_val)
            and not math.isfinite(norm_val)
            and self.scaler.get_scale() >= 1.0
        )
        if math.isfinite(loss_val) and (math.isfinite(norm_val) or overflow):
            if not skip_on_device:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.state.bad_steps = 0
            self.state.skipped_steps += overflow
        else:  # keep the last good weights; the guard in run() decides whether to go on
            self.state.bad_steps += 1
            self.state.skipped_steps += 1
            if self.scaler.is_enabled():
                self.scaler.update()
        return loss_val, norm_val

    def _first_compiled_step(self) -> tuple[float, float]:
        """The first step, which compiles: a compiler failure (no C++ compiler on a CPU
        machine, a corrupt cache) becomes one line that says how to go on."""
        try:
            return self.train_step()
        except Exception as e:
            if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise GptlabError(
                f"torch.compile failed ({first_line[:200]}); train without it (--compile off), "
                "or clear the compiler cache (rm -rf /tmp/torchinductor_$USER) and retry"
            ) from None

    def _batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch `index` of `epoch` on the device (prefetched when it was)."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == (epoch, index):
            return pending[1], pending[2]
        x, y = self.train_loader.batch(epoch, index)
        return to_device(x, self.device), to_device(y, self.device)

    def _prefetch(self, step: int) -> None:
        """Start copying step `step`'s first batch to a CUDA device while it computes."""
        if self.device.type == "cuda":
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            x, y = self._batch(epoch, in_epoch * self.accum)
            self._pending = ((epoch, in_epoch * self.accum), x, y)

    # ---------------------------------------------------------------- the loop

    def run(self) -> dict[str, Any]:
        """Train until a limit, a signal or a guard stops it; returns the final 'end' record."""
        self._emit_start()
        self.model.train()
        self._last_ckpt_time = time.monotonic()
        window = _Window()
        last_val: float | None = None
        first = True
        while (reason := self.done()) is None:
            loss, norm = self._timed_step(window, first)
            first = False
            if not self._guard(loss, norm):
                continue  # rolled back to a checkpoint: its counters replace this step's
            if self._log_due():
                self._emit_train(window, loss, norm)
            if self._eval_due():
                _, last_val = self.evaluate()
            if self._task_eval_due():
                self.evaluate_tasks()
            if self._epoch_ended():
                self.emit("epoch", epoch=self.state.step // self.steps_per_epoch)
                self.sample()
            if self._checkpoint_due():
                self._save_quietly(last_val)
                self._last_ckpt_time = time.monotonic()
        return self._finish(reason, last_val)

    def _timed_step(self, window: _Window, first: bool) -> tuple[float, float]:
        """One step, its time added to the run's; the first step of a compiled run is
        reported on its own (it compiles) and kept out of the throughput window."""
        st = self.state
        t0 = self.clock()
        tokens_before = st.tokens_seen
        compiling = first and self.rt.compiled
        loss, norm = self._first_compiled_step() if compiling else self.train_step()
        dist_lib.maybe_fail_for_test(self.dist, st.step)
        dt = self.clock() - t0  # the step's one host read has synchronised the device
        st.train_time += dt
        if self.budget is not None and not compiling:
            st.budget_time += self._agreed_seconds(dt)
            st.budget_steps += 1
        if compiling:
            self.emit("compile", seconds=round(dt, 2))
            window.reset()
        else:
            window.add(st.tokens_seen - tokens_before, loss)
        return loss, norm

    def _agreed_seconds(self, dt: float) -> float:
        """A step's seconds, the same on every rank (their mean) so that all follow one
        schedule; in a single process, `dt` itself."""
        if self.dist.world_size == 1:
            return dt
        return float(self.dist.mean(torch.tensor(dt, device=self.device, dtype=torch.float64)))

    def _guard(self, loss: float, norm: float) -> bool:
        """Report a skipped, overflowing or spiking step; after `max_bad_steps` non-finite
        steps in a row, roll back (False: the loop goes on from the checkpoint) or stop."""
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

    def _emit_start(self) -> None:
        tc, rt = self.cfg.train, self.rt
        if self.resumed_from is not None:
            changed = [f"{k}: {a!r} -> {b!r}" for k, a, b in self.resume_changes]
            self.emit("resume", checkpoint=str(self.resumed_from), changed=changed)
        self.emit(
            "start",
            params=count_parameters(self.model),
            trainable=lora.count_trainable(self.model)[0],
            device=str(self.device),
            precision=rt.precision,
            compiled=rt.compiled,
            world_size=self.dist.world_size,
            parallel=self.dist.mode,
            chunked_loss=rt.chunked_loss,
            fast_dropout=rt.fast_dropout,
            host_memory=rt.host_memory,
            accum=self.accum,
            batch_tokens=self.accum * tc.batch_size * self.cfg.model.context_length,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            **self._data_sizes(),
            budget=tc.budget,
            budget_s=tc.max_time if tc.budget == "time" else None,
            replay_steps=len(self.budget.replay) if self.budget and self.budget.replay else None,
            threads=torch.get_num_threads(),
            peak_flops=self.peak,
            peak_source=self.peak_source,
        )

    def _data_sizes(self) -> dict[str, Any]:
        """The start record's sizes of the data: tokens, and a finetune's records."""
        if self.task is not None:
            return self.task.sizes()
        return {"train_tokens": len(self.corpus.train), "val_tokens": len(self.corpus.val)}

    def _emit_train(self, window: _Window, loss: float, norm: float) -> None:
        tps = window.tokens_per_s()
        muon = (
            {"muon_lr": self.optimizer.muon.param_groups[0]["lr"]}
            if isinstance(self.optimizer, MuonAdamW)
            else {}
        )
        self.emit(
            "train",
            epoch=self.epoch_progress,
            tokens=self.state.tokens_seen,
            loss=window.mean_loss(loss),
            lr=self.optimizer.param_groups[0]["lr"],
            **muon,
            grad_norm=norm,
            tokens_per_s=tps,
            mfu=tps * self.flops_per_token / (self.peak * self.dist.world_size),
            peak_mem_mib=peak_memory_mib(self.device),
            elapsed=self.state.train_time,
            **({"progress": self.state.progress[-1]} if self.state.progress else {}),
        )
        window.reset()

    def _finish(self, reason: str, last_val: float | None) -> dict[str, Any]:
        """The end: a final evaluation, sample and checkpoint, and the "end" record. A signal
        or the guard saves at once: the user asked to stop, or the model is in trouble."""
        st = self.state
        quick = reason in ("nonfinite", "SIGINT", "SIGTERM")
        if not quick and (not st.history["step"] or st.history["step"][-1] != st.step):
            _, last_val = self.evaluate()
        if not quick and not self._epoch_ended():
            self.sample()
        if not quick and self.suite is not None and self._tasks_step != st.step:
            self.evaluate_tasks()
        try:
            path = self.save(last_val, reason=reason)
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
            val_loss=last_val,
            best_val=st.best_val,
            skipped_steps=st.skipped_steps,
            checkpoint=str(path),
        )
        if self.metrics is not None:
            self.metrics.close()
        return end


def _time_budget(tc) -> budget_lib.TimeBudget | None:
    """The run's time budget (train.budget = "time"), replaying a recorded schedule when
    train.replay_schedule names one; None for a step budget."""
    if tc.budget != "time":
        return None
    if not tc.replay_schedule:
        return budget_lib.TimeBudget(tc.max_time)
    seconds, replay = budget_lib.read_schedule(tc.replay_schedule)
    return budget_lib.TimeBudget(seconds or tc.max_time, replay)


def _check_vocab(cfg: RunConfig, corpus: Corpus) -> None:
    n_vocab = corpus.tokenizer.n_vocab
    if cfg.model.vocab_size < n_vocab:
        raise GptlabError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({n_vocab}); set --model.vocab_size {n_vocab}"
        )


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer):
    """SIGINT/SIGTERM ask the trainer to finish its step, save and stop; a second SIGINT
    aborts at once. Used by `train()` (library code does not install handlers by itself)."""

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


# --------------------------------------------------------------------------- gptlab train

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
    cfg: RunConfig,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    init_from: str | None = None,
    model_keys: tuple[str, ...] = (),
    on_event: Callable[[dict[str, Any]], None] | None = None,
    tensorboard: bool = False,
    name: str = "run",
) -> TrainResult:
    """What `gptlab train` does: train `cfg` into `out` (default runs/NAME-TIME, pointed to
    by runs/latest) and draw its loss plot.

    `resume` continues the run in `out` from its latest checkpoint. `init_from` (a gptlab
    run, a Hugging Face GPT-2 or Llama folder or hub id) starts from those weights and their model
    config; `model_keys` are the model fields the user set, of which only drop_rate and
    attention may differ from the source. `on_event` receives every record (and two
    "loading"/"init_from" notes before training starts), on global rank 0 only.
    `tensorboard` adds "tensorboard" to train.trackers (the trackers fed every record, on
    global rank 0). SIGINT/SIGTERM stop after the current
    step with a checkpoint saved.
    """
    notify = on_event if on_event is not None and dist_lib.detect().is_main else _ignore
    if tensorboard:
        names = ",".join(dict.fromkeys([*tracker_names(cfg.train.trackers), "tensorboard"]))
        cfg = replace(cfg, train=replace(cfg.train, trackers=names))
    check_installed(cfg.train.trackers)  # a missing extra is said now, not after the data loads
    if init_from is not None and resume:
        raise GptlabError(
            "--init-from starts a new run from other weights and --resume continues one; "
            "use one of them"
        )
    run_dir = _new_run_dir(out, resume, name)
    source = None
    if init_from is not None:
        cfg, source = _init_from(cfg, init_from, model_keys, notify)
    recorded = _recorded_corpus_bpe(cfg, run_dir) if resume else None
    cfg, corpus, init_weights = _open_data(cfg, source, init_from, notify, recorded)
    source = None  # init_weights holds what is needed of it
    trainer = Trainer(
        cfg, corpus, run_dir, resume=resume, on_event=on_event, init_weights=init_weights
    )
    init_weights = None  # free the source's weights: the model holds them now
    if trainer.dist.is_main:
        _point_latest(run_dir)
    end = _run_with_signals(trainer, run_dir)
    # Only after a clean end: a rank that raised exits without waiting on the others.
    dist_lib.shutdown()
    plot = None
    if trainer.dist.is_main:
        with contextlib.suppress(GptlabError):  # no evaluation yet: no plot
            plot = plot_run(run_dir)
    return TrainResult(run_dir, end, cfg, plot, trainer.dist.is_main)


def _recorded_corpus_bpe(cfg: RunConfig, run_dir: Path) -> BPETokenizer | None:
    """The tokenizer a `bpe:N` run being resumed recorded, so it continues with exactly that
    one even where the tokenizer cache is gone (the data fingerprint still refuses other
    text); None for other tokenizers or when the run recorded none."""
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
    notify,
    tokenizer: BPETokenizer | None = None,
):
    """(cfg completed by its data, the corpus, the function that loads the source's
    weights into the new model, or None without a source); `tokenizer` replaces the one
    data.tokenizer names (a resumed run's own)."""
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
    _check_source_tokenizer(init_from, source.tokenizer_identity, corpus.tokenizer.identity())
    weights = source.model.state_dict()

    def init_weights(model: nn.Module) -> None:
        model.load_state_dict(weights)

    return cfg, corpus, init_weights


def _ignore(record: dict[str, Any]) -> None:
    pass


def _run_with_signals(trainer: Trainer, run_dir: Path) -> dict[str, Any]:
    """trainer.run() with the signal handlers installed, and the trackers of
    train.trackers fed every record (global rank 0 only)."""
    tc = trainer.cfg.train
    trackers = []
    if tc.trackers and trainer.dist.is_main:
        trackers = open_trackers(
            tc.trackers, run_dir, trainer.cfg.to_dict(), trainer.state.step, tc.tracker_project
        )
        view = trainer.on_event

        def all_of_them(record: dict[str, Any]) -> None:
            view(record)
            for tracker in trackers:
                tracker(record)

        trainer.on_event = all_of_them
    try:
        with stop_on_signals(trainer):
            return trainer.run()
    finally:
        for tracker in trackers:
            tracker.close()


def _new_run_dir(out: str | Path | None, resume: bool, name: str) -> Path:
    """The run directory, checked: a resume needs one; a new run must not overwrite one."""
    if resume and out is None:
        raise GptlabError("--resume needs --out RUN_DIR: the run to continue")
    run_dir = (
        Path(out) if out is not None else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if run_dir.exists() and not run_dir.is_dir():
        raise GptlabError(
            f"--out {str(run_dir)!r} is a file, not a directory; choose another --out"
        )
    taken = [] if resume else _run_files_in(run_dir)
    if taken:
        raise GptlabError(
            f"{str(run_dir)!r} already holds {', '.join(taken)}, which a new run would overwrite; "
            "add --resume to continue that run, or choose another --out"
        )
    return run_dir


def _run_files_in(run_dir: Path) -> list[str]:
    """The run files (and a non-empty checkpoints/) already in run_dir."""
    taken = [name for name in RUN_FILES if (run_dir / name).exists()]
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        taken.insert(0, "checkpoints/")
    return taken


def _point_latest(run_dir: Path) -> None:
    """Make runs/latest point at this run (a convenience; failures are harmless)."""
    if run_dir.parent.name != "runs":
        return
    link = run_dir.parent / "latest"
    try:
        tmp = run_dir.parent / f".latest-{os.getpid()}"
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, link)
    except OSError:
        pass


def _init_from(
    cfg: RunConfig, src: str, model_keys: tuple[str, ...], notify
) -> tuple[RunConfig, Run]:
    """(cfg with the source's model config, the opened source) for `init_from`."""
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


def _check_source_tokenizer(src: str, theirs: dict[str, Any], ours: dict[str, Any]) -> None:
    if ours != theirs:
        kind = theirs.get("type")
        raise GptlabError(
            f"--init-from: {src!r} was trained with a {kind} tokenizer"
            + (" of another vocabulary" if ours.get("type") == kind else "")
            + f" but this data uses a {ours.get('type')} one; use data tokenized the same way"
        )
