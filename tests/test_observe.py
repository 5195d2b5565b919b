"""Watching and comparing runs: plots from metrics.jsonl, `gptlab eval` (loss, perplexity,
bits per byte) checked against a direct computation, and the optional TensorBoard view."""

from __future__ import annotations

import json
import math
import random
import sys

import numpy as np
import pytest
import torch

from gptlab.cli.main import main
from gptlab.data import prepare as P
from gptlab.data.corpus import TokenWindowLoader, load_corpus
from gptlab.data.tokenizer import ENDOFTEXT, GPT2Tokenizer, token_byte_lengths
from gptlab.errors import GptlabError
from gptlab.evals.loss import calc_loss_loader
from gptlab.interop.runs import open_run
from gptlab.observe.metrics import read_metrics

T = 32  # the tiny preset's context


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs on the same text (different learning rates), trained through the CLI
    with a char tokenizer (GPT-2's 50,257-way output head would dominate the test's time)."""
    tmp = tmp_path_factory.mktemp("observe")
    mp = pytest.MonkeyPatch()
    mp.setenv("GPTLAB_CACHE", str(tmp / "cache"))
    rng = random.Random(1)
    words = "the cat sat on a mat and then it ran off into ünïcode land quickly".split()
    text = " ".join(rng.choice(words) for _ in range(3000))
    data = tmp / "story.txt"
    data.write_text(text, encoding="utf-8")
    out = []
    flags = (
        "--preset tiny --max-steps 6 --quiet --train.eval_freq 2 --train.log_every 2 "
        "--train.warmup_steps 2 --data.tokenizer char"
    ).split()
    for name, lr in (("a", "1e-3"), ("b", "3e-3")):
        run = tmp / name
        args = ["train", "--data", str(data), "--out", str(run), "--train.lr", lr, *flags]
        # the default start_context has characters this text lacks
        assert main([*args, "--train.start_context", "the cat"]) == 0
        out.append(run)
    yield tmp, data, out
    mp.undo()


def test_plots_for_runs_and_their_overlay(runs, capsys):
    tmp, _, (a, b) = runs
    assert main(["plot", str(a), str(b), "--out", str(tmp / "cmp")]) == 0
    for run in (a, b):
        for name in ("loss-plot", "lr", "throughput"):
            assert (run / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert (run / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert (tmp / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "compare.png" in capsys.readouterr().out
    # the figures read metrics.jsonl only: warmup shows in the logged learning rates
    lrs = [r["lr"] for r in read_metrics(a / "metrics.jsonl") if r["event"] == "train"]
    assert lrs[0] < max(lrs)
    assert main(["plot", str(tmp / "nowhere")]) == 2


def test_eval_matches_direct_computation(runs, capsys, monkeypatch):
    tmp, data, (a, _) = runs
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp / "cache"))
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(a),
                "--data",
                str(data),
                "--batch-size",
                "1",
                "--max-batches",
                "30",
                "--json",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    run = open_run(str(a), "cpu")
    model, tok = run.model, run.tokenizer
    tokens = np.array(tok.encode(data.read_text(encoding="utf-8")), dtype=np.int64)
    assert r["windows"] == 30 and r["tokens"] == 30 * T
    targets = tokens[1 : 30 * T + 1]
    assert r["bytes"] == len(tok.decode(targets.tolist()).encode("utf-8"))
    loader = TokenWindowLoader(tokens, 1, T, shuffle=False, drop_last=False)
    with torch.no_grad():
        ref = calc_loss_loader(loader, model, run.device, num_batches=30)
    assert r["loss"] == pytest.approx(ref, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(ref * r["tokens"] / (r["bytes"] * math.log(2)))

    # without --data: all of the run's own validation split
    assert main(["eval", "--checkpoint", str(a), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    val = load_corpus(str(data), "char", 0.9).val
    assert r["windows"] == (len(val) - 1) // T and "val split" in r["data"]


def test_gpt2_bytes_per_token():
    tok = GPT2Tokenizer()
    text = f"héllo wörld 東京 🙂{ENDOFTEXT}  spaces\n\nand more"
    ids = tok.encode(text)
    table = token_byte_lengths(tok)
    assert table.shape == (tok.n_vocab,) and table[tok.eot_token] == 0
    assert int(table[ids].sum()) == len(text.replace(ENDOFTEXT, "").encode("utf-8"))


def test_eval_on_prepared_data_needs_the_runs_tokenizer(runs, capsys):
    tmp, data, (a, _) = runs
    char_prep, gpt2_prep = tmp / "prep-char", tmp / "prep-gpt2"
    P.prepare([str(data)], char_prep, "char", val_ratio=0.0, workers=1)  # the run's chars
    args = ["eval", "--checkpoint", str(a), "--data", str(char_prep), "--split", "train"]
    assert main([*args, "--max-batches", "2", "--batch-size", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["windows"] == 6 and r["tokens"] == 6 * T and math.isfinite(r["bits_per_byte"])
    P.prepare([str(data)], gpt2_prep, "gpt2", val_ratio=0.0, workers=1)
    assert main(["eval", "--checkpoint", str(a), "--data", str(gpt2_prep)]) == 2
    assert "another tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_eval_in_half_precision_on_cpu_is_close_to_fp32(runs, capsys, precision):
    """eval's --precision is a request, not training's policy: fp16 works on a CPU too."""
    tmp, data, (a, _) = runs
    base = ["eval", "--checkpoint", str(a), "--device", "cpu", "--max-batches", "2", "--json"]
    losses = {}
    for p in ("fp32", precision):
        assert main([*base, "--precision", p]) == 0
        losses[p] = json.loads(capsys.readouterr().out)["loss"]
    # bf16 keeps 8 significant bits (eps 7.8e-3; fp16 11, 9.8e-4): the mean loss over the
    # batches' tokens stays within ~2.5 bf16 eps of fp32's, the per-token errors averaging out
    assert losses[precision] == pytest.approx(losses["fp32"], rel=0.02)


def test_tensorboard_missing_is_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    from gptlab.observe.trackers import TensorBoardWriter

    with pytest.raises(GptlabError, match=r"pip install 'gptlab\[tensorboard\]'"):
        TensorBoardWriter(tmp_path)


def test_tensorboard_events_follow_the_metrics(runs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gptlab.observe.trackers import write_run

    _, _, (a, _) = runs
    log_dir = write_run(a)
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    evals = [r for r in read_metrics(a / "metrics.jsonl") if r["event"] == "eval"]
    got = [(e.step, e.value) for e in acc.Scalars("loss/val")]
    assert [s for s, _ in got] == [r["step"] for r in evals]
    assert [v for _, v in got] == pytest.approx([r["val_loss"] for r in evals])
    assert "train/lr" in acc.Tags()["scalars"]


def test_train_streams_prepared_shards(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    docs = [f"document {i}: " + "some words here and there " * (20 + i) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    prep = tmp_path / "prep"
    P.prepare([str(tmp_path / "d.jsonl")], prep, "char", val_ratio=0.2, shard_tokens=500)
    run = tmp_path / "run"
    flags = "--preset tiny --max-steps 4 --quiet --train.start_context some".split()
    tb = ["--tensorboard"] if _has_tb() else []
    assert main(["train", "--data", str(prep), "--out", str(run), *flags, *tb]) == 0
    start = next(r for r in read_metrics(run / "metrics.jsonl") if r["event"] == "start")
    m = json.loads((prep / "manifest.json").read_text())
    assert start["train_tokens"] == m["splits"]["train"]["tokens"]
    assert start["val_tokens"] == m["splits"]["val"]["tokens"]
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["tokenizer"] == "char"  # the prepared data's, recorded with the run
    assert config["model"]["vocab_size"] == m["n_vocab"]
    if _has_tb():
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # resuming keeps streaming the same shards
    more = ["--resume", "--max-steps", "6", "--quiet"]
    assert main(["train", "--data", str(prep), "--out", str(run), *more]) == 0


def _has_tb() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_text_joined_like_prepare(tmp_path):
    """`load_corpus` on text and `prepare` agree on how documents are joined."""
    (tmp_path / "a.txt").write_text("one document")
    (tmp_path / "b.txt").write_text("another one")
    P.prepare([str(tmp_path)], tmp_path / "prep", "gpt2", val_ratio=0.0, workers=1)
    prepared = np.asarray(load_corpus(str(tmp_path / "prep"), "gpt2", 0.9).train)
    direct = GPT2Tokenizer().encode(f"one document{ENDOFTEXT}another one")
    assert prepared.tolist() == direct


def test_char_prompt_outside_vocabulary_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("abc abc abc " * 200)
    args = ["train", "--data", str(tmp_path / "t.txt"), "--data.tokenizer", "char"]
    assert main([*args, "--preset", "tiny", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "train.start_context" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_prepared_data_without_validation_is_refused(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("one long document " * 300)
    P.prepare([str(tmp_path / "a.txt")], tmp_path / "prep", "gpt2", val_ratio=0.0, workers=1)
    args = ["train", "--data", str(tmp_path / "prep"), "--preset", "tiny", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    assert "--val-ratio" in capsys.readouterr().err
