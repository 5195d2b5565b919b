"""Optimizers and the learning-rate schedule.

`train.optimizer = "adamw"` (the default) trains every parameter with AdamW, fused where
PyTorch can. `train.optimizer = "muon"` gives the 2-D matrices inside the transformer blocks
to Muon, which orthogonalises each matrix's momentum before stepping, and keeps AdamW for
the rest; the two step together as one `MuonAdamW`. Muon's Newton-Schulz iteration runs in
bf16 as torch's does, or in fp32 on CPUs that emulate bf16 matmuls (50x slower with AVX2
only, BENCHMARKS.md): the caller's choice, `build_optimizer(muon_dtype=)`.

Weight decay applies to the matrices of linear layers only (decaying biases, norms and
embeddings only pulls useful values towards zero); `train.weight_decay_on = "all"` decays
every parameter, as the walk-through's `AdamW(model.parameters(), weight_decay=0.1)` does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gptlab.config.schema import TrainConfig
from gptlab.errors import GptlabError


def param_groups(
    model: nn.Module, weight_decay: float, exclude: frozenset[int] = frozenset()
) -> list[dict]:
    """Two AdamW groups: decayed weight matrices of nn.Linear, and everything else;
    parameters whose id() is in `exclude` (another optimizer's) are left out."""
    decay, no_decay, seen = [], [], set(exclude)
    tied = getattr(getattr(model, "tok_emb", None), "weight", None)  # an embedding: no decay
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))  # a tied matrix is listed once, under the module met first
            if isinstance(module, nn.Linear) and name == "weight" and p is not tied:
                decay.append(p)
            else:
                no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon trains: every 2-D matrix inside `model.trf_blocks`, each once, in
    module order (chosen by place and shape, so new block layouts need no list)."""
    return [p for p in model.trf_blocks.parameters() if p.requires_grad and p.ndim == 2]


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in `ns_dtype` instead of always bf16.

    The same update and state dict as torch's, so either loads the other's state; with bf16
    each step is bit-for-bit torch's own. The dtype describes the machine, not the run, so it
    is not a parameter group key.
    """

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalise(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
                )
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * _muon_lr_ratio(group["adjust_lr_fn"], p.shape))
        return loss


