"""Loss and evaluation with the walk-through's semantics, plus perplexity and bits per byte."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def calc_loss_batch(
    input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module, device
) -> torch.Tensor:
    """Mean cross-entropy of one batch: inputs and targets (B, T) -> scalar loss."""
    input_batch = input_batch.to(device, non_blocking=True)
    target_batch = target_batch.to(device, non_blocking=True)
    logits = model(input_batch)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(
    data_loader: Iterable, model: nn.Module, device, num_batches: int | None = None
) -> float:
    """Average loss over the first `num_batches` batches of a loader (all when None).

    An empty loader gives NaN, as in the walk-through.
    """
    n_available = len(data_loader)
    if n_available == 0:
        return float("nan")
    num_batches = n_available if num_batches is None else min(num_batches, n_available)
    total = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total / num_batches


def evaluate_model(
    model: nn.Module, train_loader, val_loader, device, eval_iter: int
) -> tuple[float, float]:
    """Train and validation loss on `eval_iter` batches each: eval mode, no grad, then back to train mode."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy in nats per token)."""
    return math.exp(loss) if loss < 700 else float("inf")


def bits_per_byte(loss: float, n_tokens: int, n_bytes: int) -> float:
    """Loss in bits per UTF-8 byte of text: comparable across tokenizers.

    `loss` is nats per token measured over `n_tokens` tokens that encode `n_bytes` bytes.
    """
    return loss * n_tokens / (n_bytes * math.log(2))
