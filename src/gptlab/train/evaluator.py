"""A run's evaluations, each with its schedule: the losses, the task suite, samples.

The loss on both splits (with the objective's own metrics) after the first step and every
train.eval_freq steps, or under a time budget with train.eval_every_frac each time progress
passes a multiple of it; train.eval_tasks' suite every train.task_eval_every steps; a sample
at each epoch's end. A run ends with whichever of them its last step lacks.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from gptlab.config.schema import RunConfig
from gptlab.evals.loss import evaluate_model
from gptlab.evals.tasks import load_suite, run_suite
from gptlab.infer.sampling import generate, token_ids_to_text
from gptlab.train import budget as budget_lib
from gptlab.train.checkpointer import HISTORY_KEYS, TrainState
from gptlab.train.objectives import Objective
from gptlab.train.resume import rng_state, set_rng_state

if TYPE_CHECKING:
    from gptlab.train.loop import Trainer


class Evaluator:
    """Evaluates a Trainer's model when due; `last_val` is the last validation loss (None
    before the first)."""

    def __init__(self, cfg: RunConfig, objective: Objective, budget: budget_lib.TimeBudget | None):
        self.cfg, self.objective, self.budget = cfg, objective, budget
        self.prompt = objective.sample_prompt(cfg)  # None: a run that writes no text
        # read and checked now: a missing suite file fails here, not at the first evaluation
        self.suite = load_suite(cfg.train.eval_tasks) if cfg.train.eval_tasks else None
        self.tasks_step = -1  # the step of the last task evaluation
        self.last_val: float | None = None

    def loss_due(self, state: TrainState) -> bool:
        # After the first step and every eval_freq steps: the walk-through's global_step
        # (0-based) % eval_freq == 0; with eval_every_frac, as progress passes its multiples.
        every, progress = self.cfg.train.eval_every_frac, state.progress
        if self.budget is not None and every:
            return len(progress) == 1 or budget_lib.crossed(progress[-2], progress[-1], every)
        return (state.step - 1) % self.cfg.train.eval_freq == 0

    def tasks_due(self, step: int) -> bool:
        every = self.cfg.train.task_eval_every
        return self.suite is not None and bool(every) and step % every == 0

    def finish(self, trainer: Trainer) -> None:
        """An evaluation, a sample and a task evaluation, each unless the last step had one."""
        st = trainer.state
        if not st.history["step"] or st.history["step"][-1] != st.step:
            self.evaluate(trainer)
        if not trainer.epoch_ended():
            self.sample(trainer)
        if self.suite is not None and self.tasks_step != st.step:
            self.evaluate_tasks(trainer)

    def evaluate(self, trainer: Trainer) -> tuple[float, float]:
        """The train and validation loss on train.eval_iter batches each (and the objective's
        metrics), recorded in the run's history and an "eval" record."""
        t, n = trainer, self.cfg.train.eval_iter
        with t.rt.autocast(), t.average.applied():
            train_loss, val_loss = evaluate_model(
                t.train_model,
                t.train_loader,
                t.val_loader,
                t.device,
                n,
                t.dist,
                self.objective.batch_loss,
            )
            splits = (("train", t.train_loader), ("val", t.val_loader))
            extra = self.objective.metrics(t.train_model, splits, t.device, n)
        st = t.state
        row = (st.step, t.epoch_progress, st.tokens_seen, train_loss, val_loss)
        for key, value in zip(HISTORY_KEYS, row, strict=True):
            st.history[key].append(value)
        st.best_val = min(st.best_val, val_loss)
        self.last_val = val_loss
        t.emit(
            "eval",
            epoch=t.epoch_progress,
            tokens=st.tokens_seen,
            train_loss=train_loss,
            val_loss=val_loss,
            **extra,
        )
        return train_loss, val_loss

    def evaluate_tasks(self, trainer: Trainer) -> dict[str, Any]:
        """Score train.eval_tasks' suite and emit the "tasks" record, with the seconds it took.
        The random state is put back, so the run trains exactly as one without."""
        t, tc = trainer, self.cfg.train
        rng = rng_state()
        t0 = time.perf_counter()
        with t.rt.autocast(), t.average.applied():
            report = run_suite(
                t.model,
                self.objective.tokenizer,
                self.suite,
                context_length=self.cfg.model.context_length,
                batch_size=tc.batch_size,
                device=t.device,
                dist=t.dist,
                max_items=tc.task_eval_items or None,
            )
        set_rng_state(rng)
        self.tasks_step = t.state.step
        seconds = round(time.perf_counter() - t0, 3)  # what the evaluation adds to the run
        return t.emit(
            "tasks", **{k: report[k] for k in ("suite", "tasks", "core")}, seconds=seconds
        )

    def sample(self, trainer: Trainer) -> str:
        """train.sample_tokens tokens after the objective's prompt (temperature 0.8, top-k 40)
        as a "sample" record; "" for a run that writes no text."""
        if self.prompt is None:
            return ""
        t, tok = trainer, self.objective.tokenizer
        t.model.eval()
        idx = self.prompt.to(t.device)
        # Its own generator: sampling never shifts the training run's random stream.
        gen = torch.Generator(device=t.device).manual_seed(self.cfg.train.seed)
        with t.rt.autocast(), t.average.applied():
            out = generate(
                t.model,
                idx,
                self.cfg.train.sample_tokens,
                temperature=0.8,
                top_k=40,
                generator=gen,
                vocab_limit=tok.n_vocab,
            )
        t.model.train()
        text = token_ids_to_text(out.cpu(), tok)
        t.emit("sample", epoch=t.epoch_progress, text=text)
        return text
