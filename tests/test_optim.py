"""train.optimizer = muon: which parameters torch.optim.Muon trains and which stay on AdamW,
the schedule over both, and that training, exact resume and the non-finite guard work with
it. The AdamW path is covered by the walk-through, speed-switch and resume tests."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from run_helpers import (
    assert_same_tensors,
    losses_by_step,
    records,
    tiny_config,
    tiny_corpus,
    weights,
    write_corpus,
)

from gptlab.cli import main as cli
from gptlab.config.schema import RuntimeConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.model import loss as loss_mod
from gptlab.model.gpt import GPTModel
from gptlab.recipes.presets import preset
from gptlab.runtime import device as runtime
from gptlab.train.loop import Trainer
from gptlab.train.objectives import LanguageModeling
from gptlab.train.optim import (
    Muon,
    MuonAdamW,
    build_optimizer,
    lr_at,
    muon_params,
    orthogonalise,
    set_lr,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text.txt")


def _model(tie_weights: bool, qkv_bias: bool = True) -> GPTModel:
    cfg = preset("tiny").model
    cfg.vocab_size, cfg.tie_weights, cfg.qkv_bias = 64, tie_weights, qkv_bias
    return GPTModel(cfg)


def _muon_cfg(**train) -> TrainConfig:
    return TrainConfig(optimizer="muon", **train)


# --------------------------------------------------------------------------- the split


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_block_matrices_and_adamw_everything_else_once(tied):
    model = _model(tied)
    opt = build_optimizer(model, _muon_cfg(), CPU)
    assert isinstance(opt, MuonAdamW) and isinstance(opt.muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}  # a tied matrix: one name
    muon = [names[id(p)] for g in opt.muon.param_groups for p in g["params"]]
    adamw = [names[id(p)] for g in opt.adamw.param_groups for p in g["params"]]
    # The reference, by name: attention q/k/v/out and the two MLP matrices of each block.
    want = [n for n, p in model.named_parameters() if n.startswith("trf_blocks.") and p.ndim == 2]
    assert sorted(muon) == sorted(want) and len(want) == 6 * model.cfg.n_layers
    assert muon == [names[id(p)] for p in muon_params(model)]
    # every parameter exactly once, across both optimizers
    assert sorted(muon + adamw) == sorted(names.values())
    assert len(muon + adamw) == len(set(muon + adamw))
    assert {"tok_emb.weight", "pos_emb.weight", "final_norm.scale"} <= set(adamw)
    assert "trf_blocks.0.att.W_query.bias" in adamw and "trf_blocks.0.norm1.scale" in adamw
    decayed = [names[id(p)] for p in opt.adamw.param_groups[0]["params"]]
    # The head stays on AdamW: untied, it is decayed like any Linear matrix; tied, it is
    # the token embedding (listed once, undecayed).
    assert decayed == ([] if tied else ["out_head.weight"])
    assert ("out_head.weight" in adamw) is not tied


def test_the_split_follows_llama_shaped_blocks():
    """SwiGLU's three matrices and grouped-query attention's smaller k/v matrices go to
    Muon; QK-norm's and RMSNorm's 1-D scales stay on AdamW (no biases here)."""
    cfg = preset("tiny").model
    cfg.vocab_size = 64
    for key, value in dict(
        positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_heads=1, qk_norm=True
    ).items():
        setattr(cfg, key, value)
    model = GPTModel(cfg.validate())
    opt = build_optimizer(model, _muon_cfg(), CPU)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in opt.muon.param_groups[0]["params"]}
    block = {n.removeprefix("trf_blocks.0.") for n in muon if n.startswith("trf_blocks.0.")}
    assert block == {
        "att.W_query.weight", "att.W_key.weight", "att.W_value.weight", "att.out_proj.weight",
        "ff.fc1.weight", "ff.fc2.weight", "ff.fc3.weight",
    }  # fmt: skip
    assert len(muon) == 7 * cfg.n_layers
    assert model.trf_blocks[0].att.W_key.weight.shape[0] < cfg.emb_dim  # the smaller k/v
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert "trf_blocks.0.att.q_norm.scale" in adamw and "final_norm.scale" in adamw
    assert muon | adamw == set(names.values()) and not muon & adamw


def test_muon_settings_reach_torch_muon_and_adamw_keeps_its_own():
    model = _model(False)
    cfg = _muon_cfg(
        lr=1e-3, muon_lr=0.05, muon_momentum=0.9, muon_weight_decay=0.01,
        muon_adjust_lr="match_rms_adamw", beta2=0.95,
    )  # fmt: skip
    opt = build_optimizer(model, cfg, CPU)
    (g,) = opt.muon.param_groups
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.05, 0.9, 0.01)
    assert g["nesterov"] and g["adjust_lr_fn"] == "match_rms_adamw"
    assert [g["lr"] for g in opt.adamw.param_groups] == [1e-3, 1e-3]
    assert opt.adamw.defaults["betas"] == (0.9, 0.95)
    # weight_decay_on = "all": one AdamW group of every non-Muon parameter
    opt = build_optimizer(model, _muon_cfg(weight_decay_on="all"), CPU)
    (g,) = opt.adamw.param_groups
    assert len(g["params"]) + len(muon_params(model)) == len(list(model.parameters()))


def test_the_default_optimizer_is_plain_adamw():
    opt = build_optimizer(_model(True), TrainConfig(), CPU)
    assert type(opt) is torch.optim.AdamW


# --------------------------------------------------------------------------- gptlab's Muon


def _matrices(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # wide, tall and square, as the blocks have them (the MLP's up and down projections)
    return [
        torch.nn.Parameter(torch.randn(r, c, generator=g)) for r, c in ((8, 32), (32, 8), (16, 16))
    ]


def _step_both(a: torch.optim.Optimizer, b: torch.optim.Optimizer, pa, pb, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for x, y in zip(pa, pb, strict=True):
            x.grad = torch.randn(x.shape, generator=g)
            y.grad = x.grad.clone()
        a.step()
        b.step()


@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_gptlab_muon_in_bf16_is_torch_muon_bit_for_bit(adjust):
    """The reference is torch.optim.Muon itself: same weights, same momentum buffers, and
    each loads the other's state dict."""
    ours, theirs = _matrices(0), _matrices(0)
    kw = dict(lr=0.05, weight_decay=0.1, momentum=0.9, adjust_lr_fn=adjust)
    a = Muon(ours, ns_dtype=torch.bfloat16, **kw)
    b = torch.optim.Muon(theirs, **kw)
    _step_both(a, b, ours, theirs, 3)
    assert_same_tensors(dict(enumerate(ours)), dict(enumerate(theirs)))
    bufs = [a.state[p]["momentum_buffer"] for p in ours]
    assert_same_tensors(
        dict(enumerate(bufs)), dict(enumerate(b.state[p]["momentum_buffer"] for p in theirs))
    )
    c = Muon(_matrices(0), ns_dtype=torch.float32, **kw)
    c.load_state_dict(b.state_dict())
    assert torch.equal(c.state_dict()["state"][0]["momentum_buffer"], bufs[0])


