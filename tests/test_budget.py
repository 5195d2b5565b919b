"""A time budget (train.budget = "time"): the learning rate as a function of the budget's
progress, the stop at the budget, evaluations at fractions of it, and the recorded schedule
that makes a time-budget run repeatable. Time-driven logic is driven by a fake clock (each
step takes exactly the seconds the test says), never by sleeps."""

from __future__ import annotations

import copy
import json
import math
import os
import signal

import pytest
from run_helpers import (
    assert_same_tensors,
    losses_by_step,
    records,
    tiny_config,
    tiny_corpus,
    weights,
    write_corpus,
)
from test_resume import poison_step

from gptlab.config import schema as C
from gptlab.errors import GptlabError
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.recipes.presets import preset
from gptlab.train.budget import TimeBudget, crossed, read_schedule, write_schedule
from gptlab.train.loop import Trainer
from gptlab.train.objectives import LanguageModeling
from gptlab.train.optim import lr_at_progress
from gptlab.train.run import stop_on_signals


class FakeClock:
    """A clock that advances `dt` seconds each time it is read: the trainer reads it before
    and after each step, so every step takes `dt` seconds."""

    def __init__(self, dt: float):
        self.dt, self.t = dt, 0.0

    def __call__(self) -> float:
        self.t += self.dt
        return self.t


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text.txt")


def time_config(seconds: float = 10.0, **train: object):
    cfg = tiny_config(steps=0, budget="time", max_time=seconds, warmup_frac=0.2, **train)
    cfg.train.min_lr_ratio = 0.1
    return cfg


# --------------------------------------------------------------------------- pure functions


def test_lr_warms_up_holds_and_decays_to_the_floor_over_the_budget():
    tc = C.TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_frac=0.2)
    assert lr_at_progress(0.0, tc) == 0.0
    assert lr_at_progress(0.1, tc) == pytest.approx(0.5)
    assert lr_at_progress(0.2, tc) == 1.0
    assert lr_at_progress(0.6, tc) == pytest.approx(0.55)  # cosine's midpoint
    assert lr_at_progress(1.0, tc) == pytest.approx(0.1)  # the floor, at the budget's end
    assert lr_at_progress(1.5, tc) == pytest.approx(0.1)
    lin = C.TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_frac=0.0, schedule="linear")
    assert lr_at_progress(0.25, lin) == pytest.approx(0.75)
    # warmup-stable-decay: lr until the last 30%, then linear to the floor
    wsd = C.TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_frac=0.1, decay_frac=0.3)
    wsd.schedule = "linear"
    assert lr_at_progress(0.5, wsd) == lr_at_progress(0.7, wsd) == 1.0
    assert lr_at_progress(0.85, wsd) == pytest.approx(0.5)
    assert lr_at_progress(0.7, C.TrainConfig(lr=2.0, schedule="constant")) == 2.0
    assert lr_at_progress(0.7, tc, peak=0.02) == pytest.approx(0.02 * lr_at_progress(0.7, tc))


def test_progress_counts_the_next_step_and_the_budget_ends_within_itself():
    b = TimeBudget(10.0)
    assert b.progress(0.0, 0, 0) == 0.0 and not b.spent(0.0, 0, 0)
    assert b.progress(4.0, 4, 4) == pytest.approx(0.5)  # 4 s + a 1 s step, of 10
    assert b.progress(9.0, 9, 9) == 1.0 and not b.spent(9.0, 9, 9)  # the last step fits
    assert b.spent(10.0, 10, 10)
    assert b.spent(9.5, 5, 5)  # one more 1.9 s step would end at 11.4 s
    replay = TimeBudget(10.0, [0.0, 0.5, 1.0])
    assert replay.progress(123.0, 1, 1) == 0.5  # the clock is not read
    assert not replay.spent(99.0, 2, 2) and replay.spent(0.0, 0, 3)
    assert crossed(0.19, 0.21, 0.1) and not crossed(0.21, 0.29, 0.1)
    assert crossed(0.29, 0.3, 0.1)  # exactly on the mark counts once
    assert not crossed(0.3, 0.31, 0.1)


