"""Typed configuration: model presets, training and data settings, TOML files, overrides.

A run is described by one `RunConfig` (sections `model`, `train`, `data`). It can be
built from a preset, a TOML file with the same sections, and `section.field=value`
overrides, in that order. Every value is checked by `validate()`, and unknown keys are
errors that name the key. The resolved config is saved with each run and checkpoint.

Each field carries its one line of meaning (and, for a setting with a fixed set of values,
its choices) in its metadata: `gptlab train --help` and validation both read them there.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def cache_dir() -> Path:
    """Where gptlab caches tokenized text and measured peaks: $GPTLAB_CACHE or ~/.cache/gptlab."""
    return Path(os.environ.get("GPTLAB_CACHE", Path.home() / ".cache" / "gptlab"))


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


@dataclass(frozen=True)
class Range:
    """The values a number may take: bounds `low` and `high` (None: unbounded), each
    included unless marked open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def describe(self) -> str:
        """'greater than 0', '1 or more', 'in [0, 1)', ..."""
        lo, hi = _number_text(self.low), _number_text(self.high)
        if self.high is None:
            return f"greater than {lo}" if self.low_open else f"{lo} or more"
        if self.low is None:
            return f"less than {hi}" if self.high_open else f"{hi} or less"
        return f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"


def _number_text(v: float | None) -> str:
    return str(int(v)) if v is not None and float(v).is_integer() else str(v)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
BELOW_ONE = Range(0, 1, high_open=True)


def _field(
    default: Any, help: str, choices: tuple[str, ...] | None = None, bounds: Range | None = None
) -> Any:
    """A dataclass field with its one line of help and, where they apply, the choices of an
    enum-like string or the range of a number: validation and the CLI read them from here."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if bounds is not None:
        metadata["range"] = bounds
    return field(default=default, metadata=metadata)


def field_help(f: dataclasses.Field) -> str:
    """The one line of meaning a config field declares."""
    return f.metadata.get("help", "")


def field_choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The values an enum-like config field accepts, or None for an open field."""
    return f.metadata.get("choices")


def field_range(f: dataclasses.Field) -> Range | None:
    """The range a numeric config field accepts, or None when any number will do."""
    return f.metadata.get("range")


