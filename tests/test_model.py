"""GPTModel against an independent implementation of the walk-through's model, shapes and
parameter counts."""

from __future__ import annotations

import copy

import pytest
import tolerances
import torch
import torch.nn.functional as F
from reference_walkthrough import RefGPTModel

import gptlab
from gptlab import GPTModel, ModelConfig, count_parameters
from gptlab.errors import GptlabError


def _build_pair(cfg: dict, attention: str | None = None) -> tuple[GPTModel, RefGPTModel]:
    """gptlab's model and the reference, each built right after torch.manual_seed(123)."""
    ours_cfg = dict(cfg) if attention is None else {**cfg, "attention": attention}
    torch.manual_seed(123)
    ours = GPTModel(ours_cfg)
    torch.manual_seed(123)
    ref = RefGPTModel(cfg)
    return ours, ref


def _batch(cfg: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg["vocab_size"], (3, cfg["context_length"] + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def test_initial_state_is_bit_equal_to_reference(walkthrough_cfg):
    ours, ref = _build_pair(walkthrough_cfg)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    mask_keys = {k for k in ref_sd if k.endswith("att.mask")}
    assert len(mask_keys) == walkthrough_cfg["n_layers"]
    assert set(ours_sd) == set(ref_sd) - mask_keys
    # Same keys in the same order means the same parameter creation order.
    assert list(ours_sd) == [k for k in ref_sd if k not in mask_keys]
    for key, value in ours_sd.items():
        assert value.shape == ref_sd[key].shape, key
        assert torch.equal(value, ref_sd[key]), key


def test_initial_state_differs_with_another_seed(walkthrough_cfg):
    """Guards the test above: equality must come from the seed, not from constant weights."""
    torch.manual_seed(123)
    a = GPTModel(walkthrough_cfg)
    torch.manual_seed(124)
    b = GPTModel(walkthrough_cfg)
    assert not torch.equal(a.tok_emb.weight, b.tok_emb.weight)
    assert not torch.equal(a.trf_blocks[1].att.W_key.weight, b.trf_blocks[1].att.W_key.weight)


@pytest.mark.parametrize("attention", [None, "sdpa", "manual"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_logits_and_loss_match_reference(walkthrough_cfg, attention, qkv_bias):
    cfg = {**walkthrough_cfg, "qkv_bias": qkv_bias}
    ours, ref = _build_pair(cfg, attention)
    assert ours.cfg.attention == (attention or "sdpa")
    ours.eval()
    ref.eval()
    x, y = _batch(cfg)
    # The two implementations order their sums differently (fused vs separate attention,
    # another softmax); the reference in float64 says how far fp32 rounding alone goes.
    exact = copy.deepcopy(ref).double()
    with torch.no_grad():
        lo, lr, le = ours(x), ref(x), exact(x)
    assert lo.shape == (3, cfg["context_length"], cfg["vocab_size"])
    tolerances.assert_close_to_rounding(lo, lr, le)
    loss_ours = gptlab.calc_loss_batch(x, y, ours, "cpu")
    loss_ref = F.cross_entropy(lr.flatten(0, 1), y.flatten())
    loss_exact = F.cross_entropy(le.flatten(0, 1), y.flatten())
    tolerances.assert_close_to_rounding(loss_ours, loss_ref, loss_exact)
    # Shorter sequences exercise the causal mask on a T < context_length slice.
    with torch.no_grad():
        short = x[:, :5]
        tolerances.assert_close_to_rounding(ours(short), ref(short), exact(short))


def test_causality_future_tokens_do_not_change_past_logits(walkthrough_cfg):
    for attention in ("sdpa", "manual"):
        torch.manual_seed(0)
        model = GPTModel({**walkthrough_cfg, "attention": attention}).eval()
        x, _ = _batch(walkthrough_cfg)
        x2 = x.clone()
        x2[:, 6:] = (x2[:, 6:] + 1) % walkthrough_cfg["vocab_size"]
        with torch.no_grad():
            a, b = model(x), model(x2)
        torch.testing.assert_close(a[:, :6], b[:, :6])
        assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_reference_state_dict_with_masks_loads_into_gptlab(walkthrough_cfg):
    torch.manual_seed(7)
    ref = RefGPTModel(walkthrough_cfg).eval()
    torch.manual_seed(8)  # different initial weights, so the load has to do the work
    ours = GPTModel(walkthrough_cfg).eval()
    ref_sd = ref.state_dict()
    assert any(k.endswith("att.mask") for k in ref_sd)
    result = ours.load_state_dict(ref_sd)  # strict: mask buffers must be accepted
    assert not result.missing_keys and not result.unexpected_keys
    x, _ = _batch(walkthrough_cfg, seed=3)
    with torch.no_grad():
        exact = copy.deepcopy(ref).double()(x)
        tolerances.assert_close_to_rounding(ours(x), ref(x), exact)


def test_train_mode_dropout_is_active_and_eval_is_deterministic(walkthrough_cfg):
    torch.manual_seed(0)
    model = GPTModel({**walkthrough_cfg, "drop_rate": 0.5})
    x, _ = _batch(walkthrough_cfg)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_accepts_model_config_and_dict_alike(walkthrough_cfg):
    torch.manual_seed(1)
    a = GPTModel(walkthrough_cfg)
    torch.manual_seed(1)
    b = GPTModel(ModelConfig(**walkthrough_cfg))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_walkthrough_config_dict_is_exported():
    assert gptlab.GPT_CONFIG_124M == {
        "vocab_size": 50257,
        "context_length": 1024,
        "emb_dim": 768,
        "n_heads": 12,
        "n_layers": 12,
        "drop_rate": 0.1,
        "qkv_bias": False,
    }


def _meta_model(cfg) -> GPTModel:
    # Shapes only: the 163M-parameter model costs no memory or time on the meta device.
    with torch.device("meta"):
        return GPTModel(cfg)


def test_gpt2_small_parameter_counts():
    model = _meta_model(gptlab.GPT_CONFIG_124M)
    assert count_parameters(model) == 163_009_536
    assert count_parameters(model, exclude_out_head=True) == 124_412_160
    # The same numbers computed by hand from the shapes, so the helper is not its own oracle.
    V, C, D, L = 50257, 1024, 768, 12
    per_block = 4 * D * D + D + 2 * (4 * D * D) + 4 * D + D + 2 * 2 * D
    assert V * D + C * D + L * per_block + 2 * D + V * D == 163_009_536


def test_gpt2_small_preset_matches_walkthrough_dict():
    from gptlab.recipes.presets import preset

    cfg = preset("gpt2-small").model
    model = _meta_model(cfg)
    assert count_parameters(model) == 163_009_536


def test_tied_weights_share_one_matrix(tiny_model_cfg):
    tiny_model_cfg.tie_weights = True
    model = GPTModel(tiny_model_cfg)
    assert model.out_head.weight is model.tok_emb.weight
    untied = GPTModel(ModelConfig(**{**vars(tiny_model_cfg), "tie_weights": False}))
    V, D = tiny_model_cfg.vocab_size, tiny_model_cfg.emb_dim
    assert count_parameters(untied) - count_parameters(model) == V * D


def test_padded_vocab_logits_are_cut_to_vocab_size(tiny_model_cfg):
    tiny_model_cfg.vocab_multiple = 64  # 97 -> 128 rows
    model = GPTModel(tiny_model_cfg).eval()
    assert model.tok_emb.weight.shape[0] == 128
    assert model.out_head.weight.shape[0] == 128
    x = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert model(x).shape == (2, 10, 97)


def test_forward_rejects_sequences_longer_than_context(tiny_model_cfg):
    model = GPTModel(tiny_model_cfg)
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, tiny_model_cfg.context_length + 1, dtype=torch.long))


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"n_heads": 5}, "divisible"),
        ({"emb_dim": 0}, "emb_dim"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"attention": "flash9"}, "attention"),
        ({"not_a_key": 1}, "not_a_key"),
    ],
)
def test_bad_model_configs_raise_gptlab_error(walkthrough_cfg, bad, words):
    with pytest.raises(GptlabError, match=words):
        GPTModel({**walkthrough_cfg, **bad})


def test_tied_gpt2_small_counts_124m_with_or_without_head():
    """GPT-2's own "124M" is the tied model: its head is the embedding, so leaving the head out
    changes nothing."""
    from gptlab import GPT_CONFIG_124M, GPTModel, count_parameters

    with torch.device("meta"):
        model = GPTModel({**GPT_CONFIG_124M, "tie_weights": True})
    assert count_parameters(model) == 124_412_160
    assert count_parameters(model, exclude_out_head=True) == 124_412_160
