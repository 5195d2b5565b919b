"""Cross-entropy straight from hidden states, without holding the full logits.

For a small model with GPT-2's 50k vocabulary, the output head and its loss are most of a
training step: `F.cross_entropy(model(x), y)` writes (B, T, V) logits, upcasts them to
fp32 under autocast, writes (B, T, V) log-probabilities, and backward writes two more.
`chunked_cross_entropy` computes the same loss and gradients from the head's input (N, D)
and weight (V, D), `chunk_rows` rows at a time: per chunk, logits (n, V) in the matmul
dtype, log-softmax in fp32, and (when gradients are wanted) the chunk's gradient while its
logits are at hand: dlogits = softmax - onehot, grad_hidden = dlogits @ W, grad_W +=
dlogits^T @ hidden. Backward only scales those by the incoming gradient (and 1/N). No
logits are kept nor recomputed: three matmuls as usual, and peak memory holds one (n, V)
chunk (as Liger-Kernel's fused linear cross-entropy does in Triton). Padded vocabulary rows
are never scored; a frozen head (LoRA's base) gets no (V, D) gradient buffer.

The trainer uses it where it measured faster (CPU; BENCHMARKS.md,
`runtime.resolve_chunked_loss`); on a GPU the compiled full-logits loss was faster.
`model_loss` picks the path for the trainer's step, `make_loss_fn` builds the step's loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def default_chunk_rows(device: torch.device, vocab_size: int) -> int:
    """Rows per chunk: a chunk's fp32 logits take at most 1 GiB on a GPU and 512 MiB on a
    CPU. Fewer, larger chunks are faster: each chunk adds a (V, D) update of the head's
    gradient (small chunks measured much slower on a CPU; BENCHMARKS.md)."""
    budget = 2**30 if device.type == "cuda" else 2**29  # bytes of fp32 logits per chunk
    return max(64, budget // (4 * vocab_size))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (N, D) hidden states against a (Vp, D) head; see the module doc."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # (N, D)
        weight: torch.Tensor,  # (Vp, D)
        targets: torch.Tensor,  # (N,)
        vocab_size: int,
        chunk_rows: int,
        compute_dtype: torch.dtype,
        need_grad: bool,
        cap: float,
        need_grad_w: bool = True,
    ) -> torch.Tensor:
        N = hidden.shape[0]
        # Every matmul below runs in compute_dtype by our own casts; autocast would add its own.
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight[:vocab_size].to(compute_dtype)  # (V, D): padded rows never scored
            h = hidden.to(compute_dtype)  # (N, D)
            acc = torch.promote_types(compute_dtype, torch.float32)  # softmax and sums
            loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
            if need_grad:
                grad_h = torch.empty(N, hidden.shape[1], dtype=acc, device=hidden.device)
                # (Vp, D): rows of padded ids keep a zero gradient; none for a frozen head
                grad_w_padded = (
                    torch.zeros(weight.shape, dtype=acc, device=hidden.device)
                    if need_grad_w
                    else torch.empty(0, dtype=acc, device=hidden.device)
                )
                grad_w = grad_w_padded[:vocab_size]  # (V, D) view
            for start in range(0, N, chunk_rows):
                hc = h[start : start + chunk_rows]  # (n, D)
                tc = targets[start : start + chunk_rows]  # (n,)
                logits = hc @ w.t()  # (n, V) in compute_dtype
                if cap:  # soft-capped: cap * tanh(logits / cap), in fp32
                    squash = torch.tanh(logits.to(acc) / cap)  # (n, V)
                    logits = squash * cap
                # one fused fp32 kernel (max, sum of exponentials, subtraction): faster
                logp = torch.log_softmax(logits, dim=-1, dtype=acc)  # (n, V)
                del logits
                loss_sum = loss_sum - logp.gather(1, tc.unsqueeze(1)).sum()
                if need_grad:
                    # d(sum of losses)/d(logits) = softmax - onehot; 1/N is applied in backward
                    probs = logp.exp_()  # (n, V), in place
                    probs.scatter_add_(1, tc.unsqueeze(1), _minus_ones(tc, acc))
                    if cap:  # through the cap: d(cap tanh(y / cap))/dy = 1 - tanh^2
                        probs.mul_(1.0 - squash.square_())
                    dlogits = probs.to(compute_dtype)  # (n, V)
                    grad_h[start : start + chunk_rows] = dlogits @ w  # (n, D)
                    if need_grad_w and compute_dtype == acc:
                        grad_w.addmm_(dlogits.t(), hc)  # (V, D)
                    elif need_grad_w:  # bf16/fp16 products, summed over chunks in fp32
                        grad_w += dlogits.t() @ hc
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w_padded)
            ctx.rows = N
            ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss_sum / N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        scale = grad_out / ctx.rows  # the loss is a mean over rows
        gh = (grad_h * scale).to(h_dtype)  # (N, D)
        gw = (grad_w * scale).to(w_dtype) if grad_w.numel() else None  # (Vp, D)
        return gh, gw, None, None, None, None, None, None, None


def _minus_ones(targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((targets.shape[0], 1), -1.0, dtype=dtype, device=targets.device)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int | None = None,
    chunk_rows: int | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight[:vocab_size].T, targets)`, chunked: a scalar fp32 loss
    with the same value and gradients. hidden (N, D) or (B, T, D); weight (Vp, D) (vocab_size
    default Vp); targets (N,) or (B, T); `softcap` c > 0 scores `c tanh(logits / c)` (the
    model's `logit_softcap`). Under autocast the matmuls run in the autocast dtype, the softmax
    statistics in fp32.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    targets = targets.reshape(-1)  # (N,)
    vocab_size = vocab_size or weight.shape[0]
    chunk_rows = chunk_rows or default_chunk_rows(hidden.device, vocab_size)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    need_grad_w = need_grad and weight.requires_grad  # a frozen head (LoRA) gets none
    return _ChunkedCrossEntropy.apply(
        hidden,
        weight,
        targets,
        vocab_size,
        chunk_rows,
        compute_dtype,
        need_grad,
        softcap,
        need_grad_w,
    )


def logits_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against target ids (B, T): a scalar."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def model_loss(
    model: nn.Module,
    input_batch: torch.Tensor,
    target_batch: torch.Tensor,
    chunked: bool = True,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of a GPTModel on one batch on its device: inputs and targets (B, T)
    -> scalar, as `calc_loss_batch`; `chunked` goes through `chunked_cross_entropy`."""
    if not chunked:
        return logits_loss(model(input_batch), target_batch)
    return chunked_cross_entropy(
        model.hidden_states(input_batch),  # (B, T, D)
        model.out_head.weight,
        target_batch,
        model.cfg.vocab_size,
        chunk_rows,
        softcap=model.cfg.logit_softcap,
    )


def make_loss_fn(
    model: nn.Module, chunked: bool, compiled: bool
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training step's loss: (inputs, targets) (B, T) on the model's device -> scalar.
    With `compiled`, model and loss are one torch.compile graph (head and loss fused too)."""

    def loss_fn(input_batch: torch.Tensor, target_batch: torch.Tensor) -> torch.Tensor:
        return model_loss(model, input_batch, target_batch, chunked=chunked)

    return torch.compile(loss_fn) if compiled else loss_fn
