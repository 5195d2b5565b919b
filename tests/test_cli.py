"""The CLI end to end on a tiny corpus, and every bad input: exit 2, one line, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_plot import check_pdf, check_png

from gptlab.cli import main as cli
from gptlab.cli.run import run_settings
from gptlab.interop.checkpoint import WEIGHTS
from gptlab.train.resolve import Resolved, resolve

TRAIN = ["train", "--preset", "tiny", "--device", "cpu", "--quiet"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """gptlab.cli.main.main in-process; returns (exit code, stdout, stderr)."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # what the console script would exit with
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def resolve_cli(*argv) -> Resolved:
    """What `gptlab ARGV` (train, finetune or config) resolves to, through the real parser
    and the library's resolution, without running anything."""
    args = cli.build_parser().parse_args([str(a) for a in argv])
    return resolve(finetune=args.command == "finetune", **run_settings(args))


def assert_user_error(rc: int, out: str, err: str, *words: str) -> str:
    """Exit 2, exactly one line on stderr naming the problem, no traceback."""
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("gptlab")
    for w in words:
        assert w in line, (w, line)
    return line


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (pointers included) with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- end to end


def test_train_writes_a_complete_run(tiny_run):
    for name in ("config.json", "tokenizer.json", "metrics.jsonl"):
        assert (tiny_run / name).is_file(), name
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["model"]["context_length"] == 32  # the tiny preset
    assert config["train"]["max_steps"] == 7 and config["train"]["eval_freq"] == 3
    assert config["data"]["source"].endswith("corpus.txt")
    assert json.loads((tiny_run / "tokenizer.json").read_text()) == {"type": "gpt2"}

    recs = records(tiny_run)
    events = [r["event"] for r in recs]
    assert events[0] == "start" and events[-1] == "end"
    assert {"train", "eval", "sample", "checkpoint"} <= set(events)
    evals = [r for r in recs if r["event"] == "eval"]
    # evaluation after steps 1, 4, 7 ((step - 1) % eval_freq == 0); step 7 is also the last
    assert [r["step"] for r in evals] == [1, 4, 7]
    B, T = config["train"]["batch_size"], config["model"]["context_length"]
    assert [r["tokens"] for r in evals] == [s * B * T for s in (1, 4, 7)]
    assert all(r["val_loss"] > 0 and r["train_loss"] > 0 for r in evals)
    end = recs[-1]
    assert end["reason"] == "max_steps" and end["step"] == 7

    check_pdf(tiny_run / "loss-plot.pdf")
    check_png(tiny_run / "loss-plot.png")
    ckpt = tiny_run / "checkpoints" / "step-00000007"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "state.pt", "meta.json"}
    assert (tiny_run / "checkpoints" / "latest").read_text().strip() == ckpt.name
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["config"] == config and meta["tokenizer"] == {"type": "gpt2"}


def test_generate_subprocess_continues_the_prompt(tiny_run):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [sys.executable, "-m", "gptlab", "generate", "--checkpoint", str(tiny_run)]
        + ["--prompt", "Every effort moves you", "--max-new-tokens", "8", "--seed", "3"]
        + ["--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Every effort moves you")
    assert len(proc.stdout.strip()) > len("Every effort moves you")
    assert "Traceback" not in proc.stderr


def test_generate_in_process_is_reproducible(tiny_run, capsys):
    base = ["generate", "--checkpoint", tiny_run, "--prompt", "The tide", "--device", "cpu"]
    base += ["--max-new-tokens", "10"]
    greedy = [run_cli(capsys, *base, "--temperature", "0") for _ in range(2)]
    seeded = [run_cli(capsys, *base, "--seed", "11", "--top-k", "5") for _ in range(2)]
    for (rc1, out1, _), (rc2, out2, _) in (greedy, seeded):
        assert rc1 == rc2 == 0
        assert out1 == out2 and out1.startswith("The tide")
    # a checkpoint directory itself works as well as the run directory
    ckpt = tiny_run / "checkpoints" / "step-00000007"
    rc, out, _ = run_cli(capsys, *base, "--temperature", "0", "--checkpoint", ckpt)
    assert rc == 0 and out == greedy[0][1]


