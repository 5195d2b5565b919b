"""Training guards: non-finite losses and gradient norms are detected, skipped and counted;
a streak stops the run with the last good weights saved (or rolls back with a lower
learning rate); fp16 overflows are left to the gradient scaler; loss spikes are flagged."""

from __future__ import annotations

import math

import pytest
import torch
from run_helpers import (
    assert_same_tensors,
    cli_flags,
    latest_step,
    losses_by_step,
    records,
    tiny_config,
    tiny_corpus,
    weights,
    write_corpus,
)

from gptlab.cli import main as cli
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.model import loss as loss_mod
from gptlab.train.loop import Trainer
from gptlab.train.objectives import LanguageModeling
from gptlab.train.optim import lr_at


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text.txt")


def poison_loss(monkeypatch, trainer_ref: list, bad, factor: float = math.nan) -> None:
    """Multiply the training loss by `factor` in the steps (1-based) for which bad(step) holds."""
    real = loss_mod.model_loss

    def calc(model, x, y, **kwargs):
        loss = real(model, x, y, **kwargs)
        return loss * factor if bad(trainer_ref[0].state.step + 1) else loss

    monkeypatch.setattr(loss_mod, "model_loss", calc)


def make_trainer(text, run_dir, steps=20, **train):
    cfg = tiny_config(steps, **train)
    events: list[dict] = []
    trainer = Trainer(
        cfg, LanguageModeling(tiny_corpus(text, cfg)), run_dir, on_event=events.append
    )
    return trainer, events


def weights_after_step(trainer: Trainer, events_sink: list, step: int) -> dict:
    """Capture the model's weights as they are when step `step` is logged."""
    captured: dict = {}
    sink = trainer.on_event

    def on_event(record):
        sink(record)
        if record["event"] == "train" and record["step"] == step:
            captured.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    trainer.on_event = on_event
    return captured


