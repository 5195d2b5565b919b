"""Optimizer and learning-rate schedule.

Weight decay applies to the matrices of linear layers only: biases, LayerNorm parameters
and embeddings are left undecayed (decaying them only pulls useful values towards zero).
`train.weight_decay_on = "all"` decays every parameter instead, as the walk-through's
`AdamW(model.parameters(), weight_decay=0.1)` does.
AdamW is the fused kernel where PyTorch has one for the device (CPU and CUDA since 2.4):
one kernel over all parameters instead of a loop over tensors (BENCHMARKS.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gptlab.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices of nn.Linear, and everything else."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))  # a tied matrix is listed once, under the module met first
            if (
                isinstance(module, nn.Linear)
                and name == "weight"
                and not _is_tied_embedding(model, p)
            ):
                decay.append(p)
            else:
                no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _is_tied_embedding(model: nn.Module, p: torch.Tensor) -> bool:
    tok = getattr(model, "tok_emb", None)
    return tok is not None and p is tok.weight


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with gptlab's parameter groups, or with `weight_decay_on="all"` the
    walk-through's one group of every parameter; fused when asked for and available."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    fused = cfg.fused_optimizer and device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(_groups(model, cfg), fused=fused, **kwargs)
    except (RuntimeError, TypeError):  # an older torch without a fused kernel for this device
        return torch.optim.AdamW(_groups(model, cfg), **kwargs)


def _groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    if cfg.weight_decay_on == "all":
        return [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    return param_groups(model, cfg.weight_decay)


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup over `warmup_steps` (step 0 runs at lr / warmup_steps, step
    warmup_steps - 1 at lr), then cosine or linear decay from lr at step `warmup_steps` to
    the floor `lr * min_lr_ratio` at the run's last step, `total_steps - 1`; constant after
    warmup when the schedule is "constant" or the total is unknown (a run limited by wall
    time alone).
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or not total_steps:
        return cfg.lr
    floor = cfg.lr * cfg.min_lr_ratio
    span = max(total_steps - 1 - cfg.warmup_steps, 1)  # the last step runs at the floor
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - floor) * progress
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))
