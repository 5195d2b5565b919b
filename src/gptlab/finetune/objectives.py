"""Finetuning's objectives: what `gptlab finetune` trains, and the losses that score it.

The Trainer (gptlab.train.loop) is the same as pretraining's; the finetuning data
(gptlab.finetune.data) comes with one of these objectives:

- `SFT`, supervised finetuning on instructions or chat records: the mean cross-entropy over
  the learned (response) tokens only (`lm_loss`); samples answer the first validation prompt;
- `Classification`, the book's chapter 6: the cross-entropy of the class logits at each
  text's last token (`classification_loss`); evaluations add the accuracy on both splits.

Both train the parameters `finetune.train_blocks` leaves trainable (`set_trainable`) or, with
`finetune.lora_rank`, LoRA adapters on a frozen base (gptlab.model.lora); then a checkpoint
keeps only what trains, the base being named in the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.config.schema import FinetuneConfig, RunConfig
from gptlab.finetune.data import IGNORE_INDEX, FinetuneData
from gptlab.model import lora
from gptlab.model.gpt import GPTModel
from gptlab.model.loss import chunked_cross_entropy
from gptlab.train.objectives import Objective

# --------------------------------------------------------------------------- losses


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the learned target tokens of a padded batch (targets (B, T))
    or a packed one (targets (B, 2, T), the example numbers in [:, 1]): a scalar.

    A bare GPTModel runs its output head on the learned positions only: the prompts'
    and the padding's logits, most of a finetuning batch's (B, T, V), are never formed. A
    wrapped model (DDP; FSDP2, which makes the model's class a subclass of its own) goes
    through its forward, which its hooks need."""
    doc_ids = None
    if targets.dim() == 3:
        doc_ids, targets = targets[:, 1], targets[:, 0]
    if type(model) is GPTModel:
        learned = targets != IGNORE_INDEX  # (B, T)
        hidden = model.hidden_states(inputs, doc_ids=doc_ids)[learned]  # (N, D)
        head = model.out_head
        if type(head) is nn.Linear and head.bias is None and not model.cfg.num_classes:
            # the head and its loss a chunk of rows at a time: no (N, V) logits kept
            return chunked_cross_entropy(
                hidden,
                head.weight,
                targets[learned],
                model.cfg.vocab_size,
                softcap=model.cfg.logit_softcap,
            )
        return F.cross_entropy(model.head_logits(hidden), targets[learned])
    logits = model(inputs, doc_ids=doc_ids)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def last_token_logits(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The classifier's logits (B, C) at each text's last token (targets[:, 1])."""
    logits = model(inputs)  # (B, T, C)
    return logits[torch.arange(inputs.shape[0], device=inputs.device), targets[:, 1]]  # (B, C)


def classification_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the last token's class logits against the labels (targets[:, 0])."""
    return F.cross_entropy(last_token_logits(model, inputs, targets), targets[:, 0])


@torch.no_grad()
def classification_accuracy(
    model: nn.Module, loader, device, num_batches: int | None = None
) -> float:
    """Share of examples whose last-token argmax is their label, over the loader's first
    `num_batches` batches (all when None): the book's calc_accuracy_loader. Eval mode while
    it runs; NaN for an empty loader."""
    was_training = model.training
    model.eval()
    correct = total = 0
    n = len(loader) if num_batches is None else min(num_batches, len(loader))
    for i in range(n):
        x, y = loader.batch(0, i)
        x, y = x.to(device), y.to(device)
        pred = last_token_logits(model, x, y).argmax(dim=-1)  # (B,)
        correct += int((pred == y[:, 0]).sum())
        total += len(pred)
    model.train(was_training)
    return correct / total if total else float("nan")


def set_trainable(model: nn.Module, train_blocks: int) -> None:
    """Train only the top `train_blocks` transformer blocks, the final norm and the head
    (the book's chapter 6 trains 1); -1 leaves every parameter trainable."""
    if train_blocks < 0:
        return
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = list(model.trf_blocks)
    top = blocks[len(blocks) - train_blocks :] if train_blocks else []
    for module in [*top, model.final_norm, model.out_head]:
        for p in module.parameters():
            p.requires_grad_(True)


# --------------------------------------------------------------------------- objectives


class SFT(Objective):
    """Supervised finetuning on rendered instructions or chat records (`data`), with the
    run's `fc` (which parameters train, LoRA)."""

    def __init__(self, data: FinetuneData, fc: FinetuneConfig):
        self.data, self.fc = data, fc
        self.tokenizer, self.fingerprint = data.tokenizer, data.fingerprint

    def loaders(self, cfg: RunConfig, world_size: int) -> tuple[Any, Any]:
        """(train, val) example loaders; every rank has all of them (it takes its share of a
        step's batches by index)."""
        return self.data.loaders(cfg.train.batch_size, cfg.train.seed)

    def sizes(self) -> dict[str, Any]:
        return self.data.sizes()

    def prepare(self, model: nn.Module, cfg: RunConfig) -> None:
        """The top finetune.train_blocks blocks train or, with LoRA, adapters on the frozen
        rest (and a classifier's head)."""
        set_trainable(model, self.fc.train_blocks)
        if self.fc.lora_rank > 0:
            lora.prepare(model, self.fc)

    def batch_loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return lm_loss(model, inputs, targets)

    def sample_prompt(self, cfg: RunConfig) -> torch.Tensor | None:
        """The first validation prompt (None: a chat whose first turn is the assistant's)."""
        ids = self.data.sample_ids
        return None if ids is None else torch.tensor([ids])

    def saved_weights(self, model: nn.Module) -> nn.Module | dict[str, torch.Tensor]:
        """A LoRA run keeps what trains (its base is named in the config); others, all."""
        return lora.trained_state_dict(model) if self.fc.lora_rank > 0 else model


class Classification(SFT):
    """The book's chapter 6: a class per label, scored at each text's last token; no
    samples (a classifier writes no text), evaluations add each split's accuracy."""

    def batch_loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return classification_loss(model, inputs, targets)

    def sample_prompt(self, cfg: RunConfig) -> None:
        return None

    def metrics(
        self, model: nn.Module, loaders: Sequence[tuple[str, Any]], device, num_batches: int
    ) -> dict[str, float]:
        return {
            split + "_acc": classification_accuracy(model, loader, device, num_batches)
            for split, loader in loaders
        }


def finetune_objective(data: FinetuneData, fc: FinetuneConfig) -> SFT:
    """The objective of `data`'s format: Classification for classification records, SFT
    for instructions and chat."""
    return (Classification if data.is_classifier else SFT)(data, fc)
