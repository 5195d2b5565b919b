"""Run metrics: one JSON record per event in `metrics.jsonl`, and device speed figures.

The metrics file is the single source for plots and summaries, so they survive crashes
and resumes. Records carry an `event` ("start", "train", "eval", "sample", "epoch",
"checkpoint", "end", ...) and the `step` they belong to.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


class MetricsLog:
    """Appends records to a JSONL file, one flushed line each."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self._f.write(json.dumps(record, allow_nan=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file; a last line cut short by a crash is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop records logged after `step` (work a resumed run will redo); returns how many.

    The file is rewritten atomically, so a crash here leaves the old file whole.
    """
    path = Path(path)
    if not path.exists():
        return 0
    records = read_metrics(path)
    keep = [r for r in records if r.get("step", 0) <= step]
    if len(keep) == len(records):
        return 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in keep:
            f.write(json.dumps(r, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(records) - len(keep)


# --------------------------------------------------------------------------- speed figures

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets.
KNOWN_PEAKS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The device's peak matmul FLOP/s for `dtype`, and where the figure came from.

    CUDA bf16/fp16: the data-sheet figure for known cards. Otherwise a matmul micro-benchmark,
    run once and cached per machine, device and dtype.
    """
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAKS.items():
            if key in name:
                return value, f"data sheet ({key})"
    return measured_matmul_flops(device, dtype), "measured"


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    from gptlab.data import cache_dir

    ident = f"{platform.node()}|{_device_name(device)}|{dtype}|{torch.get_num_threads()}|{torch.__version__}"
    cache = cache_dir() / "peak_flops.json"
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError):
        table = {}
    if ident in table:
        return float(table[ident])
    n = n or (4096 if device.type == "cuda" else 1024)
    # A private generator: whether this runs (the cache may be cold) must not shift the
    # training run's random stream, or the same seed would give different runs.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    flops = 2 * n**3 / best
    table[ident] = flops
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(table, indent=1))
    except OSError:
        pass
    return flops


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    """Wait for the device to finish queued work (before reading a timer)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated device memory on CUDA, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
