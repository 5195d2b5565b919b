"""Text generation: the walk-through's greedy `generate_text_simple`, and `generate` with
temperature, top-k and top-p sampling from its own random generator (so sampling during
training never disturbs the training run's random state).

`generate` uses a KV cache by default: one forward pass over the prompt (the prefill), then
one pass per new token over that token alone, attending over the cached keys and values.
Once the sequence outgrows the context window, every further step recomputes over the last
`context_size` tokens, exactly as the uncached path (`use_cache=False`) does at every step,
so both give the same tokens; past the window the cache cannot help, because absolute
position embeddings shift every position each step.

Several prompts are one batch (B, T) of equal length: nothing is padded. `complete` takes
prompts of any lengths and runs one batch per length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from gptlab.data.tokenizer import ENDOFTEXT, Tokenizer, eot_id
from gptlab.model.gpt import KVCache


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


def generate_stream(
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
) -> Iterator[torch.Tensor]:
    """Yield the next ids (B, 1) after idx (B, T), one step at a time, as they are sampled.

    The arguments are `generate`'s. The model runs in inference mode between steps only, so
    a caller may stop early by leaving the loop.
    """
    context_size = context_size or model.cfg.context_length
    if generator is None and seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    cache = KVCache(context_size, static=compile) if use_cache else None
    step_fn = _compiled_step() if compile and use_cache else _step
    done = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    filled = 0  # positions in the cache
    idx_next = None
    for _ in range(max_new_tokens):
        with torch.inference_mode():
            if cache is None or (filled > 0 and filled >= context_size):
                logits = model(idx[:, -context_size:])[:, -1, :]  # (B, V): recompute the window
            elif filled == 0:
                window = idx[:, -context_size:]  # (B, T') the prefill
                logits = model(window, cache)[:, -1, :]  # (B, V)
                filled = window.shape[1]
            else:
                logits = step_fn(model, idx_next, cache)  # (B, V): the newest token only
                filled += 1
            if vocab_limit is not None:
                logits = logits[:, :vocab_limit]  # (B, V'): ids the tokenizer can decode
            idx_next = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                # As in the walk-through, the end token itself is not appended; sequences that
                # ended earlier in a batch are padded with it while the others go on.
                ended = idx_next == eos_id
                if bool((done | ended).all()):
                    return
                idx_next = idx_next.masked_fill(done, eos_id)
                done |= ended
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        yield idx_next


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
    """Sample up to `max_new_tokens` tokens after idx (B, T) -> (B, T + n).

    Stops early when every sequence has produced `eos_id`. `seed` (or an explicit
    `generator`) makes sampling reproducible without touching the global random state.
    `use_cache=False` recomputes the whole window at every step (the walk-through's way);
    `compile=True` runs the cached steps through torch.compile with a static cache (for
    CUDA, where it replays each step as a CUDA graph; the first call compiles).
    `vocab_limit` samples only ids below it: a model whose vocab_size exceeds its
    tokenizer's vocabulary (set so for speed) never emits an id the tokenizer cannot decode.
    """
    steps = generate_stream(
        model,
        idx,
        max_new_tokens,
        context_size,
        temperature,
        top_k,
        top_p,
        eos_id,
        seed,
        generator,
        use_cache,
        compile,
        vocab_limit,
    )
    return torch.cat([idx, *steps], dim=1)


def stream_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    **sampling,
) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece as tokens arrive.

    Stops at `<|endoftext|>`, after `max_new_tokens`, or before the first stop string (which
    is not yielded). Text that may still turn into a stop string, or ends inside a multi-byte
    character, is held back until the next tokens decide it. `sampling` takes `generate`'s
    keyword arguments (temperature, top_k, top_p, seed, use_cache, ...); only ids the
    tokenizer can decode are sampled.
    """
    device = next(model.parameters()).device
    idx = text_to_token_ids(prompt, tokenizer).to(device)  # (1, T)
    ids: list[int] = []
    sent = 0  # characters of the continuation yielded so far
    text = ""
    sampling.setdefault("vocab_limit", tokenizer.n_vocab)
    steps = generate_stream(model, idx, max_new_tokens, eos_id=eot_id(tokenizer), **sampling)
    for idx_next in steps:
        ids.append(int(idx_next[0, 0]))
        text = tokenizer.decode(ids)
        cut = _first_stop(text, stop)
        if cut is not None:
            if cut > sent:
                yield text[sent:cut]
            return
        ready = len(text) - _undecided_tail(text, stop)
        if ready > sent:
            yield text[sent:ready]
            sent = ready
    if len(text) > sent:
        yield text[sent:]


def stream_ids(
    model: nn.Module,
    tokenizer: Tokenizer,
    ids: Sequence[int],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    stop_ids: Sequence[int] = (),
    **sampling,
) -> Iterator[str]:
    """`stream_text` for a prompt given as token ids (a rendered chat): the continuation
    piece by piece, ending at `<|endoftext|>`, at any of `stop_ids` (a chat turn's end; the
    id itself is never decoded), after `max_new_tokens`, or before the first stop string."""
    device = next(model.parameters()).device
    idx = torch.tensor([list(ids)], device=device)  # (1, T)
    ends = set(stop_ids)
    eos = eot_id(tokenizer)
    if eos is not None:
        ends.add(eos)
    sampling.setdefault("vocab_limit", tokenizer.n_vocab)
    text = TextStream(tokenizer, stop)
    for idx_next in generate_stream(model, idx, max_new_tokens, **sampling):
        token = int(idx_next[0, 0])
        if token in ends:
            break
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            return
    rest = text.flush()
    if rest:
        yield rest


def complete(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    **sampling,
) -> list[str]:
    """The continuation of each prompt (not streamed), cut at `<|endoftext|>` and before the
    first stop string. Prompts of equal token length run as one batch; a sampled batch is
    reproducible for a given `seed` and the same prompts."""
    device = next(model.parameters()).device
    eos = eot_id(tokenizer)
    sampling.setdefault("vocab_limit", tokenizer.n_vocab)
    encoded = [tokenizer.encode(p, allowed_special={ENDOFTEXT}) for p in prompts]
    out: list[str] = [""] * len(prompts)
    for length in sorted({len(e) for e in encoded}):
        rows = [i for i, e in enumerate(encoded) if len(e) == length]
        idx = torch.tensor([encoded[i] for i in rows], device=device)  # (b, length)
        result = generate(model, idx, max_new_tokens, eos_id=eos, **sampling)  # (b, length + n)
        for i, seq in zip(rows, result[:, length:].tolist(), strict=True):
            if eos is not None and eos in seq:
                seq = seq[: seq.index(eos)]
            text = tokenizer.decode(seq)
            cut = _first_stop(text, stop)
            out[i] = text if cut is None else text[:cut]
    return out


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
    """Token ids in, text out piece by piece: what `stream_text` does, for a caller that
    feeds the ids itself (the server's batched decode loop).

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


class SlotCache:
    """A KV cache of independent rows ("slots") for serving: each slot holds one sequence,
    with its own length, so sequences of different lengths decode in one batch and a new
    one can be prefilled into a free slot while the others are mid-way.

    `select(rows)` names the slots the next forward runs on (batch row b is slot rows[b]);
    then `GPTModel.forward(ids, cache)` reserves positions per row (`advance` returns them
    (B, T)), and each attention layer writes its keys and values at those positions and
    attends over the first Tk positions of its rows, Tk the longest row, with a per-row
    mask (B, 1, T, Tk) that hides what lies beyond each row's own length.

    Buffers are (slots, Hkv, max_len, Hd) per layer, sized from the first keys written
    (so grouped-query attention and autocast dtypes need no configuration).
    """

    def __init__(self, slots: int, max_len: int):
        self.slots = slots
        self.max_len = max_len
        self.keys: list[torch.Tensor] = []  # per layer (S, Hkv, max_len, Hd)
        self.values: list[torch.Tensor] = []  # per layer (S, Hkv, max_len, Hd)
        self.lengths = [0] * slots  # positions filled, per slot
        self._rows: list[int] = []
        self._rows_t: torch.Tensor | None = None  # (B,) the rows as an index
        self._positions: torch.Tensor | None = None  # (B, T) where this forward writes
        self._mask: torch.Tensor | None = None  # (B, 1, T, Tk)
        self._packed: tuple[int, int] | None = None  # (first, end) when the rows are consecutive

    def select(self, rows: Sequence[int]) -> None:
        """The slots the next forward runs on, in batch order."""
        self._rows = list(rows)
        first, n = self._rows[0], len(self._rows)
        self._packed = (first, first + n) if self._rows == list(range(first, first + n)) else None

    def free(self, slot: int) -> None:
        """Forget the slot's positions (its buffer rows are overwritten by the next user)."""
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        """Give slot `dst` the contents of slot `src` and free `src` (to keep slots packed)."""
        n = self.lengths[src]
        for buf in (*self.keys, *self.values):
            buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def advance(self, T: int, device: torch.device) -> torch.Tensor:
        """Reserve each selected row's next T positions; returns them (B, T)."""
        starts = [self.lengths[r] for r in self._rows]
        Tk = max(starts) + T  # keys to attend over: the longest row's
        if Tk > self.max_len:
            raise ValueError(f"slot cache full: {Tk} positions exceed its max_len {self.max_len}")
        for r in self._rows:
            self.lengths[r] += T
        self._rows_t = torch.tensor(self._rows, device=device)  # (B,)
        offsets = torch.arange(T, device=device)  # (T,)
        positions = torch.tensor(starts, device=device)[:, None] + offsets  # (B, T)
        keys = torch.arange(Tk, device=device)  # (Tk,)
        self._mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # (B, 1, T, Tk)
        self._positions = positions
        return positions

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write layer `layer`'s new keys and values (B, Hkv, T, Hd) at the reserved
        positions; returns the selected rows' keys and values (B, Hkv, Tk, Hd) and the mask
        (B, 1, T, Tk), True where a new position may attend."""
        if layer == len(self.keys):
            _, Hkv, _, Hd = k.shape
            for store in (self.keys, self.values):
                shape = (self.slots, Hkv, self.max_len, Hd)
                store.append(torch.zeros(shape, dtype=k.dtype, device=k.device))
        kb, vb = self.keys[layer], self.values[layer]
        rows, positions = self._rows_t[:, None], self._positions  # (B, 1), (B, T)
        # advanced indices around a slice: the (B, T) index dims come first, then Hkv, Hd
        kb[rows, :, positions] = k.transpose(1, 2).to(kb.dtype)  # (B, T, Hkv, Hd)
        vb[rows, :, positions] = v.transpose(1, 2).to(vb.dtype)
        Tk = self._mask.shape[-1]
        if self._packed is not None:  # consecutive rows: a view, no copy
            first, end = self._packed
            return kb[first:end, :, :Tk], vb[first:end, :, :Tk], self._mask
        index = self._rows_t
        return (
            kb[:, :, :Tk].index_select(0, index),
            vb[:, :, :Tk].index_select(0, index),
            self._mask,
        )
