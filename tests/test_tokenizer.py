"""Tokenizers: exact GPT-2 ids offline, round trips, the char tokenizer, and tiktoken
Encodings accepted wherever gptlab takes a tokenizer."""

from __future__ import annotations

import pytest
import torch

from gptlab import CharTokenizer, GPT2Tokenizer, get_tokenizer, text_to_token_ids, token_ids_to_text
from gptlab.data.tokenizer import ENDOFTEXT, eot_id, from_identity, gpt2_encoding
from gptlab.errors import GptlabError

GPT2_IDS = [
    ("Hello, world", [15496, 11, 995]),
    ("Every effort moves you", [6109, 3626, 6100, 345]),
    (ENDOFTEXT, [50256]),
]


@pytest.fixture(params=["gptlab", "tiktoken"])
def gpt2(request):
    """GPT-2's BPE as gptlab's tokenizer and as the raw tiktoken Encoding."""
    return GPT2Tokenizer() if request.param == "gptlab" else gpt2_encoding()


@pytest.mark.parametrize("text, ids", GPT2_IDS)
def test_gpt2_exact_ids(gpt2, text, ids):
    assert gpt2.encode(text, allowed_special={ENDOFTEXT}) == ids
    assert gpt2.decode(ids) == text


def test_gpt2_vocabulary_and_eot():
    tok = GPT2Tokenizer()
    assert tok.n_vocab == 50257
    assert tok.eot_token == 50256 == eot_id(tok) == eot_id(gpt2_encoding())


def test_gpt2_round_trip_of_mixed_text(gpt2, corpus_text):
    text = corpus_text[:600] + ENDOFTEXT + " naïve café — ünïcode ✓\n\ttabs"
    ids = gpt2.encode(text, allowed_special={ENDOFTEXT})
    assert ids.count(50256) == 1
    assert gpt2.decode(ids) == text


def test_gpt2_endoftext_is_refused_unless_allowed():
    # The walk-through passes allowed_special explicitly; without it tiktoken refuses, and
    # gptlab's wrapper must behave the same when asked to allow nothing.
    with pytest.raises(ValueError):
        GPT2Tokenizer().encode(ENDOFTEXT, allowed_special=set())


def test_text_to_token_ids_accepts_tiktoken_and_gptlab(gpt2):
    ids = text_to_token_ids("Every effort moves you", gpt2)
    assert ids.shape == (1, 4) and ids.dtype == torch.long
    assert ids.tolist() == [[6109, 3626, 6100, 345]]
    assert token_ids_to_text(ids, gpt2) == "Every effort moves you"


def test_char_round_trip_and_ids(corpus_text):
    tok = CharTokenizer.from_text(corpus_text)
    chars = sorted(set(corpus_text))
    assert tok.n_vocab == len(chars) + 1
    assert tok.eot_token == len(chars)
    sample = corpus_text[:300]
    ids = tok.encode(sample)
    assert len(ids) == len(sample)
    assert ids[:3] == [chars.index(c) for c in sample[:3]]
    assert tok.decode(ids) == sample
    joined = "abc" + ENDOFTEXT + "cab"
    tok2 = CharTokenizer.from_text("abc")
    assert tok2.encode(joined) == [0, 1, 2, 3, 2, 0, 1]
    assert tok2.decode(tok2.encode(joined)) == joined


def test_char_unknown_character_is_a_clear_error():
    tok = CharTokenizer.from_text("hello world")
    with pytest.raises(GptlabError, match="'Z'"):
        tok.encode("hello Zebra")


def test_tokenizer_identity_round_trip(corpus_text):
    char = CharTokenizer.from_text(corpus_text)
    again = from_identity(char.identity())
    assert again.chars == char.chars and again.n_vocab == char.n_vocab
    assert again.encode(corpus_text[:100]) == char.encode(corpus_text[:100])
    assert isinstance(from_identity(GPT2Tokenizer().identity()), GPT2Tokenizer)
    with pytest.raises(GptlabError, match="tokenizer"):
        from_identity({"type": "sentencepiece"})


def test_get_tokenizer_names():
    assert isinstance(get_tokenizer("gpt2"), GPT2Tokenizer)
    assert isinstance(get_tokenizer("char", text="xyz"), CharTokenizer)
    with pytest.raises(GptlabError, match="unknown tokenizer"):
        get_tokenizer("wordpiece")
