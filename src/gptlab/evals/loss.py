"""Loss and evaluation with the walk-through's semantics (`calc_loss_batch`,
`calc_loss_loader`, `evaluate_model`), perplexity and bits per byte. Under torchrun (`dist`)
the batches are shared out and the sums all-reduced, so every rank gets the one-process
value. `evaluate_tokens` measures a token stream; `evaluate_run` is what `gptlab eval` reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from gptlab.data.corpus import TokenWindowLoader, load_corpus, tokenize_documents
from gptlab.data.shards import open_split, prepared_manifest
from gptlab.data.sources import read_documents
from gptlab.data.tokenizer import token_byte_lengths
from gptlab.errors import GptlabError
from gptlab.model.loss import logits_loss
from gptlab.runtime.device import PRECISION_DTYPES, autocast, keep_freed_host_memory
from gptlab.runtime.dist import Dist, eval_batch_indices

if TYPE_CHECKING:  # only a type: runs.open_run makes it, and runs sits above this module
    from gptlab.interop.runs import Run


def calc_loss_batch(
    input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module, device
) -> torch.Tensor:
    """Mean cross-entropy of one batch: inputs and targets (B, T) -> scalar loss."""
    input_batch = input_batch.to(device, non_blocking=True)
    target_batch = target_batch.to(device, non_blocking=True)
    logits = model(input_batch)  # (B, T, V)
    return logits_loss(logits, target_batch)


def calc_loss_loader(
    data_loader: Iterable,
    model: nn.Module,
    device,
    num_batches: int | None = None,
    dist: Dist | None = None,
    batch_loss: BatchLoss | None = None,
) -> float:
    """Average loss over the first `num_batches` batches (all when None); NaN when empty.
    With a torchrun `dist`, the ranks share the batches (the loader must give them by index).
    `batch_loss(model, inputs, targets)` replaces calc_loss_batch's (a finetuning's loss)."""
    n_available = len(data_loader)
    if n_available == 0:
        return float("nan")
    num_batches = n_available if num_batches is None else min(num_batches, n_available)
    if dist is not None and dist.enabled:
        return _shared_loader_loss(data_loader, model, device, num_batches, dist, batch_loss)
    total = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total += _loss(input_batch, target_batch, model, device, batch_loss).item()
    return total / num_batches


BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _loss(x, y, model: nn.Module, device, batch_loss: BatchLoss | None) -> torch.Tensor:
    if batch_loss is None:
        return calc_loss_batch(x, y, model, device)
    return batch_loss(model, x.to(device), y.to(device))


def _shared_loader_loss(
    loader, model: nn.Module, device, n: int, dist: Dist, batch_loss: BatchLoss | None = None
) -> float:
    total = torch.zeros((), dtype=torch.float64, device=dist.device)
    for i in eval_batch_indices(n, dist.rank, dist.world_size):
        x, y = loader.batch(0, 0 if i is None else i)  # None: a padding pass, not counted
        loss = _loss(x, y, model, device, batch_loss)
        if i is not None:
            total += loss.double()
    return dist.sum(total).item() / n


def evaluate_model(
    model: nn.Module,
    train_loader,
    val_loader,
    device,
    eval_iter: int,
    dist: Dist | None = None,
    batch_loss: BatchLoss | None = None,
) -> tuple[float, float]:
    """(train loss, validation loss) on `eval_iter` batches each, in eval mode without grad,
    then back to train mode; `dist` and `batch_loss` as calc_loss_loader takes them."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, eval_iter, dist, batch_loss)
        val_loss = calc_loss_loader(val_loader, model, device, eval_iter, dist, batch_loss)
    model.train()
    return train_loss, val_loss


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy in nats per token)."""
    return math.exp(loss) if loss < 700 else float("inf")


def bits_per_byte(loss: float, n_tokens: int, n_bytes: int) -> float:
    """Loss (nats per token over `n_tokens` tokens encoding `n_bytes` bytes) in bits per
    UTF-8 byte: comparable across tokenizers."""
    return loss * n_tokens / (n_bytes * math.log(2))


@torch.no_grad()
def evaluate_tokens(
    model: nn.Module,
    tokens,
    context_length: int,
    batch_size: int,
    device,
    byte_lengths: np.ndarray | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Loss over a 1-D token array (or memory-mapped shards) in non-overlapping windows of
    `context_length` (a shorter tail is left out): loss (nats per token), perplexity, tokens,
    bytes, bits_per_byte (from `byte_lengths`, (n_vocab,) bytes per id; else NaN), windows."""
    loader = TokenWindowLoader(
        tokens, batch_size, context_length, context_length, shuffle=False, drop_last=False
    )
    n_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    total_nats, n_tokens, n_bytes, n_windows = 0.0, 0, 0, 0
    was_training = model.training
    model.eval()
    for i in range(n_batches):
        x, y = loader.batch(0, i)  # (B, T), (B, T)
        total_nats += calc_loss_batch(x, y, model, device).item() * y.numel()
        n_tokens += y.numel()
        n_windows += y.shape[0]
        if byte_lengths is not None:
            n_bytes += int(byte_lengths[y.numpy()].sum())
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


def evaluate_run(
    run: Run,
    data: str | None = None,
    split: str = "val",
    batch_size: int = 8,
    max_batches: int | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """What `gptlab eval` reports: `evaluate_tokens`'s numbers and "data", the text measured:
    `data` (a text source, all of it, or a prepared directory's `split`), by default the
    `split` of the run's own training data."""
    if split not in ("val", "train"):
        raise GptlabError(f"split must be val or train, got {split!r}")
    if precision not in PRECISION_DTYPES:  # evaluation has no 'auto': it is asked for
        raise GptlabError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if run.device.type == "cpu":
        keep_freed_host_memory()  # each batch's (B, T, V) logits would be page-faulted afresh
    tokens, what = _tokens_to_evaluate(run, data, split)
    T = run.config.model.context_length
    if len(tokens) < T + 1:
        raise GptlabError(
            f"{what} has {len(tokens)} tokens, fewer than one window ({T + 1}); give more text"
        )
    byte_lengths = token_byte_lengths(run.tokenizer)
    with autocast(run.device, precision):
        r = evaluate_tokens(run.model, tokens, T, batch_size, run.device, byte_lengths, max_batches)
    return {"data": what, **r}


def _tokens_to_evaluate(run: Run, data: str | None, split: str):
    """(tokens, description) of the text `evaluate_run` measures."""
    tokenizer = run.tokenizer
    source = data or run.config.data.source
    manifest = prepared_manifest(source)
    if manifest is not None:
        if manifest["tokenizer"] != tokenizer.identity():
            raise GptlabError(
                f"{source!r} was prepared with another tokenizer than this run's; prepare it "
                f"with the run's tokenizer (gptlab prepare ... --tokenizer) or give text"
            )
        return open_split(source, split, manifest), f"{source} ({split} split)"
    if data:
        docs = read_documents(source, text_field=run.config.data.text_field)
        return tokenize_documents(docs, tokenizer, tokenizer.identity()), f"{source} (all)"
    dc = run.config.data
    corpus = load_corpus(source, dc.tokenizer, dc.train_ratio, tokenizer, dc.text_field, dc.split)
    tokens = corpus.val if split == "val" else corpus.train
    return tokens, f"{source} (the run's {split} split)"
