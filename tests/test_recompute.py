"""Activation checkpointing (runtime.activation_checkpointing): the same math, less kept.

With it, each block keeps only its input for backward and recomputes the rest there. The
loss, every gradient and the random generators after backward must be those of the model
without it, with dropout on (PyTorch's masks and the fast CPU ones, both drawn from the
global generator that the recompute must replay), with LoRA adapters on a frozen base, and
with packed examples; and what autograd keeps for backward must actually shrink.
"""

from __future__ import annotations

import pytest
import torch

from gptlab.config.schema import ModelConfig
from gptlab.finetune.data import IGNORE_INDEX
from gptlab.finetune.objectives import lm_loss
from gptlab.model import lora
from gptlab.model.gpt import GPTModel, use_activation_checkpointing, use_fast_dropout
from gptlab.model.loss import model_loss

CFG = dict(vocab_size=97, context_length=32, emb_dim=48, n_heads=4, n_layers=3)


def _model(drop_rate: float = 0.2, **options) -> GPTModel:
    torch.manual_seed(5)
    return GPTModel(ModelConfig(**{**CFG, "drop_rate": drop_rate, **options})).train()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(0, CFG["vocab_size"], (4, CFG["context_length"]), generator=gen)
    y = torch.randint(0, CFG["vocab_size"], (4, CFG["context_length"]), generator=gen)
    return x, y


def _step(model: GPTModel, checkpointed: bool, loss_of) -> tuple[float, dict, torch.Tensor]:
    """Loss, gradients by name and the global generator's state after backward."""
    use_activation_checkpointing(model, checkpointed)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(99)  # the dropout masks come from here
    loss = loss_of(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, torch.get_rng_state()


def _assert_same(model: GPTModel, loss_of) -> None:
    plain = _step(model, False, loss_of)
    recomputed = _step(model, True, loss_of)
    # recomputing runs the same kernels on the same inputs in the same order: bit for bit
    assert recomputed[0] == plain[0]
    assert recomputed[1].keys() == plain[1].keys() and plain[1]
    for name, g in plain[1].items():
        assert torch.equal(recomputed[1][name], g), name
    assert torch.equal(recomputed[2], plain[2]), "the random stream moved differently"


def _lm(model: GPTModel) -> torch.Tensor:
    x, y = _batch()
    return model_loss(model, x, y)


@pytest.mark.parametrize("fast", [False, True], ids=["torch-dropout", "fast-dropout"])
def test_the_loss_gradients_and_random_stream_are_unchanged_with_dropout(fast):
    model = _model()
    use_fast_dropout(model, fast)
    _assert_same(model, _lm)
    # the masks really are random: another seed gives another loss
    use_activation_checkpointing(model, True)
    torch.manual_seed(100)
    assert _lm(model).item() != pytest.approx(_step(model, True, _lm)[0], abs=1e-4)


def test_a_lora_models_masked_loss_and_adapter_gradients_are_unchanged():
    model = _model(drop_rate=0.1)
    lora.add_adapters(model, 4, 8.0, "attn")
    with torch.no_grad():  # B starts at zero: give it weights so every path carries signal
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    x, y = _batch()
    y[:, :20] = IGNORE_INDEX  # a prompt, masked as finetune masks it
    _assert_same(model, lambda m: lm_loss(m, x, y))


def test_packed_examples_are_unchanged():
    model = _model(drop_rate=0.0, positions="rope")
    x, y = _batch()
    doc_ids = torch.arange(CFG["context_length"]).div(10, rounding_mode="floor").expand(4, -1)

    def packed(m: GPTModel) -> torch.Tensor:
        hidden = m.hidden_states(x, doc_ids=doc_ids)
        return torch.nn.functional.cross_entropy(m.head_logits(hidden).flatten(0, 1), y.flatten())

    _assert_same(model, packed)


def _kept_bytes(model: GPTModel) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward."""
    kept = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _lm(model)
    loss.backward()
    return kept


def test_it_keeps_a_fraction_of_the_activations_and_inference_is_untouched():
    model = _model(drop_rate=0.1, n_layers=6)
    use_activation_checkpointing(model, False)
    plain = _kept_bytes(model)
    use_activation_checkpointing(model, True)
    recomputed = _kept_bytes(model)
    assert recomputed < 0.5 * plain, (recomputed, plain)
    # without gradients (evaluation, generation) nothing is recomputed
    model.eval()
    x, _ = _batch()
    with torch.no_grad():
        on = model(x)
        use_activation_checkpointing(model, False)
        torch.testing.assert_close(on, model(x), rtol=0, atol=0)
