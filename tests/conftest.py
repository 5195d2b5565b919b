"""Shared fixtures: a tiny text corpus, a private cache directory, tiny model configs and one
tiny trained run (made once per session through the CLI, then copied by tests that change it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from gptlab.config.schema import ModelConfig

# Written for these tests: varied enough that BPE and char vocabularies are non-trivial,
# long enough (~2,400 GPT-2 tokens) for the `tiny` preset's 32-token windows in both splits.
_SENTENCES = [
    "The lighthouse keeper counted the ships that passed before dawn.",
    "Every effort moves you a little closer to the harbour, she said.",
    "Rain fell on the slate roofs, and the gulls went quiet for an hour.",
    "A clerk in the counting house wrote numbers into a green ledger.",
    "When the tide turned, the small boats drifted back toward the pier.",
    "Nobody remembered who had painted the door of the chapel bright red.",
    "The baker's apprentice hummed while the ovens warmed in the dark.",
    "Letters arrived on Thursdays, tied with string and smelling of salt.",
]


def jitter(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Add scale x N(0, 1) to every parameter, in place, and return the model: random enough
    that a wrongly copied weight or a wrong mask shows (at 0.2-0.3: confident, varied greedy
    choices). A GPTModel's padded vocabulary rows stay zero, as the model keeps them."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
        cfg = getattr(model, "cfg", None)
        if isinstance(cfg, ModelConfig) and cfg.padded_vocab_size != cfg.vocab_size:
            model.tok_emb.weight[cfg.vocab_size :].zero_()
            model.out_head.weight[cfg.vocab_size :].zero_()
    return model


def make_corpus_text(n_paragraphs: int = 30) -> str:
    """Deterministic paragraphs built from the sentences above, in rotating order."""
    paragraphs = []
    for p in range(n_paragraphs):
        k = len(_SENTENCES)
        picked = [_SENTENCES[(p * 3 + i) % k] for i in range(4)]
        paragraphs.append(f"Chapter {p + 1}.\n" + " ".join(picked))
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture(scope="session", autouse=True)
def gptlab_cache(tmp_path_factory) -> Path:
    """Point GPTLAB_CACHE at a session temp dir so tests never write to ~/.cache, and run
    torch on one thread (the models are tiny; more threads only contend on a shared machine),
    or on the count OMP_NUM_THREADS gives (`OMP_NUM_THREADS=2 make test` runs the suite on
    two: sums split over threads round differently, and the tolerances must hold there too).
    OMP_NUM_THREADS says so to the commands the tests run in-process too: without it their
    thread policy follows what else is running, so two runs a test compares bit for bit (an
    uninterrupted one and a resumed one) could differ in threads, and so in rounding.

    Session-wide (not per test) so the CPU matmul peak that the trainer measures once per
    machine, thread count and dtype is measured once per test session, not once per test.
    """
    path = tmp_path_factory.mktemp("gptlab-cache")
    old = os.environ.get("GPTLAB_CACHE")
    old_threads = torch.get_num_threads()
    old_omp = os.environ.get("OMP_NUM_THREADS")
    asked = old_omp.strip() if old_omp else ""
    threads = int(asked) if asked.isdigit() and int(asked) > 0 else 1
    os.environ["GPTLAB_CACHE"] = str(path)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    yield path
    torch.set_num_threads(old_threads)
    if old_omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old_omp
    if old is None:
        os.environ.pop("GPTLAB_CACHE", None)
    else:
        os.environ["GPTLAB_CACHE"] = old


@pytest.fixture(autouse=True)
def anchor_speed(monkeypatch):
    """Corpus sizing measures this machine's training speed at start-up
    (gptlab.train.resolve.measure_speed); tests get the anchor row's figure instead, so that
    what the rule chooses does not depend on how fast, or how busy, the machine running the
    tests is. tests/test_sizing.py measures for real."""
    from gptlab.recipes import sizing
    from gptlab.train import resolve

    monkeypatch.setattr(resolve, "measure_speed", lambda cfg, steps=3: sizing.ANCHOR_TOKENS_PER_S)


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return make_corpus_text()


@pytest.fixture
def corpus_file(tmp_path, corpus_text) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    """A model that runs a forward pass in about a millisecond."""
    return ModelConfig(
        vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )


TINY_WALKTHROUGH_DICT = {
    "vocab_size": 101,
    "context_length": 12,
    "emb_dim": 24,
    "n_heads": 3,
    "n_layers": 2,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


@pytest.fixture
def walkthrough_cfg() -> dict:
    """A small config dict in the walk-through's format (same keys as GPT_CONFIG_124M)."""
    return dict(TINY_WALKTHROUGH_DICT)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, gptlab_cache) -> Path:
    """A finished `gptlab train --preset tiny` run directory (do not modify: copy it)."""
    from gptlab.cli import main as cli

    root = tmp_path_factory.mktemp("tiny-run")
    data = root / "corpus.txt"
    data.write_text(make_corpus_text(), encoding="utf-8")
    out = root / "run"
    rc = cli.main(
        [
            "train",
            "--preset",
            "tiny",
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-steps",
            "7",
            "--train.eval_freq",
            "3",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert rc == 0
    return out


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run that a test may change."""
    dest = tmp_path / "run"
    shutil.copytree(tiny_run, dest, symlinks=True)
    return dest
