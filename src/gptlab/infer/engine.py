"""The engine: the one decoding path for text (`gptlab generate`, `--chat`, `gptlab serve`,
the lm-eval adapter), so a prompt with the same settings and seed gives the same text in each.

Continuous batching: each running generation holds a slot of a `SlotCache`; every step feeds
the newest token of each through the model as one batch (B = running, T = 1). Between steps,
waiting prompts are prefilled into free slots and finished ones leave, so short and long
requests never wait for each other. Slots stay packed (0..n-1), so the batch reads its keys
and values as a view. A generation past the context window (every one, with
`use_cache=False`) goes on "windowed", recomputing its last `context_length` tokens each step
as `gptlab.infer.sampling.generate` does. A seeded generation has its own generator, so its
text never depends on the batch, and alone it gives the tokens `generate` gives.

`start()` runs the loop on its own thread, fed by `submit` (the server; callbacks run on that
thread and must be quick and not raise); not started, `decode`, `stream` and `complete` run
it in the calling thread (command line, chat, evals).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from gptlab.data.tokenizer import ENDOFTEXT, Tokenizer, eot_id
from gptlab.errors import GptlabError
from gptlab.infer.sampling import TextStream, sample_next
from gptlab.runtime.device import autocast

if TYPE_CHECKING:
    from gptlab.interop.runs import Run

log = logging.getLogger(__name__)


class SlotCache:
    """A KV cache of independent rows ("slots"), each one sequence with its own length, so
    sequences of different lengths decode in one batch: `select` names the next forward's
    slots, the model's `advance` reserves their positions, and each layer's `update` writes
    there and attends with a per-row mask. Buffers are (slots, Hkv, max_len, Hd) per layer,
    shaped and typed by the first keys written."""

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
        self._packed: tuple[int, int] | None = None  # (first, end) for consecutive rows

    def select(self, rows: Sequence[int]) -> None:
        """The slots the next forward runs on, in batch order."""
        self._rows = list(rows)
        first, n = self._rows[0], len(self._rows)
        self._packed = (first, first + n) if self._rows == list(range(first, first + n)) else None

    def free(self, slot: int) -> None:
        """Forget the slot's positions (the next user overwrites its buffer rows)."""
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        """Move slot `src`'s contents to `dst` and free `src` (to keep slots packed)."""
        n = self.lengths[src]
        for buf in (*self.keys, *self.values):
            buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def advance(self, T: int, device: torch.device) -> torch.Tensor:
        """Reserve each selected row's next T positions; returns them (B, T)."""
        starts = [self.lengths[r] for r in self._rows]
        Tk = max(starts) + T  # the longest row's keys
        if Tk > self.max_len:
            raise ValueError(f"slot cache full: {Tk} positions exceed its max_len {self.max_len}")
        for r in self._rows:
            self.lengths[r] += T
        self._rows_t = torch.tensor(self._rows, device=device)  # (B,)
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)
        keys = torch.arange(Tk, device=device)  # (Tk,)
        self._mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # (B, 1, T, Tk)
        self._positions = positions  # (B, T)
        return positions

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write new keys and values (B, Hkv, T, Hd) at the reserved positions; returns the
        rows' keys and values (B, Hkv, Tk, Hd) and the mask (B, 1, T, Tk), True to attend."""
        if layer == len(self.keys):
            shape = (self.slots, k.shape[1], self.max_len, k.shape[3])  # (S, Hkv, max_len, Hd)
            for store in (self.keys, self.values):
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
        r = self._rows_t
        return kb[:, :, :Tk].index_select(0, r), vb[:, :, :Tk].index_select(0, r), self._mask


@dataclass(frozen=True)
class Sampling:
    """How one generation samples and when it ends."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()  # ids that end it besides <|endoftext|> (a chat turn's end)


@dataclass(frozen=True)
class Event:
    """New text of one generation; the last event has a finish_reason ("stop": end token or
    stop string; "length": max_tokens; "error": the engine failed, `text` says why)."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0  # tokens sampled so far


