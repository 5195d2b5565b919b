"""The time-to-quality script: recipes parsed through gptlab.config.schema, trained by the real
trainer, evaluated over the whole validation split; the table's figures agree with each
other. No timing is asserted: figures belong in BENCHMARKS.md, not in tests."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import make_corpus_text

from gptlab.errors import GptlabError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"
TINY = "tiny runtime.device=cpu runtime.compile=off runtime.precision=fp32"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipes_parse_presets_files_and_overrides(bench, tmp_path):
    cfg, name = bench.parse_recipe("cpu model.n_layers=6 train.lr=3e-3", 600, None, "shakespeare")
    assert name == "cpu" and cfg.model.n_layers == 6 and cfg.train.lr == 3e-3
    assert cfg.train.max_time == 600 and cfg.train.epochs == 0
    assert cfg.train.budget == "time" and cfg.train.max_steps == 0
    assert cfg.data.split == "chars"  # the same held-out characters for every tokenizer
    cfg, _ = bench.parse_recipe("cpu", 600, 300, "shakespeare")
    assert cfg.train.max_steps == 300 and cfg.train.max_time == 0
    toml = tmp_path / "r.toml"
    toml.write_text('preset = "tiny"\n[model]\nn_layers = 3\n[data]\ntokenizer = "bpe:300"\n')
    cfg, name = bench.parse_recipe(f"{toml} model.emb_dim=64", 60, None, "x.txt")
    assert name == "tiny" and cfg.model.n_layers == 3 and cfg.model.emb_dim == 64
    assert cfg.data.tokenizer == "bpe:300" and cfg.data.source == "x.txt"
    cfg, name = bench.parse_recipe("data.tokenizer=char", 60, None, "shakespeare")
    assert name == "cpu" and cfg.data.tokenizer == "char"
    cfg, _ = bench.parse_recipe("cpu data.split=tokens", 60, None, "shakespeare")
    assert cfg.data.split == "tokens"  # an override is the user's choice
    for bad, words in [
        ("nosuchpreset", "not found"),
        ("cpu model.n_layers", "section.field=value"),
        ("cpu model.nope=1", "unknown config key"),
        ("cpu data.tokenizer=bpe:10", "258"),
    ]:
        with pytest.raises(GptlabError, match=words):
            bench.parse_recipe(bad, 60, None, "shakespeare")


def test_bad_recipe_exits_2_before_training(bench, tmp_path, capsys):
    rc = bench.main(["--recipe", TINY, "--recipe", "tiny model.nope=1", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.nope" in err[0]
    assert not list(tmp_path.iterdir())  # nothing trained


def test_main_trains_each_recipe_and_reports_consistent_figures(bench, tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text(make_corpus_text(), encoding="utf-8")
    jsonl = tmp_path / "q.jsonl"
    recipes = [f"{TINY} data.tokenizer=char", f"{TINY} data.tokenizer=bpe:300 train.batch_size=2"]
    argv = ["--data", str(text), "--steps", "5", "--json", str(jsonl), "--out", str(tmp_path / "r")]
    for r in recipes:
        argv += ["--recipe", r]
    assert bench.main(argv) == 0
    table = capsys.readouterr().out.strip().splitlines()
    heads = [c.strip() for c in table[0].strip("|").split("|")]
    assert heads == [h for h, _, _ in bench.COLUMNS]
    assert len(table) == 2 + len(recipes)
    for line, recipe in zip(table[2:], recipes, strict=True):
        assert line.strip("| ").startswith(recipe)
        assert len(line.strip("|").split("|")) == len(heads)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["recipe"] for r in rows] == recipes
    for row in rows:
        assert row["steps"] == 5 and row["end_reason"] == "max_steps"
        cfg = row["config"]
        assert row["batch_tokens"] == cfg["train"]["batch_size"] * cfg["model"]["context_length"]
        assert row["tokens"] == row["steps"] * row["batch_tokens"]
        expected = row["val_loss"] * row["val_tokens"] / (math.log(2) * row["val_bytes"])
        assert row["bits_per_byte"] == pytest.approx(expected, rel=1e-12)
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["train_s"])
        assert 0 < row["val_loss"] < 10 and row["val_windows"] > 0
        assert cfg["data"]["split"] == "chars" and cfg["data"]["source"] == str(text)
        assert Path(row["run_dir"]).is_dir()
    char, bpe = rows
    # both score the same held-out characters: the bytes differ only by the left-out tail
    # (under one window of each model, 32 tokens, at most 4 bytes per BPE-300 token here)
    text_bytes = len(make_corpus_text().encode())
    held_out = text_bytes - int(0.9 * len(make_corpus_text()))
    for row in rows:
        assert held_out - 32 * 4 - 4 <= row["val_bytes"] <= held_out
    assert char["config"]["model"]["vocab_size"] < bpe["config"]["model"]["vocab_size"] == 300


def test_runs_go_to_a_temp_dir_that_is_removed(bench, tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text(make_corpus_text(), encoding="utf-8")
    jsonl = tmp_path / "q.jsonl"
    recipe = f"{TINY} data.tokenizer=char"
    assert (
        bench.main(["--data", str(text), "--steps", "2", "--recipe", recipe, "--json", str(jsonl)])
        == 0
    )
    (row,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert not Path(row["run_dir"]).exists()


def test_a_stopped_run_ends_the_benchmark(bench, tmp_path, capsys, monkeypatch):
    import gptlab.train.run as trainer_lib

    text = tmp_path / "corpus.txt"
    text.write_text(make_corpus_text(), encoding="utf-8")
    real_train = trainer_lib.train
    calls = []

    def stopped(*args, **kwargs):
        calls.append(1)
        result = real_train(*args, **kwargs)
        result.end["reason"] = "SIGINT"  # as the signal handler leaves it
        return result

    monkeypatch.setattr(trainer_lib, "train", stopped)
    recipe = f"{TINY} data.tokenizer=char"
    argv = ["--data", str(text), "--steps", "2", "--recipe", recipe, "--recipe", recipe]
    assert bench.main(argv) == 130
    assert len(calls) == 1  # the second recipe never started
    assert "stopped" in capsys.readouterr().err


def test_budget_puts_every_recipe_on_the_same_time_budget(bench):
    cfg, name = bench.parse_recipe("nanogpt-cpu", 300, None, "shakespeare")
    tc, mc = cfg.train, cfg.model
    assert name == "cpu-gpt2" and cfg.data.tokenizer == "char"
    assert (mc.n_layers, mc.n_heads, mc.emb_dim, mc.context_length) == (4, 4, 128, 64)
    assert (mc.drop_rate, mc.bias, mc.tie_weights, tc.batch_size) == (0.0, False, True, 12)
    assert (tc.budget, tc.max_time, tc.max_steps) == ("time", 300.0, 0)
    assert tc.warmup_frac == pytest.approx(100 / 2000)  # its warm-up, as a fraction
    cfg, _ = bench.parse_recipe("nanogpt-cpu", None, None, "shakespeare")
    assert (cfg.train.budget, cfg.train.max_steps) == ("steps", 2000)  # its own limits
    cfg, _ = bench.parse_recipe("cpu", None, 50, "shakespeare")
    assert (cfg.train.budget, cfg.train.max_steps, cfg.train.max_time) == ("steps", 50, 0)


def test_main_with_a_time_budget_and_one_thread(bench, tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text(make_corpus_text(), encoding="utf-8")
    jsonl = tmp_path / "q.jsonl"
    argv = ["--data", str(text), "--budget", "1", "--threads", "1", "--json", str(jsonl)]
    import torch

    before = torch.get_num_threads()
    try:
        assert bench.main([*argv, "--recipe", f"{TINY} data.tokenizer=char"]) == 0
    finally:
        torch.set_num_threads(before)
    (row,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert (row["end_reason"], row["budget"], row["threads"]) == ("budget", "time", 1)
    assert row["steps"] > 1 and row["train_s"] <= 1.0 + row["train_s"] / row["steps"]
    with pytest.raises(SystemExit) as e:
        bench.main(["--steps", "2", "--budget", "3", "--recipe", TINY])
    assert e.value.code == 2 and "give one" in capsys.readouterr().err


def test_equal_time_runs_are_planned_once_and_do_not_read_the_clock(bench, tmp_path, capsys):
    """--equal-time: a probe plans each recipe once (kept in --plans); the planned run is a
    replayed time budget of speed x S / tokens per step steps, so running it twice gives
    the same losses; --slice trains F of the steps on F of the training text and scores
    exactly the same held-out text."""
    text = tmp_path / "corpus.txt"
    text.write_text(make_corpus_text(60), encoding="utf-8")
    plans = tmp_path / "plans.json"
    recipe = f"{TINY} data.tokenizer=bpe:300 train.batch_size=2"
    base = ["--data", str(text), "--equal-time", "4", "--plans", str(plans), "--probe", "2"]
    runs = []
    for slice_, out in [("1", "a"), ("1", "b"), ("0.5", "c")]:
        jsonl = tmp_path / f"{out}.jsonl"
        argv = [*base, "--recipe", recipe, "--slice", slice_, "--json", str(jsonl)]
        assert bench.main([*argv, "--out", str(tmp_path / out)]) == 0
        runs.append(json.loads(jsonl.read_text()))
    capsys.readouterr()
    plan = json.loads(plans.read_text())[f"{recipe} @ {text}"]  # probed once, then reused
    assert plan["tokens_per_s"] == runs[0]["plan_tokens_per_s"] == runs[2]["plan_tokens_per_s"]
    steps = round(plan["tokens_per_s"] * 4 / plan["tokens_per_step"])
    full, again, proxy = runs
    assert full["steps"] == again["steps"] == max(2, steps) and full["end_reason"] == "budget"
    assert proxy["steps"] == max(2, round(plan["tokens_per_s"] * 2 / plan["tokens_per_step"]))
    assert full["val_loss"] == again["val_loss"]  # no clock in it: the same run
    # the proxy scores the same held-out text with the same tokenizer
    assert (proxy["val_bytes"], proxy["val_tokens"]) == (full["val_bytes"], full["val_tokens"])
    assert proxy["config"]["data"]["train_ratio"] < full["config"]["data"]["train_ratio"]


def test_slice_keeps_the_held_out_characters(bench, tmp_path):
    from gptlab.config import schema as C
    from gptlab.data.sources import read_documents
    from gptlab.data.tokenizer import ENDOFTEXT

    text = tmp_path / "corpus.txt"
    text.write_text(make_corpus_text(), encoding="utf-8")
    cfg, _ = bench.parse_recipe(f"{TINY} data.tokenizer=char", None, 5, str(text))
    whole = ENDOFTEXT.join(read_documents(str(text)))
    cut = int(cfg.data.train_ratio * len(whole))
    sliced = C.RunConfig.from_dict(cfg.to_dict())
    bench.slice_corpus(sliced, 0.25, tmp_path)
    part = ENDOFTEXT.join(read_documents(sliced.data.source))
    keep = int(sliced.data.train_ratio * len(part))
    assert part[:keep] == whole[: int(0.25 * cut)] and part[keep:] == whole[cut:]
    bad = C.RunConfig.from_dict(cfg.to_dict())
    bad.data.split = "tokens"
    with pytest.raises(GptlabError, match="split = chars"):
        bench.slice_corpus(bad, 0.5, tmp_path)


def test_rank_agreement(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "rank_agreement", SCRIPT.parent / "rank_agreement.py"
    )
    ra = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ra)
    assert ra.ranks([0.3, 0.1, 0.3, 0.2]) == [3.5, 1.0, 3.5, 2.0]
    assert ra.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ra.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert ra.kendall([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)  # 2 agree, 1 not
    rows = [("x", "r1", 2.0), ("x", "r2", 1.9), ("x", "r3", 2.1), ("x", "r1", 1.8)]
    path = tmp_path / "p.jsonl"
    path.write_text(
        "".join(json.dumps(dict(data=d, recipe=r, bits_per_byte=b)) + "\n" for d, r, b in rows)
    )
    assert ra.read_rows(str(path)) == {("x", "r1"): 1.8, ("x", "r2"): 1.9, ("x", "r3"): 2.1}