def test_fp32_orthogonalisation_is_the_bf16_one_more_precisely():
    """Against the exact polar factor U V^T from an SVD: both dtypes land in Muon's band of
    singular values, fp32 closer to bf16's own result than bf16 rounding, and far faster
    on a CPU without bf16 instructions (measured in BENCHMARKS.md, not here)."""
    coeffs, g = (
        (3.4445, -4.775, 2.0315),
        torch.randn(24, 64, generator=torch.Generator().manual_seed(2)),
    )
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    for m in (g, g.T):  # the wide and the tall orientation
        o32 = orthogonalise(m, coeffs, 5, 1e-7, torch.float32)
        o16 = orthogonalise(m, coeffs, 5, 1e-7, torch.bfloat16)
        assert o32.dtype == torch.float32 and o16.dtype == torch.bfloat16 and o32.shape == m.shape
        sv = torch.linalg.svdvals(o32)
        assert sv.min() > 0.5 and sv.max() < 1.3
        ref = polar if m is g else polar.T
        cos = torch.nn.functional.cosine_similarity(o32.flatten(), ref.flatten(), dim=0)
        assert cos > 0.95
        assert (o32 - o16.float()).abs().max() < 0.05
        assert not torch.equal(o32, o16.float())  # fp32 really did the arithmetic


