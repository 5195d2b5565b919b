"""Weight averaging (train.ema): an exponential moving average of the trained weights.

After every optimizer step the average moves toward the weights by 1 - train.ema. It is
what the run evaluates, samples from and saves as its weights (so `gptlab eval`,
`generate`, `serve` and an export use it); training goes on from the raw weights, which
each checkpoint keeps in its training state, so a resumed run continues both bit for bit.
With train.ema = 0 it holds nothing and every method is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightAverage:
    """The average of `model`'s trainable parameters, with `decay` per step (0: off)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad] if decay else []
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the weights after an optimizer step into the average."""
        for avg, p in zip(self.average, self.params, strict=True):
            avg.lerp_(p.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the model's parameters inside the block, the raw weights after."""
        if not self.params:
            yield
            return
        raw = self.raw_weights()
        _copy(self.params, self.average)
        try:
            yield
        finally:
            _copy(self.params, raw)

    def raw_weights(self) -> list[torch.Tensor]:
        """Copies of the weights training continues from (a checkpoint's training state)."""
        return [p.detach().clone() for p in self.params]

    def restore(self, raw: list[torch.Tensor] | None) -> None:
        """After a checkpoint's weights (the average) were loaded into the model: keep them
        as the average and put the raw weights back in the parameters."""
        if not self.params:
            return
        if raw is None or len(raw) != len(self.params):
            raise ValueError("the checkpoint holds no raw weights for train.ema")
        self.average = [p.detach().clone() for p in self.params]
        _copy(self.params, raw)


@torch.no_grad()
def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)
