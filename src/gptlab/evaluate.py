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


@torch.no_grad()
def evaluate_tokens(
    model: nn.Module,
    tokens,
    context_length: int,
    batch_size: int,
    device,
    byte_lengths=None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Loss over a 1-D token array (or memory-mapped shards) in non-overlapping windows.

    Windows start every `context_length` tokens (the tail shorter than one window plus its
    target is left out); each predicts its next `context_length` tokens. `byte_lengths`
    ((n_vocab,) UTF-8 bytes per token id, see tokenizer.token_byte_lengths) adds bits per
    byte over the predicted tokens. Returns loss (nats per token), perplexity, tokens,
    bytes, bits_per_byte (NaN without byte_lengths or bytes), and windows.
    """
    import numpy as np

    n_windows = max(len(tokens) - 1, 0) // context_length
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    offsets = np.arange(context_length + 1, dtype=np.int64)  # (T+1,)
    total_nats, n_tokens, n_bytes = 0.0, 0, 0
    was_training = model.training
    model.eval()
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows), dtype=np.int64)
        windows = np.asarray(tokens[(starts * context_length)[:, None] + offsets])  # (B, T+1)
        batch = torch.from_numpy(windows.astype(np.int64))
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)
        loss = calc_loss_batch(x, y, model, device)
        total_nats += loss.item() * y.numel()
        n_tokens += y.numel()
        if byte_lengths is not None:
            n_bytes += int(byte_lengths[windows[:, 1:]].sum())
    model.train(was_training)
    loss = total_nats / n_tokens if n_tokens else float("nan")
    return {
        "loss": loss,
        "perplexity": perplexity(loss) if n_tokens else float("nan"),
        "tokens": n_tokens,
        "bytes": n_bytes,
        "bits_per_byte": bits_per_byte(loss, n_tokens, n_bytes) if n_bytes else float("nan"),
        "windows": n_windows,
    }
