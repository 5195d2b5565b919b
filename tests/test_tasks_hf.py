"""Task log-likelihoods against transformers: a GPT-2-shaped and a Llama-shaped tiny random
model, written as a gptlab run, exported with `gptlab convert to-hf`'s code and loaded with
`from_pretrained`; every continuation token's log-probability must be transformers' (each token scored as
its own request), and every continuation's sum too (on the input lm-eval would give it:
context + continuation, left-cut to the context length), within 1e-4 in fp32, and the tokens must be the exported tokenizer's."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import tolerances
import torch
from conftest import jitter

from gptlab.config.schema import ModelConfig, RunConfig
from gptlab.evals.scoring import encode_pair, score_requests
from gptlab.evals.tasks import DEFAULT_SEED, _requests, make_task
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.interop import hf
from gptlab.interop.runs import open_run
from gptlab.model.gpt import GPTModel

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

DATA = Path(__file__).parent / "data" / "tasks"
T = 32  # short enough that the one-shot ARC contexts are cut
SHAPES = {
    "gpt2": dict(tie_weights=True),
    "llama": dict(
        positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False,
        tie_weights=False, n_kv_heads=2, rope_theta=500.0, norm_eps=1e-6, mlp_hidden=48,
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(SHAPES))
def exported(request, tmp_path_factory):
    """(our run opened by open_run, transformers' model, its tokenizer) on the same weights."""
    root = tmp_path_factory.mktemp(f"tasks-hf-{request.param}")
    cfg = ModelConfig(
        vocab_size=50257, context_length=T, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
        init="gpt2", **SHAPES[request.param],
    ).validate()  # fmt: skip
    torch.manual_seed(0)
    model = jitter(GPTModel(cfg).eval(), 0.1)
    meta = {"config": RunConfig(model=cfg).to_dict(), "tokenizer": {"type": "gpt2"}}
    ckpt_lib.save_checkpoint(root / "run", 1, model, meta)
    hf.convert_to_hf(root / "run", root / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(root / "hf", torch_dtype=torch.float32).eval()
    expected = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[request.param]
    assert type(theirs).__name__ == expected
    return open_run(root / "run", "cpu"), theirs, AutoTokenizer.from_pretrained(root / "hf")


class _HFTokens:
    """The exported tokenizer as lm-eval's HF model encodes text (no special tokens added)."""

    def __init__(self, tok):
        self.tok, self.eot_token = tok, tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids


def _all_requests(tokenizer) -> list[tuple[list[int], list[int]]]:
    reqs = []
    for name, shots in [
        ("hellaswag", 0), ("arc", 1), ("piqa", 0), ("copa", 1), ("lambada", 0), ("mc", 0),
    ]:  # fmt: skip
        task = make_task(str(DATA / f"{name}.jsonl"), num_fewshot=shots)
        reqs += _requests(task, tokenizer, range(len(task.items)), DEFAULT_SEED, T)[0]
    return reqs


@torch.no_grad()
def _their_token_logprobs(theirs, ctx, cont) -> tuple[list[float], bool]:
    whole = ctx + cont
    x = whole[-(T + 1) :][:-1]  # lm-eval's cut: the last T+1 tokens, minus the final one
    logp = torch.log_softmax(theirs(torch.tensor([x])).logits[0].double(), dim=-1)
    rows = range(len(x) - len(cont), len(x))
    greedy = all(int(logp[r].argmax()) == t for r, t in zip(rows, cont, strict=True))
    return [logp[r, t].item() for r, t in zip(rows, cont, strict=True)], greedy


def _logprobs(scores) -> torch.Tensor:
    return torch.tensor([s.logprob for s in scores], dtype=torch.float64)


def test_tokens_are_the_exported_tokenizers(exported):
    run, _, hf_tok = exported
    ours, theirs = _all_requests(run.tokenizer), _all_requests(_HFTokens(hf_tok))
    assert ours == theirs
    assert encode_pair(run.tokenizer, "", "Hi") == encode_pair(_HFTokens(hf_tok), "", "Hi")


def test_every_continuation_token_matches_transformers(exported):
    run, theirs, _ = exported
    reqs = _all_requests(run.tokenizer)
    assert len(reqs) > 40
    # one token at a time: each (context + first j tokens, token j) is one request
    singles = [(c + k[:j], [k[j]]) for c, k in reqs for j in range(len(k))]
    # our model in float64 says how far fp32 rounding alone takes a log-probability here;
    # transformers' kernels sum in other orders (tests/tolerances.py)
    exact_model = copy.deepcopy(run.model).double()
    ours_each = score_requests(run.model, singles, context_length=T, batch_size=8)
    exact_each = score_requests(exact_model, singles, context_length=T, batch_size=8)
    theirs_each = []
    for (ctx, cont), s in zip(singles, ours_each, strict=True):
        (want,), greedy = _their_token_logprobs(theirs, ctx, cont)
        assert s.greedy == greedy
        theirs_each.append(want)
    tolerances.assert_close_to_rounding(
        torch.tensor(theirs_each, dtype=torch.float64), _logprobs(ours_each), _logprobs(exact_each)
    )
    # whole continuations, with their contexts cut where they do not fit
    ours_whole = score_requests(run.model, reqs, context_length=T, batch_size=8)
    exact_whole = score_requests(exact_model, reqs, context_length=T, batch_size=8)
    n_cut, theirs_whole = 0, []
    for (ctx, cont), whole in zip(reqs, ours_whole, strict=True):
        ref, greedy = _their_token_logprobs(theirs, ctx, cont)
        theirs_whole.append(sum(ref))
        assert whole.greedy == greedy and whole.n_tokens == len(cont)
        n_cut += whole.truncated
    tolerances.assert_close_to_rounding(
        torch.tensor(theirs_whole, dtype=torch.float64),
        _logprobs(ours_whole),
        _logprobs(exact_whole),
    )
    assert 0 < n_cut < len(reqs)  # both cut and whole contexts were compared
