"""Scoring continuations by log-likelihood, the core of downstream tasks (tasks.py) and of
the lm-evaluation-harness adapter (harness.py).

Batches are padded on the right, which never changes a causal model's scored logits, and
requests with the same model input share one row, so batched scores are each request's
alone (to float rounding). Left-truncation follows lm-eval: the model reads the last
`context_length` tokens of context + continuation minus its final token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gptlab.errors import GptlabError
from gptlab.model.gpt import GPTModel, softcap


@dataclass
class Score:
    """The log-likelihood of one continuation given its context."""

    logprob: float  # sum of log p(continuation token | everything before it), nats
    greedy: bool  # every continuation token is the argmax at its position
    n_tokens: int  # continuation tokens scored
    truncated: bool  # the context was left-truncated to fit


def _model_input(
    context: Sequence[int], continuation: Sequence[int], context_length: int, eot_id: int | None
) -> tuple[tuple[int, ...], bool]:
    """The ids the model reads for one request (the continuation predicted at its last
    positions), and whether the context was cut."""
    if not continuation:
        raise GptlabError("a continuation has no tokens; every choice must be non-empty text")
    if len(continuation) > context_length:
        raise GptlabError(
            f"a continuation of {len(continuation)} tokens does not fit the model's context of "
            f"{context_length}; shorten the choices or use a model with a longer context"
        )
    if not context:
        if eot_id is None:
            raise GptlabError(
                "a request has an empty context: pass eot_id (the tokenizer's <|endoftext|>) "
                "so the first token is scored after it"
            )
        context = [eot_id]
    whole = list(context) + list(continuation)
    keep = whole[-(context_length + 1) :][:-1]  # (<= T,): the last T+1, minus the final token
    return tuple(keep), len(whole) - 1 > context_length


@torch.no_grad()
def score_requests(
    model: nn.Module,
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    context_length: int,
    batch_size: int = 16,
    device=None,
    eot_id: int | None = None,
    min_forwards: int = 0,
) -> list[Score]:
    """(context ids, continuation ids) pairs -> one Score each, in input order, for a causal
    model, ids (B, T) -> logits (B, T, V). An empty context scores after `eot_id`. Runs at
    least `min_forwards` forward passes, so every rank of a sharded (FSDP) job runs as many."""
    if batch_size < 1:
        raise GptlabError(f"batch_size must be at least 1, got {batch_size}")
    if device is None:
        device = next(model.parameters()).device
    inputs = [_model_input(c, k, context_length, eot_id) for c, k in requests]
    wanted: dict[tuple[int, ...], list[int]] = {}  # one row per input -> requests scored on it
    for i, (ids, _) in enumerate(inputs):
        wanted.setdefault(ids, []).append(i)
    unique = sorted(wanted, key=lambda ids: (-len(ids), ids))  # longest first: least padding

    was_training = model.training
    model.eval()
    out: list[Score | None] = [None] * len(requests)
    n_forwards = 0
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        todo = [(b, i) for b, ids in enumerate(chunk) for i in wanted[ids]]
        scores = _score_batch(model, chunk, [(b, requests[i][1]) for b, i in todo], device)
        n_forwards += 1
        for (_, i), (logprob, greedy, n) in zip(todo, scores, strict=True):
            out[i] = Score(logprob, greedy, n, inputs[i][1])
    while n_forwards < min_forwards:
        model(torch.zeros((1, 1), dtype=torch.long, device=device))
        n_forwards += 1
    model.train(was_training)
    return out  # type: ignore[return-value]


def _score_batch(
    model: nn.Module, chunk: list[tuple[int, ...]], conts: list[tuple[int, list[int]]], device
) -> list[tuple[float, bool, int]]:
    """One forward pass over the rows `chunk` (longest first), right-padded with 0 ->
    (summed log-probability, greedy, token count) for each (row, continuation) of `conts`."""
    x = torch.zeros((len(chunk), len(chunk[0])), dtype=torch.long)  # (B, T)
    for b, ids in enumerate(chunk):
        x[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    rows, cols, targets, sizes = [], [], [], []
    for b, cont in conts:
        end = len(chunk[b])
        rows += [b] * len(cont)
        cols += range(end - len(cont), end)  # the positions that predict cont
        targets += cont
        sizes.append(len(cont))
    logits = _logits_at(model, x.to(device), rows, cols).float()  # (N, V), N = sum(sizes)
    target = torch.tensor(targets, dtype=torch.long, device=logits.device)  # (N,)
    logp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]  # (N,)
    hit = logits.argmax(dim=-1) == target  # (N,)
    return [
        (lp.sum().item(), bool(ok.all().item()), len(lp))
        for lp, ok in zip(logp.split(sizes), hit.split(sizes), strict=True)
    ]


def _logits_at(model: nn.Module, x: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """Logits (N, V) at positions (rows[n], cols[n]) of the batch x (B, T). A plain GPTModel
    runs its output head (most of a small model's FLOPs) on those positions only; anything
    else (DDP, FSDP, compiled or foreign modules) runs its forward."""
    r = torch.tensor(rows, device=x.device)
    c = torch.tensor(cols, device=x.device)
    if type(model) is GPTModel:
        h = model.hidden_states(x)[r, c]  # (N, D)
        logits = model.out_head(h)[..., : model.cfg.vocab_size]  # (N, V)
        return softcap(logits, model.cfg.logit_softcap)
    return model(x)[r, c]  # (B, T, V) -> (N, V)


def n_forwards_needed(
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    context_length: int,
    batch_size: int = 16,
    eot_id: int | None = None,
) -> int:
    """How many forward passes `score_requests` runs for these requests."""
    rows = {_model_input(c, k, context_length, eot_id)[0] for c, k in requests}
    return -(-len(rows) // batch_size)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) tokenised as lm-eval does: the context's trailing
    whitespace moves to the continuation, and the continuation is what follows the
    context's tokens in their joint encoding. An empty context gives [<|endoftext|>]."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        eot = getattr(tokenizer, "eot_token", None)
        if eot is None:
            raise GptlabError("an empty context needs a tokenizer with an <|endoftext|> token")
        return [eot], _encode(tokenizer, continuation)
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


def _encode(tokenizer, text: str) -> list[int]:
    # The tokenizer's own default for "<|endoftext|>" in text (the special token, as a
    # Hugging Face tokenizer under lm-eval would read it).
    return list(tokenizer.encode(text))
