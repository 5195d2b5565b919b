"""data.tokenizer = "bpe:N": a byte-level BPE trained on the run's own training text at load,
cached, recorded in the run like any trained BPE, and never fitted on the validation text."""

from __future__ import annotations

import json
import random
import shutil
import string

import numpy as np
import pytest
from conftest import make_corpus_text
from test_cli import assert_user_error, run_cli

from gptlab.config.schema import RunConfig, cache_dir
from gptlab.data import corpus as data_lib
from gptlab.data.bpe import train_bpe
from gptlab.data.corpus import load_corpus, open_corpus
from gptlab.data.tokenizer import ENDOFTEXT
from gptlab.recipes.presets import preset

N = 300
# A pair of words that appears only in the last tenth of the text: a BPE fitted on the
# whole text would learn merges for it, one fitted on the training part cannot.
VAL_ONLY = "Quokkazyx wibblequ. "


def write_text(path, train_ratio: float = 0.9) -> str:
    head = make_corpus_text(60)
    tail = VAL_ONLY * 40
    # the tail is inside the validation part whichever way the text is cut
    assert len(tail) < (1 - train_ratio) * (len(head) + len(tail))
    text = head + tail
    path.write_text(text, encoding="utf-8")
    return text


@pytest.fixture
def bpe_text(tmp_path):
    path = tmp_path / "corpus.txt"
    return path, write_text(path)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A cache of this test's own, so every test trains its tokenizer itself."""
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def forbid_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(data_lib, "train_bpe", fail)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", ["bpe:abc", "bpe:10", "bpe:", "bpe:-300", "bpe:257"])
def test_bad_sizes_are_one_line_exit_2(name, capsys):
    rc, out, err = run_cli(capsys, "config", "--data.tokenizer", name)
    assert_user_error(rc, out, err, name, "258")


def test_smallest_size_is_accepted():
    cfg = preset("tiny")
    cfg.data.tokenizer = "bpe:258"
    cfg.validate()


def test_prepare_refuses_with_one_line(tmp_path, bpe_text, capsys):
    path, _ = bpe_text
    rc, out, err = run_cli(
        capsys, "prepare", path, "--out", tmp_path / "prep", "--tokenizer", f"bpe:{N}", "--quiet"
    )
    assert_user_error(rc, out, err, "gptlab tokenizer train")
    assert not (tmp_path / "prep" / "manifest.json").exists()


# --------------------------------------------------------------------------- the tokenizer


def test_trained_on_the_training_characters_only(bpe_text, fresh_cache):
    path, text = bpe_text
    corpus = load_corpus(str(path), f"bpe:{N}", 0.9, split="chars")
    cut = int(0.9 * len(text))
    # the same tokenizer as one trained by hand on the training characters...
    expected = train_bpe(text[:cut].split(ENDOFTEXT), N)
    assert corpus.tokenizer.identity() == expected.identity()
    assert corpus.tokenizer.n_vocab == N
    # ...and not the one the whole text would give (the validation-only words merge there)
    whole = train_bpe([text], N)
    assert whole.identity() != expected.identity()
    assert len(whole.encode(VAL_ONLY)) < len(expected.encode(VAL_ONLY))
    # the splits are the text's two parts, exactly
    assert corpus.tokenizer.decode(corpus.train.tolist()) == text[:cut]
    assert corpus.tokenizer.decode(corpus.val.tolist()) == text[cut:]


def test_cached_by_text_and_size(bpe_text, fresh_cache, monkeypatch):
    path, text = bpe_text
    first = load_corpus(str(path), f"bpe:{N}", 0.9)
    files = list((cache_dir() / "bpe").glob("*.json"))
    assert len(files) == 1 and not list((cache_dir() / "bpe").glob("*.tmp"))
    forbid_training(monkeypatch)
    again = load_corpus(str(path), f"bpe:{N}", 0.9, split="chars")
    assert again.tokenizer.identity() == first.tokenizer.identity()
    # another size or other training text is another tokenizer: it trains (and fails here)
    with pytest.raises(AssertionError, match="trained again"):
        load_corpus(str(path), f"bpe:{N + 1}", 0.9)
    with pytest.raises(AssertionError, match="trained again"):
        load_corpus(str(path), f"bpe:{N}", 0.8)


def test_a_damaged_cache_entry_is_trained_again(bpe_text, fresh_cache):
    path, _ = bpe_text
    first = load_corpus(str(path), f"bpe:{N}", 0.9)
    (entry,) = (cache_dir() / "bpe").glob("*.json")
    entry.write_text("{not json", encoding="utf-8")
    again = load_corpus(str(path), f"bpe:{N}", 0.9)
    assert again.tokenizer.identity() == first.tokenizer.identity()
    assert json.loads(entry.read_text(encoding="utf-8"))  # repaired