@dataclass
class ModelConfig:
    """Shape and options of a GPTModel. Field names follow the walk-through's dict."""

    vocab_size: int = _field(
        50257, "token ids the embedding and output head cover", bounds=POSITIVE
    )
    context_length: int = _field(
        1024, "longest input in tokens (rows of the position embedding)", bounds=POSITIVE
    )
    emb_dim: int = _field(768, "width of the embeddings and of every block", bounds=POSITIVE)
    n_heads: int = _field(
        12, "attention heads per block; emb_dim must be divisible by it", bounds=POSITIVE
    )
    n_layers: int = _field(12, "transformer blocks", bounds=POSITIVE)
    drop_rate: float = _field(
        0.1, "dropout probability on embeddings, attention and shortcuts", bounds=BELOW_ONE
    )
    qkv_bias: bool = _field(False, "give the query, key and value projections a bias")
    # gptlab's additions; the defaults reproduce the walk-through's model exactly.
    tie_weights: bool = _field(False, "share tok_emb and out_head weights (as GPT-2 does)")
    attention: str = _field(
        "sdpa",
        "sdpa: PyTorch's fused attention kernels; manual: the walk-through's masked softmax",
        choices=("sdpa", "manual"),
    )
    vocab_multiple: int = _field(
        1,
        "pad the embedding and head rows to a multiple of this (e.g. 64, for matmul kernels)",
        bounds=POSITIVE,
    )
    init: str = _field(
        "pytorch",
        "pytorch: PyTorch's default initialisation (the walk-through); gpt2: GPT-2's N(0, 0.02)",
        choices=("pytorch", "gpt2"),
    )
    fused_qkv: bool = _field(False, "compute q, k, v with one matmul (same parameters, same math)")
    # Architecture options of later models (Llama, the GPT-2 speedruns); each default is
    # GPT-2's, so the presets above them build the walk-through's model unchanged.
    positions: str = _field(
        "learned",
        "learned: a position embedding table (GPT-2); rope: rotary q/k rotations (Llama)",
        choices=("learned", "rope"),
    )
    rope_theta: float = _field(
        10000.0, "rotary base: wavelengths up to 2 pi theta", bounds=POSITIVE
    )
    norm: str = _field(
        "layernorm",
        "layernorm (GPT-2) or rmsnorm (Llama: no centring, no shift)",
        choices=("layernorm", "rmsnorm"),
    )
    norm_eps: float = _field(1e-5, "epsilon of every norm", bounds=POSITIVE)
    qk_norm: bool = _field(False, "RMS-normalise each head's queries and keys before attention")
    mlp: str = _field(
        "gelu",
        "gelu (GPT-2), swiglu (Llama: silu(fc1 x) * fc2 x), relu2 (relu(x)^2, the speedruns)",
        choices=("gelu", "swiglu", "relu2"),
    )
    mlp_hidden: int = _field(
        0,
        "hidden width of the MLP; 0 = 4 x emb_dim (gelu, relu2) or 8/3 x emb_dim rounded up "
        "to a multiple of 64 (swiglu)",
        bounds=NON_NEGATIVE,
    )
    bias: bool = _field(
        True, "biases in the output projections, the MLP and LayerNorm (qkv_bias: in q, k, v)"
    )
    n_kv_heads: int = _field(
        0,
        "key/value heads for grouped-query attention; n_heads must be a multiple; "
        "0 = n_heads (1: multi-query)",
        bounds=NON_NEGATIVE,
    )
    logit_softcap: float = _field(
        0.0, "squash logits into (-c, c) with c * tanh(logits / c); 0 = off", bounds=NON_NEGATIVE
    )
    zero_init_proj: bool = _field(
        False, "start the attention and MLP output projections at zero (blocks begin as identity)"
    )
    num_classes: int = _field(
        0,
        "0: the output head scores the vocabulary; N: a classification head of N classes "
        "(Linear(emb_dim, N) with a bias, the book's chapter 6), set by `gptlab finetune`",
        bounds=NON_NEGATIVE,
    )

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
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when that is 0."""
        return self.n_kv_heads or self.n_heads

    @property
    def ff_hidden(self) -> int:
        """The MLP's hidden width (mlp_hidden, or the option's customary default)."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":  # 8/3 x keeps the parameter count of a 4 x two-matrix MLP
            return math.ceil(8 * self.emb_dim / 3 / 64) * 64
        return 4 * self.emb_dim

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def validate(self) -> ModelConfig:
        _check_fields(self, "model")
        if self.emb_dim % self.n_heads:
            raise GptlabError(
                f"model.emb_dim ({self.emb_dim}) must be divisible by model.n_heads ({self.n_heads}); "
                "change one of them"
            )
        if self.n_heads % self.kv_heads:
            raise GptlabError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads "
                f"({self.n_kv_heads}); pick n_kv_heads among its divisors"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise GptlabError(
                f"rotary positions need an even head size, got emb_dim / n_heads = {self.head_dim}; "
                "change model.emb_dim or model.n_heads"
            )
        return self


_ON_OFF = ("auto", "on", "off")
# The shortest time budget: below it a run could not hold a step and its evaluation.
MIN_BUDGET_S = 1.0


