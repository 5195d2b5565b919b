"""Data-parallel training under `torchrun`: DDP or FSDP2, applied from outside the model.

`setup` turns torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) into a `Dist`, joining
the process group; without torchrun its collectives are no-ops, so the trainer has one code
path. Ranks take disjoint micro-batches whose union is exactly the single-process step's,
so a run's loss curve does not depend on how many processes computed it. Checkpoints hold
the consolidated, single-process form. Nothing here prints or exits.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from gptlab.errors import GptlabError

PARALLEL_MODES = ("ddp", "fsdp")

# A test hook (`maybe_fail_for_test`): tests prove that one rank's trouble ends the whole
# job, with its message, or stops every rank at the same step, rather than leaving the
# others waiting.
FAIL_RANK_ENV = "GPTLAB_TEST_FAIL_RANK"
FAIL_AT_STEP = 2


@dataclass
class Dist:
    """Where this process stands in a data-parallel job; unless `enabled` (started by
    torchrun), every collective returns its input unchanged."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mode: str = "none"  # "none" | "ddp" | "fsdp": set by `parallelize`

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that logs and writes files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """True when weights and optimizer state are split across ranks (FSDP2)."""
        return self.mode == "fsdp"

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of `t` over ranks (a new tensor)."""
        if not self.enabled:
            return t
        out = t.detach().clone()
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise mean of `t` over ranks (gloo has no AVG, so sum then divide)."""
        return self.sum(t) / self.world_size if self.enabled else t

    def agree(self, code: int) -> int:
        """The largest of every rank's `code`: how ranks reach one decision."""
        if not self.enabled:
            return code
        t = torch.tensor([code], dtype=torch.int64, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t.item())

    def agree_on_reason(self, reason: str | None, known: Sequence[str]) -> str | None:
        """One stop decision for all ranks: the latest reason in `known` some rank has (one not
        in `known` outranks all), None if none has."""
        if not self.enabled:
            return reason
        rank_of = {r: i + 1 for i, r in enumerate(known)}
        code = 0 if reason is None else rank_of.get(reason, len(known) + 1)
        agreed = self.agree(code)
        if agreed == code:
            return reason
        return known[agreed - 1] if agreed <= len(known) else "stopped by another rank"

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on at least one."""
        return bool(self.agree(int(bool(flag))))

    def barrier(self) -> None:
        """Wait until every rank has come here."""
        if self.enabled:
            tdist.barrier()


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise GptlabError(
            f"environment variable {name}={value!r} is not an integer; launch with torchrun"
        ) from None


def detect() -> Dist:
    """The job layout torchrun describes in the environment (none: a one-process job)."""
    world = _env_int("WORLD_SIZE")
    if world is None:
        return Dist()
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise GptlabError(
            f"inconsistent torchrun environment (RANK={rank}, LOCAL_RANK={local}, "
            f"WORLD_SIZE={world}); launch with torchrun --nproc_per_node N"
        )
    return Dist(rank=rank, local_rank=local, world_size=world, enabled=True)


def setup(device: torch.device, timeout_s: float = 600.0) -> Dist:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU), if launched by it, and pick
    this rank's device; `timeout_s` bounds every collective, so a stuck rank ends the job."""
    d = detect()
    if not d.enabled:
        d.device = device
        return d
    if device.type == "cuda":
        if device.index is not None and d.world_size > 1:
            raise GptlabError(
                f"runtime.device {device} names one GPU, but under torchrun each rank uses "
                "cuda:LOCAL_RANK; use --device cuda (or auto)"
            )
        n = torch.cuda.device_count()
        if d.local_rank >= n:
            raise GptlabError(
                f"LOCAL_RANK {d.local_rank} has no GPU: only {n} are visible; "
                f"use --nproc_per_node {n} or fewer"
            )
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise GptlabError(
            f"distributed training runs on CUDA (nccl) or CPU (gloo), not {device.type}; "
            "use --device cuda or cpu"
        )
    if not tdist.is_available() or (backend == "gloo" and not tdist.is_gloo_available()):
        raise GptlabError(
            f"this PyTorch build has no {backend} backend; install a build with torch.distributed"
        )
    d.device = device
    if not tdist.is_initialized():
        tdist.init_process_group(
            backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        # Every rank has passed the CLI's checks on --out before rank 0 writes anything there.
        tdist.barrier()
    return d


def shutdown() -> None:
    """Leave the process group (a no-op when none was joined)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def maybe_fail_for_test(d: Dist, step: int) -> None:
    """`GPTLAB_TEST_FAIL_RANK=R` makes rank R raise RuntimeError after step FAIL_AT_STEP;
    `R:hang` makes it wait for a message no rank sends, `R:signal` sends it SIGTERM."""
    target = os.environ.get(FAIL_RANK_ENV)
    if target is None or step != FAIL_AT_STEP:
        return
    rank, _, how = target.strip().partition(":")
    if rank != str(d.rank):
        return
    if how == "hang" and d.enabled:  # blocks until the process group's timeout fires
        tdist.recv(torch.zeros(1, device=d.device), src=(d.rank + 1) % d.world_size)
    if how == "signal":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise RuntimeError(f"{FAIL_RANK_ENV}: injected failure on rank {d.rank} at step {step}")


def accum_per_rank(batch_tokens: int, micro_tokens: int, world_size: int) -> int:
    """Micro-batches of `micro_tokens` each rank runs per step of `batch_tokens` (0: one)."""
    if batch_tokens == 0:
        return 1
    per_step = micro_tokens * world_size
    if batch_tokens % per_step:
        lower = max(batch_tokens // per_step, 1) * per_step
        raise GptlabError(
            f"train.batch_tokens ({batch_tokens}) does not split over {world_size} processes in "
            f"micro-batches of batch_size x context_length ({micro_tokens}) tokens: it must be a "
            f"multiple of {per_step}; use --train.batch_tokens {lower}"
        )
    return batch_tokens // per_step


def micro_batch_indices(step_in_epoch: int, accum: int, rank: int, world_size: int) -> list[int]:
    """Loader batch indices `rank` computes for step `step_in_epoch`: every world_size-th
    of the step's `accum` consecutive micro-batches, from `rank`."""
    if accum % world_size:
        raise ValueError(f"accum {accum} is not a multiple of world_size {world_size}")
    first = step_in_epoch * accum
    return list(range(first + rank, first + accum, world_size))


def eval_batch_indices(n_batches: int, rank: int, world_size: int) -> list[int | None]:
    """Evaluation batches for `rank` out of the first `n_batches`: every world_size-th one,
    padded with None (a forward on batch 0, not counted) so every rank runs as many forward
    passes (FSDP2 gathers weights in each)."""
    rounds = -(-n_batches // world_size)  # ceil
    return [i if i < n_batches else None for i in range(rank, rounds * world_size, world_size)]


def parallelize(model: nn.Module, mode: str, d: Dist) -> nn.Module:
    """The module to run forward on: a DDP wrapper ("ddp"), the model sharded in place
    ("fsdp": FSDP2 per TransformerBlock, then the root; build the optimizer after), or the
    model unchanged in one process."""
    if mode not in PARALLEL_MODES:
        raise GptlabError(
            f"runtime.parallel must be one of {', '.join(PARALLEL_MODES)}; got {mode!r}"
        )
    if not d.enabled:
        return model
    d.mode = mode
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gptlab.model.gpt import TransformerBlock

    # FSDP2 warns when a module returns a view, because an in-place op on it would skip the
    # pre-backward hook. GPTModel returns a view when its vocabulary is padded (logits cut
    # back to vocab_size), and gptlab's loss and sampling never modify logits in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPGPTModel\)")
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Backward passes in this context communicate gradients only if `enabled`."""
    if enabled:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:  # one process: nothing to sync
        yield


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """`clip_grad_norm_`'s result as a plain tensor (it is a replicated DTensor under FSDP2)."""
    full = getattr(norm, "full_tensor", None)
    return full() if callable(full) else norm


def optimizer_state_to_ids(osd: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state keyed by parameter names -> one process's state_dict form."""
    ids: dict[str, int] = {}
    groups = []
    for g in osd["param_groups"]:
        numbered = []
        for name in g["params"]:
            ids.setdefault(name, len(ids))
            numbered.append(ids[name])
        groups.append({**g, "params": numbered})
    return {"state": {ids[n]: s for n, s in osd["state"].items()}, "param_groups": groups}


def optimizer_state_to_names(
    osd: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The inverse of `optimizer_state_to_ids` for this model and optimizer."""
    names = {id(p): name for name, p in model.named_parameters()}  # a tied matrix once
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = [i for g in osd["param_groups"] for i in g["params"]]
    if len(saved) != len(order):
        raise ValueError(
            f"the saved optimizer has {len(saved)} parameters, this model {len(order)}"
        )
    rename = dict(zip(saved, order, strict=True))
    groups = [{**g, "params": [rename[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": {rename[i]: s for i, s in osd["state"].items()}, "param_groups": groups}


def materialize(model: nn.Module, device: torch.device) -> nn.Module:
    """Allocate a meta-device model on `device` (uninitialised), keeping tied parameters tied."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    model.to_empty(device=device)
    for first, *aliases in names.values():
        shared = model.get_parameter(first)
        for alias in aliases:
            owner, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)
    return model


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Consolidated weights and optimizer state on rank 0's CPU (others: {}, {}). A collective."""
    from torch.distributed.checkpoint import state_dict as dcp

    opts = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = dcp.get_model_state_dict(model, options=opts)
    parts = _optimizer_parts(optimizer)
    osds = {k: dcp.get_optimizer_state_dict(model, o, options=opts) for k, o in parts.items()}
    if not weights:  # ranks other than 0
        return {}, {}
    if list(osds) == [None]:
        return weights, optimizer_state_to_ids(osds[None])
    return weights, {k: optimizer_state_to_ids(osd) for k, osd in osds.items()}


def _optimizer_parts(optimizer: Any) -> dict[str | None, torch.optim.Optimizer]:
    """The torch optimizers inside `optimizer` by state-dict key ({None: it} for a plain one)."""
    return getattr(optimizer, "parts", None) or {None: optimizer}


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    weights: dict[str, torch.Tensor],
    osd: dict[str, Any] | None,
) -> None:
    """Load consolidated state into a sharded model and optimizer. A collective: `weights`
    is read on rank 0 only; `osd` is needed on every rank."""
    from torch.distributed.checkpoint import state_dict as dcp

    broadcast = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    dcp.set_model_state_dict(model, weights, options=broadcast)
    if optimizer is not None and osd is not None:
        for key, part in _optimizer_parts(optimizer).items():
            named = optimizer_state_to_names(osd if key is None else osd[key], model, part)
            opts = dcp.StateDictOptions(full_state_dict=True)
            dcp.set_optimizer_state_dict(model, part, named, options=opts)
