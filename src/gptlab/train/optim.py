"""Optimizers and the learning-rate schedule.

`train.optimizer = "adamw"` (the default) trains every parameter with AdamW.
`train.optimizer = "muon"` gives the 2-D weight matrices inside the transformer blocks
(attention and MLP projections) to PyTorch's `torch.optim.Muon`, which orthogonalises each
matrix's momentum before stepping, and keeps AdamW, at `train.lr`, for everything else:
embeddings, the output head (tied or not: it is an embedding), norms and biases. The two
step together as one `MuonAdamW`; the schedule drives both from their own peaks.
Muon's Newton-Schulz iteration runs in bf16 where the hardware multiplies bf16 (CUDA, CPUs
with AVX512-BF16 or AMX), as torch's does, so runs that differ only in float summation order
(DDP's all-reduce) drift apart more than AdamW runs do; on other CPUs, where bf16 matmuls
are emulated (a 256 x 1024 orthogonalisation with AVX2 only: 0.70 s against 0.013 s in
fp32, BENCHMARKS.md), gptlab's `Muon` runs it in fp32, the caller's choice through
`build_optimizer(muon_dtype=)`. Under FSDP2, torch.optim.Muon
steps the DTensor shards and each op of the iteration gathers what it needs: it
orthogonalises the whole matrix (tests/test_dist.py), at the cost of collectives per
iteration.

Weight decay applies to the matrices of linear layers only: biases, LayerNorm parameters
and embeddings are left undecayed (decaying them only pulls useful values towards zero).
`train.weight_decay_on = "all"` decays every parameter instead, as the walk-through's
`AdamW(model.parameters(), weight_decay=0.1)` does.
AdamW is the fused kernel where PyTorch has one for the device (CPU and CUDA since 2.4):
one kernel over all parameters instead of a loop over tensors (BENCHMARKS.md).
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
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))  # a tied matrix is listed once, under the module met first
            if (
                isinstance(module, nn.Linear)
                and name == "weight"
                and not _is_tied_embedding(model, p)
            ):
                decay.append(p)
            else:
                no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _is_tied_embedding(model: nn.Module, p: torch.Tensor) -> bool:
    tok = getattr(model, "tok_emb", None)
    return tok is not None and p is tok.weight


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon trains: every 2-D matrix inside the transformer blocks
    (`model.trf_blocks`), each once, in module order. Chosen by place and shape, not by name,
    so that new block layouts (more MLP matrices, smaller k/v projections) need no list; the
    embeddings and the head live outside the blocks, norm scales and biases are 1-D."""
    out, seen = [], set()
    for p in model.trf_blocks.parameters():
        if p.requires_grad and p.ndim == 2 and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in `ns_dtype` instead of always bf16.

    The same update, hyper-parameters and state dict as torch's (a `momentum_buffer` per
    matrix), so either loads the other's state; with `ns_dtype=torch.bfloat16` each step is
    bit-for-bit torch's own (tests/test_optim.py). The dtype is not a parameter group key:
    it describes the machine, not the run, and a checkpoint resumes on either.
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
    """Muon's quintic Newton-Schulz iteration in `dtype`: maps `g` to a matrix with the same
    singular vectors and singular values pushed into roughly [0.5, 1.5]. Works on the wide
    orientation (rows <= columns), where the Gram matrix is the smaller one."""
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

    Has what the trainer and `torch.amp.GradScaler` use of an optimizer: `param_groups`
    (AdamW's groups first, so `param_groups[0]["lr"]` is AdamW's, as with AdamW alone),
    `step`, `zero_grad`, `state_dict`/`load_state_dict` and `defaults`. The state dict is
    `{"adamw": ..., "muon": ...}`, each the optimizer's own.
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
    """AdamW with gptlab's parameter groups, or with `weight_decay_on="all"` the
    walk-through's one group of every parameter; fused when asked for and available.
    With `cfg.optimizer == "muon"`, a MuonAdamW: Muon for `muon_params(model)`, its
    Newton-Schulz iteration in `muon_dtype` (the trainer passes `Runtime.muon_dtype`), and
    this AdamW for the rest."""
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
    """Set every group's learning rate for optimizer step `step`: the schedule's shape from
    each optimizer's own peak (AdamW's `cfg.lr`, Muon's `cfg.muon_lr`), times `scale` (the
    trainer's rollback factor). With `progress` (a time budget's, in [0, 1]) the shape is
    `lr_at_progress`'s instead of `lr_at`'s. Returns AdamW's."""

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

    Linear warmup over `warmup_steps` (step 0 runs at lr / warmup_steps, step
    warmup_steps - 1 at lr), then cosine or linear decay from lr at step `warmup_steps` to
    the floor `lr * min_lr_ratio` at the run's last step, `total_steps - 1`; constant after
    warmup when the schedule is "constant" or the total is unknown (a run limited by wall
    time alone).
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
    """Learning rate at `progress`, the fraction of a time budget passed when the step ends
    (gptlab.train.budget), peaking at `peak` (default `cfg.lr`).

    Linear warm-up from 0 over the first `warmup_frac` of the budget; then `lr` until the
    decay starts at progress max(warmup_frac, 1 - decay_frac); then cosine or linear decay
    to the floor `lr * min_lr_ratio` at progress 1 (constant: no decay). With decay_frac
    below 1 this is a warmup-stable-decay schedule.
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
