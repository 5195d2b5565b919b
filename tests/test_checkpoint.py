"""Checkpoint round trips give identical logits; damaged or foreign checkpoints are clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from gptlab import GPTModel, ModelConfig
from gptlab import checkpoint as ckpt_lib
from gptlab.cli import load_run_model
from gptlab.config import RunConfig
from gptlab.errors import GptlabError

VARIANTS = {
    "plain": {},
    "tied": {"tie_weights": True},
    "padded": {"vocab_multiple": 64},
    "tied+padded+gpt2init": {"tie_weights": True, "vocab_multiple": 64, "init": "gpt2"},
}


def _cfg(base: ModelConfig, extra: dict) -> ModelConfig:
    return ModelConfig(**{**vars(base), **extra})


def _meta(mcfg: ModelConfig) -> dict:
    run = RunConfig()
    run.model = mcfg
    return {"config": run.to_dict(), "tokenizer": {"type": "gpt2"}, "val_loss": 1.5}


def _perturb(model: GPTModel) -> None:
    """Move every weight away from its initial value, so a load that silently fails (or
    re-initialises) cannot pass."""
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_identical_logits(tmp_path, tiny_model_cfg, variant):
    cfg = _cfg(tiny_model_cfg, VARIANTS[variant])
    torch.manual_seed(0)
    model = GPTModel(cfg)
    _perturb(model)
    model.eval()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        want = model(x)
    path = ckpt_lib.save_checkpoint(tmp_path, 7, model, _meta(cfg), state={"step": 7})
    assert path == tmp_path / "checkpoints" / "step-00000007"
    assert ckpt_lib.latest_checkpoint(tmp_path) == path
    meta = ckpt_lib.read_meta(path)
    assert meta["step"] == 7 and meta["format"] == ckpt_lib.FORMAT

    torch.manual_seed(1)  # a different initialisation
    fresh = GPTModel(cfg).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x), want)
    ckpt_lib.load_weights(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    if cfg.tie_weights:
        assert fresh.out_head.weight is fresh.tok_emb.weight
    assert ckpt_lib.load_state(path) == {"step": 7}

    # the `gptlab generate` loading path: run dir -> config + tokenizer + weights
    loaded, tokenizer, device = load_run_model(str(tmp_path), "cpu")
    assert device.type == "cpu" and not loaded.training
    assert tokenizer.n_vocab == 50257
    assert loaded.cfg == cfg
    with torch.no_grad():
        assert torch.equal(loaded(x), want)


def test_keeps_last_and_best(tmp_path, tiny_model_cfg):
    model = GPTModel(tiny_model_cfg)
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)]:
        meta = {**_meta(tiny_model_cfg), "val_loss": val}
        ckpt_lib.save_checkpoint(tmp_path, step, model, meta, keep_last=2)
    root = tmp_path / "checkpoints"
    kept = sorted(p.name for p in root.glob("step-*"))
    assert kept == ["step-00000002", "step-00000003", "step-00000004"]
    assert (root / "latest").read_text().strip() == "step-00000004"
    assert (root / "best").read_text().strip() == "step-00000002"
    assert not list(root.glob(".tmp-*"))


def test_load_into_a_different_shape_is_a_clear_error(tmp_path, tiny_model_cfg):
    path = ckpt_lib.save_checkpoint(tmp_path, 1, GPTModel(tiny_model_cfg), {})
    other = GPTModel(_cfg(tiny_model_cfg, {"emb_dim": 64}))
    with pytest.raises(GptlabError, match="do not fit"):
        ckpt_lib.load_weights(other, path)
    deeper = GPTModel(_cfg(tiny_model_cfg, {"n_layers": 3}))
    with pytest.raises(GptlabError, match="do not fit"):
        ckpt_lib.load_weights(deeper, path)


def test_damaged_checkpoints_are_clear_errors(tmp_path, tiny_model_cfg):
    model = GPTModel(tiny_model_cfg)
    path = ckpt_lib.save_checkpoint(tmp_path, 1, model, _meta(tiny_model_cfg), state={"a": 1})
    weights = path / ckpt_lib.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(GptlabError, match="corrupt or truncated"):
        ckpt_lib.load_weights(model, path)
    (path / ckpt_lib.STATE).write_bytes(b"not a pickle")
    with pytest.raises(GptlabError, match="corrupt"):
        ckpt_lib.load_state(path)
    (path / ckpt_lib.META).write_text("{ junk")
    with pytest.raises(GptlabError, match="unreadable"):
        ckpt_lib.read_meta(path)
    (path / ckpt_lib.META).write_text(json.dumps({"format": "other-tool"}))
    with pytest.raises(GptlabError, match="foreign"):
        ckpt_lib.read_meta(path)
    (path / ckpt_lib.META).write_text(json.dumps({"format": ckpt_lib.FORMAT, "format_version": 99}))
    with pytest.raises(GptlabError, match="upgrade"):
        ckpt_lib.read_meta(path)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(GptlabError, match="does not exist"):
        ckpt_lib.latest_checkpoint(tmp_path / "nowhere")
    with pytest.raises(GptlabError, match="no checkpoint"):
        ckpt_lib.latest_checkpoint(tmp_path)
