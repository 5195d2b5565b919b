"""What a run learns: the objective the Trainer is given.

The loop (gptlab.train.loop) is the same for every run; what differs between pretraining and
finetuning lives in an `Objective`: the data it batches, a batch's loss, the prompt the
run's samples continue, which parameters train, what an evaluation reports besides the
losses, and what a checkpoint keeps of the weights. `LanguageModeling` is pretraining's;
finetuning's are in gptlab.finetune.objectives.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gptlab.config.schema import RunConfig
from gptlab.data.corpus import Corpus, make_loaders
from gptlab.errors import GptlabError
from gptlab.evals.loss import calc_loss_batch
from gptlab.infer.sampling import text_to_token_ids
from gptlab.model.loss import make_loss_fn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs, targets) -> scalar


class Objective(ABC):
    """The base objective: every parameter trains, a checkpoint keeps the whole model, a
    batch's loss is calc_loss_batch's, no sample and no metrics beyond the losses. A subclass
    sets `tokenizer` and `fingerprint` (a resume must find the same) and gives `loaders` and
    `sizes`."""

    tokenizer: Any
    fingerprint: str

    @abstractmethod
    def loaders(self, cfg: RunConfig, world_size: int) -> tuple[Any, Any]:
        """(train, val) loaders: `batch(epoch, index)` -> host tensors (inputs, targets),
        the same batch for the same (epoch, index) (exact resume), `len()` in batches."""

    @abstractmethod
    def sizes(self) -> dict[str, Any]:
        """The data's sizes, for the run's "start" record."""

    def prepare(self, model: nn.Module, cfg: RunConfig) -> None:  # noqa: B027 (a hook)
        """Choose the parameters that train (in place, before the optimizer is built)."""

    def batch_loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """One batch's mean loss (a scalar), as the evaluations report it."""
        return calc_loss_batch(inputs, targets, model, inputs.device)

    def loss_fn(self, model: nn.Module, chunked: bool, compiled: bool) -> LossFn:
        """The training step's loss on `model` (the parallel wrapper): `batch_loss`, compiled
        when `compiled`."""

        def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return self.batch_loss(model, inputs, targets)

        return torch.compile(loss_fn) if compiled else loss_fn

    def sample_prompt(self, cfg: RunConfig) -> torch.Tensor | None:
        """The (1, T) token ids the run's samples continue; None: the run writes no text."""
        return None

    def metrics(
        self, model: nn.Module, loaders: Sequence[tuple[str, Any]], device, num_batches: int
    ) -> dict[str, float]:
        """What an evaluation reports besides the losses, over each (split, loader)."""
        return {}

    def saved_weights(self, model: nn.Module) -> nn.Module | dict[str, torch.Tensor]:
        """What a checkpoint keeps: the model, or tensors by state-dict key (a resume then
        loads those keys only)."""
        return model


class LanguageModeling(Objective):
    """Pretraining (`gptlab train`): predict every next token of a Corpus's windows."""

    def __init__(self, corpus: Corpus, token_dropout: float = 0.0):
        self.corpus = corpus
        self.tokenizer = corpus.tokenizer
        self.fingerprint = corpus.fingerprint
        self.token_dropout = token_dropout  # train.token_dropout

    def loaders(self, cfg: RunConfig, world_size: int) -> tuple[Any, Any]:
        """The corpus's window loaders, checked to hold a window in each split."""
        loaders = make_loaders(cfg, self.corpus, world_size)
        for split, loader, tokens in zip(
            ("training", "validation"), loaders, (self.corpus.train, self.corpus.val), strict=True
        ):
            if loader.num_windows == 0:
                raise GptlabError(
                    f"the {split} split has {len(tokens)} tokens, fewer than one context window "
                    f"({cfg.model.context_length + 1}); use more text or a smaller "
                    "--model.context_length"
                )
        return loaders

    def sizes(self) -> dict[str, Any]:
        return {"train_tokens": len(self.corpus.train), "val_tokens": len(self.corpus.val)}

    def loss_fn(self, model: nn.Module, chunked: bool, compiled: bool) -> LossFn:
        """gptlab.model.loss's step loss (the head a chunk of rows at a time when `chunked`);
        with token_dropout, of inputs with that share of ids replaced by random ones (drawn
        from the global random stream, which a checkpoint keeps)."""
        step_loss = make_loss_fn(model, chunked, compiled)
        p, n_vocab = self.token_dropout, self.tokenizer.n_vocab
        if not p:
            return step_loss

        def noisy_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            drop = torch.rand(inputs.shape, device=inputs.device) < p  # (B, T)
            noise = torch.randint_like(inputs, n_vocab)  # (B, T)
            return step_loss(torch.where(drop, noise, inputs), targets)

        return noisy_loss

    def sample_prompt(self, cfg: RunConfig) -> torch.Tensor:
        """train.start_context, encoded; an error now (not an epoch later) when the
        vocabulary cannot encode it."""
        try:
            return text_to_token_ids(cfg.train.start_context, self.tokenizer)
        except GptlabError as e:
            raise GptlabError(
                f"train.start_context cannot be encoded ({e}); set --train.start_context"
            ) from None
