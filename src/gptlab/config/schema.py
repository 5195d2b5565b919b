"""Typed configuration: one `RunConfig` of sections (model, train, data, finetune, runtime).

It is built from a preset (gptlab.recipes.presets), a TOML file with the same sections and
`section.field=value` overrides, in that order (gptlab.train.resolve); `validate()` checks every
value, unknown keys are errors that name the key, and the result is saved with each run and
checkpoint. Each field's help, choices and range live in its metadata (gptlab.config.fields).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gptlab.config.fields import (
    BELOW_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Range,
    check_fields,
    coerce,
    setting,
)
from gptlab.config.model import ModelConfig
from gptlab.config.runtime import RuntimeConfig
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


# The shortest time budget: below it a run could not hold a step and its evaluation.
MIN_BUDGET_S = 1.0


@dataclass
class TrainConfig:
    """Optimiser, schedule, limits and periodic work of the CLI trainer."""

    optimizer: str = setting(
        "adamw",
        "adamw: AdamW for every parameter; muon: Muon (torch.optim.Muon) for the 2-D matrices "
        "inside the transformer blocks, AdamW at lr for the rest (embeddings, head, norms, biases)",
        choices=("adamw", "muon"),
    )
    lr: float = setting(4e-4, "peak learning rate (of AdamW's parameters)", bounds=POSITIVE)
    muon_lr: float = setting(
        0.02, "peak learning rate of Muon's matrices (train.optimizer = muon)", bounds=POSITIVE
    )
    muon_momentum: float = setting(0.95, "Muon's (Nesterov) momentum", bounds=BELOW_ONE)
    muon_weight_decay: float = setting(
        0.0,
        "Muon's decoupled weight decay: each step multiplies its matrices by 1 - (scheduled "
        "muon_lr) x this",
        bounds=NON_NEGATIVE,
    )
    muon_adjust_lr: str = setting(
        "original",
        "how Muon scales muon_lr per matrix shape: original: by sqrt(max(1, rows/cols)) "
        "(Keller Jordan's; muon_lr ~ 0.02); match_rms_adamw: by 0.2 sqrt(max(rows, cols)), "
        "so muon_lr can be an AdamW learning rate (Moonshot's)",
        choices=("original", "match_rms_adamw"),
    )
    min_lr_ratio: float = setting(0.1, "the schedule decays to lr * min_lr_ratio", bounds=FRACTION)
    warmup_steps: int = setting(
        0, "steps of linear warm-up to lr (budget = steps)", bounds=NON_NEGATIVE
    )
    budget: str = setting(
        "steps",
        "what the schedule spans. steps: max_steps (or epochs) steps, max_time a safety net; "
        "time: max_time seconds of training steps, warm-up and decay as fractions of it, so "
        "the last steps reach the floor on any machine (gptlab.train.budget)",
        choices=("steps", "time"),
    )
    sizing: str = setting(
        "preset",
        "preset: the preset's shape, tokenizer, context and dropout as they are; corpus: "
        "those the user did not set are chosen from the training text's size and the time "
        "budget (gptlab.recipes.sizing; budget = time only)",
        choices=("preset", "corpus"),
    )
    sizing_speed: float = setting(
        0.0,
        "sizing = corpus: this machine's training speed, in tokens/s, of the shape measured "
        "on the plays (4 x 256, bpe:4096, context 128), from which the rule estimates the "
        "compute and the passes of the budget; 0: measured at start-up with a few training "
        "steps (the resolved config keeps the figure)",
        bounds=NON_NEGATIVE,
    )
    warmup_frac: float = setting(
        0.0, "budget = time: the fraction of the budget spent warming up", bounds=BELOW_ONE
    )
    decay_frac: float = setting(
        1.0,
        "budget = time: the last fraction of the budget over which lr decays to the floor "
        "(1: all of it after warm-up; less: stable at lr until then)",
        bounds=Range(0, 1, low_open=True),
    )
    eval_every_frac: float = setting(
        0.0,
        "budget = time: evaluate each time this fraction of the budget has passed, whatever "
        "the machine's speed; 0 = every eval_freq steps",
        bounds=FRACTION,
    )
    replay_schedule: str = setting(
        "",
        "budget = time: a run's schedule.json; replay its steps' progress instead of reading "
        "the clock (the same steps and learning rates, bit for bit)",
    )
    schedule: str = setting(
        "cosine",
        "decay from lr to lr * min_lr_ratio after warm-up (constant: none)",
        choices=("cosine", "linear", "constant"),
    )
    weight_decay: float = setting(
        0.1, "AdamW weight decay (of the parameters weight_decay_on names)", bounds=NON_NEGATIVE
    )
    weight_decay_on: str = setting(
        "matrices",
        "matrices: decay only the Linear layers' weight matrices; all: every parameter, as "
        "the walk-through's AdamW(model.parameters()) does",
        choices=("matrices", "all"),
    )
    beta1: float = setting(0.9, "AdamW beta1", bounds=BELOW_ONE)
    beta2: float = setting(0.999, "AdamW beta2", bounds=BELOW_ONE)
    grad_clip: float = setting(
        1.0, "max global gradient norm; 0 disables clipping", bounds=NON_NEGATIVE
    )
    token_dropout: float = setting(
        0.0,
        "gptlab train: replace this share of the training inputs (not the targets) with "
        "random token ids, drawn afresh each step: a regulariser for repeated text; 0 = off",
        bounds=BELOW_ONE,
    )
    ema: float = setting(
        0.0,
        "keep an exponential moving average of the weights, moving 1 - ema toward them each "
        "step; evaluations, samples and saved weights use it; 0 = off (gptlab.train.average)",
        bounds=BELOW_ONE,
    )
    batch_size: int = setting(
        8, "sequences per micro-batch (the walk-through's batch_size)", bounds=POSITIVE
    )
    batch_tokens: int = setting(
        0,
        "tokens per optimizer step, a multiple of batch_size x context_length; "
        "0 = one micro-batch per step",
        bounds=NON_NEGATIVE,
    )
    epochs: int = setting(1, "passes over the training windows; 0 = no limit", bounds=NON_NEGATIVE)
    max_steps: int = setting(
        0, "optimizer steps; 0 = no limit (epochs decide)", bounds=NON_NEGATIVE
    )
    max_time: float = setting(
        0.0,
        "seconds of training steps (evaluations not counted); 0 = no limit; the budget when "
        "budget = time",
        bounds=NON_NEGATIVE,
    )
    eval_freq: int = setting(
        100, "evaluate train and val loss every eval_freq steps", bounds=POSITIVE
    )
    eval_iter: int = setting(20, "batches per evaluation", bounds=POSITIVE)
    start_context: str = setting(
        "Every effort moves you", "prompt of the sample printed after each evaluation"
    )
    sample_tokens: int = setting(50, "tokens in each sample", bounds=NON_NEGATIVE)
    log_every: int = setting(10, "report the training loss every log_every steps", bounds=POSITIVE)
    seed: int = setting(123, "seed of the initial weights, dropout and data order")
    fused_optimizer: bool = setting(True, "use PyTorch's fused AdamW kernel where it has one")
    checkpoint_every: int = setting(
        0, "steps between checkpoints; 0 = only at the end", bounds=NON_NEGATIVE
    )
    checkpoint_every_minutes: float = setting(
        0.0, "minutes between checkpoints; 0 = off", bounds=NON_NEGATIVE
    )
    keep_last: int = setting(
        2, "newest checkpoints kept, plus the best by validation loss", bounds=POSITIVE
    )
    max_bad_steps: int = setting(
        5, "consecutive non-finite steps before on_nonfinite applies", bounds=POSITIVE
    )
    on_nonfinite: str = setting(
        "stop",
        "stop: save the last good weights and stop; rollback: to the latest checkpoint at "
        "half the learning rate (up to 3 times, then stop)",
        choices=("stop", "rollback"),
    )
    eval_tasks: str = setting(
        "",
        "a task suite file (.toml, as gptlab eval reads) scored during training, each score "
        "a tasks record in metrics.jsonl; empty = off",
    )
    task_eval_every: int = setting(
        0,
        "steps between task evaluations (train.eval_tasks); 0 = only at the end",
        bounds=NON_NEGATIVE,
    )
    task_eval_items: int = setting(
        0, "items scored per task in each task evaluation; 0 = all", bounds=NON_NEGATIVE
    )
    trackers: str = setting(
        "",
        "experiment trackers fed the metrics records, comma-separated: tensorboard, wandb, "
        "trackio (each an optional extra); empty = none",
    )
    tracker_project: str = setting("gptlab", "the wandb / trackio project the run logs to")

    def validate(self) -> TrainConfig:
        check_fields(self, "train")
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
    """N of a tokenizer name `bpe:N` (a BPE trained on the run's text), else None; bad N raises."""
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

    source: str = setting(
        "shakespeare",
        "a file, directory or glob, the built-in 'shakespeare', or a `gptlab prepare` directory",
    )
    tokenizer: str = setting(
        "gpt2",
        "gpt2, char, bpe:N (a byte-level BPE of N ids trained on the training text when it "
        "loads, cached), or the path of a trained tokenizer.json (or its directory)",
    )
    text_field: str = setting(
        "text", "the text's field in .jsonl, column in .parquet, field of hf: datasets"
    )
    train_ratio: float = setting(
        0.9,
        "share of the tokens for training; the rest validates",
        bounds=Range(0, 1, low_open=True, high_open=True),
    )
    split: str = setting(
        "tokens",
        "where the train/val cut is made: tokens: train_ratio of the tokenized text; chars: "
        "train_ratio of its characters, each part tokenized on its own (the walk-through)",
        choices=("tokens", "chars"),
    )
    stride: int = setting(
        0, "distance between window starts; 0 = context_length (no overlap)", bounds=NON_NEGATIVE
    )
    shuffle: bool = setting(True, "shuffle the training windows every epoch")
    order: str = setting(
        "seeded",
        "order of the training windows: seeded: a pure function of (seed, epoch), evaluations "
        "on fixed batches; dataloader: torch DataLoaders drawing from the global RNG as the "
        "walk-through's do, a fresh shuffle each epoch and evaluation (one process only)",
        choices=("seeded", "dataloader"),
    )

    def validate(self) -> DataConfig:
        check_fields(self, "data")
        if not self.source:
            raise GptlabError("data.source is empty: pass --data PATH or --data shakespeare")
        tok = self.tokenizer
        is_path = tok.endswith(".json") or "/" in tok or Path(tok).is_dir()
        if corpus_bpe_size(tok) is None and tok not in ("gpt2", "char") and not is_path:
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

    format: str = setting(
        "auto",
        "instructions: instruction, input, output (Alpaca prompt); chat: messages; "
        "classification: text, label; auto: from the first record's fields",
        choices=("auto", "instructions", "chat", "classification"),
    )
    mask: str = setting(
        "response",
        "which targets the loss skips: response: all but the response and its end (the "
        "assistant turns in chat); instruction: the instruction and input (the book's "
        "exercise 7.2); padding: only the padding (the book's chapter 7)",
        choices=("response", "instruction", "padding"),
    )
    pack: bool = setting(
        False,
        "pack examples into rows of context_length tokens, attention kept inside each "
        "example; false: pad each batch to its longest example (the book)",
    )
    template: str = setting("", "the chat template (chat format); empty: the default one")
    val: str = setting("", "a file of validation records; empty: val_ratio of the data's records")
    test: str = setting("", "a file of test records; empty: test_ratio of the data's records")
    val_ratio: float = setting(
        0.1,
        "share of the data's records held out for validation (when val is empty)",
        bounds=BELOW_ONE,
    )
    test_ratio: float = setting(
        0.1,
        "share of the data's records held out for testing (when test is empty)",
        bounds=BELOW_ONE,
    )
    train_blocks: int = setting(
        -1,
        "blocks trained from the top, with the final norm and the head (the book's chapter "
        "6 trains 1); -1: every parameter",
        bounds=Range(-1),
    )
    labels: str = setting(
        "", "classification: the class names in head order, a JSON list (set from the data)"
    )
    lora_rank: int = setting(
        0,
        "LoRA: the rank r of the adapters on a frozen base (gptlab.model.lora); 0: train the "
        "weights themselves (full finetuning)",
        bounds=NON_NEGATIVE,
    )
    lora_alpha: float = setting(
        16.0, "LoRA: the adapters' scale is lora_alpha / lora_rank", bounds=POSITIVE
    )
    lora_targets: str = setting(
        "attn",
        "LoRA: the linear layers adapted, comma-separated: attn, mlp, all, or layer names "
        "(W_query, W_key, W_value, out_proj, fc1, fc2, fc3, ff.layers.0, ff.layers.2)",
    )
    lora_dropout: float = setting(
        0.0, "LoRA: dropout on the adapters' input (the base path has none)", bounds=BELOW_ONE
    )
    base: str = setting(
        "", "LoRA: the base model the adapters apply to (set by gptlab finetune from init-from)"
    )
    base_sha256: str = setting(
        "", "LoRA: the sha256 of the base's weights, checked whenever the run is loaded (set)"
    )

    def validate(self) -> FinetuneConfig:
        check_fields(self, "finetune")
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
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> RunConfig:
        for section in SECTIONS:
            getattr(self, section).validate()
        if self.data.stride > self.model.context_length:
            raise GptlabError(
                f"data.stride ({self.data.stride}) exceeds model.context_length "
                f"({self.model.context_length}): windows would skip tokens; lower the stride"
            )
        if self.train.ema and self.runtime.parallel == "fsdp":
            raise GptlabError(
                "train.ema keeps whole weights beside FSDP2's shards, which is not supported; "
                "use --parallel ddp, or drop --train.ema"
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
        """A RunConfig from nested sections (a preset, a saved config.json or checkpoint),
        migrated from an older gptlab's (`migrate`)."""
        cfg = cls()
        apply_nested(cfg, migrate(d))
        return cfg


# Removed options, with why and what to do (none changed a weight, so saved runs still load).
REMOVED = {
    "model.fused_qkv": "model.fused_qkv was removed (one q/k/v matmul measured within noise, "
    "BENCHMARKS.md); drop the setting",
}


# Options that moved to another section: moved on load (`migrate`), named to a user who sets one.
MOVED = {f"train.{name}": f"runtime.{name}" for name in (
    "device", "precision", "compile", "chunked_loss", "fast_dropout",
    "activation_checkpointing", "host_memory", "parallel", "dist_timeout",
)}  # fmt: skip


def migrate(d: dict[str, Any]) -> dict[str, Any]:
    """An older gptlab's nested config dict in today's sections: REMOVED keys dropped, MOVED
    keys under their new names (a new name given too wins)."""
    out: dict[str, Any] = {s: dict(v) if isinstance(v, dict) else v for s, v in d.items()}
    for old, new in [*((k, None) for k in REMOVED), *MOVED.items()]:
        section, key = old.split(".")
        values = out.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        value = values.pop(key)
        if new is not None:
            new_section, new_key = new.split(".")
            out.setdefault(new_section, {}).setdefault(new_key, value)
    return out


# Each section's dataclass, in the order the sections appear in a config.
SECTION_TYPES: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}
SECTIONS = tuple(SECTION_TYPES)


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML config file as a nested dict (its sections and an optional preset key)."""
    p = Path(path)
    if not p.is_file():
        raise GptlabError(f"config file {str(p)!r} not found; check the --config path")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise GptlabError(f"config file {str(p)!r} is not valid TOML: {e}") from None


def to_toml(cfg: RunConfig, preset_name: str | None = None) -> str:
    """The config as TOML that `--config` reads back to an identical RunConfig; `preset_name`,
    if given, is recorded as a top-level `preset` key."""
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
    if dotted in REMOVED:
        raise GptlabError(REMOVED[dotted])
    if dotted in MOVED:
        raise GptlabError(
            f"{dotted} is now {MOVED[dotted]}: set --{MOVED[dotted]}, or {MOVED[dotted]} in a config file"
        )
    obj = getattr(cfg, section)
    names = [f.name for f in dataclasses.fields(obj)]
    if key not in names:
        raise GptlabError(f"unknown config key {dotted!r}; {section} has: {', '.join(names)}")
    setattr(obj, key, coerce(dotted, value, getattr(obj, key)))
