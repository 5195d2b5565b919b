"""Continuous batching: many generations share one model, one forward pass per step.

One background thread owns the model. Each running generation holds a slot of a
`SlotCache`; at every step the newest token of every running generation goes through the
model as one batch (B = running generations, T = 1), each row at its own position. Between
steps, new prompts are prefilled one at a time (B = 1) into free slots and join the batch,
and generations that finished or whose client went away leave it, so short and long
requests never wait for each other. Slots are kept packed (running generations in slots
0..n-1; a leaving one's place is taken by the last), so the batch reads its keys and
values as a view, without copying them.

Sampling is `gptlab.infer.sampling.sample_next` per group of rows that share settings; a seeded
generation samples from its own generator, so its text depends only on its prompt, its
settings and its seed, never on what else is in the batch. Text comes out through
`gptlab.infer.sampling.TextStream` (stop strings, unfinished characters held back).

Callbacks run on the engine's thread: they must be quick and must not raise.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gptlab.data.tokenizer import Tokenizer, eot_id
from gptlab.infer.sampling import SlotCache, TextStream, sample_next
from gptlab.runtime.device import autocast

log = logging.getLogger(__name__)


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


class Generation:
    """One sequence being generated: its prompt, settings, slot and text so far."""

    def __init__(
        self,
        prompt: list[int],
        sampling: Sampling,
        on_event: Callable[[Event], None],
        text: TextStream,
        generator: torch.Generator | None,
    ):
        self.prompt = prompt
        self.sampling = sampling
        self.on_event = on_event
        self.text = text
        self.generator = generator  # None: the engine's shared one
        self.slot = -1
        self.next_id = -1  # the token to feed at the next step
        self.tokens = 0  # tokens sampled
        self.cancelled = False  # set from another thread; read between steps
        self.finished = False


class Engine:
    """The decode loop: `submit` generations from any thread; events arrive through each
    generation's callback. `max_batch` is the number of slots (generations decoding at
    once); further ones wait in order."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        max_batch: int = 16,
        precision: str = "fp32",
        prefill_tokens: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.precision = precision
        self.context_length = model.cfg.context_length
        self.vocab_limit = min(tokenizer.n_vocab, model.cfg.vocab_size)
        self.eos = eot_id(tokenizer)
        self.cache = SlotCache(max_batch, self.context_length)
        # prompt tokens prefilled between two decode steps (at least one prompt): bounds how
        # long running generations pause while new ones join
        self.prefill_tokens = prefill_tokens or self.context_length
        self.running: list[Generation] = []  # running[i] holds slot i
        self.waiting: deque[Generation] = deque()
        self._shared_generator = torch.Generator(device=self.device)
        self._shared_generator.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the public side

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
        """Queue a generation of up to `sampling.max_tokens` tokens after `prompt` (ids,
        at least one; prompt plus tokens must fit the context, the caller checks)."""
        generator = None
        if sampling.seed is not None and sampling.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        text = TextStream(self.tokenizer, sampling.stop)
        gen = Generation(list(prompt), sampling, on_event, text, generator)
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
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "slots": self.cache.slots,
        }

    # ------------------------------------------------------------------ the loop

    @torch.inference_mode()  # the whole thread: the cache's tensors are inference tensors
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._drop_cancelled()
                while not (self.running or self.waiting or self._closing):
                    self._cond.wait()
                    self._drop_cancelled()
                if self._closing:
                    return
                joining = self._take_waiting()
            for gen in joining:
                self._guarded(self._prefill, [gen], gen)
            if self.running:
                self._guarded(self._decode_step, list(self.running))

    def _take_waiting(self) -> list[Generation]:
        """The waiting generations that join now: as many as free slots and the prefill
        budget allow (always one, if a slot is free)."""
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
        self._release([g for g in self.running if g.cancelled])

    def _guarded(self, step: Callable, gens: list[Generation], *args) -> None:
        """Run a prefill or decode step; if it fails, its generations end with an error
        event and leave, and the loop goes on serving the others."""
        try:
            with autocast(self.device, self.precision):
                step(*args)
        except Exception as e:  # one failed step must not stop the server
            log.exception("generation step failed")
            failed = [g for g in gens if not g.finished]
            for gen in failed:
                gen.finished = True
                gen.on_event(Event(f"generation failed: {e}", "error", gen.tokens))
            self._release([g for g in failed if g.slot >= 0])

    def _prefill(self, gen: Generation) -> None:
        """Run the prompt alone (B = 1) into the next free slot; it joins the batch."""
        gen.slot = len(self.running)
        self.running.append(gen)
        self.cache.free(gen.slot)
        self.cache.select([gen.slot])
        ids = torch.tensor([gen.prompt], device=self.device)  # (1, T)
        logits = self.model(ids, self.cache)[:, -1, : self.vocab_limit]  # (1, V)
        self._accept([gen], self._sample(logits, [gen]))

    def _decode_step(self) -> None:
        """One token for every running generation, in one forward pass."""
        gens = list(self.running)
        self.cache.select(range(len(gens)))
        ids = torch.tensor([[g.next_id] for g in gens], device=self.device)  # (B, 1)
        logits = self.model(ids, self.cache)[:, -1, : self.vocab_limit]  # (B, V)
        self._accept(gens, self._sample(logits, gens))

    def _sample(self, logits: torch.Tensor, gens: list[Generation]) -> list[int]:
        """Next ids for logits (B, V): greedy rows in one argmax, sampled rows by groups
        of equal settings (a seeded row alone, with its own generator)."""
        out = [0] * len(gens)
        groups: dict[tuple, list[int]] = {}
        for i, g in enumerate(gens):
            s = g.sampling
            key = (
                (0.0,) if s.temperature <= 0 else (s.temperature, s.top_k, s.top_p, id(g.generator))
            )
            groups.setdefault(key, []).append(i)
        for rows in groups.values():
            s, gen = gens[rows[0]].sampling, gens[rows[0]].generator
            picked = logits if len(rows) == len(gens) else logits[rows]  # (b, V)
            ids = sample_next(
                picked, s.temperature, s.top_k, s.top_p, gen or self._shared_generator
            )
            for i, token in zip(rows, ids[:, 0].tolist(), strict=True):
                out[i] = token
        return out

    def _accept(self, gens: list[Generation], tokens: list[int]) -> None:
        """Hand each generation its new token: report new text, and let the finished leave."""
        done = []
        for gen, token in zip(gens, tokens, strict=True):
            gen.tokens += 1
            reason = None
            piece = ""
            if token == self.eos or token in gen.sampling.stop_ids:
                reason = "stop"
                piece = gen.text.flush()
            else:
                piece = gen.text.push(token)
                if gen.text.stopped:
                    reason = "stop"
                elif gen.tokens >= gen.sampling.max_tokens or self._slot_full(gen):
                    reason = "length"
                    piece += gen.text.flush()
            gen.next_id = token
            if reason is not None:
                gen.finished = True
                done.append(gen)
                gen.on_event(Event(piece, reason, gen.tokens))
            elif piece:
                gen.on_event(Event(piece, None, gen.tokens))
        self._release(done)

    def _slot_full(self, gen: Generation) -> bool:
        # the next step would feed one more position than the context holds
        return self.cache.lengths[gen.slot] >= self.context_length

    def _release(self, gens: list[Generation]) -> None:
        """Free the generations' slots, moving the last running ones into the gaps so the
        running generations stay in slots 0..n-1."""
        for gen in sorted(gens, key=lambda g: g.slot, reverse=True):
            slot, last = gen.slot, len(self.running) - 1
            if slot < 0:
                continue
            if slot != last:
                moved = self.running[last]
                self.cache.move(last, slot)
                self.running[slot] = moved
                moved.slot = slot
            else:
                self.cache.free(slot)
            self.running.pop()
            gen.slot = -1
