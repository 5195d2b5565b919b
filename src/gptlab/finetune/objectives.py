"""Finetuning's objectives: what `gptlab finetune` trains, and the losses that score it.

- `SFT`, on instructions or chat records: the mean cross-entropy over the learned tokens
  only (`lm_loss`); samples answer the first validation prompt;
- `Classification`, the book's chapter 6: the cross-entropy of the class logits at each
  text's last token (`classification_loss`); evaluations add the accuracy on both splits.

Both train the parameters `finetune.train_blocks` leaves trainable (`set_trainable`) or, with
`finetune.lora_rank`, LoRA adapters on a frozen base, whose checkpoints keep only the adapters.
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


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the learned target tokens of a padded batch (targets (B, T))
    or a packed one (targets (B, 2, T), the example numbers in [:, 1]): a scalar. A bare
    GPTModel runs its head on the learned positions only; a wrapped one (DDP, FSDP2) goes
    through its forward, which its hooks need."""
    doc_ids = None
    if targets.dim() == 3:
        doc_ids, targets = targets[:, 1], targets[:, 0]
    if type(model) is GPTModel:
        learned = targets != IGNORE_INDEX  # (B, T)
        hidden = model.hidden_states(inputs, doc_ids=doc_ids)[learned]  # (N, D)
        head, cfg = model.out_head, model.cfg
        if type(head) is nn.Linear and head.bias is None and not cfg.num_classes:
            # the head and its loss a chunk of rows at a time: no (N, V) logits kept
            return chunked_cross_entropy(
                hidden, head.weight, targets[learned], cfg.vocab_size, softcap=cfg.logit_softcap
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
    `num_batches` batches (all when None): the book's calc_accuracy_loader; NaN when empty."""
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


class SFT(Objective):
    """Supervised finetuning on rendered instructions or chat records, with the run's `fc`."""

    def __init__(self, data: FinetuneData, fc: FinetuneConfig):
        self.data, self.fc = data, fc
        self.tokenizer, self.fingerprint = data.tokenizer, data.fingerprint

    def loaders(self, cfg: RunConfig, world_size: int) -> tuple[Any, Any]:
        """(train, val) example loaders; every rank has all the batches."""
        return self.data.loaders(cfg.train.batch_size, cfg.train.seed)

    def sizes(self) -> dict[str, Any]:
        return self.data.sizes()

    def prepare(self, model: nn.Module, cfg: RunConfig) -> None:
        """The top finetune.train_blocks blocks train or, with LoRA, adapters."""
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
    """The book's chapter 6: a class per label, scored at each text's last token."""

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
    """The objective of `data`'s format: Classification or SFT."""
    return (Classification if data.is_classifier else SFT)(data, fc)
