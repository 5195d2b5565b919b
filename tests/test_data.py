"""Sliding windows (the walk-through's dataset and the trainer's loader) against direct
slices of the token ids; corpus reading, joining, splitting and caching."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from gptlab import TokenWindowLoader, create_dataloader, create_dataloader_v1, load_corpus
from gptlab.config.schema import RunConfig
from gptlab.data.corpus import read_documents
from gptlab.data.tokenizer import ENDOFTEXT, GPT2Tokenizer, gpt2_encoding
from gptlab.errors import GptlabError

WINDOW_CASES = [(4, 1), (4, 4), (8, 3), (5, 7), (16, 16)]  # (max_length, stride)


def expected_windows(ids: list[int], max_length: int, stride: int):
    """The walk-through's windows, computed directly: starts range(0, n - max_length, stride)."""
    starts = range(0, len(ids) - max_length, stride)
    inputs = [ids[s : s + max_length] for s in starts]
    targets = [ids[s + 1 : s + max_length + 1] for s in starts]
    return inputs, targets


def collect(loader) -> tuple[list[list[int]], list[list[int]]]:
    xs, ys = [], []
    for x, y in loader:
        assert x.dtype == torch.long and y.dtype == torch.long
        assert x.shape == y.shape
        xs += x.tolist()
        ys += y.tolist()
    return xs, ys


@pytest.fixture(scope="module")
def short_text(corpus_text) -> str:
    return corpus_text[:400]


@pytest.mark.parametrize("max_length, stride", WINDOW_CASES)
@pytest.mark.parametrize("make", [create_dataloader, create_dataloader_v1])
def test_create_dataloader_windows_equal_direct_slices(short_text, make, max_length, stride):
    ids = gpt2_encoding().encode(short_text, allowed_special={ENDOFTEXT})
    loader = make(
        short_text,
        batch_size=3,
        max_length=max_length,
        stride=stride,
        shuffle=False,
        drop_last=False,
        num_workers=0,
    )
    want_x, want_y = expected_windows(ids, max_length, stride)
    assert len(want_x) > 3
    got_x, got_y = collect(loader)
    assert got_x == want_x
    assert got_y == want_y


def test_create_dataloader_walkthrough_call_shapes(corpus_text):
    """The walk-through's positional call, drop_last and shuffle defaults."""
    loader = create_dataloader_v1(corpus_text, 2, 8, 8, True, True, 0)
    ids = gpt2_encoding().encode(corpus_text, allowed_special={ENDOFTEXT})
    n_windows = len(range(0, len(ids) - 8, 8))
    assert len(loader) == n_windows // 2
    batches = list(loader)
    assert all(x.shape == (2, 8) and y.shape == (2, 8) for x, y in batches)
    # shuffled: each window at most once (as a multiset: the corpus repeats sentences)
    rows = Counter(tuple(row) for x, _ in batches for row in x.tolist())
    windows = Counter(tuple(w) for w in expected_windows(ids, 8, 8)[0])
    assert sum(rows.values()) == len(loader) * 2
    assert not rows - windows


@pytest.mark.parametrize(
    "tokenizer", [gpt2_encoding(), GPT2Tokenizer()], ids=["tiktoken", "gptlab"]
)
def test_create_dataloader_accepts_tokenizers(short_text, tokenizer):
    loader = create_dataloader(
        short_text, batch_size=2, max_length=6, stride=6, shuffle=False, tokenizer=tokenizer
    )
    x, y = next(iter(loader))
    ids = gpt2_encoding().encode(short_text)
    assert x.tolist() == [ids[0:6], ids[6:12]]
    assert y.tolist() == [ids[1:7], ids[7:13]]


@pytest.mark.parametrize("max_length, stride", [(8, 0), (0, 4), (8, -1), (-2, 4)])
def test_create_dataloader_rejects_non_positive(short_text, max_length, stride):
    with pytest.raises(GptlabError, match="positive"):
        create_dataloader(short_text, max_length=max_length, stride=stride)


@pytest.mark.parametrize("max_length, stride", WINDOW_CASES)
def test_token_window_loader_cuts_the_same_windows(short_text, max_length, stride):
    ids = gpt2_encoding().encode(short_text)
    tokens = np.asarray(ids, dtype=np.uint16)
    loader = TokenWindowLoader(tokens, 3, max_length, stride, shuffle=False, drop_last=False)
    want_x, want_y = expected_windows(ids, max_length, stride)
    assert loader.num_windows == len(want_x)
    got_x, got_y = collect(loader)
    assert got_x == want_x and got_y == want_y