def test_plot_redraws_from_metrics(tiny_run_copy, capsys):
    for name in ("loss-plot.pdf", "loss-plot.png"):
        (tiny_run_copy / name).unlink()
    rc, out, err = run_cli(capsys, "plot", tiny_run_copy)
    assert rc == 0, err
    check_pdf(tiny_run_copy / "loss-plot.pdf")
    check_png(tiny_run_copy / "loss-plot.png")
    assert "loss-plot.png" in out


def test_train_from_toml_with_char_tokenizer_then_generate(tmp_path, corpus_file, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        'preset = "tiny"\n'
        "[model]\nn_layers = 1\n"
        "[train]\nmax_steps = 3\neval_freq = 2\n[runtime]\ndevice = 'cpu'\n"
        f"[data]\ntokenizer = 'char'\nsource = '{corpus_file}'\n"
    )
    out_dir = tmp_path / "char-run"
    rc, out, err = run_cli(capsys, "train", "--config", config, "--out", out_dir, "--quiet")
    assert rc == 0, err
    saved = json.loads((out_dir / "config.json").read_text())
    n_chars = len(set(corpus_file.read_text()))
    assert saved["model"]["n_layers"] == 1 and saved["data"]["tokenizer"] == "char"
    assert saved["model"]["vocab_size"] == n_chars + 1  # the char vocabulary and <|endoftext|>
    assert json.loads((out_dir / "tokenizer.json").read_text())["type"] == "char"
    assert [r["step"] for r in records(out_dir) if r["event"] == "eval"] == [1, 3]
    rc, out, err = run_cli(
        capsys, "generate", "--checkpoint", out_dir, "--prompt", "The ", "--seed", "0"
    )
    assert rc == 0, err
    assert out.startswith("The ")
    # a prompt with a character the char tokenizer never saw is a user error
    rc, out, err = run_cli(capsys, "generate", "--checkpoint", out_dir, "--prompt", "Zebra€")
    assert_user_error(rc, out, err, "not in this char tokenizer")


# --------------------------------------------------------------------------- bad input: train


@pytest.fixture
def short_file(tmp_path) -> Path:
    p = tmp_path / "short.txt"
    p.write_text("Too short to fill a single window of thirty-two tokens.")
    return p


@pytest.fixture
def short_val_file(tmp_path, corpus_text) -> Path:
    """Enough training windows, but the 10% validation split is under one window."""
    p = tmp_path / "short_val.txt"
    p.write_text(corpus_text[:1000])
    return p