@dataclass(eq=False)
class Generation:
    """One sequence being generated: its prompt, settings, slot and text so far."""

    prompt: list[int]
    sampling: Sampling
    on_event: Callable[[Event], None]
    text: TextStream  # its `ids` are the tokens sampled so far, but an ending one
    generator: torch.Generator | None  # None: the engine's shared one
    slot: int = -1  # -1: no slot (waiting, windowed or gone)
    windowed: bool = False  # decoded without a cache, over the last context_length ids
    next_id: int = -1  # the token to feed at the next step
    tokens: int = 0  # tokens sampled
    cancelled: bool = False  # set from another thread; read between steps
    finished: bool = False


class Engine:
    """The decode loop over one model and its tokenizer, `max_batch` generations at once
    (further ones wait in order). `seed` seeds the generator unseeded generations share
    (None: a random one)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        max_batch: int = 16,
        precision: str = "fp32",
        prefill_tokens: int | None = None,
        use_cache: bool = True,
        compile: bool = False,
        seed: int | None = None,
    ):
        self.context_length = model.cfg.context_length
        self.vocab_limit = min(tokenizer.n_vocab, model.cfg.vocab_size)
        # shapes change with the batch and the cache length at every step: compile dynamic
        self.model = torch.compile(model, dynamic=True) if compile else model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.precision = precision
        self.use_cache = use_cache
        self.eos = eot_id(tokenizer)
        self.cache = SlotCache(max_batch, self.context_length)
        # prompt tokens prefilled between two steps (at least one prompt): bounds how long
        # running generations pause while new ones join
        self.prefill_tokens = prefill_tokens or self.context_length
        self.running: list[Generation] = []  # running[i] holds slot i
        self.windowed: list[Generation] = []  # running without a slot
        self.waiting: deque[Generation] = deque()
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        self._shared_generator = torch.Generator(device=self.device).manual_seed(seed)
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    @classmethod
    def for_run(cls, run: Run, command: str = "generate", **options) -> Engine:
        """An engine over a run's model and tokenizer; a GptlabError naming `command` for a
        classifier, which writes no text."""
        classes = run.config.model.num_classes
        if classes:
            raise GptlabError(
                f"{command} needs a language model; this run is a classifier of {classes} "
                "classes (gptlab finetune); evaluate it with gptlab eval"
            )
        return cls(run.model, run.tokenizer, **options)

    # ------------------------------------------------------------------ on its own thread

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="gptlab-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop (running generations get no further events)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(
        self, prompt: Sequence[int], sampling: Sampling, on_event: Callable[[Event], None]
    ) -> Generation:
        """Queue a generation after `prompt` (ids, at least one)."""
        generator = None
        if sampling.seed is not None and sampling.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        text = TextStream(self.tokenizer, sampling.stop)
        gen = Generation(list(prompt), sampling, on_event, text, generator)
        gen.windowed = not self.use_cache
        with self._cond:
            self.waiting.append(gen)
            self._cond.notify()
        return gen

    def cancel(self, gen: Generation) -> None:
        """Drop a generation (its client went away); its slot is freed before the next step."""
        with self._cond:
            gen.cancelled = True
            self._cond.notify()

    def load(self) -> dict[str, int]:
        """How busy the engine is: running and waiting generations, and its slots."""
        running = len(self.running) + len(self.windowed)
        return {"running": running, "waiting": len(self.waiting), "slots": self.cache.slots}

    @torch.inference_mode()  # the whole thread: the cache's tensors are inference tensors
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._drop_cancelled()
                while not (self.running or self.windowed or self.waiting or self._closing):
                    self._cond.wait()
                    self._drop_cancelled()
                if self._closing:
                    return
            self.step()

    # ------------------------------------------------------------------ in the caller's thread

    def decode(
        self, prompts: Sequence[str | Sequence[int]], sampling: Sampling | Sequence[Sampling]
    ) -> Iterator[tuple[int, Event]]:
        """Generate after each prompt (text or ids) in the calling thread, with one `sampling`
        for all or one per prompt; yields (prompt index, event) until all finish. Leaving
        early cancels the rest; a model error is raised. Only for an engine not `start`ed."""
        if self._thread is not None:
            raise RuntimeError("this engine runs on its own thread: submit to it instead")
        each = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        events: deque[tuple[int, Event]] = deque()
        gens = [
            self.submit(self._ids(p), s, lambda e, i=i: events.append((i, e)))
            for i, (p, s) in enumerate(zip(prompts, each, strict=True))
        ]
        try:
            while events or not all(g.finished for g in gens):
                if not events:
                    self.step()
                while events:
                    yield events.popleft()
        finally:
            for gen in gens:
                gen.cancelled = not gen.finished
            with torch.inference_mode():  # the cache's tensors are inference tensors
                self._drop_cancelled()

    def stream(self, prompt: str | Sequence[int], sampling: Sampling) -> Iterator[str]:
        """The text generated after one prompt, piece by piece as it becomes certain."""
        for _, event in self.decode([prompt], sampling):
            if event.text:
                yield event.text

    def complete(
        self, prompts: Sequence[str | Sequence[int]], sampling: Sampling | Sequence[Sampling]
    ) -> list[str]:
        """The text generated after each prompt (all decoded together)."""
        texts: list[list[str]] = [[] for _ in prompts]
        for i, event in self.decode(prompts, sampling):
            texts[i].append(event.text)
        return ["".join(t) for t in texts]

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, allowed_special={ENDOFTEXT})
        else:
            ids = list(prompt)
        if not ids:
            raise GptlabError("a prompt is empty; give some text to continue")
        return ids

    # ------------------------------------------------------------------ the steps

    @torch.inference_mode()
    def step(self) -> None:
        """One round: waiting generations join (prefilled: their first token), then windowed
        ones get a token each, and those in slots one each in one forward pass."""
        with self._cond:
            self._drop_cancelled()
            joining = self._take_waiting()
        windowed = list(self.windowed)
        for gen in joining:
            self._guarded(self._prefill, [gen], gen)
        for gen in windowed:
            if not gen.finished:
                self._guarded(self._window_step, [gen], gen)
        if self.running:
            self._guarded(self._decode_step, list(self.running))

    def _take_waiting(self) -> list[Generation]:
        """The waiting generations that free slots and the prefill budget let join (always
        one, if a slot is free)."""
        joining, budget = [], self.prefill_tokens
        free = self.cache.slots - len(self.running)
        while self.waiting and len(joining) < free:
            if joining and len(self.waiting[0].prompt) > budget:
                break
            gen = self.waiting.popleft()
            budget -= len(gen.prompt)
            joining.append(gen)
        return joining

    def _drop_cancelled(self) -> None:
        self.waiting = deque(g for g in self.waiting if not g.cancelled)
        self._leave([g for g in (*self.running, *self.windowed) if g.cancelled])

    def _guarded(self, step: Callable, gens: list[Generation], *args) -> None:
        """Run a step; if it fails on the engine's thread its generations end with an error
        event and the loop serves the others (in the caller's thread the error is raised)."""
        try:
            with autocast(self.device, self.precision):
                step(*args)
        except Exception as e:
            if self._thread is None:
                raise
            log.exception("generation step failed")  # one failed step must not stop the server
            failed = [g for g in gens if not g.finished]
            for gen in failed:
                gen.finished = True
                gen.on_event(Event(f"generation failed: {e}", "error", gen.tokens))
            self._leave(failed)

    def _prefill(self, gen: Generation) -> None:
        """Run the prompt's last context_length ids (B = 1) into a free slot, joining the batch."""
        if gen.sampling.max_tokens < 1:  # nothing to sample
            gen.finished = True
            gen.on_event(Event("", "length", 0))
            return
        if gen.windowed:
            self.windowed.append(gen)
            self._window_step(gen)
            return
        gen.slot = len(self.running)
        self.running.append(gen)
        self.cache.free(gen.slot)
        self.cache.select([gen.slot])
        ids = torch.tensor([gen.prompt[-self.context_length :]], device=self.device)  # (1, T)
        logits = self.model(ids, self.cache)[:, -1, : self.vocab_limit]  # (1, V)
        self._accept([gen], self._sample(logits, [gen]))

    def _window_step(self, gen: Generation) -> None:
        """One token for a windowed generation: the last context_length ids, no cache."""
        window = (gen.prompt + gen.text.ids)[-self.context_length :]
        ids = torch.tensor([window], device=self.device)  # (1, T)
        logits = self.model(ids)[:, -1, : self.vocab_limit]  # (1, V)
        self._accept([gen], self._sample(logits, [gen]))

    def _decode_step(self) -> None:
        gens = list(self.running)
        self.cache.select(range(len(gens)))
        ids = torch.tensor([[g.next_id] for g in gens], device=self.device)  # (B, 1)
        logits = self.model(ids, self.cache)[:, -1, : self.vocab_limit]  # (B, V)
        self._accept(gens, self._sample(logits, gens))

    def _sample(self, logits: torch.Tensor, gens: list[Generation]) -> list[int]:
        """Next ids for logits (B, V), by groups of equal settings (a seeded row alone)."""
        out = [0] * len(gens)
        groups: dict[tuple, list[int]] = {}
        for i, g in enumerate(gens):
            s = g.sampling
            key = (
                (0.0,) if s.temperature <= 0 else (s.temperature, s.top_k, s.top_p, id(g.generator))
            )
            groups.setdefault(key, []).append(i)
        for rows in groups.values():
            first = gens[rows[0]]
            s, generator = first.sampling, first.generator or self._shared_generator
            picked = logits if len(rows) == len(gens) else logits[rows]  # (b, V)
            ids = sample_next(picked, s.temperature, s.top_k, s.top_p, generator)
            for i, token in zip(rows, ids[:, 0].tolist(), strict=True):
                out[i] = token
        return out

    def _accept(self, gens: list[Generation], tokens: list[int]) -> None:
        """Hand each generation its token: report new text, let the finished leave, and send
        one that fills its slot on windowed."""
        done = []
        for gen, token in zip(gens, tokens, strict=True):
            gen.tokens += 1
            reason = None
            if token == self.eos or token in gen.sampling.stop_ids:
                reason = "stop"
                piece = gen.text.flush()
            else:
                piece = gen.text.push(token)
                if gen.text.stopped:
                    reason = "stop"
                elif gen.tokens >= gen.sampling.max_tokens:
                    reason = "length"
                    piece += gen.text.flush()
            gen.next_id = token
            if reason is not None:
                gen.finished = True
                done.append(gen)
            if reason is not None or piece:
                gen.on_event(Event(piece, reason, gen.tokens))
        self._leave(done)
        full = [
            g for g in gens if g.slot >= 0 and self.cache.lengths[g.slot] >= self.context_length
        ]
        self._leave(full)  # the next step would feed one more position than the context holds
        for gen in full:
            gen.windowed = True
            self.windowed.append(gen)

    def _leave(self, gens: list[Generation]) -> None:
        """Take generations out, moving the last running ones into their slots (packed)."""
        self.windowed = [g for g in self.windowed if g not in gens]
        for gen in sorted(gens, key=lambda g: g.slot, reverse=True):
            slot, last = gen.slot, len(self.running) - 1
            if slot < 0:
                continue
            if slot != last:
                self.cache.move(last, slot)
                self.running[slot] = self.running[last]
                self.running[slot].slot = slot
            else:
                self.cache.free(slot)
            self.running.pop()
            gen.slot = -1