def test_schedule_file_round_trips_exactly_and_bad_files_are_one_line(tmp_path):
    progress = [0.0, 1 / 3, 0.1 + 0.2, 1.0]
    path = write_schedule(tmp_path, 12.5, progress)
    assert read_schedule(path) == (12.5, progress)
    assert read_schedule(tmp_path) == (12.5, progress)  # the run directory
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "odd.json").write_text(json.dumps({"progress": [0.5, 2.0]}))
    for name, words in (
        ("nope.json", "not found"),
        ("bad.json", "not JSON"),
        ("odd.json", "[0, 1]"),
    ):
        with pytest.raises(GptlabError, match=words) as e:
            read_schedule(tmp_path / name)
        assert "\n" not in str(e.value) and "--train.budget time" in str(e.value)


@pytest.mark.parametrize(
    "train, words",
    [
        ({"budget": "time", "max_time": 0.0, "max_steps": 5}, "at least 1"),
        ({"budget": "time", "max_time": 0.5}, "at least 1"),
        ({"max_time": -5.0}, "train.max_time"),
        ({"replay_schedule": "s.json", "max_steps": 5}, "--train.budget time"),
        ({"warmup_frac": 1.0}, "train.warmup_frac"),
        ({"decay_frac": 0.0}, "train.decay_frac"),
        ({"budget": "hours"}, "train.budget"),
    ],
)
def test_bad_budgets_are_one_line_errors_naming_the_fix(train, words):
    cfg = preset("tiny")
    for key, value in train.items():
        setattr(cfg.train, key, value)
    with pytest.raises(GptlabError, match=words) as e:
        cfg.validate()
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize("dt, steps", [(1.0, 10), (0.5, 20), (0.25, 40)])
def test_the_schedule_fits_the_budget_whatever_the_step_time(text, tmp_path, dt, steps):
    """A machine twice as fast runs twice the steps; on each the last step is at the floor
    and the run stops at the budget with a final evaluation and checkpoint."""
    cfg = time_config(10.0, eval_every_frac=0.25)
    corpus = tiny_corpus(text, cfg)
    run = tmp_path / "run"
    end = Trainer(cfg, LanguageModeling(corpus), run, clock=FakeClock(dt)).run()
    assert (end["reason"], end["step"]) == ("budget", steps)
    assert end["train_time"] == pytest.approx(10.0)
    lrs = [r["lr"] for r in records(run, "train")]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(cfg.train.lr, rel=0.02)
    assert lrs[-1] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)
    # evaluations after step 1, at each quarter of the budget, the last one at the end
    evals = [r["step"] for r in records(run, "eval")]
    assert evals == [1] + [math.ceil(steps * q / 4) for q in (1, 2, 3, 4)]
    _, progress = read_schedule(run)
    assert len(progress) == steps and progress[-1] == 1.0
    assert progress == sorted(progress)
    meta = ckpt_lib.read_meta(ckpt_lib.latest_checkpoint(run))
    assert meta["step"] == steps


def test_a_step_budget_is_untouched_by_the_time_fields(text, tmp_path):
    """budget = steps ignores the clock for its schedule: the same run, fast or slow."""
    cfg = tiny_config(steps=6, warmup_steps=2)
    corpus = tiny_corpus(text, cfg)
    a = Trainer(
        copy.deepcopy(cfg), LanguageModeling(corpus), tmp_path / "a", clock=FakeClock(1.0)
    ).run()
    b = Trainer(
        copy.deepcopy(cfg), LanguageModeling(corpus), tmp_path / "b", clock=FakeClock(7.0)
    ).run()
    assert a["reason"] == b["reason"] == "max_steps"
    assert losses_by_step(tmp_path / "a", key="lr") == losses_by_step(tmp_path / "b", key="lr")
    assert not (tmp_path / "a" / "schedule.json").exists()


