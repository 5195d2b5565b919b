"""The chunked cross-entropy equals F.cross_entropy on full logits: values and gradients."""

from __future__ import annotations

import pytest
import tolerances
import torch
import torch.nn.functional as F

from gptlab.config.schema import ModelConfig
from gptlab.evals.loss import calc_loss_batch
from gptlab.model.gpt import GPTModel
from gptlab.model.loss import chunked_cross_entropy, model_loss

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _reference(hidden, weight, targets, vocab_size):
    logits = hidden @ weight[:vocab_size].T  # (N, V)
    return F.cross_entropy(logits, targets)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
@pytest.mark.parametrize("device", DEVICES)
def test_chunked_ce_matches_cross_entropy(dtype, chunk_rows, device):
    """Chunks sum the log-sum-exp, the mean and the head's gradient in another order. In
    float64 that moves nothing a test can see (1e-12); in fp32 the reference for how much
    rounding may move is the full loss in float64 (tolerances.py)."""
    torch.manual_seed(0)
    N, D, V, Vp = 50, 16, 37, 64  # a padded head: rows 37..63 must never be scored
    hidden = torch.randn(N, D, dtype=dtype, device=device, requires_grad=True)
    weight = torch.randn(Vp, D, dtype=dtype, device=device, requires_grad=True)
    targets = torch.randint(0, V, (N,), device=device)

    def full(h, w):  # the loss and its gradients through full logits
        loss = _reference(h, w, targets, V)
        return (loss, *torch.autograd.grad(loss * 3.0, (h, w)))

    ref = full(hidden, weight)
    exact = full(*(t.detach().double().requires_grad_() for t in (hidden, weight)))
    out = chunked_cross_entropy(hidden, weight, targets, V, chunk_rows=chunk_rows)
    gh, gw = torch.autograd.grad(out * 3.0, (hidden, weight))  # a non-unit upstream gradient

    assert out.dtype == torch.promote_types(dtype, torch.float32)
    for got, want, exact_one in zip((out, gh, gw), ref, exact, strict=True):
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        else:
            tolerances.assert_close_to_rounding(got, want, exact_one)
    assert torch.equal(gw[V:], torch.zeros_like(gw[V:]))


def test_chunked_ce_takes_batched_inputs_and_no_grad():
    torch.manual_seed(1)
    hidden = torch.randn(2, 5, 8)  # (B, T, D)
    weight = torch.randn(11, 8)
    targets = torch.randint(0, 11, (2, 5))
    ref = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten())
    with torch.no_grad():
        out = chunked_cross_entropy(hidden, weight, targets, chunk_rows=3)
    torch.testing.assert_close(out, ref)


def test_chunked_ce_is_stable_for_large_logits():
    # logits of +-1e4 overflow a naive exp; the result must stay finite and exact
    hidden = torch.tensor([[100.0], [-100.0]])
    weight = torch.tensor([[100.0], [-100.0], [0.0]])
    targets = torch.tensor([1, 1])
    out = chunked_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(out, _reference(hidden, weight, targets, 3))
    assert torch.isfinite(out)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_ce_under_bf16_autocast_matches_autocast_cross_entropy(device):
    torch.manual_seed(2)
    hidden = torch.randn(64, 32, device=device, requires_grad=True)
    weight = (0.2 * torch.randn(100, 32, device=device)).requires_grad_()
    targets = torch.randint(0, 100, (64,), device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(hidden, weight), targets)
        out = chunked_cross_entropy(hidden, weight, targets, chunk_rows=16)
    ref_g = torch.autograd.grad(ref, (hidden, weight))
    out_g = torch.autograd.grad(out, (hidden, weight))
    # both run the matmuls in bf16 (about 3 significant digits) and the softmax in fp32
    torch.testing.assert_close(out, ref.float(), rtol=1e-2, atol=1e-2)
    for a, b in zip(out_g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("tie, multiple", [(False, 1), (True, 1), (True, 64), (False, 64)])
def test_model_loss_matches_calc_loss_batch(tie, multiple):
    cfg = ModelConfig(
        vocab_size=50,
        context_length=8,
        emb_dim=16,
        n_heads=2,
        n_layers=2,
        drop_rate=0.0,
        tie_weights=tie,
        vocab_multiple=multiple,
    )
    torch.manual_seed(3)
    model = GPTModel(cfg)
    x, y = torch.randint(0, 50, (3, 8)), torch.randint(0, 50, (3, 8))

    ref = calc_loss_batch(x, y, model, "cpu")
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    out = model_loss(model, x, y, chunked=True, chunk_rows=5)
    out_grads = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(out_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model_loss(model, x, y, chunked=False), ref)


def test_hidden_states_feed_the_head():
    cfg = ModelConfig(
        vocab_size=30, context_length=8, emb_dim=16, n_heads=2, n_layers=1, vocab_multiple=64
    )
    model = GPTModel(cfg).eval()
    x = torch.randint(0, 30, (2, 8))
    hidden = model.hidden_states(x)
    assert hidden.shape == (2, 8, 16)
    torch.testing.assert_close(model.out_head(hidden)[..., :30], model(x))


def test_chunked_ce_with_a_frozen_head_gives_the_hiddens_gradient_and_none_for_the_head():
    """LoRA's base: the head is frozen, so no (V, D) gradient is formed or returned."""
    torch.manual_seed(3)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(70, 16, dtype=torch.float64)  # requires_grad False
    targets = torch.randint(0, 64, (37,))
    chunked_cross_entropy(hidden, weight, targets, vocab_size=64, chunk_rows=10).backward()
    got = hidden.grad.clone()
    hidden.grad = None
    F.cross_entropy(hidden @ weight[:64].t(), targets).backward()
    torch.testing.assert_close(got, hidden.grad, rtol=0, atol=1e-12)
    assert weight.grad is None