def test_token_window_loader_shuffle_is_a_seeded_permutation(short_text):
    ids = gpt2_encoding().encode(short_text)
    tokens = np.asarray(ids, dtype=np.uint16)
    loader = TokenWindowLoader(tokens, 2, 4, 2, shuffle=True, seed=5)
    want = sorted(tuple(w) for w in expected_windows(ids, 4, 2)[0])
    n_full = len(loader) * 2  # drop_last: a final partial batch is left out

    def epoch_rows(ld, epoch):
        return [tuple(r) for i in range(len(ld)) for r in ld.batch(epoch, i)[0].tolist()]

    e0, e1 = epoch_rows(loader, 0), epoch_rows(loader, 1)
    assert len(e0) == n_full and not Counter(e0) - Counter(want)
    assert e0 != e1  # each epoch has its own order
    again = TokenWindowLoader(tokens, 2, 4, 2, shuffle=True, seed=5)
    assert epoch_rows(again, 1) == e1  # ... fixed by (seed, epoch)
    # iterating the loader yields epoch 0
    assert [tuple(r) for x, _ in loader for r in x.tolist()] == e0


def test_token_window_loader_stride_none_means_context_length():
    tokens = np.arange(50, dtype=np.uint16)
    loader = TokenWindowLoader(tokens, 1, 8, None, shuffle=False)
    assert loader.starts.tolist() == list(range(0, 42, 8))


def test_cli_config_stride_zero_means_context_length(tiny_run):
    """In the CLI config, data.stride 0 is the documented 'no overlap' default."""
    cfg = RunConfig()
    cfg.data.stride = 0
    cfg.validate()  # accepted
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    saved = json.loads((tiny_run / "config.json").read_text())
    assert saved["data"]["stride"] == 0
    T, B = saved["model"]["context_length"], saved["train"]["batch_size"]
    windows = len(range(0, start["train_tokens"] - T, T))
    assert start["steps_per_epoch"] == windows // B


@pytest.mark.parametrize("stride", [-1, 10_000])
def test_cli_config_rejects_bad_stride(stride):
    cfg = RunConfig()
    cfg.data.stride = stride
    with pytest.raises(GptlabError, match="data.stride"):
        cfg.validate()


# --------------------------------------------------------------------------- corpus


def test_load_corpus_joins_documents_and_splits(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("First document here.")
    (d / "sub" / "b.md").write_text("Second one, in markdown.")
    (d / "ignored.csv").write_text("x,y")
    (d / "empty.txt").write_text("   \n")
    enc = gpt2_encoding()
    want = enc.encode(
        "First document here." + ENDOFTEXT + "Second one, in markdown.",
        allowed_special={ENDOFTEXT},
    )
    for source in (str(d), str(d / "**" / "*[td]")):  # a.txt, empty.txt, sub/b.md
        corpus = load_corpus(source, "gpt2", 0.5)
        got = np.concatenate([corpus.train, corpus.val]).tolist()
        assert got == want
        assert len(corpus.train) == int(0.5 * len(want))
    assert read_documents(str(d / "a.txt")) == ["First document here."]


def test_load_corpus_uses_and_survives_the_cache(tmp_path, gptlab_cache):
    f = tmp_path / "t.txt"
    f.write_text("Cache me if you can. " * 20)
    first = load_corpus(str(f), "gpt2", 0.9)
    cached = list((gptlab_cache / "tokens").glob("*.npy"))
    assert cached
    second = load_corpus(str(f), "gpt2", 0.9)
    assert second.fingerprint == first.fingerprint
    assert np.array_equal(second.train, first.train)
    # a damaged cache entry is rebuilt, not trusted
    for p in cached:
        p.write_bytes(b"garbage")
    third = load_corpus(str(f), "gpt2", 0.9)
    assert np.array_equal(third.train, first.train)
    # different text, different fingerprint
    f.write_text("Something else entirely. " * 20)
    assert load_corpus(str(f), "gpt2", 0.9).fingerprint != first.fingerprint


def test_builtin_shakespeare_is_plain_text():
    docs = read_documents("shakespeare")
    assert len(docs) >= 30
    sample = docs[0][:5000]
    assert "**" not in sample and "\\" not in sample
    assert sum(len(d) for d in docs) > 1_000_000


@pytest.mark.parametrize(
    "setup, words",
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_text(""), "no text"),
        (lambda p: p.write_bytes(b"\xff\xfe\x00bad"), "UTF-8"),
    ],
    ids=["missing", "empty", "binary"],
)
def test_read_documents_errors(tmp_path, setup, words):
    p = tmp_path / "data.txt"
    setup(p)
    with pytest.raises(GptlabError, match=words):
        read_documents(str(p))