BAD_TRAIN = {
    "missing data": (["--data", "{tmp}/nope.txt"], ["nope.txt", "not found"]),
    "missing dir glob": (["--data", "{tmp}/none/*.txt"], ["match"]),
    "empty file": (["--data", "{empty}"], ["no text"]),
    "shorter than a window": (["--data", "{short}"], ["fewer than one context window"]),
    "val split too short": (["--data", "{short_val}"], ["validation split", "context window"]),
    "unknown preset": (["--preset", "gpt5", "--data", "{corpus}"], ["unknown preset", "gpt5"]),
    "unknown key": (["--data", "{corpus}", "--train.nope", "1"], ["train.nope"]),
    "unknown section": (["--data", "{corpus}", "--optim.lr", "1"], ["optim.lr"]),
    "negative lr": (["--data", "{corpus}", "--train.lr", "-1"], ["train.lr", "greater than 0"]),
    "heads vs emb": (["--data", "{corpus}", "--model.n_heads", "3"], ["n_heads", "divisible"]),
    "lr not a number": (["--data", "{corpus}", "--train.lr", "fast"], ["train.lr", "number"]),
    "int not a number": (["--data", "{corpus}", "--model.n_layers=two"], ["n_layers", "number"]),
    "bool not a bool": (["--data", "{corpus}", "--model.qkv_bias", "maybe"], ["qkv_bias"]),
    "max-steps not a number": (["--data", "{corpus}", "--max-steps", "abc"], ["--max-steps"]),
    "negative stride": (["--data", "{corpus}", "--data.stride", "-4"], ["data.stride"]),
    "stride beyond context": (["--data", "{corpus}", "--data.stride", "33"], ["data.stride"]),
    "unknown tokenizer": (["--data", "{corpus}", "--data.tokenizer", "wp"], ["data.tokenizer"]),
    "bad precision": (["--data", "{corpus}", "--precision", "fp8"], ["runtime.precision"]),
    "missing value": (["--data", "{corpus}", "--train.lr"], ["--train.lr", "needs a value"]),
    "stray argument": (["--data", "{corpus}", "extra"], ["'extra'"]),
    "missing config": (["--config", "{tmp}/none.toml"], ["none.toml", "not found"]),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_bad_train_input(case, tmp_path, corpus_file, short_file, short_val_file, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    paths = dict(
        tmp=tmp_path, empty=empty, short=short_file, short_val=short_val_file, corpus=corpus_file
    )
    args, words = BAD_TRAIN[case]
    args = [a.format(**paths) for a in args]
    out_dir = tmp_path / "out"
    rc, out, err = run_cli(capsys, *TRAIN, "--max-steps", "2", "--out", out_dir, *args)
    assert_user_error(rc, out, err, *words)
    assert not out_dir.exists()  # nothing written for a run that never started


@pytest.mark.parametrize(
    "toml, words",
    [
        ("[train]\nnope = 1\n", ["train.nope"]),
        ("[trian]\nlr = 1\n", ["trian"]),
        ("[model]\nn_heads = 3\n", ["divisible"]),
        ("[train]\nlr = 'fast'\n", ["train.lr", "number"]),
        ("[train]\nlr = -0.1\n", ["train.lr"]),
        ("[model]\nqkv_bias = 3\n", ["qkv_bias"]),
        ("[train\nlr = 1\n", ["not valid TOML"]),
        ("preset = 'huge'\n", ["unknown preset", "huge"]),
    ],
    ids=[
        "unknown key",
        "unknown section",
        "heads",
        "string lr",
        "negative lr",
        "int for bool",
        "syntax",
        "preset",
    ],
)
def test_bad_toml_config(toml, words, tmp_path, corpus_file, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    rc, out, err = run_cli(
        capsys, "train", "--config", config, "--data", corpus_file, "--out", tmp_path / "o"
    )
    assert_user_error(rc, out, err, *words)
    assert not (tmp_path / "o").exists()


def test_bad_input_in_a_real_process(tmp_path):
    """The console entry point itself: exit status 2 and one stderr line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "gptlab", *TRAIN, "--data", str(tmp_path / "missing.txt")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert_user_error(proc.returncode, proc.stdout, proc.stderr, "missing.txt", "not found")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("shape", ["finished run", "run without checkpoints"])
def test_out_pointing_at_existing_run_changes_nothing(tiny_run_copy, corpus_file, capsys, shape):
    if shape == "run without checkpoints":  # e.g. a run killed before its first save
        shutil.rmtree(tiny_run_copy / "checkpoints")
    before = snapshot(tiny_run_copy)
    rc, out, err = run_cli(
        capsys, *TRAIN, "--data", corpus_file, "--out", tiny_run_copy, "--max-steps", "2"
    )
    assert_user_error(rc, out, err, str(tiny_run_copy), "--resume")
    assert snapshot(tiny_run_copy) == before


def test_out_pointing_at_a_directory_with_other_files_keeps_them(tmp_path, corpus_file, capsys):
    """A directory that is not a run but holds a file gptlab would overwrite."""
    target = tmp_path / "project"
    target.mkdir()
    (target / "config.json").write_text('{"mine": true}')
    before = snapshot(target)
    rc, out, err = run_cli(capsys, *TRAIN, "--data", corpus_file, "--out", target)
    assert_user_error(rc, out, err, "config.json")
    assert snapshot(target) == before


def test_out_pointing_at_a_file_is_a_user_error(tmp_path, corpus_file, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    rc, out, err = run_cli(capsys, *TRAIN, "--data", corpus_file, "--out", target)
    assert_user_error(rc, out, err, "notes.txt", "--out")
    assert target.read_text() == "keep me"


# --------------------------------------------------------------------------- bad input: generate


def _junk_meta(d: Path) -> None:
    (d / "meta.json").write_text("{ this is not json")


def _foreign_meta(d: Path) -> None:
    (d / "meta.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))


def _no_config_meta(d: Path) -> None:
    (d / "meta.json").write_text(json.dumps({"format": "gptlab-checkpoint", "format_version": 1}))


def _bad_sections_meta(d: Path) -> None:
    meta = {"format": "gptlab-checkpoint", "format_version": 1, "config": 5, "tokenizer": "gpt2"}
    (d / "meta.json").write_text(json.dumps(meta))


def _bad_tokenizer_meta(d: Path) -> None:
    meta = {"format": "gptlab-checkpoint", "format_version": 1, "config": {}, "tokenizer": "gpt2"}
    (d / "meta.json").write_text(json.dumps(meta))


def _foreign_weights_only(d: Path) -> None:
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")


def _empty(d: Path) -> None:
    pass


BAD_CKPT_DIRS = {
    "junk meta.json": (_junk_meta, ["unreadable"]),
    "foreign meta.json": (_foreign_meta, ["not a gptlab checkpoint"]),
    "meta without config": (_no_config_meta, ["metadata"]),
    "meta config not a table": (_bad_sections_meta, ["metadata"]),
    "meta tokenizer not a table": (_bad_tokenizer_meta, ["metadata"]),
    "foreign checkpoint": (_foreign_weights_only, ["pytorch_model.bin", "convert from-hf"]),
    "empty dir": (_empty, ["no checkpoint found"]),
}


@pytest.mark.parametrize("case", list(BAD_CKPT_DIRS))
def test_generate_rejects_unusable_checkpoint_dirs(case, tmp_path, capsys):
    make, words = BAD_CKPT_DIRS[case]
    d = tmp_path / "ckpt"
    d.mkdir()
    make(d)
    rc, out, err = run_cli(capsys, "generate", "--checkpoint", d, "--device", "cpu")
    assert_user_error(rc, out, err, *words)


def test_generate_rejects_truncated_weights(tiny_run_copy, capsys):
    weights = tiny_run_copy / "checkpoints" / "step-00000007" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rc, out, err = run_cli(capsys, "generate", "--checkpoint", tiny_run_copy, "--device", "cpu")
    assert_user_error(rc, out, err, "truncated")


def test_generate_rejects_weights_of_another_shape(tiny_run_copy, capsys):
    meta_path = tiny_run_copy / "checkpoints" / "step-00000007" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["model"]["n_layers"] = 3  # the weights hold 2 blocks
    meta_path.write_text(json.dumps(meta))
    rc, out, err = run_cli(capsys, "generate", "--checkpoint", tiny_run_copy, "--device", "cpu")
    assert_user_error(rc, out, err, "do not fit")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--checkpoint", "{tmp}/missing"], ["does not exist"]),
        (["--max-new-tokens", "-1"], ["--max-new-tokens"]),
        (["--max-new-tokens", "many"], ["--max-new-tokens"]),
        (["--temperature", "-0.5"], ["--temperature"]),
        (["--prompt", ""], ["--prompt"]),
        (["--beam", "3"], ["--beam"]),
    ],
    ids=["missing dir", "negative tokens", "non-number", "negative temperature", "empty", "flag"],
)
def test_bad_generate_arguments(args, words, tiny_run, tmp_path, capsys):
    args = [a.format(tmp=tmp_path) for a in args]
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(tiny_run), *args]
    rc, out, err = run_cli(capsys, "generate", "--device", "cpu", *args)
    assert_user_error(rc, out, err, *words)


@pytest.mark.parametrize("device", ["cuda", "mps", "tpu9"])
def test_unavailable_device_is_a_user_error(device, tiny_run, capsys):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    rc, out, err = run_cli(capsys, "generate", "--checkpoint", tiny_run, "--device", device)
    assert_user_error(rc, out, err, device)


def test_plot_of_a_non_run_is_a_user_error(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "plot", tmp_path)
    assert_user_error(rc, out, err, "metrics.jsonl")


def test_the_eval_after_the_last_epoch_is_labelled_with_that_epoch(tmp_path, corpus_file, capsys):
    """The walk-through labels an evaluation with the 1-based epoch holding its step; a run
    of exactly two epochs ends with a final evaluation of epoch 2, never 'Ep 3'."""
    argv = [*TRAIN, "--data", corpus_file, "--out", tmp_path / "run", "--epochs", "2"]
    argv += ["--train.eval_freq", "1000"]  # only the first and the final evaluation
    rc, out, _ = run_cli(capsys, *argv)
    assert rc == 0
    evals = [r for r in records(tmp_path / "run") if r["event"] == "eval"]
    start = next(r for r in records(tmp_path / "run") if r["event"] == "start")
    assert evals[-1]["step"] == 2 * start["steps_per_epoch"]  # ends on the epoch boundary
    labels = [line.split(" (Step")[0] for line in out.splitlines() if line.startswith("Ep ")]
    assert labels == ["Ep 1", "Ep 2"]