def test_muon_runs_its_iteration_in_fp32_only_on_cpus_without_bf16(monkeypatch):
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda native=native: native)
        assert runtime.resolve_muon_dtype(CPU) == want
        assert runtime.resolve_runtime(RuntimeConfig(host_memory="release"), CPU).muon_dtype == want
    assert runtime.resolve_muon_dtype(torch.device("cuda")) == torch.bfloat16
    opt = build_optimizer(_model(True), _muon_cfg(), CPU, muon_dtype=torch.float32)
    assert isinstance(opt.muon, Muon) and opt.muon.ns_dtype == torch.float32


# --------------------------------------------------------------------------- the schedule


def test_the_schedule_drives_both_optimizers_from_their_own_peaks():
    cfg = _muon_cfg(lr=1e-3, muon_lr=0.04, warmup_steps=4, min_lr_ratio=0.1)
    opt = build_optimizer(_model(True), cfg, CPU)
    total = 25
    for step in (0, 2, 3, 10, 24):
        for scale in (1.0, 0.5):
            lr = set_lr(opt, step, cfg, total, scale)
            want = lr_at(step, cfg, total) * scale
            assert lr == want
            assert [g["lr"] for g in opt.adamw.param_groups] == [want, want]
            muon_lr = opt.muon.param_groups[0]["lr"]
            assert muon_lr == lr_at(step, cfg, total, peak=0.04) * scale
            assert muon_lr / want == pytest.approx(40.0)  # the same shape, another peak
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.004 * 0.5)  # the floor, halved


def test_lr_at_with_the_default_peak_is_unchanged():
    cfg = TrainConfig(lr=2e-3, warmup_steps=50)
    for step in range(0, 1000, 37):
        assert lr_at(step, cfg, 1000) == lr_at(step, cfg, 1000, peak=2e-3)


# --------------------------------------------------------------------------- training


def _trainer(text, run_dir, steps=20, **train):
    cfg = tiny_config(steps, optimizer="muon", **train)
    events: list[dict] = []
    return Trainer(
        cfg, LanguageModeling(tiny_corpus(text, cfg)), run_dir, on_event=events.append
    ), events


