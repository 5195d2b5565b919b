"""Downstream tasks by log-likelihood (gptlab.tasks): the scoring core against a plain
reference, batched against one at a time, lm-eval's tokenisation, the task formats, suites
and the centred score, bad input, and a model overfit on a sentence choosing it."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import jitter

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.model import GPTModel
from gptlab.tasks import Score, encode_pair, score_requests

T = 16


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97, context_length=T, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )
    return jitter(GPTModel(cfg), 0.2).eval()


def _plain_score(model, context, continuation, eot=96) -> Score:
    """The log-likelihood written out: one sequence, left-cut to T inputs, one position at
    a time."""
    whole = (list(context) or [eot]) + list(continuation)
    x = whole[-(T + 1) :][:-1]
    logits = model(torch.tensor([x]))[0]  # (len(x), V)
    total, greedy = 0.0, True
    for j, tok in enumerate(continuation):
        pos = len(x) - len(continuation) + j
        logp = torch.log_softmax(logits[pos].double(), dim=-1)
        total += logp[tok].item()
        greedy &= int(logits[pos].argmax()) == tok
    return Score(total, greedy, len(continuation), len(whole) - 1 > T)


def _random_requests(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        ctx = [rng.randrange(96) for _ in range(rng.randint(0, 24))]
        cont = [rng.randrange(96) for _ in range(rng.randint(1, 5))]
        reqs.append((ctx, cont))
    reqs.append((reqs[0][0], reqs[0][1][:1]))  # one-token choices of one context share a row
    reqs.append((reqs[0][0], [(reqs[0][1][0] + 1) % 96]))
    return reqs


def test_score_matches_the_plain_computation(model):
    reqs = _random_requests(12)
    got = score_requests(model, reqs, context_length=T, batch_size=4, eot_id=96)
    for (ctx, cont), s in zip(reqs, got, strict=True):
        ref = _plain_score(model, ctx, cont)
        assert s.logprob == pytest.approx(ref.logprob, abs=1e-4)
        assert (s.greedy, s.n_tokens, s.truncated) == (ref.greedy, ref.n_tokens, ref.truncated)
    assert any(s.truncated for s in got) and not all(s.truncated for s in got)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_equals_one_at_a_time(model, batch_size):
    reqs = _random_requests(20, seed=1)
    alone = [score_requests(model, [r], context_length=T, eot_id=96)[0] for r in reqs]
    batched = score_requests(model, reqs, context_length=T, batch_size=batch_size, eot_id=96)
    for a, b in zip(alone, batched, strict=True):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-5)
        assert (a.greedy, a.n_tokens, a.truncated) == (b.greedy, b.n_tokens, b.truncated)


def test_greedy_is_true_when_the_continuation_is_the_argmax(model):
    ctx = [5, 6, 7]
    conts = []
    seq = list(ctx)
    for _ in range(3):  # greedy decoding, three tokens
        nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
        conts.append(nxt)
        seq.append(nxt)
    s_greedy, s_other = score_requests(
        model, [(ctx, conts), (ctx, conts[:2] + [(conts[2] + 1) % 97])], context_length=T
    )
    assert s_greedy.greedy and not s_other.greedy


def test_empty_context_needs_eot_and_continuation_must_fit(model):
    with pytest.raises(GptlabError, match="eot_id"):
        score_requests(model, [([], [1])], context_length=T)
    with pytest.raises(GptlabError, match="does not fit"):
        score_requests(model, [([1], list(range(T + 1)))], context_length=T)
    s = score_requests(model, [([], [3])], context_length=T, eot_id=96)[0]
    assert s.logprob == pytest.approx(_plain_score(model, [96], [3]).logprob, abs=1e-5)


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole():
    from gptlab.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    ctx, cont = encode_pair(tok, "The cat sat on the ", "mat")
    assert ctx == tok.encode("The cat sat on the")
    assert cont == tok.encode(" mat")  # the space belongs to the continuation
    ctx, cont = encode_pair(tok, "Question: 2+2\nAnswer:", " four")
    assert ctx + cont == tok.encode("Question: 2+2\nAnswer: four")
    assert encode_pair(tok, "", "Hello") == ([tok.eot_token], tok.encode("Hello"))
