"""Where a training step's time goes: the CLI trainer's step against bare loops.

    python benchmarks/probe_step.py --workload gpt2-124m            (on a GPU: ~3 minutes)
    python benchmarks/probe_step.py --workload small --device cpu

Every row trains the same model (the workload's shapes, gptlab's defaults for the device)
from the same batch shapes, so the differences are the step's own:

- `trainer`: `Trainer.train_step`, as `bench_train.py` times it (data loader, lr schedule,
  clipping, the device-side skip of non-finite steps, one host sync per step);
- `bare`: forward and backward of the same compiled model and loss, clipping and the
  optimizer's step on a fixed batch, the loss read every step (one host sync, like the
  trainer);
- `bare, no sync`: the same, the loss never read inside the timed loop: what a step costs
  when the host never waits (the gap to `bare` is the price of the per-step sync);
- `bare, no clip`: the same without gradient clipping (nanoGPT clips too; this is its cost);
- `bare, max-autotune` (CUDA, --autotune): torch.compile's autotuned kernels.

If `trainer` is well below `bare`, the time is in the trainer's own per-step work; if
`bare, no sync` is well above `bare`, overlapping the sync (reading the loss a step late)
would pay. Figures go to BENCHMARKS.md with the machine; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from typing import Any

_spec = importlib.util.spec_from_file_location(
    "bench_train", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_train.py")
)
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)


def bare_row(
    settings: dict[str, Any],
    device: str,
    steps: int,
    warmup: int,
    read_loss: bool = True,
    clip: bool = True,
    compile_mode: str | None = None,
) -> dict[str, Any]:
    """Time `steps` bare training steps after `warmup` untimed ones; returns the figures."""
    import torch

    from gptlab.config.schema import RunConfig, set_field
    from gptlab.model.gpt import GPTModel, flops_per_token, use_fast_dropout
    from gptlab.model.loss import make_loss_fn
    from gptlab.runtime.device import (
        autocast,
        keep_freed_host_memory,
        measured_matmul_flops,
        peak_memory_mib,
        resolve_chunked_loss,
        resolve_compile,
        resolve_device,
        resolve_fast_dropout,
        resolve_host_memory,
        resolve_muon_dtype,
        resolve_precision,
        sync,
    )
    from gptlab.train.optim import build_optimizer

    cfg = RunConfig()
    for key, value in settings.items():
        set_field(cfg, key, value)
    tc, mc = cfg.train, cfg.model
    dev = resolve_device(device)
    if resolve_host_memory(cfg.runtime.host_memory, dev) == "keep":
        keep_freed_host_memory()
    precision = resolve_precision(cfg.runtime.precision, dev)
    compiled = resolve_compile(cfg.runtime.compile, dev)
    chunked = resolve_chunked_loss(cfg.runtime.chunked_loss, dev)
    torch.manual_seed(0)
    model = GPTModel(mc).to(dev)
    use_fast_dropout(model, resolve_fast_dropout(cfg.runtime.fast_dropout, dev))
    model.train()
    optimizer = build_optimizer(model, tc, dev, resolve_muon_dtype(dev))
    if compile_mode:
        from gptlab.model.loss import model_loss

        loss_fn = torch.compile(
            lambda x, y: model_loss(model, x, y, chunked=chunked), mode=compile_mode
        )
    else:
        loss_fn = make_loss_fn(model, chunked, compiled)
    B, T = tc.batch_size, mc.context_length
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, mc.vocab_size, (B, T), generator=g).to(dev)
    y = torch.randint(0, mc.vocab_size, (B, T), generator=g).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def step() -> torch.Tensor:
        with autocast(dev, precision):
            loss = loss_fn(x, y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    first_loss = step().item()
    first_step = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step().item()
    sync(dev)
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        loss = step()
        losses.append(loss.item() if read_loss else loss)
    sync(dev)
    elapsed = time.perf_counter() - t0
    tps = steps * B * T / elapsed
    peak = measured_matmul_flops(dev, torch.bfloat16)
    return {
        "tokens_per_s": round(tps, 1),
        "ms_per_step": round(1000 * elapsed / steps, 2),
        "mfu": round(tps * flops_per_token(mc) / peak, 4),
        "peak_mem_mib": round(peak_memory_mib(dev), 1),
        "first_step_s": round(first_step, 2),
        "first_loss": round(first_loss, 4),
        "last_loss": round(float(losses[-1]), 4),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(bench_train.WORKLOADS), default="gpt2-124m")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--steps", type=int, help="timed steps per row (default: per workload)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--autotune", action="store_true", help="add a max-autotune row (CUDA)")
    p.add_argument("--json", action="store_true", help="also one JSON line per row")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be at least 1")
    device = bench_train._resolve_device(args.device)
    steps = args.steps or bench_train.WORKLOADS[args.workload]["steps"]
    settings = bench_train.default_settings(args.workload)

    import torch

    rows: list[tuple[str, Any]] = [
        ("trainer", lambda: bench_train.run_row(settings, device, steps, args.warmup, 1e9)),
        ("bare", lambda: bare_row(settings, device, steps, args.warmup)),
        ("bare, no sync", lambda: bare_row(settings, device, steps, args.warmup, read_loss=False)),
        ("bare, no clip", lambda: bare_row(settings, device, steps, args.warmup, clip=False)),
    ]
    if args.autotune and device.startswith("cuda"):
        rows.append(
            (
                "bare, max-autotune",
                lambda: bare_row(
                    settings, device, steps, args.warmup, compile_mode="max-autotune-no-cudagraphs"
                ),
            )
        )
    print(
        f"workload {args.workload} with gptlab's defaults, {steps} timed steps per row after "
        f"{args.warmup} warm-up; device {device}",
        flush=True,
    )
    header = f"{'row':22s} {'tokens/s':>10s} {'ms/step':>9s} {'MFU':>6s} {'peak MiB':>9s} {'1st step s':>10s}"
    print(header + "\n" + "-" * len(header), flush=True)
    for name, run in rows:
        try:
            r = run()
        except Exception as e:  # one failing row (out of memory, say) must not end the probe
            print(f"{name:22s} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        finally:
            torch._dynamo.reset()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(
            f"{name:22s} {r['tokens_per_s']:>10,.0f} {r['ms_per_step']:>9.1f} {r['mfu']:>6.1%} "
            f"{r['peak_mem_mib']:>9,.0f} {r['first_step_s']:>10.1f}",
            flush=True,
        )
        if args.json:
            print(json.dumps({"workload": args.workload, "row": name, **r}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
