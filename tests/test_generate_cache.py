"""KV-cached generation against the uncached path, sampling filters, streaming and stops."""

from __future__ import annotations

import copy

import pytest
import tolerances
import torch
from conftest import jitter

from gptlab.cli.main import main
from gptlab.config.schema import ModelConfig, RunConfig
from gptlab.data.tokenizer import CharTokenizer, GPT2Tokenizer
from gptlab.infer.engine import Engine, Sampling
from gptlab.infer.sampling import _step, _undecided_tail, filter_logits, generate, sample_next
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.model.gpt import GPTModel
from gptlab.model.kvcache import KVCache


def tiny(attention: str = "sdpa", vocab: int = 97, ctx: int = 16, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab,
        context_length=ctx,
        emb_dim=32,
        n_heads=4,
        n_layers=2,
        drop_rate=0.0,
        qkv_bias=True,
        init="gpt2",
    )
    return jitter(GPTModel(cfg).eval(), 0.3)


def prompt(batch: int = 1, n: int = 5, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize("static", [False, True])
def test_cached_forward_gives_the_full_forwards_logits(attention, static):
    model = tiny(attention)
    x = prompt(batch=3, n=16)
    with torch.no_grad():
        full = model(x)  # (3, 16, V)
        cache = KVCache(16, static=static)
        # a prefill, a second block after it (needs the offset causal mask), then single tokens
        pieces = [model(x[:, :6], cache), model(x[:, 6:11], cache)]
        pieces += [model(x[:, t : t + 1], cache) for t in range(11, 16)]
        exact = copy.deepcopy(model).double()(x)
    # shorter matmuls than the full forward's: other blockings, other roundings
    tolerances.assert_close_to_rounding(torch.cat(pieces, dim=1), full, exact)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_dynamic_cache_never_reads_its_unfilled_slots(attention):
    # Attention runs over the filled slots only: poison every slot past the prefill with
    # NaN, and the later steps must still give the full forward's logits.
    model = tiny(attention)
    x = prompt(batch=2, n=12)
    with torch.no_grad():
        full = model(x)  # (2, 12, V)
        cache = KVCache(16)
        pieces = [model(x[:, :7], cache)]
        for buf in cache.keys + cache.values:
            buf[:, :, 7:] = float("nan")
        pieces += [model(x[:, 7:9], cache)]  # a block: the masked path
        pieces += [model(x[:, t : t + 1], cache) for t in range(9, 12)]  # single tokens
        exact = copy.deepcopy(model).double()(x)
    got = torch.cat(pieces, dim=1)
    assert not got.isnan().any()
    tolerances.assert_close_to_rounding(got, full, exact)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cached_and_uncached_greedy_agree_across_the_context_edge(attention, batch):
    model = tiny(attention)
    x = prompt(batch=batch)
    # 5 prompt + 30 new tokens: the 16-token window fills after 11 and slides for 19 more
    uncached = generate(model, x, 30, use_cache=False)
    assert generate(model, x, 30).tolist() == uncached.tolist()
    assert generate(model, x, 30, context_size=8).tolist() == (
        generate(model, x, 30, use_cache=False, context_size=8).tolist()
    )
    assert len(set(uncached[0].tolist())) > 3  # not a degenerate repetition


def test_static_cache_generates_the_same_tokens():
    model = tiny()
    x = prompt(batch=2)
    want = generate(model, x, 20)
    # the static cache path without torch.compile (what --compile replays on CUDA)
    got = x
    cache = KVCache(16, static=True)
    with torch.no_grad():
        logits = model(x, cache)[:, -1]
        for _ in range(11):
            nxt = sample_next(logits)
            got = torch.cat([got, nxt], dim=1)
            logits = _step(model, nxt, cache)
    assert got.tolist() == want[:, :16].tolist()


def test_cached_and_uncached_sampling_agree_with_a_seed():
    model = tiny()
    x = prompt(batch=2)
    kw = dict(temperature=1.3, top_k=20, top_p=0.9, seed=7)
    a = generate(model, x, 25, use_cache=False, **kw)
    b = generate(model, x, 25, **kw)
    assert a.tolist() == b.tolist()
    c = generate(model, x, 25, **{**kw, "seed": 8})
    assert c.tolist() != a.tolist()


def test_sampling_leaves_the_global_random_state_alone():
    model = tiny()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    generate(model, prompt(), 10, temperature=1.0, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_eos_stops_generation_in_both_paths():
    model = tiny()
    x = prompt()
    free = generate(model, x, 20)[0, 5:].tolist()
    eos = free[3]
    stop = free.index(eos)  # its first appearance
    for use_cache in (True, False):
        out = generate(model, x, 20, eos_id=eos, use_cache=use_cache)
        assert out[0, 5:].tolist() == free[:stop]  # the end token itself is not appended


def test_the_engine_streams_what_generate_returns_for_each_prompt():
    model, tok = char_model_and_tokenizer()
    x = prompt(batch=2, vocab=len(tok.chars))
    assert generate(model, x, 9, temperature=0.9, seed=3).shape == (2, 14)
    engine = Engine(model, tok)
    for row in x.tolist():
        pieces = list(engine.stream(row, Sampling(9, temperature=0.9, seed=3)))
        want = generate(model, torch.tensor([row]), 9, temperature=0.9, seed=3)[0, 5:]
        assert "".join(pieces) == tok.decode(want.tolist())


def test_kv_cache_refuses_to_overflow():
    model = tiny()
    cache = KVCache(8)
    with torch.no_grad():
        model(prompt(n=6), cache)
        with pytest.raises(ValueError, match="KV cache full"):
            model(prompt(n=3), cache)
        with pytest.raises(ValueError, match="exceeds context_length"):
            model(prompt(n=1), KVCache(32))


# --------------------------------------------------------------------------- sampling filters


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()

    def kept(p: float) -> set[int]:
        return set(torch.isfinite(filter_logits(logits, top_p=p)[0]).nonzero().flatten().tolist())

    assert kept(0.4) == {1}  # the top token alone reaches 0.4
    assert kept(0.75) == {1, 3}  # 0.5 < 0.75 <= 0.8
    assert kept(0.85) == {1, 3, 2}  # 0.8 < 0.85 <= 0.95
    assert kept(0.99) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}  # 1.0 disables the filter
    # rows are filtered independently
    two = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5]]).log()
    out = torch.isfinite(filter_logits(two, top_p=0.6))
    assert out.tolist() == [[True, False, False], [False, True, True]]