@dataclass
class TrainConfig:
    """Optimiser, schedule, limits and periodic work of the CLI trainer."""

    optimizer: str = _field(
        "adamw",
        "adamw: AdamW for every parameter; muon: Muon (torch.optim.Muon) for the 2-D matrices "
        "inside the transformer blocks, AdamW at lr for the rest (embeddings, head, norms, biases)",
        choices=("adamw", "muon"),
    )
    lr: float = _field(4e-4, "peak learning rate (of AdamW's parameters)", bounds=POSITIVE)
    muon_lr: float = _field(
        0.02, "peak learning rate of Muon's matrices (train.optimizer = muon)", bounds=POSITIVE
    )
    muon_momentum: float = _field(0.95, "Muon's (Nesterov) momentum", bounds=BELOW_ONE)
    muon_weight_decay: float = _field(
        0.0,
        "Muon's decoupled weight decay: each step multiplies its matrices by 1 - (scheduled "
        "muon_lr) x this",
        bounds=NON_NEGATIVE,
    )
    muon_adjust_lr: str = _field(
        "original",
        "how Muon scales muon_lr per matrix shape: original: by sqrt(max(1, rows/cols)) "
        "(Keller Jordan's; muon_lr ~ 0.02); match_rms_adamw: by 0.2 sqrt(max(rows, cols)), "
        "so muon_lr can be an AdamW learning rate (Moonshot's)",
        choices=("original", "match_rms_adamw"),
    )
    min_lr_ratio: float = _field(0.1, "the schedule decays to lr * min_lr_ratio", bounds=FRACTION)
    warmup_steps: int = _field(
        0, "steps of linear warm-up to lr (budget = steps)", bounds=NON_NEGATIVE
    )
    budget: str = _field(
        "steps",
        "what the schedule spans. steps: max_steps (or epochs) steps, max_time a safety net; "
        "time: max_time seconds of training steps, warm-up and decay as fractions of it, so "
        "the last steps reach the floor on any machine (gptlab.train.budget)",
        choices=("steps", "time"),
    )
    sizing: str = _field(
        "preset",
        "preset: the preset's shape, tokenizer, context and dropout as they are; corpus: "
        "those the user did not set are chosen from the training text's size and the time "
        "budget (gptlab.recipes.sizing; budget = time only)",
        choices=("preset", "corpus"),
    )
    sizing_speed: float = _field(
        0.0,
        "sizing = corpus: this machine's training speed, in tokens/s, of the shape measured "
        "on the plays (4 x 256, bpe:4096, context 128), from which the rule estimates the "
        "compute and the passes of the budget; 0: measured at start-up with a few training "
        "steps (the resolved config keeps the figure)",
        bounds=NON_NEGATIVE,
    )
    warmup_frac: float = _field(
        0.0, "budget = time: the fraction of the budget spent warming up", bounds=BELOW_ONE
    )
    decay_frac: float = _field(
        1.0,
        "budget = time: the last fraction of the budget over which lr decays to the floor "
        "(1: all of it after warm-up; less: stable at lr until then)",
        bounds=Range(0, 1, low_open=True),
    )
    eval_every_frac: float = _field(
        0.0,
        "budget = time: evaluate each time this fraction of the budget has passed, whatever "
        "the machine's speed; 0 = every eval_freq steps",
        bounds=FRACTION,
    )
    replay_schedule: str = _field(
        "",
        "budget = time: a run's schedule.json; replay its steps' progress instead of reading "
        "the clock (the same steps and learning rates, bit for bit)",
    )
    schedule: str = _field(
        "cosine",
        "decay from lr to lr * min_lr_ratio after warm-up (constant: none)",
        choices=("cosine", "linear", "constant"),
    )
    weight_decay: float = _field(
        0.1, "AdamW weight decay (of the parameters weight_decay_on names)", bounds=NON_NEGATIVE
    )
    weight_decay_on: str = _field(
        "matrices",
        "matrices: decay only the Linear layers' weight matrices; all: every parameter, as "
        "the walk-through's AdamW(model.parameters()) does",
        choices=("matrices", "all"),
    )
    beta1: float = _field(0.9, "AdamW beta1", bounds=BELOW_ONE)
    beta2: float = _field(0.999, "AdamW beta2", bounds=BELOW_ONE)
    grad_clip: float = _field(
        1.0, "max global gradient norm; 0 disables clipping", bounds=NON_NEGATIVE
    )
    batch_size: int = _field(
        8, "sequences per micro-batch (the walk-through's batch_size)", bounds=POSITIVE
    )
    batch_tokens: int = _field(
        0,
        "tokens per optimizer step, a multiple of batch_size x context_length; "
        "0 = one micro-batch per step",
        bounds=NON_NEGATIVE,
    )
    epochs: int = _field(1, "passes over the training windows; 0 = no limit", bounds=NON_NEGATIVE)
    max_steps: int = _field(0, "optimizer steps; 0 = no limit (epochs decide)", bounds=NON_NEGATIVE)
    max_time: float = _field(
        0.0,
        "seconds of training steps (evaluations not counted); 0 = no limit; the budget when "
        "budget = time",
        bounds=NON_NEGATIVE,
    )
    eval_freq: int = _field(
        100, "evaluate train and val loss every eval_freq steps", bounds=POSITIVE
    )
    eval_iter: int = _field(20, "batches per evaluation", bounds=POSITIVE)
    start_context: str = _field(
        "Every effort moves you", "prompt of the sample printed after each evaluation"
    )
    sample_tokens: int = _field(50, "tokens in each sample", bounds=NON_NEGATIVE)
    log_every: int = _field(10, "report the training loss every log_every steps", bounds=POSITIVE)
    seed: int = _field(123, "seed of the initial weights, dropout and data order")
    device: str = _field("auto", "auto, cpu, cuda, cuda:N or mps (auto: a GPU if there is one)")
    precision: str = _field(
        "auto",
        "matmul precision, weights stay fp32; auto: bf16 where the device supports it, "
        "fp16 on older CUDA GPUs, else fp32",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    compile: str = _field(
        "auto", "torch.compile the model and loss; auto: on CUDA only", choices=_ON_OFF
    )
    fused_optimizer: bool = _field(True, "use PyTorch's fused AdamW kernel where it has one")
    chunked_loss: str = _field(
        "auto",
        "compute the loss from hidden states in row chunks, never holding the full (B, T, V) "
        "logits (gptlab.model.loss); auto: on when training on CPU",
        choices=_ON_OFF,
    )
    fast_dropout: str = _field(
        "auto",
        "draw dropout masks from random integers (gptlab.model.gpt.Dropout; another random stream "
        "than PyTorch's); auto: on when training on CPU",
        choices=_ON_OFF,
    )
    activation_checkpointing: bool = _field(
        False,
        "keep only each block's input for backward and recompute the rest there: the same "
        "loss and gradients, a fraction of the activations' memory, one more forward pass "
        "(GPT-2 124M on CPU: full finetuning 10%, LoRA 24% slower a step; BENCHMARKS.md)",
    )
    host_memory: str = _field(
        "auto",
        "keep: glibc's malloc keeps freed memory for reuse instead of returning it to the OS, "
        "so each step need not fault it in again; auto: keep when training on CPU (Linux)",
        choices=("auto", "keep", "release"),
    )
    checkpoint_every: int = _field(
        0, "steps between checkpoints; 0 = only at the end", bounds=NON_NEGATIVE
    )
    checkpoint_every_minutes: float = _field(
        0.0, "minutes between checkpoints; 0 = off", bounds=NON_NEGATIVE
    )
    keep_last: int = _field(
        2, "newest checkpoints kept, plus the best by validation loss", bounds=POSITIVE
    )
    max_bad_steps: int = _field(
        5, "consecutive non-finite steps before on_nonfinite applies", bounds=POSITIVE
    )
    on_nonfinite: str = _field(
        "stop",
        "stop: save the last good weights and stop; rollback: to the latest checkpoint at "
        "half the learning rate (up to 3 times, then stop)",
        choices=("stop", "rollback"),
    )
    parallel: str = _field(
        "ddp",
        "under torchrun: ddp (a replica per process) or fsdp (FSDP2, sharded)",
        choices=("ddp", "fsdp"),
    )
    dist_timeout: float = _field(
        600.0, "seconds any collective may wait before the job fails", bounds=POSITIVE
    )
    eval_tasks: str = _field(
        "",
        "a task suite file (.toml, as gptlab eval reads) scored during training, each score "
        "a tasks record in metrics.jsonl; empty = off",
    )
    task_eval_every: int = _field(
        0,
        "steps between task evaluations (train.eval_tasks); 0 = only at the end",
        bounds=NON_NEGATIVE,
    )
    task_eval_items: int = _field(
        0, "items scored per task in each task evaluation; 0 = all", bounds=NON_NEGATIVE
    )
    trackers: str = _field(
        "",
        "experiment trackers fed the metrics records, comma-separated: tensorboard, wandb, "
        "trackio (each an optional extra); empty = none",
    )
    tracker_project: str = _field("gptlab", "the wandb / trackio project the run logs to")

    def validate(self) -> TrainConfig:
        _check_fields(self, "train")
        tracker_names(self.trackers)
        if self.trackers and not self.tracker_project:
            raise GptlabError("train.tracker_project is empty; name the project, e.g. gptlab")
        if self.epochs == 0 and self.max_steps == 0 and self.max_time == 0:
            raise GptlabError(
                "no training limit: set train.epochs, train.max_steps or train.max_time above 0"
            )
        if self.budget == "time" and not self.replay_schedule and self.max_time < MIN_BUDGET_S:
            raise GptlabError(
                f"train.budget = time needs train.max_time, the budget in seconds, of at least "
                f"{MIN_BUDGET_S:g} (got {self.max_time:g}); set --train.max_time SECONDS"
            )
        if self.replay_schedule and self.budget != "time":
            raise GptlabError(
                "train.replay_schedule replays a time budget's schedule; add --train.budget time"
            )
        return self


TRACKERS = ("tensorboard", "wandb", "trackio")


def tracker_names(text: str) -> tuple[str, ...]:
    """The tracker names of a train.trackers value ("tensorboard,wandb"), each once, checked."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        if name not in TRACKERS:
            raise GptlabError(
                f"train.trackers: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}"
            )
    return names


# A byte-level BPE holds the 256 bytes, `<|endoftext|>` and at least one merge (bpe.py).
BPE_MIN_VOCAB = 256 + 1 + 1
BPE_PREFIX = "bpe:"


def corpus_bpe_size(name: str) -> int | None:
    """N for a tokenizer name `bpe:N` (a BPE trained on the run's own training text), None
    for any other name; a `bpe:` name whose N is not a whole number >= 258 is an error."""
    if not name.startswith(BPE_PREFIX):
        return None
    size = name[len(BPE_PREFIX) :]
    if not size.isdigit() or int(size) < BPE_MIN_VOCAB:
        raise GptlabError(
            f"data.tokenizer {name!r}: N in bpe:N must be a whole number of ids, "
            f"{BPE_MIN_VOCAB} or more (256 bytes, <|endoftext|> and merges), e.g. bpe:4096"
        )
    return int(size)


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes training windows."""

    source: str = _field(
        "shakespeare",
        "a file, directory or glob, the built-in 'shakespeare', or a `gptlab prepare` directory",
    )
    tokenizer: str = _field(
        "gpt2",
        "gpt2, char, bpe:N (a byte-level BPE of N ids trained on the training text when it "
        "loads, cached), or the path of a trained tokenizer.json (or its directory)",
    )
    text_field: str = _field(
        "text", "the text's field in .jsonl, column in .parquet, field of hf: datasets"
    )
    train_ratio: float = _field(
        0.9,
        "share of the tokens for training; the rest validates",
        bounds=Range(0, 1, low_open=True, high_open=True),
    )
    split: str = _field(
        "tokens",
        "where the train/val cut is made: tokens: train_ratio of the tokenized text; chars: "
        "train_ratio of its characters, each part tokenized on its own (the walk-through)",
        choices=("tokens", "chars"),
    )
    stride: int = _field(
        0, "distance between window starts; 0 = context_length (no overlap)", bounds=NON_NEGATIVE
    )
    shuffle: bool = _field(True, "shuffle the training windows every epoch")
    order: str = _field(
        "seeded",
        "order of the training windows: seeded: a pure function of (seed, epoch), evaluations "
        "on fixed batches; dataloader: torch DataLoaders drawing from the global RNG as the "
        "walk-through's do, a fresh shuffle each epoch and evaluation (one process only)",
        choices=("seeded", "dataloader"),
    )

    def validate(self) -> DataConfig:
        _check_fields(self, "data")
        if not self.source:
            raise GptlabError("data.source is empty: pass --data PATH or --data shakespeare")
        if corpus_bpe_size(self.tokenizer) is None and (
            self.tokenizer not in ("gpt2", "char")
            and not (
                self.tokenizer.endswith(".json")
                or "/" in self.tokenizer
                or Path(self.tokenizer).is_dir()
            )
        ):
            raise GptlabError(
                f"data.tokenizer must be gpt2, char, bpe:N, or the path of a trained "
                f"tokenizer.json (or its directory); got {self.tokenizer!r}"
            )
        return self


# What finetune.lora_targets may name (gptlab.model.lora maps them to the model's layers): the
# groups, the attention's four matrices, the MLP's (GPT-2's and SwiGLU's).
LORA_TARGET_NAMES = (
    "attn", "mlp", "all", "W_query", "W_key", "W_value", "out_proj",
    "ff.layers.0", "ff.layers.2", "fc1", "fc2", "fc3",
)  # fmt: skip


@dataclass
class FinetuneConfig:
    """How `gptlab finetune` reads, renders and masks its records (unused by train)."""

    format: str = _field(
        "auto",
        "instructions: instruction, input, output (Alpaca prompt); chat: messages; "
        "classification: text, label; auto: from the first record's fields",
        choices=("auto", "instructions", "chat", "classification"),
    )
    mask: str = _field(
        "response",
        "which targets the loss skips: response: all but the response and its end (the "
        "assistant turns in chat); instruction: the instruction and input (the book's "
        "exercise 7.2); padding: only the padding (the book's chapter 7)",
        choices=("response", "instruction", "padding"),
    )
    pack: bool = _field(
        False,
        "pack examples into rows of context_length tokens, attention kept inside each "
        "example; false: pad each batch to its longest example (the book)",
    )
    template: str = _field("", "the chat template (chat format); empty: the default one")
    val: str = _field("", "a file of validation records; empty: val_ratio of the data's records")
    test: str = _field("", "a file of test records; empty: test_ratio of the data's records")
    val_ratio: float = _field(
        0.1,
        "share of the data's records held out for validation (when val is empty)",
        bounds=BELOW_ONE,
    )
    test_ratio: float = _field(
        0.1,
        "share of the data's records held out for testing (when test is empty)",
        bounds=BELOW_ONE,
    )
    train_blocks: int = _field(
        -1,
        "blocks trained from the top, with the final norm and the head (the book's chapter "
        "6 trains 1); -1: every parameter",
        bounds=Range(-1),
    )
    labels: str = _field(
        "", "classification: the class names in head order, a JSON list (set from the data)"
    )
    lora_rank: int = _field(
        0,
        "LoRA: the rank r of the adapters on a frozen base (gptlab.model.lora); 0: train the "
        "weights themselves (full finetuning)",
        bounds=NON_NEGATIVE,
    )
    lora_alpha: float = _field(
        16.0, "LoRA: the adapters' scale is lora_alpha / lora_rank", bounds=POSITIVE
    )
    lora_targets: str = _field(
        "attn",
        "LoRA: the linear layers adapted, comma-separated: attn, mlp, all, or layer names "
        "(W_query, W_key, W_value, out_proj, fc1, fc2, fc3, ff.layers.0, ff.layers.2)",
    )
    lora_dropout: float = _field(
        0.0, "LoRA: dropout on the adapters' input (the base path has none)", bounds=BELOW_ONE
    )
    base: str = _field(
        "", "LoRA: the base model the adapters apply to (set by gptlab finetune from init-from)"
    )
    base_sha256: str = _field(
        "", "LoRA: the sha256 of the base's weights, checked whenever the run is loaded (set)"
    )

    def validate(self) -> FinetuneConfig:
        _check_fields(self, "finetune")
        names = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        bad = [t for t in names if t not in LORA_TARGET_NAMES]
        if bad or not names:
            raise GptlabError(
                f"finetune.lora_targets {self.lora_targets!r}: unknown target "
                f"{bad[0] if bad else '(none)'!r}; use a comma-separated list of "
                f"{', '.join(LORA_TARGET_NAMES)}"
            )
        if self.lora_rank and self.train_blocks >= 0:
            raise GptlabError(
                "finetune.train_blocks and LoRA (finetune.lora_rank) both choose what trains; "
                "use one of them (LoRA trains its adapters and a classifier's head)"
            )
        if self.val_ratio + self.test_ratio >= 1:
            raise GptlabError(
                f"finetune.val_ratio + finetune.test_ratio ({self.val_ratio + self.test_ratio}) "
                "must be below 1: some records must train"
            )
        return self


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> RunConfig:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        self.finetune.validate()
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


SECTIONS = ("model", "train", "data", "finetune")
# Each section's dataclass, in the order the sections appear in a config.
SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "finetune": FinetuneConfig,
}

# `gptlab finetune`'s training settings (the model comes from --init-from): the book's
# chapters 6 and 7 (AdamW at 5e-5, weight decay 0.1, batches of 8, a few epochs), at a
# constant rate, evaluated every 20 steps.
FINETUNE_TRAIN: dict[str, Any] = {
    "optimizer": "adamw",
    "lr": 5e-5,
    "weight_decay": 0.1,
    "schedule": "constant",
    "warmup_steps": 0,
    "batch_size": 8,
    "batch_tokens": 0,
    "epochs": 2,
    "eval_freq": 20,
    "eval_iter": 5,
    "log_every": 5,
    "grad_clip": 1.0,
}

# The later ideas in the blocks (see the README's architecture options), as the `cpu` and
# `gpu` presets use them.
MODERN_BLOCKS: dict[str, Any] = {
    "positions": "rope",
    "norm": "rmsnorm",
    "qk_norm": True,
    "mlp": "relu2",
    "bias": False,
    "zero_init_proj": True,
    "logit_softcap": 15.0,
}

# The small run both CPU recipes share: 4 layers x 256 at context 128, 16 sequences a step.
# cpu-gpt2 keeps a fixed step count (its schedule reaches its floor; max_time is a safety
# net for slower machines); cpu spans a time budget instead.
_CPU_MODEL: dict[str, Any] = {
    "context_length": 128,
    "emb_dim": 256,
    "n_heads": 4,
    "n_layers": 4,
    "drop_rate": 0.0,
    "vocab_multiple": 64,
    "init": "gpt2",
}
_CPU_TRAIN: dict[str, Any] = {
    "batch_size": 16,
    "lr": 2e-3,
    "warmup_steps": 50,
    "beta2": 0.95,
    "epochs": 0,
    "max_time": 570.0,
    "eval_freq": 100,
    "eval_iter": 10,
    "log_every": 10,
}

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
    # The default run: the lowest bits per byte we measured in a ten-minute budget on 2 CPU
    # cores (BENCHMARKS.md, "Time to quality", holds the runs that chose it). GPT-2's 50k
    # vocabulary made the output head ~80% of this model's FLOPs; a byte-level BPE of 4,096
    # ids trained on the run's own training text frees that compute for the blocks, which
    # take the later ideas: rotary positions, RMSNorm, QK-norm, ReLU^2, no biases, residual
    # projections that start at zero, soft-capped logits and an untied head, with Muon for
    # the blocks' matrices.
    "cpu": {
        "model": {**_CPU_MODEL, "tie_weights": False, **MODERN_BLOCKS},
        # A time budget (gptlab.train.budget): 530 s of training steps, warm-up over its first
        # 4% and cosine decay to the floor at its end, whatever the machine's speed (1,200
        # steps took 401-532 s on 2-core machines), with an evaluation each tenth; start-up,
        # the BPE's training, evaluations and samples fit the rest of `make demo`'s 10 minutes.
        # sizing = corpus: on another corpus, gptlab.recipes.sizing chooses the shape, BPE size,
        # context and dropout the user left unset (on the plays: exactly these).
        "train": {
            **_CPU_TRAIN,
            "optimizer": "muon",
            "muon_lr": 0.02,
            "budget": "time",
            "sizing": "corpus",
            "max_time": 530.0,
            "warmup_frac": 0.04,
            "eval_every_frac": 0.1,
        },
        "data": {"tokenizer": "bpe:4096", "split": "chars"},
    },
    # The default before it (until 2026-12): GPT-2's blocks, vocabulary and AdamW at the same
    # small scale; kept so that the time-to-quality comparison can be repeated.
    "cpu-gpt2": {
        "model": {**_CPU_MODEL, "tie_weights": True},
        "train": {**_CPU_TRAIN, "max_steps": 1000},  # ~1.5 passes over the plays
    },
    # The default's recipe at GPT-2 small's scale (12 x 768, context 1024), for one GPU and a
    # corpus of billions of tokens, hence GPT-2's tokenizer: half a million tokens per
    # optimizer step (32 micro-batches of 16 x 1024 on one GPU; fewer per GPU under
    # torchrun), 3,000 steps (1.6B tokens). Not yet measured on a GPU (BENCHMARKS.md).
    "gpu": {
        "model": {
            **GPT_CONFIG_124M,
            "drop_rate": 0.0,
            "tie_weights": False,
            "vocab_multiple": 64,
            "init": "gpt2",
            **MODERN_BLOCKS,
        },
        "train": {
            "optimizer": "muon",
            "muon_lr": 0.02,
            "lr": 3e-3,
            "batch_size": 16,
            "batch_tokens": 524288,
            "warmup_steps": 100,
            "beta2": 0.95,
            "epochs": 0,
            "max_steps": 3000,
            "eval_freq": 250,
            "eval_iter": 20,
            "checkpoint_every": 500,
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


def to_toml(cfg: RunConfig, preset_name: str | None = None) -> str:
    """The config as TOML text that `load_toml` + `apply_nested` (or `--config`) read back
    to an identical RunConfig; with `preset_name`, a top-level `preset` key records it."""
    import tomli_w  # only `gptlab config` writes TOML

    doc: dict[str, Any] = {"preset": preset_name} if preset_name else {}
    return tomli_w.dumps({**doc, **cfg.to_dict()})


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
    names = [f.name for f in dataclasses.fields(obj)]
    if key not in names:
        raise GptlabError(f"unknown config key {dotted!r}; {section} has: {', '.join(names)}")
    setattr(obj, key, _coerce(dotted, value, getattr(obj, key)))


def _coerce(name: str, value: Any, current: Any) -> Any:
    """value (a command-line string or a TOML/JSON value) as the type of `current`."""
    kind = type(current)
    if isinstance(value, str) and kind is not str:
        return _parse(name, value, kind)
    if kind is bool and not isinstance(value, bool):
        raise GptlabError(f"{name} must be true or false, got {value!r}")
    if kind is int and isinstance(value, float):  # 1e3 or 2.5 in TOML: say so, do not round
        raise GptlabError(f"{name} must be an integer, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GptlabError(f"{name} must be of type {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise GptlabError(f"{name} must be a finite number, got {value!r}")
    return value


def _parse(name: str, text: str, kind: type) -> Any:
    """A command-line string as a bool, int or float field's value."""
    t = text.strip().lower()
    if kind is bool:
        if t in ("true", "1", "yes", "on"):
            return True
        if t in ("false", "0", "no", "off"):
            return False
        raise GptlabError(f"{name} must be true or false, got {text!r}")
    try:
        number = float(t)
    except ValueError:
        what = "an integer" if kind is int else "a"
        raise GptlabError(f"{name} must be {what} number, got {text!r}") from None
    if not math.isfinite(number):
        raise GptlabError(f"{name} must be a finite number, got {text!r}")
    if kind is float:
        return number
    try:
        return int(t)  # not int(number): a float cannot hold every large integer exactly
    except ValueError:
        raise GptlabError(f"{name} must be an integer, got {text!r}") from None


def _check_fields(obj: Any, section: str) -> None:
    """Every field of obj within the range, and among the choices, its metadata declares."""
    for f in fields(obj):
        v, bounds, choices = getattr(obj, f.name), field_range(f), field_choices(f)
        if bounds is not None and v not in bounds:
            raise GptlabError(f"{section}.{f.name} must be {bounds.describe()}, got {v}")
        if choices is not None and v not in choices:
            raise GptlabError(f"{section}.{f.name} must be one of {', '.join(choices)}; got {v!r}")