@pytest.mark.parametrize("k", [1, 7])
def test_resume_continues_the_budget_where_it_stopped(text, tmp_path, monkeypatch, k):
    """Stopped at step k and resumed, on a clock that gives every step the same time, the
    run ends where the uninterrupted one ends, bit for bit: elapsed time is in the
    checkpoint, so the remaining budget is the rest of it."""
    cfg = time_config(12.0)
    corpus = tiny_corpus(text, cfg)
    ref = Trainer(
        copy.deepcopy(cfg), LanguageModeling(corpus), tmp_path / "ref", clock=FakeClock(1.0)
    ).run()

    run = tmp_path / "run"
    first = Trainer(copy.deepcopy(cfg), LanguageModeling(corpus), run, clock=FakeClock(1.0))
    poison_step(monkeypatch, [first], k, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with stop_on_signals(first):
        assert first.run()["step"] == k
    monkeypatch.undo()
    second = Trainer(
        copy.deepcopy(cfg), LanguageModeling(corpus), run, resume=True, clock=FakeClock(1.0)
    )
    assert second.state.budget_time == pytest.approx(k)
    end = second.run()
    assert (end["reason"], end["step"]) == ("budget", ref["step"])
    assert losses_by_step(run) == losses_by_step(tmp_path / "ref")
    assert read_schedule(run) == read_schedule(tmp_path / "ref")
    assert_same_tensors(
        weights(ckpt_lib.latest_checkpoint(run)),
        weights(ckpt_lib.latest_checkpoint(tmp_path / "ref")),
    )


def test_a_replayed_schedule_repeats_a_real_clock_run_across_a_resume(text, tmp_path, monkeypatch):
    """A run on the real clock records its schedule; a run that replays it, stopped part
    way and resumed, is the same run bit for bit: what "bit-exact" means with a time
    budget (the clock itself never repeats)."""
    cfg = time_config(1.0)
    corpus = tiny_corpus(text, cfg)
    ref = tmp_path / "ref"
    end = Trainer(copy.deepcopy(cfg), LanguageModeling(corpus), ref).run()
    assert end["reason"] == "budget"
    _, progress = read_schedule(ref)
    assert len(progress) == end["step"] and end["step"] >= 2

    replay = copy.deepcopy(cfg)
    replay.train.replay_schedule = str(ref / "schedule.json")
    run = tmp_path / "run"
    k = max(1, end["step"] // 2)
    first = Trainer(copy.deepcopy(replay), LanguageModeling(corpus), run, clock=FakeClock(100.0))
    poison_step(monkeypatch, [first], k, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with stop_on_signals(first):
        assert first.run()["step"] == k
    monkeypatch.undo()
    again = Trainer(
        copy.deepcopy(replay), LanguageModeling(corpus), run, resume=True, clock=FakeClock(100.0)
    )
    done = again.run()
    assert (done["reason"], done["step"]) == ("budget", end["step"])
    assert losses_by_step(run) == losses_by_step(ref)
    assert losses_by_step(run, key="lr") == losses_by_step(ref, key="lr")
    assert_same_tensors(
        weights(ckpt_lib.latest_checkpoint(run)), weights(ckpt_lib.latest_checkpoint(ref))
    )
    assert math.isclose(read_schedule(run)[0], read_schedule(ref)[0])


def test_limit_flags_choose_the_budget():
    """The default preset spans a time budget; --max-time sets it, a step or epoch count
    makes the schedule span the steps instead."""
    from test_cli import resolve_cli

    def built(*flags: str) -> C.TrainConfig:
        return resolve_cli("config", *flags).config.train

    tc = built()
    assert (tc.budget, tc.max_time, tc.max_steps) == ("time", 530.0, 0)
    assert (built("--max-time", "60").budget, built("--max-time", "60").max_time) == ("time", 60)
    tc = built("--max-steps", "300")
    assert (tc.budget, tc.max_steps, tc.max_time) == ("steps", 300, 0)
    tc = built("--max-steps", "300", "--max-time", "100", "--train.budget", "time")
    assert (tc.budget, tc.max_steps, tc.max_time) == ("time", 300, 100)
    with pytest.raises(GptlabError, match="at least 1"):
        built("--max-time", "0.5")
