"""Exact resume: a run that is killed (SIGKILL) or stopped (SIGINT, SIGTERM) and resumed
repeats the uninterrupted run's per-step losses and ends with bit-identical weights
(CPU, fp32, dropout on). Also: what a resume may and may not change, and that
metrics.jsonl and the plot continue the same curves."""

from __future__ import annotations

import copy
import os
import random
import shutil
import signal

import pytest
import torch
from run_helpers import (
    STEPS,
    assert_same_tensors,
    cli_flags,
    latest_step,
    losses_by_step,
    records,
    release,
    run_cli,
    spawn,
    tiny_config,
    tiny_corpus,
    wait_for_gate,
    weights,
    write_corpus,
)

from gptlab.cli import main as cli
from gptlab.errors import GptlabError
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.model import loss as loss_mod
from gptlab.train import checkpointer as checkpointer_mod
from gptlab.train.loop import Trainer
from gptlab.train.objectives import LanguageModeling
from gptlab.train.run import stop_on_signals


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text.txt")


@pytest.fixture(scope="module")
def reference(text, tmp_path_factory):
    """The uninterrupted run, through the CLI in its own process like the runs it is
    compared with; only its final checkpoint is written."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = run_cli(cli_flags(text, run))
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(losses_by_step(run)) == STEPS
    return run


def assert_same_run(run, reference) -> None:
    """Same per-step training losses, evaluations, final weights and optimizer state."""
    assert losses_by_step(run) == losses_by_step(reference)
    assert losses_by_step(run, "eval", "val_loss") == losses_by_step(reference, "eval", "val_loss")
    a, b = ckpt_lib.latest_checkpoint(run), ckpt_lib.latest_checkpoint(reference)
    assert ckpt_lib.read_meta(a)["step"] == ckpt_lib.read_meta(b)["step"] == STEPS
    assert_same_tensors(weights(a), weights(b))
    sa, sb = ckpt_lib.load_state(a), ckpt_lib.load_state(b)
    for i, state in sb["optimizer"]["state"].items():
        assert_same_tensors(sa["optimizer"]["state"][i], state)
    assert sa["trainer"]["history"] == sb["trainer"]["history"]
    assert sa["trainer"]["tokens_seen"] == sb["trainer"]["tokens_seen"]


# --------------------------------------------------------------------------- subprocess runs


def test_sigkill_mid_step_then_resume_matches_uninterrupted(text, reference, tmp_path):
    # Checkpoints every 3 steps: one exists before step k, and 1 or 2 steps after it were
    # done (and logged) before the kill, so the resumed run must redo them.
    k = random.choice([s for s in range(4, STEPS + 1) if (s - 1) % 3])
    run = tmp_path / "run"
    proc = spawn([*cli_flags(text, run), "--checkpoint-every", "3"], gate=f"step:{k}")
    wait_for_gate(proc)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert max(losses_by_step(run)) == k - 1  # it died inside step k
    assert latest_step(run) == (k - 1) // 3 * 3

    done = run_cli(["train", "--out", str(run), "--resume"])  # the saved config, unchanged
    assert done.returncode == 0, f"killed in step {k}: {done.stdout}{done.stderr}"
    assert "resuming from" in done.stdout
    # Steps after the checkpoint were redone; their first records were dropped, so each
    # step has one record and the curves are the uninterrupted run's.
    assert_same_run(run, reference)
    assert (run / "loss-plot.png").is_file()
    assert len(records(run, "eval")) == len(records(reference, "eval"))


def test_sigkill_mid_save_then_resume_matches_uninterrupted(text, reference, tmp_path):
    n = random.randint(2, STEPS // 3)  # the n-th save is that of step 3n
    run = tmp_path / "run"
    proc = spawn([*cli_flags(text, run), "--checkpoint-every", "3"], gate=f"save:{n}")
    wait_for_gate(proc)
    half = list((run / "checkpoints").glob(".tmp-step-*"))
    assert [p.name.split("-")[2] for p in half] == [f"{3 * n:08d}"]
    assert (half[0] / "model.safetensors").is_file() and not (half[0] / "state.pt").exists()
    proc.kill()
    proc.communicate()
    # The half-written save is not a checkpoint: the previous one is latest and loads.
    assert latest_step(run) == 3 * (n - 1)
    ckpt_lib.load_state(ckpt_lib.latest_checkpoint(run))

    done = run_cli(["train", "--out", str(run), "--resume"])
    assert done.returncode == 0, f"killed in save {n}: {done.stdout}{done.stderr}"
    assert_same_run(run, reference)
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the leftover was swept


def test_sigint_finishes_the_step_saves_and_resumes_exactly(text, reference, tmp_path):
    k = random.randint(1, STEPS - 1)
    run = tmp_path / "run"
    proc = spawn(cli_flags(text, run), gate=f"step:{k}")  # no periodic checkpoints
    wait_for_gate(proc)
    proc.send_signal(signal.SIGINT)  # arrives while step k is in progress
    rest = release(proc)
    assert proc.returncode == 130, rest
    # It finished step k, saved exactly there (without a final evaluation) and said how
    # to go on.
    assert max(losses_by_step(run)) == k
    assert latest_step(run) == k
    assert records(run, "end")[-1]["reason"] == "SIGINT"
    hint = f"resume with: gptlab train --out {run} --resume"
    assert hint in rest

    done = run_cli(hint.split("gptlab ", 1)[1].split())
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_run(run, reference)


# --------------------------------------------------------------------------- in-process runs


def poison_step(monkeypatch, trainer_ref: list, at_step: int, action) -> None:
    """Run `action()` inside the loss computation of step `at_step` (1-based): a stand-in
    for a signal that arrives while a step is in progress."""
    real = loss_mod.model_loss

    def calc(model, x, y, **kwargs):
        if trainer_ref[0].state.step + 1 == at_step:
            action()
        return real(model, x, y, **kwargs)

    monkeypatch.setattr(loss_mod, "model_loss", calc)


@pytest.mark.parametrize("k", [1, 8, 13])  # first step, an epoch boundary, mid-epoch
def test_stop_at_step_k_and_resume_in_process(text, tmp_path, monkeypatch, k):
    cfg = tiny_config()
    corpus = tiny_corpus(text, cfg)
    Trainer(copy.deepcopy(cfg), LanguageModeling(corpus), tmp_path / "ref").run()

    run = tmp_path / "run"
    first = Trainer(copy.deepcopy(cfg), LanguageModeling(corpus), run)
    poison_step(monkeypatch, [first], k, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with stop_on_signals(first):
        end = first.run()
    monkeypatch.undo()
    assert (end["reason"], end["step"]) == ("SIGTERM", k)

    second = Trainer(copy.deepcopy(cfg), LanguageModeling(corpus), run, resume=True)
    assert second.state.step == k
    second.run()
    assert losses_by_step(run) == losses_by_step(tmp_path / "ref")
    assert_same_tensors(
        weights(ckpt_lib.latest_checkpoint(run)),
        weights(ckpt_lib.latest_checkpoint(tmp_path / "ref")),
    )


# Every architecture option on at once (the "speedrun" shape with grouped-query attention).
MODERN = dict(
    positions="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", bias=False, n_kv_heads=1,
    logit_softcap=15.0, zero_init_proj=True, tie_weights=False, x0_skip=True, value_embeds=1,
)  # fmt: skip


@pytest.mark.parametrize(
    "model, train",
    [(MODERN, {}), ({}, dict(ema=0.7)), ({}, dict(token_dropout=0.2))],
    ids=["every-architecture-option", "ema", "token-dropout"],
)
def test_a_run_with_options_resumes_exactly(text, tmp_path, monkeypatch, model, train):
    """Stopped at step 13 and resumed: the uninterrupted run's losses, evaluations and
    weights. With train.ema the checkpoint's weights are the average and its training
    state the raw weights; train.token_dropout draws from the random stream a checkpoint
    keeps."""
    cfg = tiny_config(**train)
    for key, value in model.items():
        setattr(cfg.model, key, value)
    corpus = tiny_corpus(text, cfg)

    def trainer(run_dir, **kwargs):
        objective = LanguageModeling(corpus, cfg.train.token_dropout)
        return Trainer(copy.deepcopy(cfg), objective, run_dir, **kwargs)

    trainer(tmp_path / "ref").run()
    run = tmp_path / "run"
    first = trainer(run)
    poison_step(monkeypatch, [first], 13, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with stop_on_signals(first):
        assert first.run()["step"] == 13
    monkeypatch.undo()
    trainer(run, resume=True).run()
    for event, key in (("train", "loss"), ("eval", "val_loss")):
        assert losses_by_step(run, event, key) == losses_by_step(tmp_path / "ref", event, key)
    saved = weights(ckpt_lib.latest_checkpoint(run))
    assert_same_tensors(saved, weights(ckpt_lib.latest_checkpoint(tmp_path / "ref")))
    assert ("trf_blocks.0.att.q_norm.scale" in saved) == bool(model)  # the options were on


def test_second_sigint_aborts_at_once(text, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    trainer_ref = []
    real_init = Trainer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        trainer_ref.append(self)

    monkeypatch.setattr(Trainer, "__init__", init)

    def two_interrupts():
        os.kill(os.getpid(), signal.SIGINT)  # first: finish the step, then save
        os.kill(os.getpid(), signal.SIGINT)  # second: abort now

    poison_step(monkeypatch, trainer_ref, 7, two_interrupts)
    handler_before = signal.getsignal(signal.SIGINT)
    code = cli.main([*cli_flags(text, run), "--checkpoint-every", "3"])
    assert code == 130
    assert "aborted" in capsys.readouterr().err
    # Nothing was saved after the abort: the periodic checkpoint of step 6 is the latest,
    # whole and loadable.
    assert latest_step(run) == 6
    assert not (run / "checkpoints" / "step-00000007").exists()
    ckpt_lib.load_state(ckpt_lib.latest_checkpoint(run))
    assert signal.getsignal(signal.SIGINT) is handler_before  # the CLI restored it


def test_checkpoint_every_minutes(text, tmp_path, monkeypatch):
    cfg = tiny_config(6, checkpoint_every_minutes=1.0, keep_last=10)
    trainer = Trainer(cfg, LanguageModeling(tiny_corpus(text, cfg)), tmp_path / "run")
    # A clock on which each step takes 40 s: a save is due every second step.
    monkeypatch.setattr(checkpointer_mod.time, "monotonic", lambda: 40.0 * trainer.state.step)
    trainer.run()
    saved = [(r["step"], r["reason"]) for r in records(tmp_path / "run", "checkpoint")]
    assert saved == [(2, "periodic"), (4, "periodic"), (6, "periodic"), (6, "max_steps")]
    assert latest_step(tmp_path / "run") == 6


# --------------------------------------------------------------------------- what may change


@pytest.fixture
def finished_run(text, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert cli.main([*cli_flags(text, run, steps=6), "--quiet"]) == 0
    return run


def test_resume_reuses_the_saved_config_and_logs_safe_changes(finished_run, capsys):
    capsys.readouterr()
    code = cli.main(
        ["train", "--out", str(finished_run), "--resume", "--max-steps", "9"]
        + ["--train.eval_freq", "2", "--keep-last", "1", "--quiet"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "changed: train.max_steps: 6 -> 9" in out
    assert "changed: train.eval_freq: 5 -> 2" in out
    assert "changed: train.keep_last: 2 -> 1" in out
    assert "changed: model." not in out and "changed: data." not in out
    assert latest_step(finished_run) == 9
    resumed = records(finished_run, "resume")[-1]
    assert resumed["step"] == 6 and "train.max_steps: 6 -> 9" in resumed["changed"]
    # one training record per step, across both invocations
    assert sorted(losses_by_step(finished_run)) == list(range(1, 10))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model.n_layers", "3"], "cannot resume: model.n_layers changed from 2 to 3"),
        (["--model.emb_dim", "64"], "cannot resume: model.emb_dim changed from 32 to 64"),
        (["--data.tokenizer", "gpt2"], "cannot resume: data.tokenizer changed from 'char'"),
        (["--train.batch_size", "2"], "cannot resume: train.batch_size changed from 4 to 2"),
        (
            ["--train.optimizer", "muon"],
            "cannot resume: train.optimizer changed from 'adamw' to 'muon' (the checkpoint's "
            "optimizer state belongs to the other optimizer)",
        ),
    ],
)
def test_resume_refuses_model_tokenizer_and_batch_changes(finished_run, capsys, flags, message):
    before = (finished_run / "metrics.jsonl").read_text()
    code = cli.main(["train", "--out", str(finished_run), "--resume", "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1, err
    assert (finished_run / "metrics.jsonl").read_text() == before  # nothing touched


def test_resume_refuses_other_text_but_not_the_same_text_moved(finished_run, text, capsys):
    other = text.parent / "other.txt"
    other.write_text(text.read_text().replace("king", "kong"))
    code = cli.main(["train", "--out", str(finished_run), "--resume", "--data", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and "the training text differs from the checkpoint's" in err

    moved = text.parent / "moved.txt"
    shutil.copy(text, moved)
    args = ["train", "--out", str(finished_run), "--resume", "--data", str(moved), "--quiet"]
    code = cli.main([*args, "--max-steps", "7"])
    assert code == 0
    assert "changed: data.source" in capsys.readouterr().out


def test_changed_shape_in_the_checkpoint_itself_is_refused(finished_run, capsys):
    """Even when the configs agree, weights of another shape are refused on load."""
    ckpt = ckpt_lib.latest_checkpoint(finished_run)
    tensors = weights(ckpt)
    tensors["pos_emb.weight"] = torch.zeros(16, 32)
    from safetensors.torch import save_file

    save_file(tensors, str(ckpt / ckpt_lib.WEIGHTS))
    code = cli.main(["train", "--out", str(finished_run), "--resume", "--max-steps", "8"])
    err = capsys.readouterr().err
    assert code == 2
    assert "do not fit this model (size mismatch for pos_emb.weight" in err
    assert err.count("\n") == 1


def test_resume_needs_a_checkpoint_and_a_new_run_needs_an_empty_dir(finished_run, tmp_path, text):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny_config()
    with pytest.raises(GptlabError, match="--resume: no checkpoint in"):
        Trainer(cfg, LanguageModeling(tiny_corpus(text, cfg)), empty, resume=True)
    code = cli.main(cli_flags(text, finished_run, steps=6))
    assert code == 2  # "already holds a run; add --resume"


def test_resume_ignores_a_killed_save_and_continues_from_the_previous(finished_run, capsys):
    """A leftover temporary directory of a save that died is never taken for a checkpoint,
    and is swept by the next save."""
    root = finished_run / "checkpoints"
    junk = root / ".tmp-step-00000007-99999"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"half")
    code = cli.main(["train", "--out", str(finished_run), "--resume", "--max-steps", "7"])
    assert code == 0, capsys.readouterr()
    assert not junk.exists()
    assert latest_step(finished_run) == 7


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_resume_restores_the_gpu_rng_and_repeats_the_next_step(text, tmp_path):
    """On a GPU, dropout draws from the CUDA generator. A run resumed from step 3 must
    repeat the original run's step 4 bit for bit: same weights, optimizer state and CUDA
    RNG state, and the forward pass is deterministic. (Later steps are compared loosely:
    some CUDA backward kernels add with atomics, in no fixed order.)"""
    cfg = tiny_config(6, device="cuda", checkpoint_every=3, keep_last=5)
    corpus = tiny_corpus(text, cfg)
    Trainer(copy.deepcopy(cfg), LanguageModeling(corpus), tmp_path / "a").run()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000006")  # latest falls back to 3

    resumed = Trainer(copy.deepcopy(cfg), LanguageModeling(corpus), tmp_path / "b", resume=True)
    saved = ckpt_lib.load_state(tmp_path / "b" / "checkpoints" / "step-00000003")
    assert saved["rng"]["cuda"], "the CUDA generator state was not saved"
    assert torch.equal(torch.cuda.get_rng_state(), saved["rng"]["cuda"][0])
    assert next(iter(resumed.optimizer.state.values()))["exp_avg"].is_cuda
    resumed.run()
    a, b = losses_by_step(tmp_path / "a"), losses_by_step(tmp_path / "b")
    assert b[4] == a[4]
    assert b.keys() == a.keys() and all(abs(b[s] - a[s]) < 1e-3 for s in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_run_saves_and_restores_its_gradient_scaler(text, tmp_path):
    cfg = tiny_config(4, device="cuda", precision="fp16", checkpoint_every=2)
    corpus = tiny_corpus(text, cfg)
    end = Trainer(copy.deepcopy(cfg), LanguageModeling(corpus), tmp_path / "run").run()
    assert end["reason"] == "max_steps"
    assert not records(tmp_path / "run", "nonfinite")  # overflows are the scaler's business
    state = ckpt_lib.load_state(ckpt_lib.latest_checkpoint(tmp_path / "run"))
    assert state["scaler"] and state["scaler"]["scale"] > 0
    cfg.train.max_steps = 6
    resumed = Trainer(copy.deepcopy(cfg), LanguageModeling(corpus), tmp_path / "run", resume=True)
    assert resumed.scaler.get_scale() == state["scaler"]["scale"]
    assert resumed.run()["step"] == 6


def test_measuring_the_peak_flops_leaves_the_random_stream_alone(tmp_path, monkeypatch):
    """The trainer measures the matmul peak when its cache is cold, which happens after a
    resume restored the RNG states on another machine or thread count; it must not draw
    from the global generators."""
    from gptlab.runtime.device import measured_matmul_flops

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    before = torch.get_rng_state()
    assert measured_matmul_flops(torch.device("cpu"), torch.float32, n=64) > 0
    assert torch.equal(torch.get_rng_state(), before)