def test_a_tiny_muon_run_lowers_the_loss_and_logs_both_rates(text, tmp_path):
    trainer, events = _trainer(text, tmp_path / "run", steps=20)
    end = trainer.run()
    assert end["reason"] == "max_steps"
    train = [r for r in events if r["event"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.2
    evals = [r["val_loss"] for r in events if r["event"] == "eval"]
    assert evals[-1] < evals[0]
    assert all(r["muon_lr"] / r["lr"] == pytest.approx(0.02 / 1e-3) for r in train)
    # Muon holds a momentum buffer for each of its matrices and AdamW nothing of them
    assert len(trainer.optimizer.muon.state) == len(muon_params(trainer.model))
    assert not set(map(id, trainer.optimizer.muon.state)) & set(
        map(id, trainer.optimizer.adamw.state)
    )


def test_a_muon_run_resumed_from_a_checkpoint_repeats_the_uninterrupted_run(text, tmp_path):
    ref = tmp_path / "ref"
    _trainer(text, ref, steps=12, checkpoint_every=5, keep_last=5)[0].run()
    # the same run, as if it had been killed after its step-5 checkpoint
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for p in (run / "checkpoints").glob("step-*"):
        if p.name != "step-00000005":
            shutil.rmtree(p)
    (run / "checkpoints" / "latest").unlink()
    cfg = tiny_config(12, optimizer="muon", checkpoint_every=5, keep_last=5)
    resumed = Trainer(cfg, LanguageModeling(tiny_corpus(text, cfg)), run, resume=True)
    assert resumed.state.step == 5
    resumed.run()
    assert losses_by_step(run) == losses_by_step(ref)
    assert losses_by_step(run, "train", "muon_lr") == losses_by_step(ref, "train", "muon_lr")
    a, b = ckpt_lib.latest_checkpoint(run), ckpt_lib.latest_checkpoint(ref)
    assert a.name == b.name == "step-00000012"
    assert_same_tensors(weights(a), weights(b))
    sa, sb = ckpt_lib.load_state(a)["optimizer"], ckpt_lib.load_state(b)["optimizer"]
    assert set(sb) == {"adamw", "muon"} and len(sb["muon"]["state"]) == 12
    for part in sb:
        assert sa[part]["param_groups"] == sb[part]["param_groups"]
        for i, state in sb[part]["state"].items():
            assert_same_tensors(sa[part]["state"][i], state)


def _poison(monkeypatch, trainer, bad) -> None:
    real = loss_mod.model_loss

    def calc(model, x, y, **kwargs):
        loss = real(model, x, y, **kwargs)
        return loss * math.nan if bad(trainer.state.step + 1) else loss

    monkeypatch.setattr(loss_mod, "model_loss", calc)


def test_a_non_finite_muon_step_is_skipped_and_changes_nothing(text, tmp_path, monkeypatch):
    trainer, events = _trainer(text, tmp_path / "run", steps=6)
    _poison(monkeypatch, trainer, lambda step: step == 3)
    snaps: dict[int, dict] = {}
    sink = trainer.on_event

    def on_event(record):
        sink(record)
        if record["event"] == "train" and record["step"] in (2, 3):
            snaps[record["step"]] = {
                "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                "momentum": [s["momentum_buffer"].clone() for s in trainer.optimizer.muon.state.values()],
            }  # fmt: skip

    trainer.on_event = on_event
    end = trainer.run()
    assert (end["reason"], end["skipped_steps"]) == ("max_steps", 1)
    assert [r["step"] for r in events if r["event"] == "nonfinite"] == [3]
    assert_same_tensors(snaps[2]["weights"], snaps[3]["weights"])
    for a, b in zip(snaps[2]["momentum"], snaps[3]["momentum"], strict=True):
        assert torch.equal(a, b)  # Muon's momentum did not take in the NaN gradient
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_rollback_halves_both_learning_rates(text, tmp_path, monkeypatch):
    trainer, events = _trainer(
        text, tmp_path / "run", steps=10, max_bad_steps=2, checkpoint_every=4,
        on_nonfinite="rollback", schedule="constant",
    )  # fmt: skip
    seen: set[int] = set()

    def first_pass_only(step):
        fresh = step not in seen
        seen.add(step)
        return fresh and step in (6, 7)

    _poison(monkeypatch, trainer, first_pass_only)
    assert trainer.run()["reason"] == "max_steps"
    assert [r["from_step"] for r in records(tmp_path / "run", "rollback")] == [7]
    lrs = losses_by_step(tmp_path / "run", "train", "lr")
    muon_lrs = losses_by_step(tmp_path / "run", "train", "muon_lr")
    assert (lrs[4], muon_lrs[4]) == (1e-3, 0.02)
    assert all((lrs[s], muon_lrs[s]) == (0.5e-3, 0.01) for s in range(5, 11))


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--train.optimizer", "sgd", "train.optimizer must be one of adamw, muon; got 'sgd'"),
        ("--train.muon_lr", "0", "train.muon_lr must be greater than 0, got 0.0"),
        ("--train.muon_momentum", "1", "train.muon_momentum must be in [0, 1), got 1.0"),
        ("--train.muon_adjust_lr", "x", "train.muon_adjust_lr must be one of original, "),
    ],
)
def test_invalid_optimizer_settings_exit_2_with_one_line(
    text, tmp_path, capsys, flag, value, message
):
    code = cli.main(["train", "--data", str(text), "--out", str(tmp_path / "r"), flag, value])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_train_help_lists_the_optimizer_settings(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for name in ("--train.optimizer", "--train.muon_lr", "--train.muon_momentum"):
        assert name in out
    assert "{adamw,muon}" in out


def test_muon_on_a_torch_without_it_is_one_clear_error(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    cfg = TrainConfig(optimizer="muon")
    with pytest.raises(GptlabError, match="PyTorch 2.9 or newer.*--train.optimizer adamw"):
        build_optimizer(torch.nn.Linear(2, 2), cfg, torch.device("cpu"))
