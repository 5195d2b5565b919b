"""Muon's Newton-Schulz iteration in bf16 against fp32 on this CPU (gptlab.train.optim.orthogonalise),
the figure behind `runtime.resolve_muon_dtype`: bf16 pays only where the CPU multiplies bf16.

    python benchmarks/bench_muon_ns.py [--rows 256 --cols 1024 --reps 5]
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_muon_ns.py   # oneDNN without bf16 instructions

Prints the best of `--reps` seconds for one orthogonalisation (5 iterations, torch's
coefficients) in each dtype, with the CPU's model name and bf16 flags. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from gptlab.train.optim import orthogonalise

COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's defaults


def cpu() -> dict[str, object]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    flags = sorted({f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in info.split()})
    return {"cpu": name or platform.processor(), "flags": flags}


def best_seconds(g: torch.Tensor, dtype: torch.dtype, reps: int) -> float:
    orthogonalise(g, COEFFICIENTS, 5, 1e-7, dtype)  # warm-up: allocations, kernel choice
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        orthogonalise(g, COEFFICIENTS, 5, 1e-7, dtype)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    g = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    row = {
        **cpu(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "threads": torch.get_num_threads(),
        "shape": [args.rows, args.cols],
        "bf16_s": best_seconds(g, torch.bfloat16, args.reps),
        "fp32_s": best_seconds(g, torch.float32, args.reps),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