def test_token_split_keeps_the_training_text_out_of_validation(tmp_path, fresh_cache):
    path = tmp_path / "corpus.txt"
    # Training text that compresses badly (random letters) before validation text that
    # compresses well (a phrase the BPE learned): the plain cut at `ratio` of the tokens
    # would fall inside the training characters, so validation would score text the
    # tokenizer was fitted on.
    rng = random.Random(0)
    noise = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(2000))
    text = noise + VAL_ONLY * 110
    path.write_text(text, encoding="utf-8")
    ratio = 0.52
    corpus = load_corpus(str(path), f"bpe:{N}", ratio)
    tok = corpus.tokenizer
    cut = int(ratio * len(text))
    tokens = np.concatenate([corpus.train, corpus.val])
    plain = int(ratio * len(tokens))
    assert len(corpus.train) > plain  # the guard moved the cut later
    val_text = tok.decode(corpus.val.tolist())
    assert text.endswith(val_text) and len(val_text) <= len(text) - cut
    assert tok.decode(tokens.tolist()) == text
    # one token earlier would have started inside the training characters
    assert len(tok.decode(tokens[len(corpus.train) - 1 :].tolist())) > len(text) - cut


def test_token_split_is_the_plain_one_when_it_already_holds(bpe_text, fresh_cache):
    path, text = bpe_text
    corpus = load_corpus(str(path), f"bpe:{N}", 0.9)
    n = len(corpus.train) + len(corpus.val)
    assert len(corpus.train) == int(0.9 * n)
    val_text = corpus.tokenizer.decode(corpus.val.tolist())
    assert len(val_text) <= len(text) - int(0.9 * len(text))


def test_open_corpus_sizes_the_vocabulary(bpe_text, fresh_cache):
    path, _ = bpe_text
    cfg = RunConfig()
    cfg.data.source, cfg.data.tokenizer = str(path), f"bpe:{N}"
    cfg, corpus = open_corpus(cfg)
    assert cfg.model.vocab_size == corpus.tokenizer.n_vocab == N
    assert cfg.data.tokenizer == f"bpe:{N}"  # the name stays; the run records the tokenizer


# --------------------------------------------------------------------------- a run


def train_flags(path, out, steps: int) -> list:
    return [
        "train",
        "--data",
        path,
        "--preset",
        "tiny",
        "--out",
        out,
        "--max-steps",
        steps,
        "--data.tokenizer",
        f"bpe:{N}",
        "--device",
        "cpu",
        "--compile",
        "off",
        "--precision",
        "fp32",
        "--train.checkpoint_every",
        "4",
        "--train.sample_tokens",
        "4",
        "--quiet",
    ]


def test_a_run_generates_evaluates_and_resumes_with_its_tokenizer(
    tmp_path, bpe_text, fresh_cache, monkeypatch, capsys
):
    path, _ = bpe_text
    run = tmp_path / "run"
    rc, out, err = run_cli(capsys, *train_flags(path, run, 4))
    assert rc == 0, err
    recorded = json.loads((run / "tokenizer.json").read_text())
    assert recorded["type"] == "bpe"
    assert json.loads((run / "config.json").read_text())["data"]["tokenizer"] == f"bpe:{N}"
    # generate and eval rebuild the tokenizer from the run: no training, no cache
    shutil.rmtree(fresh_cache)
    forbid_training(monkeypatch)
    rc, out, err = run_cli(
        capsys, "generate", "--checkpoint", run, "--prompt", "The lighthouse", "--device", "cpu"
    )
    assert rc == 0, err
    assert out.startswith("The lighthouse") and len(out.strip()) > len("The lighthouse")
    rc, out, err = run_cli(capsys, "eval", "--checkpoint", run, "--device", "cpu", "--json")
    assert rc == 0, err
    assert json.loads(out)["bits_per_byte"] > 0
    # resume continues with the recorded tokenizer, though the cache is gone
    rc, out, err = run_cli(capsys, *train_flags(path, run, 6), "--resume")
    assert rc == 0, err
    assert json.loads((run / "tokenizer.json").read_text()) == recorded
    # other text under the same name is refused: the data fingerprint differs
    other = tmp_path / "other.txt"
    other.write_text(make_corpus_text(40), encoding="utf-8")
    rc, out, err = run_cli(capsys, *train_flags(other, run, 8), "--resume")
    assert_user_error(rc, out, err, "training text differs")
