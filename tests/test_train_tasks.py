"""Task evaluation during training (train.eval_tasks): "tasks" records in metrics.jsonl at
the due steps and at the end, the same losses as a run without them, an exact resume, a
missing suite refused before training, the plot's panel and the serve page's /v1/run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_helpers import write_corpus

import gptlab.observe.plot as plot_lib
from gptlab.cli.main import main
from gptlab.observe.metrics import read_metrics

# Items written from the test corpus' own words (the char tokenizer knows their letters).
ITEMS = [
    ("the king", [" speaks", " walks"], 0),
    ("the brave queen", [" walks", " gold"], 0),
    ("the old river", [" night", " speaks"], 1),
    ("the young sword", [" castle", " morning"], 0),
    ("the gold castle", [" the", " king"], 1),
]


@pytest.fixture
def suite(tmp_path) -> Path:
    lines = [json.dumps({"context": c, "choices": ch, "answer": a}) for c, ch, a in ITEMS]
    (tmp_path / "words.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "more.jsonl").write_text("\n".join(lines[::-1]) + "\n")
    path = tmp_path / "suite.toml"
    path.write_text(
        'name = "words"\n\n[[tasks]]\nname = "words"\ndata = "words.jsonl"\n'
        'random_baseline = 0.5\n\n[[tasks]]\nname = "more"\ndata = "more.jsonl"\n'
        "num_fewshot = 1\nrandom_baseline = 0.5\n"
    )
    return path


def _flags(text: Path, out: Path, steps: int) -> list[str]:
    # dropout on, so a disturbed random stream would change the losses
    return [
        "train", "--data", str(text), "--preset", "tiny", "--out", str(out),
        "--max-steps", str(steps), "--device", "cpu", "--compile", "off", "--precision", "fp32",
        "--data.tokenizer", "char", "--model.drop_rate", "0.1", "--train.schedule", "constant",
        "--train.log_every", "1", "--train.eval_freq", "4", "--train.sample_tokens", "4",
        "--quiet",
    ]  # fmt: skip


def _events(run: Path, event: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == event]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _events(run, "train")] + [
        (r["step"], r["val_loss"]) for r in _events(run, "eval")
    ]


@pytest.fixture
def runs(tmp_path, suite):
    text = write_corpus(tmp_path / "corpus.txt")
    with_tasks, without = tmp_path / "with", tmp_path / "without"
    tasks = ["--train.eval_tasks", str(suite), "--train.task_eval_every", "3"]
    assert main([*_flags(text, with_tasks, 10), *tasks]) == 0
    assert main(_flags(text, without, 10)) == 0
    return text, with_tasks, without, tasks


def test_task_scores_are_recorded_and_training_is_unchanged(runs):
    _, with_tasks, without, _ = runs
    records = _events(with_tasks, "tasks")
    assert [r["step"] for r in records] == [3, 6, 9, 10]  # every 3 steps, and the end
    for r in records:
        assert set(r["tasks"]) == {"words", "more"}
        assert r["tasks"]["words"]["n_items"] == len(ITEMS)
        centred = [t["centred"] for t in r["tasks"].values()]
        assert r["core"] == pytest.approx(sum(centred) / len(centred))
        assert r["seconds"] > 0  # what the evaluation cost, for the benchmarks' share
    assert _losses(with_tasks) == _losses(without)  # bit for bit: same RNG stream


def test_a_resumed_run_with_task_evals_is_exact(runs, tmp_path):
    text, with_tasks, _, tasks = runs
    part = tmp_path / "part"
    assert main([*_flags(text, part, 5), *tasks]) == 0
    assert main([*_flags(text, part, 10), *tasks, "--resume"]) == 0
    assert _losses(part) == _losses(with_tasks)
    assert [r["step"] for r in _events(part, "tasks")] == [3, 5, 6, 9, 10]


def test_a_missing_suite_is_refused_before_training(tmp_path, capsys):
    text, run = write_corpus(tmp_path / "c.txt"), tmp_path / "run"
    assert main([*_flags(text, run, 2), "--train.eval_tasks", str(tmp_path / "no.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no.toml" in err and "not found" in err
    assert not (run / "metrics.jsonl").exists()


def test_plot_draws_the_task_scores(runs, monkeypatch, capsys):
    _, with_tasks, without, _ = runs
    figures = {}
    real = plot_lib._save

    def keep(fig, out_dir, stem):
        figures[stem] = fig
        return real(fig, out_dir, stem)

    monkeypatch.setattr(plot_lib, "_save", keep)
    assert main(["plot", str(with_tasks)]) == 0
    assert "tasks.png" in capsys.readouterr().out and (with_tasks / "tasks.png").is_file()
    (ax,) = figures["tasks"].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    records = _events(with_tasks, "tasks")
    assert list(lines["core"].get_xdata()) == [r["step"] for r in records]
    assert list(lines["core"].get_ydata()) == pytest.approx([r["core"] for r in records])
    assert list(lines["more"].get_ydata()) == pytest.approx(
        [r["tasks"]["more"]["centred"] for r in records]
    )
    assert plot_lib.plot_tasks(without) is None  # no task evaluations: no figure


def test_the_run_view_gets_the_task_records(runs):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from gptlab.infer.serve import build
    from gptlab.interop.runs import open_run

    _, with_tasks, _, _ = runs
    app, engine = build(open_run(with_tasks, "cpu"), max_batch=1)
    try:
        with TestClient(app) as client:
            view = client.get("/v1/run").json()
            page = client.get("/static/app.js").text
    finally:
        engine.close()
    got = [r for r in view["records"] if r["event"] == "tasks"]
    assert got == [{k: v for k, v in r.items()} for r in _events(with_tasks, "tasks")]
    assert view["config"]["train"]["eval_tasks"].endswith("suite.toml")
    assert 'r.event === "tasks"' in page  # the page draws them
