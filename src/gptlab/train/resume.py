"""What a resumed run may change, what it may not, and the random state it carries.

A run resumed from step k repeats the uninterrupted run's steps bit for bit (CPU, fp32)
when the model, the data stream, the batch and the optimizer's kind are the same
(`FROZEN_ON_RESUME`, the tokenizer and the data fingerprint, checked before anything loads)
and every random generator continues where it stopped. Limits, evaluation, checkpointing and
the learning rate may change; each change is reported.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.config.schema import RunConfig, migrate
from gptlab.errors import GptlabError
from gptlab.interop import checkpoint as ckpt_lib

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
    "train.optimizer",
    "finetune.lora_rank",
    "finetune.lora_alpha",
    "finetune.lora_targets",
    "finetune.lora_dropout",
    "finetune.base_sha256",
)
# Why a frozen field may not change, where "it defines the model or data" is not the reason.
FROZEN_BECAUSE = {
    "train.optimizer": "the checkpoint's optimizer state belongs to the other optimizer",
}

Change = tuple[str, Any, Any]  # (dotted key, saved value, new value)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[Change]:
    """Every dotted key whose value differs between two nested config dicts, sorted."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, name + ".")
        elif a != b:
            out.append((name, a, b))
    return out


def is_frozen(key: str) -> bool:
    return any(key == f or (f.endswith(".*") and key.startswith(f[:-1])) for f in FROZEN_ON_RESUME)


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict with the fields it lacks filled from today's defaults (which
    reproduce the older behaviour), removed and moved options migrated (`migrate`)."""
    out = RunConfig().to_dict()
    for section, values in migrate(saved).items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def _refuse(key: str, old: Any, new: Any) -> GptlabError:
    why = FROZEN_BECAUSE.get(key, "it defines the model or data")
    return GptlabError(
        f"cannot resume: {key} changed from {old!r} to {new!r} ({why}); "
        "start a new run with another --out"
    )


def check_resume(
    run_dir: Path, cfg: RunConfig, tokenizer: dict[str, Any], fingerprint: str
) -> tuple[Path, list[Change]]:
    """The checkpoint to resume `run_dir` from and the config changes, once they are known
    to be safe for `cfg`, the tokenizer identity and the data fingerprint (checked before
    anything is built, so a refusal names the change rather than a symptom)."""
    ckpt = ckpt_lib.latest_checkpoint(run_dir, missing_ok=True)
    if ckpt is None:
        raise GptlabError(
            f"--resume: no checkpoint in {str(run_dir)!r} to continue from; "
            "start a new run (without --resume) with an unused --out"
        )
    meta = ckpt_lib.read_meta(ckpt)
    saved_cfg = meta.get("config")
    if not isinstance(saved_cfg, dict):
        raise GptlabError(
            f"checkpoint {str(ckpt)!r} has no saved config in its metadata; it cannot be resumed"
        )
    changes = config_changes(with_defaults(saved_cfg), cfg.to_dict())
    frozen = [c for c in changes if is_frozen(c[0])]
    # Data and batch changes first: a char vocabulary follows its text, so other text
    # also shows up as a model.vocab_size change, which is the symptom, not the cause.
    frozen.sort(key=lambda c: c[0].startswith("model."))
    if frozen and not frozen[0][0].startswith("model."):
        raise _refuse(*frozen[0])
    if meta.get("tokenizer") != tokenizer:
        raise GptlabError(
            "cannot resume: the tokenizer (for char, the characters of the text) differs from "
            "the checkpoint's; use the same --data and tokenizer"
        )
    if meta.get("data_fingerprint") != fingerprint:
        raise GptlabError(
            "cannot resume: the training text differs from the checkpoint's; use the same --data"
        )
    if frozen:
        raise _refuse(*frozen[0])
    return ckpt, changes


def check_data_layout(saved: dict[str, Any] | None, steps_per_epoch: int, accum: int) -> None:
    """ValueError when a checkpoint's epoch layout differs from this run's."""
    if saved and (saved["steps_per_epoch"], saved["accum"]) != (steps_per_epoch, accum):
        raise ValueError(
            f"its epoch has {saved['steps_per_epoch']} steps of {saved['accum']} micro-batches, "
            f"this run's {steps_per_epoch} of {accum}"
        )


def rng_state() -> dict[str, Any]:
    """Every global random generator's state (Python, NumPy, torch, CUDA), in types that
    `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(rng["python"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
