"""Training: the walk-through's `train_model_simple`, and the CLI's `Trainer`.

`train_model_simple` is the walk-through's loop, unchanged in behaviour: evaluate every
`eval_freq` steps on `eval_iter` batches, print a sample after each epoch, return the
loss and token histories.

`Trainer` is the same loop grown up. Its per-step work is plain (micro-batches under
autocast, backward, clip, step); everything periodic (logging, evaluation, samples,
checkpoints, limits, signals) sits behind small `due` checks. Every event becomes one
record in metrics.jsonl and is passed to an `on_event` callback, which is how the CLI
draws its progress bar: the library itself prints nothing.

Exact resume: the data order is a pure function of (seed, epoch), sampling uses its own
generator, and checkpoints carry the optimizer and every RNG state, so a run resumed from
step k repeats the uninterrupted run's steps k+1, k+2, ... bit for bit (CPU, fp32).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gptlab import checkpoint as ckpt_lib
from gptlab import dist as dist_lib
from gptlab.config import RunConfig
from gptlab.data import Corpus, make_loaders
from gptlab.errors import GptlabError
from gptlab.evaluate import calc_loss_batch, evaluate_model
from gptlab.generate import generate, generate_text_simple, text_to_token_ids, token_ids_to_text
from gptlab.loss import model_loss
from gptlab.metrics import MetricsLog, peak_flops, peak_memory_mib, truncate_metrics
from gptlab.model import GPTModel, count_parameters, flops_per_token, use_fast_dropout
from gptlab.optim import build_optimizer, lr_at

# --------------------------------------------------------------------------- the walk-through's loop


def generate_and_print_sample(model: nn.Module, tokenizer, device, start_context: str) -> None:
    """Print a 50-token greedy continuation of `start_context` on one line."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(
            model, idx=encoded, max_new_tokens=50, context_size=context_size
        )
    print(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))
    model.train()


def train_model_simple(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    device,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer,
) -> tuple[list[float], list[float], list[int]]:
    """The walk-through's training loop. Returns (train_losses, val_losses, track_tokens_seen),
    one entry per evaluation: after steps 0, eval_freq, 2*eval_freq, ... (0-based)."""
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, device, eval_iter
                )
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(
                    f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
                )
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


