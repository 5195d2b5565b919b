"""Progress views for the terminal: the records training and `gptlab prepare` emit (those of
metrics.jsonl) as a progress bar and lines. The library never prints; the CLI passes one of
these as `on_event`.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any


def _eval_line(r: dict[str, Any]) -> str:
    # The walk-through's labels: the step's 0-based index (r["step"] counts steps done) and
    # the 1-based epoch holding it (an evaluation after epoch 10's last step is Ep 10).
    step, epoch = max(r["step"] - 1, 0), max(1, math.ceil(r["epoch"]))
    return (
        f"Ep {epoch} (Step {step:06d}): "
        f"Train loss {r['train_loss']:.3f}, Val loss {r['val_loss']:.3f}"
    )


# One line for each event that is printed as it comes (the rest need the view's state).
LINES = {
    "eval": _eval_line,
    "sample": lambda r: "sample: " + r["text"].replace("\n", " / "),
    "compile": lambda r: f"compiled the model in {r['seconds']:.1f} s (first step)",
    "nonfinite": lambda r: (
        f"step {r['step']}: non-finite loss or gradient, step skipped ({r['consecutive']} in a row)"
    ),
    "rollback": lambda r: (
        f"step {r['from_step']}: non-finite steps; rolled back to {r['checkpoint']} "
        f"with learning rate x{r['lr_scale']:g}"
    ),
    "loading": lambda r: (
        f"gptlab: streaming prepared data {r['source']!r} ({r['tokenizer']} tokenizer, "
        "its own train/val split)"
        if r["prepared"]
        else f"gptlab: loading data {r['source']!r} ({r['tokenizer']} tokenizer)"
    ),
    "init_from": lambda r: f"gptlab: loading weights from {r['source']!r}",
}


def _records_note(r: dict[str, Any]) -> str:
    """A finetune's records in the start line: how many, and how many were cut."""
    if "format" not in r:
        return ""
    cut = f", {r['truncated']:,} cut to the context" if r["truncated"] else ""
    return (
        f" ({r['train_examples']:,} / {r['val_examples']:,} / {r['test_examples']:,} "
        f"{r['format']} records for train / val / test{cut})"
    )


def _trainable_note(r: dict[str, Any]) -> str:
    """The trainable share when not every parameter trains (LoRA, finetune.train_blocks)."""
    n, total = r.get("trainable", r["params"]), r["params"]
    if n == total:
        return ""
    return f" ({n:,} trainable / {total:,} = {100 * n / total:.2f}%)"


class _BarView:
    bar = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ConsoleView(_BarView):
    """Renders trainer events as a tqdm progress bar and lines; `note` is printed at the start."""

    def __init__(self, quiet: bool = False, note: str | None = None):
        self.quiet = quiet
        self.note = note

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def __call__(self, r: dict[str, Any]) -> None:
        ev = r["event"]
        if ev in LINES:
            self._print(LINES[ev](r))
        elif ev == "checkpoint_failed" and not r.get("final"):  # a final failure is an error
            self._print(f"warning: {r['error']} (training goes on)")
        elif handler := getattr(self, f"_on_{ev}", None):
            handler(r)

    def _on_start(self, r: dict[str, Any]) -> None:
        if self.note:  # with the progress lines: stderr is kept for the one-line errors
            self._print(self.note)
        world = r.get("world_size", 1)
        procs = f" | {world} processes ({r['parallel']})" if world > 1 else ""
        if r.get("budget_s"):
            procs += f" | time budget {r['budget_s']:g} s"
        if r.get("threads"):
            procs += f" | {r['threads']} CPU threads"
        self._print(
            f"model: {r['params'] / 1e6:.2f}M parameters{_trainable_note(r)} | device {r['device']} | precision {r['precision']}"
            f"{' | compiled' if r['compiled'] else ''}{procs} | {r['batch_tokens']} tokens/step ({r['accum']} micro-batches)"
            f" | {r['train_tokens']:,} train / {r['val_tokens']:,} val tokens" + _records_note(r)
        )
        # A bar only on a terminal: in a log file or pipe its redraws are noise, and one
        # plain line per logged step is what a reader (or a supervising script) wants.
        if not self.quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=r["total_steps"] or None,
                initial=r["step"],
                unit="step",
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def _on_resume(self, r: dict[str, Any]) -> None:
        self._print(f"resuming from {r['checkpoint']} (step {r['step']})")
        for c in r["changed"]:
            self._print(f"  changed: {c}")

    def _on_train(self, r: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = r["step"]
            self.bar.set_postfix_str(
                f"loss {r['loss']:.3f} | {r['tokens'] / 1e6:.2f}M tok | {r['tokens_per_s']:,.0f} tok/s"
                f" | MFU {100 * r['mfu']:.1f}%",
                refresh=True,
            )
        elif not self.quiet:
            done = f" ({100 * r['progress']:.0f}% of the budget)" if "progress" in r else ""
            self._print(
                f"step {r['step']}{done}: loss {r['loss']:.3f}, {r['tokens_per_s']:,.0f} tok/s"
            )

    def _on_end(self, r: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = r["step"]
            self.bar.refresh()
        self.close()
        val = r.get("val_loss")
        print(
            f"done ({r['reason']}): {r['step']} steps, {r['tokens']:,} tokens in {r['train_time']:.0f} s"
            + (f", val loss {val:.3f}" if val is not None else "")
        )


class PrepareView(_BarView):
    """Renders prepare events: a byte-based progress bar with tokens/s."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.t0 = time.perf_counter()
        self.tokens0 = 0

    def __call__(self, r: dict[str, Any]) -> None:
        ev = r["event"]
        if ev == "chars":
            print(f"char tokenizer: {r['n_chars']} characters found", flush=True)
        elif ev == "start":
            if r["resumed"]:
                print(f"continuing an interrupted preparation ({r['tokens']:,} tokens done)")
            print(
                f"tokenizing with {r['workers']} worker(s): vocabulary {r['n_vocab']:,}, "
                f"shards of {r['dtype']}",
                flush=True,
            )
            self.tokens0 = r["tokens"]
            if not self.quiet:
                from tqdm.auto import tqdm

                self.bar = tqdm(
                    total=r["total_bytes"] or None,
                    initial=r["done_bytes"],
                    unit="B",
                    unit_scale=True,
                    dynamic_ncols=True,
                )
        elif ev == "progress" and self.bar is not None:
            self.bar.n = r["done_bytes"]
            rate = (r["tokens"] - self.tokens0) / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(
                f"{r['tokens']:,} tokens | {r['documents']:,} docs | {rate:,.0f} tok/s",
                refresh=True,
            )
        elif ev == "finished_already":
            print("already prepared: nothing to do")