def test_top_k_and_sampling_draw_only_kept_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [
        [False, True, False, True, False]
    ]
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert draws == {1, 3}
    assert int(sample_next(logits)) == 1  # temperature 0 is greedy


# --------------------------------------------------------------------------- text, stops, batches


def char_model_and_tokenizer():
    """A char model that never ends its text (its vocabulary lacks <|endoftext|>)."""
    tok = CharTokenizer("abcdefgh ,.")
    tok.eot_token = None
    return tiny(vocab=len(tok.chars), ctx=32), tok


def greedy_text(model, tok, text: str, n: int) -> str:
    """The greedy continuation by `generate`, decoded (the char model never ends its text)."""
    return tok.decode(generate(model, torch.tensor([tok.encode(text)]), n)[0, len(text) :].tolist())


def test_streamed_pieces_join_to_the_full_continuation():
    model, tok = char_model_and_tokenizer()
    pieces = list(Engine(model, tok).stream("abc", Sampling(20, temperature=0)))
    full = Engine(model, tok).complete(["abc"], Sampling(20, temperature=0))[0]
    assert "".join(pieces) == full == greedy_text(model, tok, "abc", 20) and len(pieces) > 1


def test_stop_string_cuts_the_text_before_it():
    model, tok = char_model_and_tokenizer()
    full = greedy_text(model, tok, "abc", 25)
    stop = full[6:8]
    want = full[: full.index(stop)]
    engine, sampling = Engine(model, tok), Sampling(25, temperature=0, stop=(stop,))
    assert "".join(engine.stream("abc", sampling)) == want
    assert engine.complete(["abc"], sampling)[0] == want


def test_undecided_tail_holds_back_stop_prefixes_and_broken_characters():
    assert _undecided_tail("hello wor", ["world"]) == 3
    assert _undecided_tail("hello", ["xyz"]) == 0
    assert _undecided_tail("caf\ufffd", []) == 1


def test_streamed_text_holds_a_multibyte_character_until_it_is_whole():
    tok = GPT2Tokenizer()
    # a CJK character spans several byte-level tokens: a prefix of them decodes to U+FFFD
    ids = tok.encode(" 日本")
    assert "\ufffd" in tok.decode(ids[:1])
    assert _undecided_tail(tok.decode(ids[:1]), []) >= 1


def test_the_engine_batches_prompts_of_different_lengths_exactly():
    model, tok = char_model_and_tokenizer()
    prompts = ["abc", "hgfe", "de", "cab"]
    engine, sampling = Engine(model, tok, max_batch=3), Sampling(10, temperature=0)
    together = engine.complete(prompts, sampling)
    alone = [engine.complete([p], sampling)[0] for p in prompts]
    assert together == alone == [greedy_text(model, tok, p, 10) for p in prompts]


# --------------------------------------------------------------------------- CLI


def test_cli_streams_the_same_text_with_and_without_the_cache(tmp_path, capsys):
    model = tiny(vocab=50257, ctx=24)
    meta = {"config": RunConfig(model=model.cfg).to_dict(), "tokenizer": {"type": "gpt2"}}
    ckpt_lib.save_checkpoint(tmp_path / "run", 1, model, meta)
    args = ["generate", "--checkpoint", str(tmp_path / "run"), "--max-new-tokens", "30"]
    args += ["--temperature", "0.8", "--seed", "3", "--prompt", "Every effort moves you"]
    outs = []
    for extra in ([], ["--no-cache"]):
        assert main(args + extra) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("Every effort moves you")
    assert main(args + ["--prompt", "Hello"]) == 0
    batch = capsys.readouterr().out
    assert batch.startswith("[1] Every effort moves you") and "\n[2] Hello" in batch
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--top-p", "1.5"]) == 2
