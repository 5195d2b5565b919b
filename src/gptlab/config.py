"""Typed configuration: model presets, training and data settings, TOML files, overrides.

A run is described by one `RunConfig` (sections `model`, `train`, `data`). It can be
built from a preset, a TOML file with the same sections, and `section.field=value`
overrides, in that order. Every value is checked by `validate()`, and unknown keys are
errors that name the key. The resolved config is saved with each run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


# The walk-through's configuration dict, exactly as its readers know it.
GPT_CONFIG_124M: dict[str, Any] = {
    "vocab_size": 50257,
    "context_length": 1024,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


@dataclass
class ModelConfig:
    """Shape and options of a GPTModel. Field names follow the walk-through's dict."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    # gptlab's additions; the defaults reproduce the walk-through's model exactly.
    tie_weights: bool = False  # share tok_emb and out_head weights (as GPT-2 does)
    attention: str = "sdpa"  # "sdpa": fused kernels; "manual": the walk-through's masked softmax
    vocab_multiple: int = 1  # pad the embedding/head rows to a multiple of this (64 is fast)
    init: str = "pytorch"  # "pytorch": PyTorch defaults (the walk-through); "gpt2": N(0, 0.02)
    fused_qkv: bool = False  # compute q, k, v with one matmul (same parameters, same math)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from the walk-through's plain dict (or any dict of ModelConfig fields)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GptlabError(
                f"unknown model config key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}"
            )
        return cls(**d).validate()

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def validate(self) -> ModelConfig:
        _positive(
            self,
            "model",
            ["vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "vocab_multiple"],
        )
        if self.emb_dim % self.n_heads:
            raise GptlabError(
                f"model.emb_dim ({self.emb_dim}) must be divisible by model.n_heads ({self.n_heads}); "
                "change one of them"
            )
        _fraction(self, "model", "drop_rate", upper_open=True)
        _choice(self, "model", "attention", ("sdpa", "manual"))
        _choice(self, "model", "init", ("pytorch", "gpt2"))
        return self


@dataclass
class TrainConfig:
    """Optimiser, schedule, limits and periodic work of the CLI trainer."""

    lr: float = 4e-4
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    weight_decay: float = 0.1
    # "matrices": decay only the weight matrices of linear layers (gptlab.optim.param_groups);
    # "all": every parameter in one group, as the walk-through's AdamW(model.parameters())
    weight_decay_on: str = "matrices"
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    batch_size: int = 8  # sequences per micro-batch (the walk-through's batch_size)
    batch_tokens: int = 0  # tokens per optimizer step; 0 means one micro-batch per step
    epochs: int = 1  # passes over the training windows
    max_steps: int = 0  # optimizer steps; 0 = no limit (epochs decide)
    max_time: float = 0.0  # seconds of training; 0 = no limit
    eval_freq: int = 100  # evaluate train and val loss every eval_freq steps
    eval_iter: int = 20  # batches per evaluation
    start_context: str = "Every effort moves you"
    sample_tokens: int = 50
    log_every: int = 10
    seed: int = 123
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N" | "mps"
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16"
    compile: str = "auto"  # "auto" | "on" | "off"
    fused_optimizer: bool = True
    # "auto" | "on" | "off": the training loss from hidden states in row chunks, never holding
    # the full (B, T, V) logits (gptlab.loss); auto turns it on where it measured faster
    chunked_loss: str = "auto"
    # "auto" | "on" | "off": dropout masks from random integers on CPU (gptlab.model.Dropout,
    # 2.7x faster than PyTorch's; another random stream); auto = on when training on CPU
    fast_dropout: str = "auto"
    # "auto" | "keep" | "release": "keep" has glibc's malloc keep freed memory for reuse
    # instead of handing large blocks back to the OS, which each step then page-faults in
    # again (1.2-1.5x the tokens/s on our CPU); auto = keep when training on CPU (Linux)
    host_memory: str = "auto"
    checkpoint_every: int = 0  # steps; 0 = only at the end (and on signals)
    checkpoint_every_minutes: float = 0.0
    keep_last: int = 2
    max_bad_steps: int = 5  # consecutive non-finite steps before training stops
    # after max_bad_steps: "stop" (save the last good weights), or "rollback" to the latest
    # checkpoint with half the learning rate (up to 3 times, then stop)
    on_nonfinite: str = "stop"
    parallel: str = "ddp"  # under torchrun: "ddp" (replicas) | "fsdp" (FSDP2, sharded)
    dist_timeout: float = 600.0  # seconds any collective may wait before the job fails

    def validate(self) -> TrainConfig:
        _positive(
            self,
            "train",
            [
                "lr",
                "batch_size",
                "eval_freq",
                "eval_iter",
                "log_every",
                "keep_last",
                "max_bad_steps",
                "dist_timeout",
            ],
        )
        _non_negative(
            self,
            "train",
            [
                "warmup_steps",
                "weight_decay",
                "grad_clip",
                "batch_tokens",
                "epochs",
                "max_steps",
                "max_time",
                "sample_tokens",
                "checkpoint_every",
                "checkpoint_every_minutes",
            ],
        )
        _fraction(self, "train", "min_lr_ratio")
        _fraction(self, "train", "beta1", upper_open=True)
        _fraction(self, "train", "beta2", upper_open=True)
        _choice(self, "train", "schedule", ("cosine", "linear", "constant"))
        _choice(self, "train", "weight_decay_on", ("matrices", "all"))
        _choice(self, "train", "precision", ("auto", "fp32", "bf16", "fp16"))
        _choice(self, "train", "compile", ("auto", "on", "off"))
        _choice(self, "train", "on_nonfinite", ("stop", "rollback"))
        _choice(self, "train", "parallel", ("ddp", "fsdp"))
        _choice(self, "train", "chunked_loss", ("auto", "on", "off"))
        _choice(self, "train", "fast_dropout", ("auto", "on", "off"))
        _choice(self, "train", "host_memory", ("auto", "keep", "release"))
        if self.epochs == 0 and self.max_steps == 0 and self.max_time == 0:
            raise GptlabError(
                "no training limit: set train.epochs, train.max_steps or train.max_time above 0"
            )
        return self


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes training windows."""

    source: str = (
        "shakespeare"  # a file, directory, glob, built-in "shakespeare", or a prepared dir
    )
    tokenizer: str = "gpt2"  # "gpt2" | "char" | path of a trained tokenizer.json (or its directory)
    train_ratio: float = 0.9
    # where the train/val cut is made: "tokens": train_ratio of the tokenized text;
    # "chars": train_ratio of its characters, each part tokenized on its own (the walk-through)
    split: str = "tokens"
    stride: int = 0  # distance between window starts; 0 = context_length (no overlap)
    shuffle: bool = True
    # the order of training windows: "seeded": a pure function of (seed, epoch), evaluation on
    # fixed batches; "dataloader": torch DataLoaders drawing from the global RNG as the
    # walk-through's do: each epoch and each evaluation draws a fresh shuffle (one process only)
    order: str = "seeded"

    def validate(self) -> DataConfig:
        if not self.source:
            raise GptlabError("data.source is empty: pass --data PATH or --data shakespeare")
        if self.tokenizer not in ("gpt2", "char") and not (
            self.tokenizer.endswith(".json")
            or "/" in self.tokenizer
            or Path(self.tokenizer).is_dir()
        ):
            raise GptlabError(
                f"data.tokenizer must be gpt2, char, or the path of a trained tokenizer.json "
                f"(or its directory); got {self.tokenizer!r}"
            )
        if not 0.0 < self.train_ratio < 1.0:
            raise GptlabError(
                f"data.train_ratio must be between 0 and 1 (exclusive), got {self.train_ratio}"
            )
        _non_negative(self, "data", ["stride"])
        _choice(self, "data", "split", ("tokens", "chars"))
        _choice(self, "data", "order", ("seeded", "dataloader"))
        return self


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> RunConfig:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        if self.data.stride > self.model.context_length:
            raise GptlabError(
                f"data.stride ({self.data.stride}) exceeds model.context_length "
                f"({self.model.context_length}): windows would skip tokens; lower the stride"
            )
        micro = self.train.batch_size * self.model.context_length
        if self.train.batch_tokens and self.train.batch_tokens % micro:
            raise GptlabError(
                f"train.batch_tokens ({self.train.batch_tokens}) must be a multiple of "
                f"batch_size x context_length ({micro}); e.g. {max(1, self.train.batch_tokens // micro) * micro}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        cfg = cls()
        apply_nested(cfg, d)
        return cfg


SECTIONS = ("model", "train", "data")

# Presets set whole runs. The GPT-2 family sets only the model shape; the small ones are
# sized for a 2-core CPU and carry the schedule that suits them.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "gpt2-small": {"model": dict(GPT_CONFIG_124M)},
    "gpt2-medium": {"model": {**GPT_CONFIG_124M, "emb_dim": 1024, "n_layers": 24, "n_heads": 16}},
    "gpt2-large": {"model": {**GPT_CONFIG_124M, "emb_dim": 1280, "n_layers": 36, "n_heads": 20}},
    "gpt2-xl": {"model": {**GPT_CONFIG_124M, "emb_dim": 1600, "n_layers": 48, "n_heads": 25}},
    # Seconds on a CPU: for tests and smoke runs.
    "tiny": {
        "model": {
            "context_length": 32,
            "emb_dim": 32,
            "n_heads": 2,
            "n_layers": 2,
            "drop_rate": 0.0,
            "tie_weights": True,
            "init": "gpt2",
        },
        "train": {
            "batch_size": 4,
            "lr": 1e-3,
            "eval_freq": 20,
            "eval_iter": 2,
            "sample_tokens": 20,
            "max_steps": 20,
            "log_every": 5,
        },
    },
    # The default run: the lowest validation loss we found in 10 minutes on 2 CPU cores.
    # GPT-2 BPE beat a char-level 6x384 model in bits per byte, and 4 layers for 1,000
    # steps beat 8 layers for 800 (BENCHMARKS.md). A fixed step count lets the cosine reach
    # its floor: 1,000 steps took 509 s of training (~4,000 tokens/s on a quiet 2-core CPU:
    # bf16, chunked loss, kept host memory); max_time is a safety net for slower machines.
    "cpu": {
        "model": {
            "context_length": 128,
            "emb_dim": 256,
            "n_heads": 4,
            "n_layers": 4,
            "drop_rate": 0.0,
            "tie_weights": True,
            "vocab_multiple": 64,
            "init": "gpt2",
        },
        "train": {
            "batch_size": 16,
            "lr": 2e-3,
            "warmup_steps": 50,
            "beta2": 0.95,
            "epochs": 0,  # max_steps decides: 1,000 steps are ~1.5 passes over the plays
            "max_steps": 1000,
            "max_time": 570.0,
            "eval_freq": 100,
            "eval_iter": 10,
            "log_every": 10,
        },
    },
    # The walk-through's chapter 5 run, step for step: `gptlab train --preset walkthrough --data
    # the-verdict.txt` prints the losses its train_model_simple prints on a CPU (the same
    # random draws; the floats differ by ~1e-6, as gptlab's fused LayerNorm and GELU round
    # differently from the book's formulas). Everything that changes the numbers is pinned:
    # its model and dropout draws (manual attention, PyTorch's masks, fp32, no compile),
    # AdamW(model.parameters(), lr=4e-4, weight_decay=0.1) unfused and unclipped, its
    # 90/10 split by characters and its loaders.
    "walkthrough": {
        "model": {
            **GPT_CONFIG_124M,
            "context_length": 256,
            "tie_weights": False,
            "init": "pytorch",
            "attention": "manual",
            "vocab_multiple": 1,
            "fused_qkv": False,
        },
        "train": {
            "lr": 4e-4,
            "schedule": "constant",
            "warmup_steps": 0,
            "weight_decay": 0.1,
            "weight_decay_on": "all",
            "beta1": 0.9,
            "beta2": 0.999,
            "grad_clip": 0.0,
            "batch_size": 2,
            "batch_tokens": 0,
            "epochs": 10,
            "max_steps": 0,
            "eval_freq": 5,
            "eval_iter": 5,
            "seed": 123,
            "precision": "fp32",
            "compile": "off",
            "fused_optimizer": False,
            "chunked_loss": "off",
            "fast_dropout": "off",
        },
        "data": {
            "tokenizer": "gpt2",
            "train_ratio": 0.9,
            "split": "chars",
            "stride": 0,
            "shuffle": True,
            "order": "dataloader",
        },
    },
}
DEFAULT_PRESET = "cpu"


def preset(name: str) -> RunConfig:
    """The RunConfig a preset describes (defaults for everything it leaves out)."""
    if name not in PRESETS:
        raise GptlabError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return RunConfig.from_dict(PRESETS[name])


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a nested dict (sections model/train/data, optional preset)."""
    p = Path(path)
    if not p.is_file():
        raise GptlabError(f"config file {str(p)!r} not found; check the --config path")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise GptlabError(f"config file {str(p)!r} is not valid TOML: {e}") from None


def apply_nested(cfg: RunConfig, d: dict[str, Any], origin: str = "config") -> None:
    """Set fields from a nested dict {"model": {...}, "train": {...}, "data": {...}}."""
    for section, values in d.items():
        if section not in SECTIONS:
            raise GptlabError(
                f"unknown {origin} section {section!r}; sections are {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise GptlabError(f"{origin} section {section!r} must be a table of keys")
        for key, value in values.items():
            set_field(cfg, f"{section}.{key}", value)


def set_field(cfg: RunConfig, dotted: str, value: Any) -> None:
    """Set `section.field` to value, converting strings to the field's type."""
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or not key:
        raise GptlabError(
            f"unknown config key {dotted!r}; use section.field with sections {', '.join(SECTIONS)}"
        )
    obj = getattr(cfg, section)
    types = {f.name: f.type for f in dataclasses.fields(obj)}
    if key not in types:
        raise GptlabError(f"unknown config key {dotted!r}; {section} has: {', '.join(types)}")
    setattr(obj, key, _coerce(dotted, value, getattr(obj, key)))


def _coerce(name: str, value: Any, current: Any) -> Any:
    kind = type(current)
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise GptlabError(f"{name} must be true or false, got {value!r}")
        try:
            return int(text) if kind is int else float(text)
        except ValueError:
            raise GptlabError(f"{name} must be a number, got {value!r}") from None
    if kind is bool and not isinstance(value, bool):
        raise GptlabError(f"{name} must be true or false, got {value!r}")
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GptlabError(f"{name} must be of type {kind.__name__}, got {value!r}")
    return value


def _positive(obj: Any, section: str, names: list[str]) -> None:
    for n in names:
        v = getattr(obj, n)
        if not v > 0:
            raise GptlabError(f"{section}.{n} must be greater than 0, got {v}")


def _non_negative(obj: Any, section: str, names: list[str]) -> None:
    for n in names:
        v = getattr(obj, n)
        if v < 0:
            raise GptlabError(f"{section}.{n} must be 0 or more, got {v}")


def _fraction(obj: Any, section: str, name: str, upper_open: bool = False) -> None:
    v = getattr(obj, name)
    if not (0.0 <= v < 1.0 if upper_open else 0.0 <= v <= 1.0):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise GptlabError(f"{section}.{name} must be in {bound}, got {v}")


def _choice(obj: Any, section: str, name: str, choices: tuple[str, ...]) -> None:
    v = getattr(obj, name)
    if v not in choices:
        raise GptlabError(f"{section}.{name} must be one of {', '.join(choices)}; got {v!r}")
