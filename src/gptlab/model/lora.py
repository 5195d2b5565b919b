"""LoRA: low-rank adapters on a frozen GPTModel.

Each chosen linear layer y = x W^T + b becomes y = x W^T + b + (dropout(x) A^T B^T) * alpha / r,
with W and b frozen, A (r, in) initialised like nn.Linear's weights and B (out, r) zero, so
the adapted model starts exactly as the base. Only A and B train: no gradients nor optimizer
state for the base weights (less memory), no gradient matmuls for them in backward (faster).

`LoRALinear` is an `nn.Linear` (same `weight`, `bias` and state-dict keys) plus `lora_A` and
`lora_B`, so the base loads into an adapted model as it is; `merge_lora` folds
W + alpha / r * B A back into plain `nn.Linear`s.

Targets name linear layers by the model's own names (`gptlab.model.gpt`), each matching
every layer whose dotted name ends with it: W_query, W_key, W_value, out_proj; the GPT-2
MLP's ff.layers.0 and ff.layers.2, SwiGLU's fc1, fc2, fc3. Groups: attn (the four attention
matrices, the usual recipe), mlp, all. The embedding and output head are never adapted
(GPT-2 ties them; a classifier's fresh head trains whole).

A LoRA run's checkpoints hold only what trains (`trained_state_dict`); the run's config
names the base and its weights' sha256 (finetune.base, finetune.base_sha256).

Shape legend as in gptlab.model.gpt; r = rank, I / O = a layer's in / out features.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.config.schema import LORA_TARGET_NAMES
from gptlab.errors import GptlabError
from gptlab.model.gpt import Dropout, GPTModel

ATTN = ("W_query", "W_key", "W_value", "out_proj")
MLP_NAMES = ("ff.layers.0", "ff.layers.2", "fc1", "fc2", "fc3")
GROUPS = {"attn": ATTN, "mlp": ("mlp",), "all": (*ATTN, "mlp")}


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update: x (..., I) -> (..., O). Shares
    (does not copy) the weight and bias of the `linear` it is built from."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a second weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # (O, I), shared with `linear`, not copied
        self.register_parameter("bias", linear.bias)  # (O,) or None
        self.rank = rank
        self.scale = alpha / rank
        like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))  # (r, I)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))  # (O, r)
        # nn.Linear's own initialisation, applied to A: updates start on the scale of the
        # layer's inputs; B = 0 makes the first forward exactly the base's.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)  # (..., O)
        low = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., O)
        return base + low * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing this layer: W + scale * B A, the same bias."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale  # (O, I)
            out.weight.copy_(self.weight.float() + delta)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def parse_targets(targets: str) -> tuple[str, ...]:
    """The comma-separated names of `finetune.lora_targets`, checked against
    LORA_TARGET_NAMES (which the config checks too, before a model exists)."""
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    bad = [t for t in names if t not in LORA_TARGET_NAMES]
    if not names or bad:
        raise GptlabError(
            f"finetune.lora_targets {targets!r}: unknown target {bad[0] if bad else '(none)'!r}; "
            f"use a comma-separated list of {', '.join(LORA_TARGET_NAMES)}"
        )
    return names


def target_layers(model: GPTModel, targets: str) -> list[str]:
    """The dotted names of the nn.Linear layers of `model` that `targets` selects, in
    module order; an error naming the model's layers when a name selects none."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen: set[str] = set()
    for name in parse_targets(targets):
        for part in GROUPS.get(name, (name,)):
            if part == "mlp":
                hits = [n for n in linears if ".ff." in n]
            else:
                hits = [n for n in linears if n == part or n.endswith("." + part)]
            if not hits:
                kinds = sorted(
                    {n.split(".", 2)[-1] if n.startswith("trf_blocks.") else n for n in linears}
                )
                raise GptlabError(
                    f"finetune.lora_targets: {part!r} names no linear layer of this model; "
                    f"its layers are {', '.join(kinds)} (or use attn, mlp, all)"
                )
            chosen.update(hits)
    return [n for n in linears if n in chosen]


def prepare(model: GPTModel, fc: Any) -> GPTModel:
    """Freeze `model`, adapt the layers a FinetuneConfig `fc` names (fc.lora_*) and let a
    classifier's head train whole. In place; returns it. A is drawn from the global torch
    generator."""
    add_adapters(model, fc.lora_rank, fc.lora_alpha, fc.lora_targets, fc.lora_dropout)
    if model.cfg.num_classes:  # a fresh head: nothing of the base to adapt
        model.out_head.requires_grad_(True)
    return model


def add_adapters(
    model: GPTModel, rank: int, alpha: float, targets: str = "attn", dropout: float = 0.0
) -> GPTModel:
    """Freeze `model` and adapt the layers `targets` selects (in place; returns `model`)."""
    if rank < 1:
        raise GptlabError(
            f"LoRA rank must be 1 or more, got {rank}; pass --lora-rank R with R >= 1"
        )
    if has_lora(model):
        raise GptlabError("this model already has LoRA adapters; merge them first (merge_lora)")
    if not alpha > 0:
        raise GptlabError(
            f"LoRA alpha must be above 0, got {alpha}; pass --lora-alpha A with A > 0"
        )
    names = target_layers(model, targets)
    layers = {name: model.get_submodule(name) for name in names}
    for name, linear in layers.items():  # all checked before anything changes
        smallest = min(linear.in_features, linear.out_features)
        if rank > smallest:
            raise GptlabError(
                f"LoRA rank {rank} exceeds {name}'s smallest side ({smallest}); "
                f"use --lora-rank {smallest} or less"
            )
    model.requires_grad_(False)
    for name, linear in layers.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, LoRALinear(linear, rank, alpha, dropout))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def trained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA run's checkpoint holds: every trainable parameter (the adapters, and a
    classifier's head) by state-dict key, detached."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def merge_lora(model: GPTModel) -> GPTModel:
    """Fold every adapter into its layer: a plain GPTModel computing the adapted model's
    outputs to fp32 rounding, every parameter trainable again. In place; returns `model`."""
    for name, layer in lora_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer.merged())
    model.requires_grad_(True)
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) distinct parameters (a tied matrix counts once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())


def weights_fingerprint(model: nn.Module) -> str:
    """Hex sha256 of a model's state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
