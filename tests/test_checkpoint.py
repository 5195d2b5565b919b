"""Checkpoints: round trips give identical logits; complete contents, clean keys whatever the
wrappers, atomic saves that survive a full disk, one-line errors for damaged or foreign
checkpoints, pruning."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil

import pytest
import torch
from run_helpers import (
    assert_same_tensors,
    cli_flags,
    latest_step,
    records,
    tiny_config,
    tiny_corpus,
    weights,
    write_corpus,
)
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from gptlab import GPTModel, ModelConfig
from gptlab.cli import main as cli
from gptlab.config.schema import RunConfig
from gptlab.errors import GptlabError
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.interop.runs import open_run
from gptlab.train.loop import Trainer
from gptlab.train.objectives import LanguageModeling
from gptlab.train.resume import rng_state, set_rng_state

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
    run = open_run(str(tmp_path), "cpu")
    loaded, tokenizer = run.model, run.tokenizer
    assert run.device.type == "cpu" and not loaded.training
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


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text.txt")


@pytest.fixture(scope="module")
def trained(text, tmp_path_factory):
    """A finished 4-step CLI run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("trained") / "run"
    code = cli.main([*cli_flags(text, run, steps=4), "--checkpoint-every", "2", "--quiet"])
    assert code == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run, free to damage."""
    return shutil.copytree(trained, tmp_path / "run")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("gptlab: error: ") and err.count("\n") == 1, err
    return err


# --------------------------------------------------------------------------- contents


def test_checkpoint_contents_are_complete(trained):
    ckpt = ckpt_lib.latest_checkpoint(trained)
    assert ckpt.name == "step-00000004"
    meta = ckpt_lib.read_meta(ckpt)
    assert meta["format"] == "gptlab-checkpoint"
    assert meta["format_version"] == ckpt_lib.FORMAT_VERSION
    assert meta["step"] == 4 and meta["tokens_seen"] == 4 * 4 * 32
    assert meta["config"]["model"]["n_layers"] == 2 and meta["config"]["train"]["max_steps"] == 4
    assert meta["tokenizer"]["type"] == "char" and meta["data_fingerprint"]
    assert meta["val_loss"] == records(trained, "eval")[-1]["val_loss"]

    state = ckpt_lib.load_state(ckpt)  # weights_only=True
    assert set(state) >= {"optimizer", "scaler", "trainer", "rng", "data", "schedule"}
    opt = state["optimizer"]
    n_params = len(list(GPTModel(tiny_model_config(meta)).parameters()))
    assert len(opt["state"]) == n_params  # tied weights counted once
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in opt["state"].values())
    tr = state["trainer"]
    assert tr["step"] == 4 and tr["tokens_seen"] == 4 * 4 * 32
    assert tr["history"]["step"] == [1, 4]  # evaluations: step 1 and the end
    assert len(tr["history"]["val_loss"]) == 2 and len(tr["history"]["tokens"]) == 2
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert state["data"]["epoch"] == 0 and state["data"]["batch_in_epoch"] == 4
    assert state["data"]["steps_per_epoch"] == 8
    assert state["schedule"]["total_steps"] == 4
    assert state["scaler"] is None  # fp32: no gradient scaler


def tiny_model_config(meta):
    from gptlab.config.schema import RunConfig

    return RunConfig.from_dict(meta["config"]).model


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    model = nn.Linear(2, 2)  # made first: its initialisation draws from the torch RNG
    rng = rng_state()
    ckpt = ckpt_lib.save_checkpoint(tmp_path, 1, model, {}, {"rng": rng})
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(ckpt_lib.load_state(ckpt)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


class _Wrapper(nn.Module):
    """Stands for DDP / FSDP: the model sits in `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def test_wrapped_and_compiled_models_save_clean_keys(tmp_path):
    cfg = tiny_config()
    cfg.model.vocab_size = 40
    model = GPTModel(cfg.model)
    compiled = torch.compile(_Wrapper(torch.compile(model, backend="eager")), backend="eager")
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert ckpt_lib.unwrap(compiled) is model

    ckpt = ckpt_lib.save_checkpoint(tmp_path, 1, compiled, {})
    saved = weights(ckpt)
    assert not [k for k in saved if k.startswith(("_orig_mod.", "module."))]
    fresh = GPTModel(cfg.model)
    ckpt_lib.load_weights(fresh, ckpt)
    assert_same_tensors(fresh.state_dict(), model.state_dict())


def test_trainer_with_compile_on_saves_clean_keys(text, tmp_path, monkeypatch):
    """The trainer's compiled path (the eager backend: no C compiler needed on CPU)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend="eager"))
    cfg = tiny_config(2, compile="on")
    trainer = Trainer(cfg, LanguageModeling(tiny_corpus(text, cfg)), tmp_path / "run")
    assert trainer.rt.compiled and trainer.train_model is not trainer.model
    trainer.run()
    keys = set(weights(ckpt_lib.latest_checkpoint(tmp_path / "run")))
    assert keys and not [k for k in keys if "_orig_mod" in k or k.startswith("module.")]


# --------------------------------------------------------------------------- a full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _torch_full_disk(obj, f, *args, **kwargs):
    # What torch.save raised on a real full tmpfs: its C++ writer's RuntimeError, after
    # part of the file was written.
    with open(f, "wb") as fh:
        fh.write(b"PK\x03\x04partial")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def _safetensors_full_disk(*args, **kwargs):
    # What safetensors raised on a real full tmpfs.
    raise SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


@pytest.mark.parametrize(
    ("target", "fake", "why"),
    [
        ("torch.save", _enospc, "No space left on device"),
        ("torch.save", _torch_full_disk, "unexpected pos 576 vs 534"),
        ("save_model", _safetensors_full_disk, "No space left on device (os error 28)"),
    ],
)
def test_a_save_that_fails_halfway_keeps_the_previous_checkpoint(
    run, monkeypatch, target, fake, why
):
    model = GPTModel(tiny_model_config(ckpt_lib.read_meta(ckpt_lib.latest_checkpoint(run))))
    if target == "torch.save":
        monkeypatch.setattr(torch, "save", fake)
    else:
        monkeypatch.setattr(ckpt_lib, "save_model", fake)
    with pytest.raises(GptlabError) as info:
        ckpt_lib.save_checkpoint(run, 6, model, {"config": {}}, {"x": torch.ones(2)})
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("could not save checkpoint step-00000006 (") and why in message
    assert "MiB free there" in message
    assert "the previous checkpoint" in message and "step-00000004 is intact" in message
    root = run / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["best", "latest", "step-00000002", "step-00000004"]
    assert latest_step(run) == 4
    ckpt = ckpt_lib.latest_checkpoint(run)
    ckpt_lib.load_weights(model, ckpt)
    assert ckpt_lib.load_state(ckpt)["trainer"]["step"] == 4


def test_an_interrupt_during_a_save_leaves_no_half_checkpoint(run, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt_lib.save_checkpoint(run, 6, nn.Linear(2, 2), {}, {"x": torch.ones(1)})
    monkeypatch.undo()
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert latest_step(run) == 4


def test_a_failed_periodic_save_is_reported_and_training_goes_on(text, tmp_path, monkeypatch):
    real, calls = torch.save, []

    def second_save_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            _enospc()
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "save", second_save_fails)
    cfg = tiny_config(6, checkpoint_every=2, keep_last=5)
    events = []
    end = Trainer(
        cfg, LanguageModeling(tiny_corpus(text, cfg)), tmp_path / "run", on_event=events.append
    ).run()
    failed = [r for r in events if r["event"] == "checkpoint_failed"]
    assert [r["step"] for r in failed] == [4]
    assert "could not save checkpoint step-00000004 (No space left on device" in failed[0]["error"]
    assert end["reason"] == "max_steps" and end["step"] == 6
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert names == ["step-00000002", "step-00000006"]


def test_a_failed_final_save_exits_nonzero_with_a_clear_message(
    text, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(torch, "save", _enospc)
    run = tmp_path / "run"
    code = cli.main([*cli_flags(text, run, steps=3), "--quiet"])
    assert code == 2
    err = one_line_error(capsys)
    assert "could not save checkpoint step-00000003 (No space left on device" in err
    assert "no earlier checkpoint exists; free disk space or choose another --out" in err
    assert records(run, "checkpoint_failed")[-1]["final"] is True


# --------------------------------------------------------------------------- damaged checkpoints


def _truncate(name: str, keep: float):
    def damage(ckpt):
        path = ckpt / name
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return damage


def _write_meta(content: str):
    def damage(ckpt):
        (ckpt / "meta.json").write_text(content)

    return damage


def _future_version(ckpt):
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["format_version"] = ckpt_lib.FORMAT_VERSION + 1
    (ckpt / "meta.json").write_text(json.dumps(meta))


DAMAGE = {
    "truncated weights": (_truncate("model.safetensors", 0.5), "are corrupt or truncated"),
    "weights cut in the header": (_truncate("model.safetensors", 0.0001), "corrupt or truncated"),
    "truncated state": (_truncate("state.pt", 0.5), "is corrupt or not safe to load"),
    "garbage meta.json": (_write_meta("\x00\x81garbage{"), "is unreadable"),
    "meta.json of a list": (_write_meta("[1, 2]"), "is not a gptlab checkpoint (foreign format)"),
    "future format": (_future_version, "newer than this gptlab reads"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_gives_a_one_line_error(run, capsys, case):
    damage, message = DAMAGE[case]
    ckpt = ckpt_lib.latest_checkpoint(run)
    damage(ckpt)
    capsys.readouterr()
    code = cli.main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--quiet"])
    assert code == 2
    assert message in one_line_error(capsys)
    if case != "truncated state":  # generation needs no training state
        code = cli.main(["generate", "--checkpoint", str(run), "--max-new-tokens", "2"])
        assert code == 2
        assert message in one_line_error(capsys)


def test_the_advice_for_a_damaged_checkpoint_works(run, capsys):
    """'move it out of the way': the run then resumes from the checkpoint before it."""
    ckpt = ckpt_lib.latest_checkpoint(run)
    _truncate("model.safetensors", 0.5)(ckpt)
    assert cli.main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    assert f"move '{ckpt}' out of the way" in one_line_error(capsys)
    ckpt.rename(run / "damaged")
    assert cli.main(["train", "--out", str(run), "--resume", "--max-steps", "5", "--quiet"]) == 0
    assert records(run, "resume")[-1]["step"] == 2
    assert latest_step(run) == 5


def test_a_hostile_pickle_is_refused(run):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    ckpt = ckpt_lib.latest_checkpoint(run)
    with open(ckpt / "state.pt", "wb") as f:
        pickle.dump({"optimizer": Boom()}, f, protocol=2)
    with pytest.raises(GptlabError, match="is corrupt or not safe to load"):
        ckpt_lib.load_state(ckpt)


def test_foreign_and_empty_directories_give_one_line_errors(tmp_path, capsys):
    foreign = tmp_path / "hf-model"
    foreign.mkdir()
    save_file({"h.0.attn.c_attn.weight": torch.zeros(2, 2)}, str(foreign / "model.safetensors"))
    (foreign / "config.json").write_text('{"model_type": "gpt2"}')
    # a folder with config.json is opened as a Hugging Face model, and its flaw is named
    assert cli.main(["generate", "--checkpoint", str(foreign)]) == 2
    assert "config.json lacks a valid GPT-2 field" in one_line_error(capsys)
    (foreign / "config.json").unlink()  # weights without meta.json or config.json
    assert cli.main(["generate", "--checkpoint", str(foreign)]) == 2
    assert "is not a gptlab checkpoint (no meta.json)" in one_line_error(capsys)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["generate", "--checkpoint", str(empty)]) == 2
    assert "no checkpoint found in" in one_line_error(capsys)
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in one_line_error(capsys)

    a_file = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, a_file)
    assert cli.main(["generate", "--checkpoint", str(a_file)]) == 2
    assert "is a file, not a run or checkpoint directory" in one_line_error(capsys)
    assert a_file.stat().st_size > 0  # looked at, never touched


@pytest.mark.parametrize("pointer", [b"\xff\xfe\x00garbage", b"step-00000099\n", b"../../etc\n"])
def test_a_damaged_latest_pointer_falls_back_to_the_newest_checkpoint(run, pointer):
    (run / "checkpoints" / "latest").write_bytes(pointer)
    assert ckpt_lib.latest_checkpoint(run).name == "step-00000004"


# --------------------------------------------------------------------------- pruning


def test_keep_last_k_plus_the_best_as_it_changes(tmp_path):
    model = nn.Linear(2, 2)
    root = tmp_path / "checkpoints"

    def save(step, val):
        ckpt_lib.save_checkpoint(tmp_path, step, model, {"val_loss": val}, keep_last=2)
        return sorted(p.name[-2:] for p in root.glob("step-*"))

    assert save(1, 5.0) == ["01"]
    assert save(2, 3.0) == ["01", "02"]
    assert save(3, 4.0) == ["02", "03"]
    assert save(4, 6.0) == ["02", "03", "04"]  # 2 is kept as the best
    assert save(5, None) == ["02", "04", "05"]  # no evaluation: never the best
    assert (root / "best").read_text().strip() == "step-00000002"
    assert save(6, 2.5) == ["05", "06"]  # a new best, which is also among the last two
    assert (root / "best").read_text().strip() == "step-00000006"
    assert (root / "latest").read_text().strip() == "step-00000006"


def test_resaving_a_step_replaces_it(tmp_path):
    model = nn.Linear(2, 2)
    ckpt_lib.save_checkpoint(tmp_path, 3, model, {"val_loss": 2.0})
    with torch.no_grad():
        model.weight.fill_(7.0)
    ckpt = ckpt_lib.save_checkpoint(tmp_path, 3, model, {"val_loss": 1.0})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == [ckpt.name]
    assert ckpt_lib.read_meta(ckpt)["val_loss"] == 1.0
    assert torch.all(weights(ckpt)["weight"] == 7.0)


def test_trainer_keeps_the_last_k(text, tmp_path):
    cfg = tiny_config(7, checkpoint_every=1, keep_last=3)
    Trainer(cfg, LanguageModeling(tiny_corpus(text, cfg)), tmp_path / "run").run()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    # the last three, and the best: evaluations ran at steps 1 and 6 (and 7, the end)
    assert names[-3:] == ["step-00000005", "step-00000006", "step-00000007"]
    best = (tmp_path / "run" / "checkpoints" / "best").read_text().strip()
    assert best in names and len(names) <= 4
