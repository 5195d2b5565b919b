"""Continuous batching against one-at-a-time generation: the SlotCache and the Engine give
the tokens `gptlab.infer.sampling.generate` gives for each prompt alone, whatever else shares
the batch.

The models run in float64, so a batch's different summation order cannot flip a greedy
choice: every difference found here is a bug, not rounding."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import jitter

from gptlab.config.schema import ModelConfig
from gptlab.data.tokenizer import CharTokenizer
from gptlab.infer.engine import Engine, Event, Sampling, SlotCache
from gptlab.infer.sampling import TextStream, generate
from gptlab.model.gpt import GPTModel

TEXT = "abcdefghijklmnopqrstuvwxyz .,!?\n"


def tiny_model(vocab: int, ctx: int = 24, seed: int = 0, **options) -> GPTModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab, context_length=ctx, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
        **options,
    )  # fmt: skip
    return jitter(GPTModel(cfg).double().eval(), 0.3)


@pytest.mark.parametrize(
    "options", [{}, {"positions": "rope", "n_kv_heads": 2}, {"attention": "manual"}]
)
@torch.no_grad()
def test_slot_cache_rows_joining_at_different_steps_match_generate(options):
    model = tiny_model(vocab=40, **options)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [12], [30, 31]]
    n_new = 8
    ref = [generate(model, torch.tensor([p]), n_new)[0, len(p) :].tolist() for p in prompts]
    cache = SlotCache(slots=5, max_len=24)
    slot_of = {0: 0, 1: 3, 2: 1, 3: 4}  # scattered slots: the batch gathers, not a view
    joins = {0: 0, 1: 1, 2: 3, 3: 3}  # the decode step at which each prompt is prefilled
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    for step in range(n_new + 4):
        for i in [i for i, s in joins.items() if s == step]:
            cache.select([slot_of[i]])
            logits = model(torch.tensor([prompts[i]]), cache)[:, -1]  # (1, V)
            out[i].append(int(logits.argmax()))
        rows = [i for i in out if out[i] and len(out[i]) < n_new]
        if not rows:
            continue
        cache.select([slot_of[i] for i in rows])
        ids = torch.tensor([[out[i][-1]] for i in rows])  # (B, 1)
        for i, token in zip(rows, model(ids, cache)[:, -1].argmax(-1).tolist(), strict=True):
            out[i].append(token)
    assert [out[i] for i in range(len(prompts))] == ref


def test_slot_cache_move_keeps_a_sequence_going():
    model = tiny_model(vocab=40)
    prompt, n_new = [4, 5, 6], 6
    ref = generate(model, torch.tensor([prompt]), n_new)[0, 3:].tolist()
    cache = SlotCache(slots=3, max_len=24)
    with torch.no_grad():
        cache.select([2])
        got = [int(model(torch.tensor([prompt]), cache)[:, -1].argmax())]
        cache.move(2, 0)  # as the engine packs its slots when another sequence leaves
        assert cache.lengths == [3, 0, 0]
        cache.select([0])
        while len(got) < n_new:
            got.append(int(model(torch.tensor([[got[-1]]]), cache)[:, -1].argmax()))
    assert got == ref


def test_text_stream_matches_the_engines_stream():
    tok = CharTokenizer(TEXT)
    model = tiny_model(vocab=tok.n_vocab)
    for stop in ((), ("e",), ("zz", "k,")):
        pieces = list(Engine(model, tok).stream("hello", Sampling(12, 0.0, stop=stop)))
        ids = generate(model, torch.tensor([tok.encode("hello")]), 12)[0, 5:].tolist()
        ts = TextStream(tok, stop)
        got = []
        for i in ids:
            got.append(ts.push(i))
            if ts.stopped:
                break
        got.append(ts.flush())
        assert "".join(got) == "".join(pieces)


class Collector:
    """Gathers one generation's events; `done` is set by its last event."""

    def __init__(self):
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.finish_reason is not None:
            self.done.set()

    @property
    def text(self) -> str:
        assert self.done.wait(30), "the generation did not finish"
        return "".join(e.text for e in self.events)


def alone(engine: Engine, prompt: str, n: int, stop: tuple[str, ...] = ()) -> str:
    """The greedy text `generate` gives `prompt` alone, cut at <|endoftext|> and before the
    first stop string: what the engine must give it, whatever shares the batch."""
    tok = engine.tokenizer
    ids = tok.encode(prompt)
    out = generate(
        engine.model, torch.tensor([ids]), n, eos_id=tok.eot_token, vocab_limit=tok.n_vocab
    )
    text = tok.decode(out[0, len(ids) :].tolist())
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


@pytest.fixture
def char_engine():
    tok = CharTokenizer(TEXT)
    model = tiny_model(vocab=tok.n_vocab, ctx=32)
    engine = Engine(model, tok, max_batch=3, prefill_tokens=4).start()
    yield engine
    engine.close()


def test_engine_greedy_matches_generate_for_many_prompts_through_few_slots(char_engine):
    engine = char_engine
    prompts = ["a", "hello there", "zzz", "the quick brown fox", "no.", "what?", "x y z"]
    lengths = [5, 20, 1, 13, 9, 28, 7]  # 28: "what?" then fills the context of 32 exactly
    stops = [(), ("e",), (), ("q", "o "), (), (), ("zz",)]
    got = []
    for p, n, stop in zip(prompts, lengths, stops, strict=True):
        sink = Collector()
        engine.submit(engine.tokenizer.encode(p), Sampling(n, 0.0, stop=stop), sink)
        got.append(sink)
    for p, n, stop, sink in zip(prompts, lengths, stops, got, strict=True):
        want = alone(engine, p, n, stop)
        assert sink.text == want
        reason = sink.events[-1].finish_reason
        assert reason == ("length" if sink.events[-1].completion_tokens == n else "stop")
    assert engine.load()["running"] == 0


def test_engine_seeded_sampling_matches_generate_whatever_shares_the_batch(char_engine):
    engine = char_engine
    tok = engine.tokenizer
    settings = dict(temperature=0.9, top_k=10, top_p=0.9)
    sinks = []
    for seed in (1, 2, 1):
        sink = Collector()
        engine.submit(tok.encode("abc"), Sampling(12, seed=seed, **settings), sink)
        engine.submit(tok.encode("noise"), Sampling(12, temperature=1.0), Collector())
        sinks.append(sink)
    texts = [s.text for s in sinks]
    ref = generate(
        engine.model, torch.tensor([tok.encode("abc")]), 12, seed=1, vocab_limit=tok.n_vocab,
        eos_id=tok.eot_token, **settings,
    )  # fmt: skip
    assert texts[0] == texts[2] == tok.decode(ref[0, 3:].tolist())
    assert texts[0] != texts[1]


def test_cancelled_generation_leaves_its_slot_and_the_others_finish(char_engine):
    engine = char_engine
    tok = engine.tokenizer
    first = threading.Event()

    def cancel_at_first_token(event: Event) -> None:  # on the engine's thread
        if not first.is_set():
            first.set()
            engine.cancel(gen)

    gen = engine.submit(tok.encode("ab"), Sampling(25, 0.0), cancel_at_first_token)
    other = Collector()
    engine.submit(tok.encode("cd"), Sampling(25, 0.0), other)
    want = alone(engine, "cd", 25)
    assert other.text == want
    assert first.is_set() and gen.cancelled and gen.slot == -1
    assert engine.load()["running"] == 0
