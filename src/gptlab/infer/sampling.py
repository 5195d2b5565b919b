"""Choosing tokens: the walk-through's greedy `generate_text_simple` (the reference every
faster path is tested against), the sampling rules (`sample_next`: temperature, top-k,
top-p, from its own random generator, so sampling during training never disturbs the
training run's random state), `generate` over a batch tensor, and `TextStream`, which
turns sampled ids into text as it becomes certain.

`generate` uses a KV cache by default: one forward pass over the prompt (the prefill), then
one pass per new token over that token alone, attending over the cached keys and values.
Once the sequence outgrows the context window, every further step recomputes over the last
`context_size` tokens, exactly as the uncached path (`use_cache=False`) does at every step,
so both give the same tokens; past the window the cache cannot help, because absolute
position embeddings shift every position each step. Its rows are one batch (B, T) of equal
length, decoded in step: nothing is padded.

Text (the command line, chat, the server) decodes through `gptlab.infer.engine.Engine`,
which gives the same tokens for a prompt as `generate` does.
"""

from __future__ import annotations

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
    """Greedy decoding: append the most likely next token `max_new_tokens` times.

    idx (B, T) -> (B, T + max_new_tokens). Only the last `context_size` tokens are fed back.
    """
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
    """Pick next ids from last-position logits (B, V) -> (B, 1).

    temperature 0 is greedy; otherwise logits are divided by the temperature, cut to the
    `top_k` largest and/or the smallest set whose probability reaches `top_p`, and sampled.
    """
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
    """Sample up to `max_new_tokens` tokens after idx (B, T) -> (B, T + n), every row in
    step: decoding a batch tensor (text goes through `gptlab.infer.engine`).

    Stops early when every sequence has produced `eos_id`; one that ended earlier is padded
    with it while the others go on, and the end token itself is not appended. `seed` (or an
    explicit `generator`) makes sampling reproducible without touching the global random
    state. `use_cache=False` recomputes the whole window at every step (the walk-through's
    way); `compile=True` runs the cached steps through torch.compile with a static cache
    (for CUDA, where it replays each step as a CUDA graph; the first call compiles).
    `vocab_limit` samples only ids below it: a model whose vocab_size exceeds its
    tokenizer's vocabulary (set so for speed) never emits an id the tokenizer cannot decode.
    """
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
    """One cached decoding step: ids (B, 1) -> last-position logits (B, V)."""
    return model(idx_next, cache)[:, -1, :]


_COMPILED_STEP = None


def _compiled_step():
    # Built once and shared, so each generate() call reuses the compiled graphs; on CUDA
    # "reduce-overhead" replays the step as one CUDA graph (the static cache keeps its shapes).
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        mode = "reduce-overhead" if torch.cuda.is_available() else None
        _COMPILED_STEP = torch.compile(_step, mode=mode, fullgraph=True)
    return _COMPILED_STEP


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _undecided_tail(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters must wait: an unfinished UTF-8 character (decoded as
    U+FFFD) or the start of a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


class TextStream:
    """Token ids in, text out piece by piece, for a caller that feeds the ids as they are
    sampled (the engine's decode loop).

    `push` returns the text that is now certain: nothing that may still turn into a stop
    string or ends inside a multi-byte character. Once a stop string appears, `stopped` is
    set and the text before it is all that was ever returned.
    """

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
        piece = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece
