"""One resolution (gptlab.train.resolve): `gptlab train` and the Python call with the same
settings make the same run, corpus sizing included; what counts as given; finetune's limits
are train's; and the README's Python examples run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_cli import resolve_cli, run_cli

from gptlab.errors import GptlabError
from gptlab.observe.metrics import read_metrics
from gptlab.recipes import presets
from gptlab.train.resolve import resolve
from gptlab.train.run import train

README = Path(__file__).resolve().parents[1] / "README.md"

# A clock-free schedule (a constant rate, no warm-up), a loss every step and no evaluation
# before the end: a time budget then decides only how many steps run, never their numbers.
# Typed here for the Python call; the command gets the same values as text.
STEADY = {
    "train.schedule": "constant",
    "train.warmup_frac": 0.0,
    "train.log_every": 1,
    "train.eval_every_frac": 0.0,
    "train.eval_freq": 100000,
    "train.eval_iter": 1,
    "train.sample_tokens": 0,
    "train.sizing_speed": 4800.0,  # given: nothing is measured, so nothing varies
    "runtime.device": "cpu",
}


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "train"]


def test_the_command_and_the_python_call_make_the_same_run(tmp_path, capsys, corpus_text):
    """The default preset on a small book, sized to it (train.sizing = corpus): the command
    and train() with the same settings save the same config.json, a shape other than the
    preset's, and the same first ten losses."""
    book = tmp_path / "book.txt"
    book.write_text(corpus_text * 4, encoding="utf-8")
    flags = [f"--{k}={v}" for k, v in STEADY.items()]
    rc, out, err = run_cli(
        capsys, "train", "--data", book, "--max-time", "3", *flags, "--out", tmp_path / "cli",
        "--quiet",
    )  # fmt: skip
    assert rc == 0, err
    assert out.startswith("gptlab: sizing: ")  # the run's first line, as before
    result = train(data=str(book), max_time=3, overrides=STEADY, out=tmp_path / "py")
    assert result.end["reason"] != "nonfinite"
    saved = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("cli", "py")]
    assert saved[0] == saved[1]
    cpu = presets.preset(presets.DEFAULT_PRESET).model
    shape = (saved[0]["model"]["n_layers"], saved[0]["model"]["emb_dim"])
    assert shape != (cpu.n_layers, cpu.emb_dim)  # the corpus chose it
    first = [_losses(tmp_path / d)[:10] for d in ("cli", "py")]
    assert len(first[0]) == 10 and first[0] == first[1]


def test_a_runconfig_passed_in_is_taken_as_resolved(tmp_path):
    """Every field of a RunConfig counts as given: sizing leaves it as it is, and the
    caller's object is not changed; the settings still apply over it, in order."""
    book = tmp_path / "book.txt"
    book.write_text("the river and the stone " * 4000, encoding="utf-8")
    cfg = presets.preset("cpu")
    cfg.data.source = str(book)
    r = resolve(cfg, overrides={"train.lr": "1e-3"}, max_steps=5)
    assert r.sizing is None and r.name == "run" and r.model_keys == ()
    assert (r.config.model.n_layers, r.config.model.emb_dim) == (cfg.model.n_layers, 256)
    assert (r.config.train.lr, r.config.train.max_steps, r.config.train.budget) == (
        1e-3,
        5,
        "steps",
    )
    assert cfg.train.lr == presets.preset("cpu").train.lr  # the caller's config is unchanged
    sized = resolve(preset="cpu", data=str(book))
    assert sized.sizing.startswith("gptlab: sizing: ") and sized.config.model.emb_dim == 128
    with pytest.raises(GptlabError, match="not both"):
        resolve(cfg, preset="tiny")


def test_finetune_resolves_as_train_does(tmp_path):
    """A step count makes the schedule span steps for finetune too (as --max-steps' help
    says); the finetune's base and its one-line refusals are kept."""
    toml = tmp_path / "ft.toml"
    toml.write_text(
        'preset = "tiny"\n[train]\nbudget = "time"\nmax_time = 60.0\n[model]\ndrop_rate = 0.1\n'
    )
    r = resolve_cli(
        "finetune", "--init-from", "base", "--data", "x.jsonl", "--config", toml, "--max-steps", "4"
    )
    assert (r.config.train.budget, r.config.train.max_steps, r.config.train.max_time) == (
        "steps",
        4,
        0,
    )
    assert r.config.train.lr == presets.FINETUNE_TRAIN["lr"] and r.name == "finetune"
    assert r.model_keys == ("drop_rate",)
    t = resolve_cli("train", "--config", toml, "--max-steps", "4", "--model.attention", "manual")
    assert (t.config.train.budget, t.config.train.max_steps) == ("steps", 4)
    assert t.model_keys == ("attention", "drop_rate")  # flags first, then the file's
    with pytest.raises(GptlabError, match="drop --preset"):
        resolve(finetune=True, preset="tiny", data="x.jsonl")
    with pytest.raises(GptlabError, match="needs --data"):
        resolve(finetune=True)


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


# Blocks that need what a test has not (a server, lm-eval's downloads): compiled only.
NEEDS_SERVICE = ("lm_eval.simple_evaluate", "OpenAI(")
# The walk-through block at a tiny scale: (what it says, what the test runs instead).
TINY_WALKTHROUGH = [
    ('"context_length": 256}', '"context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 1}'),
    ("max_length=256, stride=256", "max_length=16, stride=16"),
    ("num_epochs=10, eval_freq=5, eval_iter=5", "num_epochs=1, eval_freq=20, eval_iter=1"),
]


def test_the_readme_python_examples_run(tmp_path, monkeypatch, corpus_text):
    """Every ```python block of the README compiles; those that need no service run, in a
    temporary directory, the walk-through's at a tiny scale."""
    blocks = _python_blocks()
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-book.txt").write_text(corpus_text * 4, encoding="utf-8")  # sizable
    (tmp_path / "your-text.txt").write_text(corpus_text, encoding="utf-8")
    ran = 0
    for i, code in enumerate(blocks):
        compile(code, f"README.md python block {i}", "exec")
        if any(s in code for s in NEEDS_SERVICE):
            continue
        if "train_model_simple" in code:
            for said, tiny in TINY_WALKTHROUGH:
                assert said in code, said
                code = code.replace(said, tiny)
        exec(compile(code, f"README.md python block {i}", "exec"), {"__name__": "readme"})
        ran += 1
    assert ran >= 2
    assert (tmp_path / "runs" / "mine" / "config.json").is_file()
