"""Trained byte-level BPE tokenizers: exact round trips, identity, use by prepare and train."""

from __future__ import annotations

import json

import pytest

from gptlab.cli.main import main
from gptlab.data.bpe import train_bpe
from gptlab.data.tokenizer import ENDOFTEXT, BPETokenizer, from_identity, get_tokenizer
from gptlab.errors import GptlabError

TRAIN_TEXT = [
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "Der schnelle braune Fuchs springt über den faulen Hund. Ça va? Très bien!",
    "def f(x):\n    return x ** 2  # squares\n\n\n",
] * 20

HARD = [
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\r\nwindows lines\n\n\n\nand runs      of spaces",
    "unicode: café naïve 東京タワー 🙂🚀 Ελληνικά ﬁ",
    "never seen bytes: ☃ ⛄ \u200b zero width, \x00 nul, \x7f del",
    f"two docs{ENDOFTEXT}joined{ENDOFTEXT}",
    f"{ENDOFTEXT}{ENDOFTEXT}",
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TRAIN_TEXT, 400)


@pytest.mark.parametrize("text", HARD)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.n_vocab for i in ids)


def test_special_token_and_identity(tok, tmp_path):
    assert tok.encode(ENDOFTEXT) == [tok.eot_token]
    assert 300 < tok.n_vocab <= 400  # fewer when the text has no more pairs to merge
    assert len(tok.encode("it was the best of times")) < len("it was the best of times") / 2
    with pytest.raises(GptlabError, match="not an allowed special token"):
        tok.encode(f"a{ENDOFTEXT}b", allowed_special=set())
    # the identity is self-contained JSON and rebuilds the same tokenizer
    ident = json.loads(json.dumps(tok.identity()))
    again = from_identity(ident)
    text = HARD[4] + HARD[6]
    assert again.encode(text) == tok.encode(text) and again.identity() == tok.identity()
    tok.save(tmp_path / "t")
    assert get_tokenizer(str(tmp_path / "t")).identity() == tok.identity()
    assert get_tokenizer(str(tmp_path / "t" / "tokenizer.json")).n_vocab == tok.n_vocab
    # bytes per token add up to the text's UTF-8 bytes (specials count nothing)
    ids = tok.encode(HARD[4] + ENDOFTEXT + HARD[3])
    assert sum(tok.token_bytes(i) for i in ids) == len((HARD[4] + HARD[3]).encode())


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(GptlabError, match="not found"):
        BPETokenizer.from_file(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(GptlabError, match="not a valid tokenizer.json"):
        BPETokenizer.from_file(tmp_path)
    with pytest.raises(GptlabError, match="too small"):
        train_bpe(["x"], 100)


def test_cli_trains_tokenizer_used_by_prepare_train_generate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t * 3}) for t in TRAIN_TEXT), encoding="utf-8")
    tok_dir, prep, run = tmp_path / "tok", tmp_path / "prep", tmp_path / "run"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--data",
                str(data),
                "--vocab-size",
                "300",
                "--out",
                str(tok_dir),
            ]
        )
        == 0
    )
    assert (tok_dir / "tokenizer.json").is_file()
    assert (
        main(
            [
                "prepare",
                str(data),
                "--out",
                str(prep),
                "--tokenizer",
                str(tok_dir),
                "--val-ratio",
                "0.2",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(prep),
                "--preset",
                "tiny",
                "--max-steps",
                "3",
                "--out",
                str(run),
                "--quiet",
                "--train.eval_freq",
                "2",
            ]
        )
        == 0
    )
    config = json.loads((run / "config.json").read_text())
    n_vocab = BPETokenizer.from_file(tok_dir).n_vocab
    assert config["model"]["vocab_size"] == n_vocab <= 300  # sized by the trained tokenizer
    assert json.loads((run / "tokenizer.json").read_text())["type"] == "bpe"
    capsys.readouterr()
    # generation rebuilds the tokenizer from the run, even with the file gone
    (tok_dir / "tokenizer.json").unlink()
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(run),
                "--prompt",
                "It was",
                "--seed",
                "1",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("It was")
