"""The experiment trackers (gptlab.observe.trackers): a tiny run logs to TensorBoard, wandb (offline)
and trackio (local), and each one's own reader gives back metrics.jsonl's losses; a resume
continues the same tracker runs; a missing extra is one line naming the install. Nothing
here reaches the network: WANDB_MODE=offline, trackio without a Space, HF_HUB_OFFLINE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import write_corpus

from gptlab.cli.main import main
from gptlab.config.schema import set_field
from gptlab.errors import GptlabError
from gptlab.observe import trackers as T
from gptlab.observe.metrics import read_metrics
from gptlab.recipes.presets import preset

HAVE = {name: T.importlib.util.find_spec(mod) is not None for name, mod in T.MODULES.items()}


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """wandb offline and trackio's store in a temp dir, set before trackio is imported
    (it reads TRACKIO_DIR once, at import)."""
    root = tmp_path_factory.mktemp("trackers")
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_SILENT": "true",
        "TRACKIO_DIR": str(root / "trackio"),
        "HF_HUB_OFFLINE": "1",
    }
    (root / "wandb").mkdir()
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if "trackio" in sys.modules:
        import trackio.utils

        assert trackio.utils.TRACKIO_DIR == Path(env["TRACKIO_DIR"]), "trackio imported too early"
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _flags(text: Path, out: Path, steps: int) -> list[str]:
    return [
        "train", "--data", str(text), "--preset", "tiny", "--out", str(out),
        "--max-steps", str(steps), "--device", "cpu", "--compile", "off",
        "--data.tokenizer", "char", "--train.log_every", "1", "--train.eval_freq", "4",
        "--train.sample_tokens", "4", "--quiet",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tracked_run(offline):
    """A 10-step run with every installed tracker, resumed to 14 steps."""
    names = [n for n, ok in HAVE.items() if ok]
    if not names:
        pytest.skip("no tracker installed")
    text, run = write_corpus(offline / "corpus.txt"), offline / "run"
    args = [a for n in names for a in ("--tracker", n)]
    assert main([*_flags(text, run, 10), *args]) == 0
    first_state = json.loads((run / T.STATE_FILE).read_text())
    # from the saved config (no --preset): its train.trackers with it
    resume = ["train", "--data", str(text), "--out", str(run), "--resume", "--quiet"]
    assert main([*resume, "--max-steps", "14"]) == 0
    return run, names, first_state


def _losses(run: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(train loss by step, val loss by step) from metrics.jsonl."""
    records = read_metrics(run / "metrics.jsonl")
    train = {r["step"]: r["loss"] for r in records if r["event"] == "train"}
    val = {r["step"]: r["val_loss"] for r in records if r["event"] == "eval"}
    return train, val


def test_the_trackers_are_kept_in_the_config_and_resume_in_the_same_runs(tracked_run):
    run, names, first_state = tracked_run
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["trackers"] == ",".join(names)
    assert json.loads((run / T.STATE_FILE).read_text()) == first_state
    train, _ = _losses(run)
    assert max(train) == 14  # the resume trained on


def test_tensorboard_reads_back_the_losses(tracked_run):
    run, names, _ = tracked_run
    if "tensorboard" not in names:
        pytest.skip("tensorboard not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    train, val = _losses(run)
    assert {e.step: e.value for e in acc.Scalars("loss/val")} == pytest.approx(val)
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == pytest.approx(train)


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline .wandb file, read by wandb's own reader."""
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [r["history"]["item"] for r in rows if r.get("type") == "history"]


def test_wandb_offline_run_holds_the_losses(tracked_run, offline):
    run, names, state = tracked_run
    if "wandb" not in names:
        pytest.skip("wandb not installed")
    run_id = state["wandb"]["id"]
    # one offline run per attempt, both under the same id: `wandb sync` joins them
    files = sorted(
        (offline / "wandb" / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb")
    )
    assert len(files) == 2
    history = [row for f in files for row in _wandb_history(f)]
    train, val = _losses(run)
    got_train = {row["_step"]: row["train/loss"] for row in history if "train/loss" in row}
    got_val = {row["_step"]: row["loss/val"] for row in history if "loss/val" in row}
    assert got_train == pytest.approx(train)
    assert got_val == pytest.approx(val)


def test_trackio_local_store_holds_the_losses(tracked_run):
    run, names, state = tracked_run
    if "trackio" not in names:
        pytest.skip("trackio not installed")
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("gptlab", state["trackio"]["name"])
    train, val = _losses(run)
    assert {r["step"]: r["train/loss"] for r in logs if "train/loss" in r} == pytest.approx(train)
    assert {r["step"]: r["loss/val"] for r in logs if "loss/val" in r} == pytest.approx(val)
    # one trackio run, continued by the resume
    runs = [
        r for r in SQLiteStorage.get_run_records("gptlab") if r["name"] == state["trackio"]["name"]
    ]
    assert len(runs) == 1


@pytest.mark.parametrize("name", ["wandb", "trackio", "tensorboard"])
def test_a_missing_extra_is_one_line_before_training(tmp_path, monkeypatch, capsys, name):
    real = T.importlib.util.find_spec
    monkeypatch.setattr(
        T.importlib.util,
        "find_spec",
        lambda mod, *a: None if mod == T.MODULES[name] else real(mod, *a),
    )
    text, run = write_corpus(tmp_path / "c.txt"), tmp_path / "run"
    assert main([*_flags(text, run, 2), "--tracker", name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"pip install 'gptlab[{name}]'" in err
    assert not (run / "metrics.jsonl").exists()  # said before anything was trained


def test_tracker_names_are_checked():
    cfg = preset("tiny")
    set_field(cfg, "train.trackers", "tensorboard, wandb,tensorboard")
    assert T.tracker_names(cfg.validate().train.trackers) == ("tensorboard", "wandb")
    set_field(cfg, "train.trackers", "mlflow")
    with pytest.raises(GptlabError, match="train.trackers: unknown tracker 'mlflow'"):
        cfg.validate()


def test_scalars_name_every_record_alike():
    assert T.scalars({"event": "eval", "step": 3, "train_loss": 2.0, "val_loss": 2.5}) == {
        "loss/train": 2.0,
        "loss/val": 2.5,
    }
    rec = {"event": "tasks", "step": 9, "core": 0.1, "tasks": {"hs": {"acc": 0.3, "n_items": 5}}}
    assert T.scalars(rec) == {"tasks/core": 0.1, "tasks/hs/acc": 0.3, "tasks/hs/n_items": 5}
    assert T.scalars({"event": "sample", "step": 1, "text": "x"}) == {}
