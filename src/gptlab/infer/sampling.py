"""Choosing tokens: the walk-through's greedy `generate_text_simple` (the reference every
faster path is tested against), `sample_next` (temperature, top-k, top-p, from its own
generator, so sampling during training never disturbs the run's random state), `generate`
over a batch tensor, and `TextStream`, which turns sampled ids into text as it becomes certain.

`generate` prefills the prompt into a KV cache, then feeds one new token per step. Past the
context window every step recomputes the last `context_size` tokens, as `use_cache=False`
does throughout (absolute positions shift each step, so no cache can help); both give the
same tokens. Text (command line, chat, server) decodes through `gptlab.infer.engine.Engine`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from gptlab.data.tokenizer import ENDOFTEXT, Tokenizer
from gptlab.model.kvcache import KVCache


def text_to_token_ids(text: str, tokenizer: Tokenizer) -> torch.Tensor:
    """Encode text as a (1, T) batch of token ids."""
    return torch.tensor(tokenizer.encode(text, allowed_special={ENDOFTEXT})).unsqueeze(0)  # (1, T)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: Tokenizer) -> str:
    """Decode a (1, T) batch (or a flat (T,) tensor) of token ids."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())


@torch.no_grad()
def generate_text_simple(
    model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int
) -> torch.Tensor:
    """Greedy decoding: idx (B, T) -> (B, T + max_new_tokens), feeding back the last
    `context_size` tokens."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :]  # (B, V)
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Logits (B, V) with every token outside the `top_k` largest and outside the smallest
    set whose probability reaches `top_p` set to -inf (the most likely token always stays)."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)  # (B, V)
        # drop a token when the ones before it already reach top_p (the first always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p  # (B, V)
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next ids (B, 1) from last-position logits (B, V): argmax at temperature 0, else
    sampled from the logits divided by the temperature and cut by `filter_logits`."""
    if temperature <= 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool = False,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Sample up to `max_new_tokens` tokens after idx (B, T) -> (B, T + n), rows in step,
    until every row has produced `eos_id` (not appended; rows that ended are padded with it).

    `seed` or `generator` leaves the global random state alone. `compile=True` runs cached
    steps through torch.compile with a static cache. `vocab_limit` samples only ids below it
    (a vocab_size padded for speed never yields an id the tokenizer cannot decode)."""
    context_size = context_size or model.cfg.context_length
    if generator is None and seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    cache = KVCache(context_size, static=compile) if use_cache else None
    step_fn = _compiled_step() if compile and use_cache else _step
    done = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    filled = 0  # positions in the cache
    prompt, steps = idx, []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            if cache is None or (filled > 0 and filled >= context_size):
                logits = model(idx[:, -context_size:])[:, -1, :]  # (B, V): recompute the window
            elif filled == 0:
                window = idx[:, -context_size:]  # (B, T') the prefill
                logits = model(window, cache)[:, -1, :]  # (B, V)
                filled = window.shape[1]
            else:
                logits = step_fn(model, steps[-1], cache)  # (B, V): the newest token only
                filled += 1
            if vocab_limit is not None:
                logits = logits[:, :vocab_limit]  # (B, V'): ids the tokenizer can decode
            idx_next = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                ended = idx_next == eos_id
                if bool((done | ended).all()):
                    break
                idx_next = idx_next.masked_fill(done, eos_id)
                done |= ended
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
            steps.append(idx_next)
    return torch.cat([prompt, *steps], dim=1)  # outside inference mode: an ordinary tensor


def _step(model: nn.Module, idx_next: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One cached step: ids (B, 1) -> last-position logits (B, V)."""
    return model(idx_next, cache)[:, -1, :]


@functools.cache
def _compiled_step():
    # Built once and shared, so each generate() call reuses the compiled graphs; on CUDA
    # "reduce-overhead" replays the step as one CUDA graph (the static cache keeps its shapes).
    mode = "reduce-overhead" if torch.cuda.is_available() else None
    return torch.compile(_step, mode=mode, fullgraph=True)


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _undecided_tail(text: str, stop: Sequence[str]) -> int:
    """Trailing characters that must wait: an unfinished UTF-8 character (U+FFFD) or the
    start of a stop string."""
    held = [k for s in stop for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])]
    return max([len(text) - len(text.rstrip("\ufffd")), *held])


class TextStream:
    """Token ids in, certain text out: `push` holds back what may still become a stop string
    or ends inside a multi-byte character. Once a stop string appears, `stopped` is set and
    only the text before it was ever returned."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # the whole continuation decoded so far
        self.sent = 0  # characters of it returned so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; the newly certain text ("" if none)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids)
        cut = _first_stop(self.text, self.stop)
        if cut is not None:
            self.stopped = True
            return self._take(cut)
        return self._take(len(self.text) - _undecided_tail(self.text, self.stop))

    def flush(self) -> str:
        """At the end of generation: the text held back, unless a stop string cut it."""
        return "" if self.stopped else self._take(len(self.text))

    def _take(self, upto: int) -> str:
        piece, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return piece