def orthogonalise(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype
) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration in `dtype`: `g` with its singular values pushed
    into roughly [0.5, 1.5], computed on the wide orientation (the smaller Gram matrix)."""
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = g.to(dtype)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """How Muon scales its learning rate for a matrix of `shape` (torch's two rules)."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


class MuonAdamW:
    """torch.optim.Muon and torch.optim.AdamW over disjoint parameters, used as one optimizer.

    Has what the trainer and `torch.amp.GradScaler` use of an optimizer; `param_groups` lists
    AdamW's first (so `param_groups[0]["lr"]` is AdamW's). The state dict is
    `{"adamw": ..., "muon": ...}`.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon):
        self.adamw, self.muon = adamw, muon
        self.defaults: dict = {}  # not fused as a whole: the trainer checks for a skip on the host

    @property
    def parts(self) -> dict[str, torch.optim.Optimizer]:
        """The two optimizers by their keys in the state dict (FSDP2 gathers each on its own)."""
        return {"adamw": self.adamw, "muon": self.muon}

    @property
    def param_groups(self) -> list[dict]:
        # Built on each call: load_state_dict replaces the optimizers' group dicts.
        return self.adamw.param_groups + self.muon.param_groups

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {key: opt.state_dict() for key, opt in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for key, opt in self.parts.items():
            opt.load_state_dict(state[key])


Optimizer = torch.optim.AdamW | MuonAdamW


def build_optimizer(
    model: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    muon_dtype: torch.dtype = torch.bfloat16,
) -> Optimizer:
    """AdamW over `param_groups` (with `weight_decay_on="all"`, one group of every
    parameter), fused when asked for and available; with `cfg.optimizer == "muon"`, a
    MuonAdamW: Muon (iterating in `muon_dtype`) for `muon_params(model)`, AdamW for the rest."""
    if cfg.optimizer == "muon":
        if not hasattr(torch.optim, "Muon"):  # PyTorch ships it from 2.9
            raise GptlabError(
                f"train.optimizer=muon needs torch.optim.Muon (PyTorch 2.9 or newer; this is "
                f"{torch.__version__}): upgrade torch, or pass --train.optimizer adamw"
            )
        hidden = muon_params(model)
        muon = Muon(
            hidden,
            ns_dtype=muon_dtype,
            lr=cfg.muon_lr,
            weight_decay=cfg.muon_weight_decay,
            momentum=cfg.muon_momentum,
            nesterov=True,
            adjust_lr_fn=cfg.muon_adjust_lr,
        )
        return MuonAdamW(_adamw(model, cfg, device, frozenset(map(id, hidden))), muon)
    return _adamw(model, cfg, device)


def _adamw(
    model: nn.Module, cfg: TrainConfig, device: torch.device, exclude: frozenset[int] = frozenset()
) -> torch.optim.AdamW:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    fused = cfg.fused_optimizer and device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(_groups(model, cfg, exclude), fused=fused, **kwargs)
    except (RuntimeError, TypeError):  # an older torch without a fused kernel for this device
        return torch.optim.AdamW(_groups(model, cfg, exclude), **kwargs)


def _groups(model: nn.Module, cfg: TrainConfig, exclude: frozenset[int]) -> list[dict]:
    if cfg.weight_decay_on == "all":
        rest = [p for p in model.parameters() if id(p) not in exclude]
        return [{"params": rest, "weight_decay": cfg.weight_decay}]
    return param_groups(model, cfg.weight_decay, exclude)


def set_lr(
    optimizer: Optimizer,
    step: int,
    cfg: TrainConfig,
    total_steps: int | None,
    scale: float = 1.0,
    progress: float | None = None,
) -> float:
    """Set every group's learning rate for step `step` from its optimizer's own peak
    (`cfg.lr`, `cfg.muon_lr`), times `scale` (the rollback factor); with a time budget's
    `progress`, by `lr_at_progress` instead of `lr_at`. Returns AdamW's."""

    def at(peak: float | None) -> float:
        if progress is not None:
            return lr_at_progress(progress, cfg, peak)
        return lr_at(step, cfg, total_steps, peak)

    lr = at(None) * scale
    muon = optimizer.muon.param_groups if isinstance(optimizer, MuonAdamW) else []
    muon_lr = at(cfg.muon_lr) * scale if muon else lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    for group in muon:
        group["lr"] = muon_lr
    return lr


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None, peak: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based), peaking at `peak` (default `cfg.lr`).

    Linear warmup over `warmup_steps` (step 0 at lr / warmup_steps), then cosine or linear
    decay to the floor `lr * min_lr_ratio` at step `total_steps - 1`; constant after warmup
    when the schedule is "constant" or the total is unknown (a run limited by time alone).
    """
    lr = cfg.lr if peak is None else peak
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or not total_steps:
        return lr
    floor = lr * cfg.min_lr_ratio
    span = max(total_steps - 1 - cfg.warmup_steps, 1)  # the last step runs at the floor
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.schedule == "linear":
        return lr - (lr - floor) * progress
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))


def lr_at_progress(progress: float, cfg: TrainConfig, peak: float | None = None) -> float:
    """Learning rate at `progress`, the fraction of a time budget passed when the step ends,
    peaking at `peak` (default `cfg.lr`).

    Linear warm-up over the first `warmup_frac`; then `lr` until progress
    max(warmup_frac, 1 - decay_frac); then cosine or linear decay to `lr * min_lr_ratio` at
    progress 1 (warmup-stable-decay when decay_frac is below 1).
    """
    lr = cfg.lr if peak is None else peak
    p = min(max(progress, 0.0), 1.0)
    if cfg.warmup_frac and p < cfg.warmup_frac:
        return lr * p / cfg.warmup_frac
    start = max(cfg.warmup_frac, 1.0 - cfg.decay_frac)
    if cfg.schedule == "constant" or p <= start:
        return lr
    floor = lr * cfg.min_lr_ratio
    x = (p - start) / (1.0 - start)
    if cfg.schedule == "linear":
        return lr - (lr - floor) * x
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * x))