# --------------------------------------------------------------------------- devices and precision


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GptlabError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptlabError("train.device is cuda but no CUDA GPU is visible; use --train.device cpu")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps and mps.is_available()):
        raise GptlabError("device mps is not available on this machine; use --device cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matmul instructions (AVX512-BF16 or AMX), where bf16 pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> the fastest safe choice: bf16 on CUDA with bf16 and on bf16-capable CPUs,
    fp16 on older CUDA cards (with a gradient scaler), else fp32."""
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise GptlabError("fp16 training is not supported on CPU; use --precision bf16 or fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """Mixed precision context: matmuls in bf16/fp16, master weights stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_chunked_loss(name: str, device: torch.device) -> bool:
    """'auto' -> the chunked loss (gptlab.loss) where it measured faster: on CPU (1.4x the
    tokens/s of a 4-layer model with GPT-2's vocabulary in bf16), not on CUDA (there the
    compiled full-logits loss was 8% faster for GPT-2 124M on an H200, the chunked one
    saved 1.2 GiB); see BENCHMARKS.md. 'on'/'off' as given."""
    if name != "auto":
        return name == "on"
    return device.type == "cpu"


def resolve_compile(name: str, device: torch.device) -> bool:
    """'auto' -> torch.compile on CUDA only: on CPU it needs a C++ toolchain, its first step
    takes 25-40 s, and it added only 4-17% there (BENCHMARKS.md). 'on'/'off' as given."""
    return name == "on" or (name == "auto" and device.type == "cuda")


def resolve_fast_dropout(name: str, device: torch.device) -> bool:
    """'auto' -> the fast dropout masks (gptlab.model.Dropout) when training on CPU, where
    PyTorch's per-element Bernoulli draws are slow; CUDA's dropout is fused already."""
    return name == "on" or (name == "auto" and device.type == "cpu")


def keep_freed_host_memory() -> bool:
    """Have glibc's malloc keep freed memory in the process for reuse; True if it took.

    By default glibc serves large blocks (above a threshold that starts at 128 KiB and
    rises to at most 32 MiB) with their own mmap and unmaps them when freed, so a training
    step that frees and re-allocates its activations, logits and gradients page-faults them
    in again every step, zeroed page by page by the kernel (~600k faults per step for a
    6x384 model on our 2-core CPU; keeping the memory made it 1.2-1.5x faster, see
    BENCHMARKS.md). With mmap off and a high trim threshold, freed blocks stay on the heap
    and the next step reuses them; the cost is that the process keeps its peak memory until
    it exits. Process-wide and for good; a no-op (False) off Linux or with another C library.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and friends: no glibc tunables
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def resolve_host_memory(name: str, device: torch.device) -> str:
    """'auto' -> 'keep' when training on CPU, where the host allocator is the hot path."""
    if name != "auto":
        return name
    return "keep" if device.type == "cpu" else "release"


def make_loss_fn(
    model: nn.Module, chunked: bool, compiled: bool
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training step's loss: (inputs, targets) (B, T) on the model's device -> scalar.

    The same value as `calc_loss_batch`. With `compiled`, the model and the loss are one
    torch.compile graph, so the compiler sees (and fuses) the head and cross-entropy too.
    """

    def loss_fn(input_batch: torch.Tensor, target_batch: torch.Tensor) -> torch.Tensor:
        return model_loss(model, input_batch, target_batch, chunked=chunked)

    return torch.compile(loss_fn) if compiled else loss_fn


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch -> device; on CUDA through pinned memory, so the copy does not block."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# --------------------------------------------------------------------------- the CLI trainer


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry besides weights and optimizer."""

    step: int = 0  # optimizer steps done (a skipped non-finite step counts: its data was used)
    tokens_seen: int = 0
    train_time: float = 0.0  # seconds spent training, summed over resumes
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


# Why a run stops, in the order ranks settle on one when they differ (the last wins).
STOP_REASONS = ("epochs", "max_steps", "max_time", "nonfinite", "SIGTERM", "SIGINT")

# Config fields a resumed run may not change: they define the model or the data stream.
# data.source is not among them: the same text under another path is fine, and the data
# fingerprint (text + tokenizer) refuses different text whatever its path.
FROZEN_ON_RESUME = (
    "model.*",
    "data.tokenizer",
    "data.train_ratio",
    "data.stride",
    "data.shuffle",
    "data.split",
    "data.order",
    "train.batch_size",
    "train.batch_tokens",
    "train.seed",
)


MAX_ROLLBACKS = 3  # train.on_nonfinite = "rollback" gives up (and stops) after this many


class Trainer:
    """Trains a GPTModel on a Corpus into a run directory.

    `on_event(record)` receives every metrics record as it is written (the CLI renders them).
    `init_weights(model)`, when given, sets the new model's weights before training starts
    (not on resume): how `gptlab train --init-from` starts from GPT-2 or another run.
    """

    def __init__(
        self,
        cfg: RunConfig,
        corpus: Corpus,
        run_dir: str | Path,
        resume: bool = False,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        init_weights: Callable[[nn.Module], None] | None = None,
    ):
        self.cfg = cfg.validate()
        self.corpus = corpus
        self.run_dir = Path(run_dir)
        self.on_event = on_event or (lambda record: None)
        self.stop_reason: str | None = None  # set by signal handlers or guards
        tc, mc = cfg.train, cfg.model
        resume_from = self._check_resume() if resume else None

        if mc.vocab_size < corpus.tokenizer.n_vocab:
            raise GptlabError(
                f"model.vocab_size ({mc.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({corpus.tokenizer.n_vocab}); set --model.vocab_size {corpus.tokenizer.n_vocab}"
            )
        # Under torchrun: join the job, one GPU per local rank (a single process: no-op).
        self.dist = dist_lib.setup(resolve_device(tc.device), tc.dist_timeout)
        self.device = self.dist.device
        self.precision = resolve_precision(tc.precision, self.device)
        if self.dist.enabled and tc.parallel == "fsdp" and self.precision == "fp16":
            raise GptlabError(
                "fp16 needs a gradient scaler that FSDP2 shards do not support here; "
                "use --precision bf16 (or fp32) with --parallel fsdp"
            )
        self.train_loader, self.val_loader = make_loaders(cfg, corpus, self.dist.world_size)
        for split, loader, tokens in (
            ("training", self.train_loader, corpus.train),
            ("validation", self.val_loader, corpus.val),
        ):
            if loader.num_windows == 0:
                raise GptlabError(
                    f"the {split} split has {len(tokens)} tokens, fewer than one context window "
                    f"({mc.context_length + 1}); use more text or a smaller --model.context_length"
                )
        if len(self.train_loader) == 0:
            raise GptlabError(
                f"the training split has {self.train_loader.num_windows} windows, fewer than one batch "
                f"({tc.batch_size}); lower --train.batch_size or use more text"
            )
        micro_tokens = tc.batch_size * mc.context_length
        # Micro-batches per optimizer step in the whole job; each rank runs accum / world_size.
        world = self.dist.world_size
        self.accum = dist_lib.accum_per_rank(tc.batch_tokens, micro_tokens, world) * world
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

        self.host_memory = resolve_host_memory(tc.host_memory, self.device)
        if self.host_memory == "keep" and not keep_freed_host_memory():
            self.host_memory = "release"  # not glibc: the C library's own behaviour stays

        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        self.model = GPTModel(mc).to(self.device)
        self.fast_dropout = resolve_fast_dropout(tc.fast_dropout, self.device)
        use_fast_dropout(self.model, self.fast_dropout)  # only CPU tensors take the fast path
        if init_weights is not None and not resume:
            init_weights(self.model)  # e.g. GPT-2's (train --init-from); a resume loads its own
        # DDP wrapper or FSDP2 shards (in place, so the optimizer comes after); a single
        # process gets self.model back.
        self.parallel_model = dist_lib.parallelize(self.model, tc.parallel, self.dist)
        self.optimizer = build_optimizer(self.model, tc, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.compiled = resolve_compile(tc.compile, self.device)
        single = self.dist.world_size == 1
        # Under DDP/FSDP2 the loss must run through the wrapper (its forward drives gradient
        # sync and FSDP2's all-gathers), so the chunked loss, which calls the bare model's
        # hidden_states, is single-process only.
        self.chunked_loss = single and resolve_chunked_loss(tc.chunked_loss, self.device)
        self.loss_fn = make_loss_fn(self.parallel_model, self.chunked_loss, self.compiled)
        self.train_model = (
            torch.compile(self.parallel_model) if self.compiled else self.parallel_model
        )
        # Non-finite steps are skipped on the device where the fused AdamW kernel can do it
        # (not with fp16's GradScaler, which has its own skip), else after a host check.
        self._fused_can_skip = (
            single
            and bool(self.optimizer.defaults.get("fused"))
            and getattr(self.optimizer, "_step_supports_amp_scaling", False)
        )
        self._pending: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None
        self.state = TrainState()
        self.sample_gen_seed = tc.seed
        # Fail now, not at the first sample an epoch later: a char vocabulary may lack some
        # of the prompt's characters, and that error would kill the run before its save.
        try:
            text_to_token_ids(tc.start_context, corpus.tokenizer)
        except GptlabError as e:
            raise GptlabError(
                f"train.start_context cannot be encoded ({e}); set --train.start_context"
            ) from None

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.resumed_from: Path | None = None
        if resume:
            self._restore(*resume_from)
        if self.dist.is_main:  # one writer per job
            self._write_run_files()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if self.dist.is_main else None

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            self.precision
        ]
        self.peak, self.peak_source = peak_flops(self.device, dtype)
        self.flops_per_token = flops_per_token(mc)

    # ---------------------------------------------------------------- run files and resume

    def _write_run_files(self) -> None:
        (self.run_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        (self.run_dir / "tokenizer.json").write_text(json.dumps(self.corpus.tokenizer.identity()))

    def _meta(self, val_loss: float | None) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "tokenizer": self.corpus.tokenizer.identity(),
            "data_fingerprint": self.corpus.fingerprint,
            "tokens_seen": self.state.tokens_seen,
            "val_loss": val_loss,
        }

    def _check_resume(self) -> tuple[Path, list[tuple[str, Any, Any]]]:
        """The checkpoint to resume from and the config changes, once they are known to be
        safe. Runs first, so a refusal names the change rather than a symptom of it."""
        ckpt = ckpt_lib.latest_checkpoint(self.run_dir, missing_ok=True)
        if ckpt is None:
            raise GptlabError(
                f"--resume: no checkpoint in {str(self.run_dir)!r} to continue from; "
                "start a new run (without --resume) with an unused --out"
            )
        meta = ckpt_lib.read_meta(ckpt)
        saved_cfg = meta.get("config")
        if not isinstance(saved_cfg, dict):
            raise GptlabError(
                f"checkpoint {str(ckpt)!r} has no saved config in its metadata; it cannot be resumed"
            )
        # Fields added to gptlab after the checkpoint was written take their defaults, which
        # reproduce the older behaviour; only real differences count as changes.
        changes = _config_changes(_with_defaults(saved_cfg), self.cfg.to_dict())
        frozen = [c for c in changes if _is_frozen(c[0])]
        # Data and batch changes first: a char vocabulary follows its text, so other text
        # also shows up as a model.vocab_size change, which is the symptom, not the cause.
        frozen.sort(key=lambda c: c[0].startswith("model."))
        if frozen and not frozen[0][0].startswith("model."):
            raise _refuse(*frozen[0])
        if meta.get("tokenizer") != self.corpus.tokenizer.identity():
            raise GptlabError(
                "cannot resume: the tokenizer (for char, the characters of the text) differs from "
                "the checkpoint's; use the same --data and tokenizer"
            )
        if meta.get("data_fingerprint") != self.corpus.fingerprint:
            raise GptlabError(
                "cannot resume: the training text differs from the checkpoint's; use the same --data"
            )
        if frozen:
            raise _refuse(*frozen[0])
        return ckpt, changes

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
            ckpt_lib.load_weights(self.model, ckpt, self.device)
        st = ckpt_lib.load_state(ckpt)
        try:
            data = st.get("data")
            if data and (data["steps_per_epoch"], data["accum"]) != (
                self.steps_per_epoch,
                self.accum,
            ):
                raise ValueError(
                    f"its epoch has {data['steps_per_epoch']} steps of {data['accum']} micro-batches, "
                    f"this run's {self.steps_per_epoch} of {self.accum}"
                )
            self.train_loader.load_state_dict((data or {}).get("loader", {}))
            if self.dist.sharded:
                self._load_sharded(ckpt, st["optimizer"])
            else:
                self.optimizer.load_state_dict(st["optimizer"])
            if st.get("scaler"):
                self.scaler.load_state_dict(st["scaler"])
            self.state = TrainState(**st["trainer"])
            _set_rng_state(st["rng"])
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
        with autocast(self.device, self.precision):
            train_loss, val_loss = dist_lib.evaluate_model(
                self.train_model,
                self.train_loader,
                self.val_loader,
                self.device,
                self.cfg.train.eval_iter,
                self.dist,
            )
        h = self.state.history
        h["step"].append(self.state.step)
        h["epoch"].append(self.epoch_progress)
        h["tokens"].append(self.state.tokens_seen)
        h["train_loss"].append(train_loss)
        h["val_loss"].append(val_loss)
        self.state.best_val = min(self.state.best_val, val_loss)
        self.emit(
            "eval",
            epoch=self.epoch_progress,
            tokens=self.state.tokens_seen,
            train_loss=train_loss,
            val_loss=val_loss,
        )
        return train_loss, val_loss

    def full_validation_loss(self) -> float:
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.precision):
            loss = dist_lib.loader_loss(
                self.val_loader, self.train_model, self.device, None, self.dist
            )
        self.model.train()
        return loss

    def sample(self) -> str:
        tc = self.cfg.train
        tok = self.corpus.tokenizer
        self.model.eval()
        idx = text_to_token_ids(tc.start_context, tok).to(self.device)
        # Its own generator: sampling never shifts the training run's random stream.
        gen = torch.Generator(device=self.device).manual_seed(self.sample_gen_seed)
        with autocast(self.device, self.precision):
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
        state = {
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "trainer": asdict(self.state),
            "rng": _get_rng_state(),
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
        path = ckpt_lib.save_checkpoint(
            self.run_dir,
            self.state.step,
            model,
            self._meta(val_loss),
            state,
            self.cfg.train.keep_last,
        )
        self.emit("checkpoint", path=str(path), reason=reason)
        return path

    # ---------------------------------------------------------------- the loop

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
        if tc.max_time and self.state.train_time >= tc.max_time:
            return "max_time"
        return None

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over `accum` micro-batches; returns (loss, grad_norm)."""
        tc = self.cfg.train
        epoch, in_epoch = divmod(self.state.step, self.steps_per_epoch)
        lr = lr_at(self.state.step, tc, self.total_steps) * self.state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        # This rank's share of the step's micro-batches (all of them in a single process).
        mine = dist_lib.micro_batch_indices(
            in_epoch, self.accum, self.dist.rank, self.dist.world_size
        )
        for m, index in enumerate(mine):
            x, y = self._batch(epoch, index)
            # ranks exchange gradients once per step, after their last micro-batch
            with dist_lib.grad_sync(self.parallel_model, m == len(mine) - 1):
                with autocast(self.device, self.precision):
                    loss = self.loss_fn(x, y) / len(mine)
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        loss_sum = self.dist.mean(loss_sum)  # the whole step's loss, the same on every rank
        self.scaler.unscale_(self.optimizer)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        grad_norm = dist_lib.grad_norm_value(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        )
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
        else:  # keep the last good weights; the guard below decides whether to go on
            self.state.bad_steps += 1
            self.state.skipped_steps += 1
            if self.scaler.is_enabled():
                self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens_seen += self.accum * x.numel()
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

    def run(self) -> dict[str, Any]:
        """Train until a limit, a signal or a guard stops it; returns the final 'end' record."""
        tc, st = self.cfg.train, self.state
        n_params = count_parameters(self.model)
        if self.resumed_from is not None:
            changed = [f"{k}: {a!r} -> {b!r}" for k, a, b in self.resume_changes]
            self.emit("resume", checkpoint=str(self.resumed_from), changed=changed)
        self.emit(
            "start",
            params=n_params,
            device=str(self.device),
            precision=self.precision,
            compiled=self.compiled,
            world_size=self.dist.world_size,
            parallel=self.dist.mode,
            chunked_loss=self.chunked_loss,
            fast_dropout=self.fast_dropout,
            host_memory=self.host_memory,
            accum=self.accum,
            batch_tokens=self.accum * tc.batch_size * self.cfg.model.context_length,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            train_tokens=len(self.corpus.train),
            val_tokens=len(self.corpus.val),
            peak_flops=self.peak,
            peak_source=self.peak_source,
        )
        self.model.train()
        last_ckpt_time = time.monotonic()
        window_t, window_tokens, window_steps, window_loss = time.perf_counter(), 0, 0, 0.0
        first_step = True
        last_val: float | None = None
        while (reason := self.done()) is None:
            t0 = time.perf_counter()
            tokens_before = st.tokens_seen
            if first_step and self.compiled:
                loss, norm = self._first_compiled_step()
            else:
                loss, norm = self.train_step()
            dist_lib.maybe_fail_for_test(self.dist, st.step)
            dt = time.perf_counter() - t0  # .item() in train_step has synchronised the device
            st.train_time += dt
            if first_step and self.compiled:
                self.emit("compile", seconds=round(dt, 2))
                window_t = time.perf_counter()
            else:
                window_tokens += st.tokens_seen - tokens_before
                window_steps += 1
                window_loss += loss if math.isfinite(loss) else 0.0
            first_step = False

            spike = (
                math.isfinite(st.loss_ema)
                and math.isfinite(loss)
                and loss > 1.5 * st.loss_ema + 0.5
            )
            if math.isfinite(loss):
                st.loss_ema = (
                    loss if not math.isfinite(st.loss_ema) else 0.9 * st.loss_ema + 0.1 * loss
                )
            if st.bad_steps:  # this step was non-finite and skipped
                self.emit("nonfinite", loss=loss, grad_norm=norm, consecutive=st.bad_steps)
                if st.bad_steps >= tc.max_bad_steps:
                    if tc.on_nonfinite == "rollback" and self._rollback():
                        st = self.state  # the checkpoint's counters replace ours
                        continue
                    self.stop_reason = "nonfinite"
            elif not math.isfinite(norm):
                self.emit("overflow", grad_norm=norm, scale=self.scaler.get_scale())
            elif spike:
                self.emit("spike", loss=loss, ema=st.loss_ema)

            if st.step % tc.log_every == 0 or st.step == 1 or self.done():
                elapsed = time.perf_counter() - window_t
                tps = window_tokens / elapsed if elapsed > 0 and window_steps else 0.0
                self.emit(
                    "train",
                    epoch=self.epoch_progress,
                    tokens=st.tokens_seen,
                    loss=window_loss / window_steps if window_steps else loss,
                    lr=self.optimizer.param_groups[0]["lr"],
                    grad_norm=norm,
                    tokens_per_s=tps,
                    mfu=tps * self.flops_per_token / (self.peak * self.dist.world_size),
                    peak_mem_mib=peak_memory_mib(self.device),
                    elapsed=st.train_time,
                )
                window_t, window_tokens, window_steps, window_loss = time.perf_counter(), 0, 0, 0.0

            if (st.step - 1) % tc.eval_freq == 0:
                _, last_val = self.evaluate()
            if st.step % self.steps_per_epoch == 0:
                self.emit("epoch", epoch=st.step // self.steps_per_epoch)
                self.sample()
            minutes_due = tc.checkpoint_every_minutes and self.dist.any(
                time.monotonic() - last_ckpt_time >= 60 * tc.checkpoint_every_minutes
            )  # decided together: under FSDP2 a save needs every rank
            due = (tc.checkpoint_every and st.step % tc.checkpoint_every == 0) or minutes_due
            # Not in the middle of a non-finite streak: a rollback must find good weights.
            if due and not st.bad_steps:
                self._save_quietly(last_val)
                last_ckpt_time = time.monotonic()

        # The end: a final evaluation, sample and checkpoint. A signal or the guard saves at
        # once: the user asked to stop, or the model is in trouble.
        quick = reason in ("nonfinite", "SIGINT", "SIGTERM")
        if not quick and (not st.history["step"] or st.history["step"][-1] != st.step):
            _, last_val = self.evaluate()
        if not quick and st.step % self.steps_per_epoch != 0:
            self.sample()
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

    def _save_quietly(self, val_loss: float | None) -> None:
        """A periodic save that fails (full disk) is reported and training goes on."""
        try:
            self.save(val_loss)
        except GptlabError as e:
            self.emit("checkpoint_failed", error=str(e))


def _config_changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, name + ".")
        elif a != b:
            out.append((name, a, b))
    return out


def _refuse(key: str, old: Any, new: Any) -> GptlabError:
    return GptlabError(
        f"cannot resume: {key} changed from {old!r} to {new!r} (it defines the model or data); "
        "start a new run with another --out"
    )


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict with the fields it lacks filled from today's defaults."""
    out = RunConfig().to_dict()
    for section, values in saved.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def _is_frozen(key: str) -> bool:
    return any(key == f or (f.endswith(".*") and key.startswith(f[:-1])) for f in FROZEN_ON_RESUME)


def _get_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer):
    """SIGINT/SIGTERM ask the trainer to finish its step, save and stop; a second SIGINT
    aborts at once. Used by the CLI (library code does not install handlers by itself)."""

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