def test_a_nan_streak_stops_with_the_last_good_weights_saved(text, tmp_path, monkeypatch):
    trainer, events = make_trainer(
        text, tmp_path / "run", max_bad_steps=3, checkpoint_every=1, keep_last=20
    )
    poison_loss(monkeypatch, [trainer], lambda step: step > 6)
    good = weights_after_step(trainer, events, 6)
    end = trainer.run()

    assert (end["reason"], end["step"], end["skipped_steps"]) == ("nonfinite", 9, 3)
    bad = [r for r in events if r["event"] == "nonfinite"]
    assert [(r["step"], r["consecutive"]) for r in bad] == [(7, 1), (8, 2), (9, 3)]
    assert all(math.isnan(r["loss"]) for r in bad)
    # The stop saved at once, without a final evaluation and sample ...
    assert [r["event"] for r in events[-3:]] == ["train", "checkpoint", "end"]
    # ... a checkpoint whose weights are those from before the first NaN; no periodic
    # save was made during the streak.
    ckpt = ckpt_lib.latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step-00000009"
    assert_same_tensors(weights(ckpt), {k: v for k, v in good.items() if k in weights(ckpt)})
    saved = sorted(int(p.name[5:]) for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert saved == [1, 2, 3, 4, 5, 6, 9]
    assert ckpt_lib.load_state(ckpt)["trainer"]["skipped_steps"] == 3


def test_the_cli_reports_the_stop_and_the_run_resumes_with_a_lower_lr(
    text, tmp_path, monkeypatch, capsys
):
    trainer_ref = []
    real_init = Trainer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        trainer_ref.append(self)

    monkeypatch.setattr(Trainer, "__init__", init)
    poison_loss(monkeypatch, trainer_ref, lambda step: step > 4)
    run = tmp_path / "run"
    code = cli.main([*cli_flags(text, run, steps=12), "--train.max_bad_steps", "2", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "training stopped after 2 consecutive non-finite steps" in err
    assert "resume with a lower --train.lr" in err
    assert latest_step(run) == 6

    monkeypatch.undo()
    code = cli.main(["train", "--out", str(run), "--resume", "--train.lr", "5e-4", "--quiet"])
    assert code == 0
    assert "changed: train.lr: 0.001 -> 0.0005" in capsys.readouterr().out
    assert latest_step(run) == 12


def test_isolated_bad_steps_are_skipped_counted_and_training_goes_on(text, tmp_path, monkeypatch):
    trainer, events = make_trainer(text, tmp_path / "run", steps=8, max_bad_steps=3)
    poison_loss(monkeypatch, [trainer], lambda step: step in (3, 5, 6))
    before, after = (weights_after_step(trainer, events, s) for s in (2, 3))
    end = trainer.run()
    assert (end["reason"], end["step"], end["skipped_steps"]) == ("max_steps", 8, 3)
    assert [r["consecutive"] for r in events if r["event"] == "nonfinite"] == [1, 1, 2]
    assert_same_tensors(before, after)  # the skipped step changed nothing


def test_a_non_finite_gradient_with_a_finite_loss_is_caught(text, tmp_path):
    trainer, events = make_trainer(text, tmp_path / "run", steps=6)
    trainer.model.pos_emb.weight.register_hook(
        lambda g: g * math.inf if trainer.state.step + 1 == 4 else g
    )
    end = trainer.run()
    bad = [r for r in events if r["event"] == "nonfinite"]
    assert [r["step"] for r in bad] == [4]
    assert math.isfinite(bad[0]["loss"]) and not math.isfinite(bad[0]["grad_norm"])
    assert end["skipped_steps"] == 1 and end["reason"] == "max_steps"


def test_a_loss_spike_is_flagged_in_the_metrics(text, tmp_path, monkeypatch):
    trainer, events = make_trainer(text, tmp_path / "run", steps=12)
    poison_loss(monkeypatch, [trainer], lambda step: step == 10, factor=30.0)
    trainer.run()
    spikes = records(tmp_path / "run", "spike")
    assert [r["step"] for r in spikes] == [10]
    assert spikes[0]["loss"] > 1.5 * spikes[0]["ema"] + 0.5
    assert not records(tmp_path / "run", "nonfinite")


def test_fp16_overflows_are_left_to_the_gradient_scaler(text, tmp_path):
    """While the scaler looks for its scale, infinite gradients are routine: such steps are
    skipped by the scaler and do not count towards max_bad_steps."""
    trainer, events = make_trainer(text, tmp_path / "run", steps=6, max_bad_steps=2)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    trainer.model.pos_emb.weight.register_hook(
        lambda g: g * math.inf if trainer.state.step < 3 else g
    )
    end = trainer.run()
    assert (end["reason"], end["skipped_steps"]) == ("max_steps", 3)
    assert [r["step"] for r in events if r["event"] == "overflow"] == [1, 2, 3]
    assert not [r for r in events if r["event"] == "nonfinite"]
    assert trainer.scaler.get_scale() == 2.0**13


def test_rollback_reloads_the_latest_checkpoint_with_half_the_lr(text, tmp_path, monkeypatch):
    trainer, events = make_trainer(
        text,
        tmp_path / "run",
        steps=12,
        max_bad_steps=3,
        checkpoint_every=5,
        on_nonfinite="rollback",
        schedule="constant",
    )
    seen: set[int] = set()

    def first_pass_only(step):  # steps 7-9 fail once; after the rollback they pass
        fresh = step not in seen
        seen.add(step)
        return fresh and step in (7, 8, 9)

    poison_loss(monkeypatch, [trainer], first_pass_only)
    end = trainer.run()
    assert (end["reason"], end["step"]) == ("max_steps", 12)
    rollback = [r for r in events if r["event"] == "rollback"]
    assert len(rollback) == 1
    assert (rollback[0]["step"], rollback[0]["from_step"]) == (5, 9)
    assert rollback[0]["checkpoint"].endswith("step-00000005")
    assert trainer.state.lr_scale == 0.5 and trainer.state.rollbacks == 1
    lrs = losses_by_step(tmp_path / "run", "train", "lr")  # also: one record per step
    assert sorted(lrs) == list(range(1, 13))
    assert lrs[5] == 1e-3 and all(lrs[s] == 0.5e-3 for s in range(6, 13))
    assert lr_at(6, trainer.cfg.train, trainer.total_steps) == 1e-3
    # the lowered rate lives in the checkpoint, so a resume keeps it
    state = ckpt_lib.load_state(ckpt_lib.latest_checkpoint(tmp_path / "run"))
    assert state["trainer"]["lr_scale"] == 0.5


def test_rollback_gives_up_after_three_tries(text, tmp_path, monkeypatch):
    trainer, events = make_trainer(
        text, tmp_path / "run", max_bad_steps=2, checkpoint_every=3, on_nonfinite="rollback"
    )
    poison_loss(monkeypatch, [trainer], lambda step: step > 3)
    end = trainer.run()
    assert end["reason"] == "nonfinite"
    assert [r["lr_scale"] for r in events if r["event"] == "rollback"] == [0.5, 0.25, 0.125]
    assert_same_tensors(
        weights(ckpt_lib.latest_checkpoint(tmp_path / "run")),
        weights(tmp_path / "run" / "checkpoints" / "step-00000003"),
    )


def test_rollback_without_a_checkpoint_stops(text, tmp_path, monkeypatch):
    trainer, events = make_trainer(text, tmp_path / "run", max_bad_steps=2, on_nonfinite="rollback")
    poison_loss(monkeypatch, [trainer], lambda step: step > 1)
    end = trainer.run()
    assert (end["reason"], end["step"]) == ("nonfinite", 3)
    assert not [r for r in events if r["event"] == "rollback"]


def test_a_resumed_run_starts_a_fresh_count_of_bad_steps(text, tmp_path, monkeypatch):
    trainer, _ = make_trainer(text, tmp_path / "run", steps=10, max_bad_steps=2)
    poison_loss(monkeypatch, [trainer], lambda step: step in (4, 5))
    assert trainer.run()["reason"] == "nonfinite"
    monkeypatch.undo()

    cfg = tiny_config(10, max_bad_steps=2)
    resumed = Trainer(cfg, LanguageModeling(tiny_corpus(text, cfg)), tmp_path / "run", resume=True)
    assert resumed.state.step == 5 and resumed.state.bad_steps == 0
    poison_loss(monkeypatch, [resumed], lambda step: step == 6)  # one bad step: go on
    end = resumed.run()
    assert (end["reason"], end["step"], end["skipped_steps"]) == ("max_steps", 10, 3)
