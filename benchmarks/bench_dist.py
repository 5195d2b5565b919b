"""What FSDP2 saves: per-rank memory for parameters, gradients and AdamW state, DDP vs FSDP2.

    python benchmarks/bench_dist.py                      # 2 processes on CPU (gloo)
    python benchmarks/bench_dist.py --nproc 4 --models cpu gpt2-small gpt2-medium

Launches itself under torchrun, builds each model on every rank, wraps it with gptlab's
`dist.parallelize` (DDP, then FSDP2), runs one training step on a small batch (so
gradients and optimizer state exist), and counts the bytes each rank holds locally:
parameters, gradients (after backward, before zero_grad) and optimizer state (exp_avg,
exp_avg_sq, step). A DTensor counts its local shard only. These are exact byte counts,
not a profile; they leave out activations, DDP's gradient buckets (another copy of the
gradients) and FSDP2's transient all-gather buffers (one block's full weights at a time,
plus the root's embedding/head while it runs). The worst rank is shown (ranks differ by
at most one padded row per tensor).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys

import torch


def _launch(args: argparse.Namespace) -> int:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(args.nproc),
        __file__,
        "--models",
        *args.models,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _measure(name: str, mode: str) -> dict:
    from gptlab.config.schema import TrainConfig
    from gptlab.model.gpt import GPTModel, count_parameters
    from gptlab.recipes.presets import preset
    from gptlab.runtime import dist as dist_lib
    from gptlab.train.optim import build_optimizer

    d = dist_lib.setup(torch.device("cpu"))
    cfg = preset(name).model
    cfg.drop_rate = 0.0
    torch.manual_seed(0)
    model = GPTModel(cfg)
    n_params = count_parameters(model)
    wrapped = dist_lib.parallelize(model, mode, d)
    opt = build_optimizer(model, TrainConfig(), d.device)
    x = torch.randint(0, cfg.vocab_size, (1, 33))
    logits = wrapped(x[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
    params = list(model.parameters())  # a tied matrix once
    out = {
        "model": name,
        "mode": mode,
        "n_params": n_params,
        "params": sum(_local_bytes(p) for p in params),
        "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optim": sum(
            _local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
        ),
    }
    del model, wrapped, opt, logits, params
    gc.collect()
    return out


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as tdist

    from gptlab.runtime import dist as dist_lib

    rows = []
    for name in args.models:
        for mode in ("ddp", "fsdp"):
            mine = _measure(name, mode)
            everyone: list = [None] * tdist.get_world_size()
            tdist.all_gather_object(everyone, mine)
            rows.append(everyone)
    if tdist.get_rank() == 0:
        world = tdist.get_world_size()
        mib = 2**20
        print(f"per-rank memory on {world} CPU processes (gloo), fp32 weights, AdamW")
        print(
            "| model | params | mode | weights MiB | grads MiB | AdamW state MiB | "
            "total MiB | vs DDP |"
        )
        print("|---|---|---|---|---|---|---|---|")
        ddp_total = {}
        for everyone in rows:
            r = max(everyone, key=lambda e: e["params"] + e["grads"] + e["optim"])  # worst rank
            total = r["params"] + r["grads"] + r["optim"]
            if r["mode"] == "ddp":
                ddp_total[r["model"]] = total
            ratio = total / ddp_total[r["model"]]
            print(
                f"| {r['model']} | {r['n_params'] / 1e6:.1f}M | {r['mode']} | "
                f"{r['params'] / mib:.1f} | {r['grads'] / mib:.1f} | {r['optim'] / mib:.1f} | "
                f"{total / mib:.1f} | {ratio:.2f} |"
            )
    dist_lib.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["cpu", "gpt2-small"])
    args = p.parse_args()
    if "WORLD_SIZE" not in os.environ:
        return _launch(args)
    _worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
