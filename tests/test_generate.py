"""Greedy decoding, seeded sampling, end-of-text stopping."""

from __future__ import annotations

import pytest
import torch

from gptlab import GPTModel, generate, generate_text_simple
from gptlab.data.tokenizer import CharTokenizer
from gptlab.infer.engine import Engine, Sampling
from gptlab.infer.sampling import sample_next


@pytest.fixture
def model(tiny_model_cfg) -> GPTModel:
    torch.manual_seed(321)
    return GPTModel(tiny_model_cfg).eval()


@pytest.fixture
def prompt() -> torch.Tensor:
    return torch.tensor([[5, 17, 42], [8, 8, 1]])  # (B=2, T=3)


def test_greedy_is_argmax_of_each_step_and_deterministic(model, prompt):
    out = generate_text_simple(model, prompt, max_new_tokens=12, context_size=16)
    assert out.shape == (2, 15)
    assert torch.equal(out[:, :3], prompt)
    assert torch.equal(out, generate_text_simple(model, prompt, 12, 16))
    # every appended token is the argmax of the model's last-position logits at that point
    with torch.no_grad():
        for t in range(3, 15):
            want = model(out[:, max(0, t - 16) : t])[:, -1].argmax(-1)
            assert torch.equal(out[:, t], want)
    # generate() at temperature 0 is the same greedy decoder
    assert torch.equal(generate(model, prompt, 12, temperature=0.0), out)


def test_the_engine_decodes_greedy_as_the_walkthrough_does(model):
    """The engine (the decoding path of generate, chat and serve) gives generate_text_simple's
    tokens, with its cache and without, past the context window too (30 new tokens, 16)."""
    tok = CharTokenizer(chr(ord("!") + i) for i in range(96))  # ids 0..95, <|endoftext|> 96
    prompt = [5, 17, 42]
    want = generate_text_simple(model, torch.tensor([prompt]), 30, context_size=16)[0, 3:]
    assert tok.eot_token not in want.tolist()  # precondition (fixed seed): no end of text
    for use_cache in (True, False):
        engine = Engine(model, tok, use_cache=use_cache)
        gen = engine.submit(prompt, Sampling(30, temperature=0.0), lambda event: None)
        while not gen.finished:
            engine.step()
        assert gen.text.ids == want.tolist()


def test_greedy_crops_to_context_size(model):
    long_prompt = torch.arange(40).remainder(97).unsqueeze(0)  # longer than context 16
    out = generate_text_simple(model, long_prompt, 3, context_size=16)
    tail = generate_text_simple(model, long_prompt[:, -16:], 3, context_size=16)
    assert torch.equal(out[:, -3:], tail[:, -3:])


def test_topk_with_seed_is_reproducible_and_seeds_differ(model, prompt):
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=5)
    a = generate(model, prompt, seed=42, **kw)
    b = generate(model, prompt, seed=42, **kw)
    assert torch.equal(a, b)
    others = [generate(model, prompt, seed=s, **kw) for s in range(5)]
    assert any(not torch.equal(a, o) for o in others)
    # every sampled token is among the 5 most likely at its step
    with torch.no_grad():
        for t in range(3, a.shape[1]):
            top5 = model(a[:, max(0, t - 16) : t])[:, -1].topk(5).indices
            assert (top5 == a[:, t : t + 1]).any(-1).all()


def test_seeded_generate_leaves_global_rng_alone(model, prompt):
    torch.manual_seed(9)
    before = torch.get_rng_state()
    generate(model, prompt, 10, temperature=0.9, top_k=10, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    # and an explicit generator works the same way as a seed
    g = torch.Generator().manual_seed(1)
    assert torch.equal(
        generate(model, prompt, 10, temperature=0.9, top_k=10, generator=g),
        generate(model, prompt, 10, temperature=0.9, top_k=10, seed=1),
    )


def test_top_p_tiny_is_greedy_and_top_k_one_is_greedy():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 2.9, -5.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, 1.0, top_p=1e-6, generator=g).flatten().tolist() == [1, 0]
        assert sample_next(logits, 5.0, top_k=1, generator=g).flatten().tolist() == [1, 0]


def test_eos_stops_generation(model):
    prompt = torch.tensor([[5, 17, 42]])
    greedy = generate(model, prompt, 15)[0, 3:].tolist()
    # choose as "end of text" the token greedy decoding produces at position p
    p = 4
    eos = greedy[p]
    first = greedy.index(eos)  # it may have appeared earlier
    out = generate(model, prompt, 15, eos_id=eos)
    assert out[0, 3:].tolist() == greedy[:first]  # stops before it; eos not appended
    # eos at the very first step: nothing is appended
    assert torch.equal(generate(model, prompt, 15, eos_id=greedy[0]), prompt)


def test_eos_in_a_batch_pads_finished_rows(model):
    prompts = torch.tensor([[5, 17, 42], [8, 8, 1]])
    greedy = generate(model, prompts, 10)
    eos = greedy[0, 3].item()
    assert not (greedy[1, 3:] == eos).any()  # precondition (fixed seed): row 1 never ends
    out = generate(model, prompts, 10, eos_id=eos)
    assert (out[0, 3:] == eos).all()  # row 0 ended at once and is padded with eos
    assert torch.equal(out[1], greedy[1])  # row 1 goes on unchanged


def test_ids_beyond_the_tokenizers_vocabulary_are_never_sampled():
    """A model may have a larger vocab_size than its tokenizer (chosen for speed, or after
    --model.vocab_size); ids past the tokenizer's vocabulary cannot be decoded, so text
    generation never samples them, however likely the model makes them."""
    from types import SimpleNamespace

    from gptlab.data.tokenizer import eot_id

    tok = CharTokenizer.from_text("abcdefgh ")
    n = tok.n_vocab

    class FavoursUnknownIds(torch.nn.Module):
        cfg = SimpleNamespace(context_length=8, vocab_size=n + 30)

        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))  # a device to be found on

        def forward(self, idx, cache=None):  # (B, T) -> (B, T, n + 30)
            logits = torch.zeros(*idx.shape, n + 30)
            logits[..., n:] = 5.0  # the undecodable ids are each e^5 times likelier
            if eot_id(tok) is not None:
                logits[..., eot_id(tok)] = -1e9  # no early end: the text has all 20 tokens
            return logits

    model = FavoursUnknownIds()
    prompt = torch.tensor([tok.encode("ab")])
    free = generate(model, prompt, 20, temperature=1.0, seed=0, use_cache=False)
    assert (free[:, 2:] >= n).any()  # unguarded, the model does pick them
    limited = generate(model, prompt, 20, temperature=1.0, seed=0, use_cache=False, vocab_limit=n)
    assert (limited[:, 2:] < n).all()
    engine = Engine(model, tok, use_cache=False)
    text = "".join(engine.stream("ab", Sampling(20, temperature=1.0, seed=0)))
    assert len(text) == 20 and set(text) <= set("abcdefgh ")
