"""Presets: whole runs, measured or chosen, kept apart from the mechanism that runs them
(gptlab.config.schema). `gptlab train --preset NAME` starts from one; `gptlab finetune`
starts from FINETUNE_TRAIN's training settings. BENCHMARKS.md holds the runs that chose them.
"""

from __future__ import annotations

from typing import Any

from gptlab.config.schema import GPT_CONFIG_124M, RunConfig
from gptlab.errors import GptlabError

# `gptlab finetune`'s training settings (the model comes from --init-from): the book's
# chapters 6 and 7, at a constant rate.
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

# The later ideas in the blocks (the README's architecture options) the cpu and gpu presets use.
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

# The GPT-2 family sets only the model shape; the small presets are sized for a 2-core CPU
# and carry the schedule that suits them.
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
    # cores (BENCHMARKS.md, "Time to quality"). GPT-2's 50k vocabulary made the output head
    # ~80% of this model's FLOPs; a byte-level BPE of 4,096 ids trained on the run's own text
    # frees that compute for the blocks, which take MODERN_BLOCKS, an untied head and Muon.
    "cpu": {
        "model": {**_CPU_MODEL, "tie_weights": False, **MODERN_BLOCKS},
        # A time budget (gptlab.train.budget): 530 s of steps, warm-up over the first 4% and
        # cosine decay to the floor at the end whatever the machine's speed, an evaluation each
        # tenth; start-up, BPE training, evaluations and samples fit the rest of `make demo`'s
        # 10 minutes. sizing = corpus: gptlab.recipes.sizing chooses the shape, BPE size,
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
    # The default's recipe at GPT-2 small's scale, for one GPU and billions of tokens (hence
    # GPT-2's tokenizer): 524,288 tokens a step (32 micro-batches of 16 x 1024 on one GPU),
    # 3,000 steps (1.6B tokens). Not yet measured on a GPU (BENCHMARKS.md).
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
    # the-verdict.txt` prints the losses its train_model_simple prints on a CPU (to ~1e-6: the
    # fused LayerNorm and GELU round differently). Everything that changes the numbers is
    # pinned: model and dropout draws, AdamW unfused and unclipped, split and loaders.
    "walkthrough": {
        "model": {
            **GPT_CONFIG_124M,
            "context_length": 256,
            "tie_weights": False,
            "init": "pytorch",
            "attention": "manual",
            "vocab_multiple": 1,
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
            "fused_optimizer": False,
        },
        "runtime": {
            "precision": "fp32",
            "compile": "off",
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
