"""Where and how a model runs: every `auto` of the runtime config is decided here, once, into
a `Runtime` (what each choice measured is in BENCHMARKS.md); and the device facts speed
figures need (peak matmul FLOP/s, peak memory, synchronising before a timer).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab.atomic import write_text
from gptlab.config.schema import RuntimeConfig, cache_dir
from gptlab.errors import GptlabError

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA, else MPS, else CPU; a named device must exist on this machine."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GptlabError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptlabError(
            "runtime.device is cuda but no CUDA GPU is visible; use --runtime.device cpu"
        )
    if device.type == "mps" and not has_mps:
        raise GptlabError("device mps is not available on this machine; use --device cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matmul instructions (AVX512-BF16 or AMX), where bf16 pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16 where CUDA or the CPU has it, fp16 on older CUDA cards, else fp32."""
    if name not in ("auto", *PRECISION_DTYPES):
        raise GptlabError(f"precision must be auto, fp32, bf16 or fp16; got {name!r}")
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise GptlabError("fp16 training is not supported on CPU; use --precision bf16 or fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def resolve_muon_dtype(device: torch.device) -> torch.dtype:
    """The dtype of Muon's Newton-Schulz iteration: bf16, but fp32 on a CPU without bf16
    matmul instructions (emulated bf16 takes 1.9x to 46x fp32's time)."""
    if device.type == "cpu" and not cpu_has_native_bf16():
        return torch.float32
    return torch.bfloat16


def autocast(device: torch.device, precision: str):
    """Mixed precision context: matmuls in bf16/fp16, master weights stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])


def resolve_chunked_loss(name: str, device: torch.device) -> bool:
    """'auto' -> the chunked loss on CPU, where it measured faster (on CUDA it saves memory)."""
    return name == "on" or (name == "auto" and device.type == "cpu")


def resolve_compile(name: str, device: torch.device) -> bool:
    """'auto' -> torch.compile on CUDA only (on CPU it needs a C++ toolchain and gains little)."""
    return name == "on" or (name == "auto" and device.type == "cuda")


def resolve_fast_dropout(name: str, device: torch.device) -> bool:
    """'auto' -> the fast dropout masks on CPU (CUDA's dropout is fused already)."""
    return name == "on" or (name == "auto" and device.type == "cpu")


def resolve_host_memory(name: str, device: torch.device) -> str:
    """'auto' -> 'keep' when training on CPU, where the host allocator is the hot path."""
    if name != "auto":
        return name
    return "keep" if device.type == "cpu" else "release"


def keep_freed_host_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse, process-wide; True if it took. glibc
    mmaps large blocks and unmaps them when freed, so every training step page-faults its
    activations and gradients in again, zeroed; the cost is keeping the peak memory."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and friends: no glibc tunables
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


@dataclass(frozen=True)
class Runtime:
    """The resolved run-time choices of one training process (no 'auto' left)."""

    device: torch.device
    precision: str  # "fp32" | "bf16" | "fp16"
    compiled: bool
    chunked_loss: bool
    fast_dropout: bool
    host_memory: str  # "keep" | "release": what the allocator actually does
    muon_dtype: torch.dtype = torch.bfloat16  # Muon's Newton-Schulz iteration

    @property
    def dtype(self) -> torch.dtype:
        return PRECISION_DTYPES[self.precision]

    def autocast(self):
        return autocast(self.device, self.precision)


def resolve_runtime(rc: RuntimeConfig, device: torch.device, world_size: int = 1) -> Runtime:
    """Decide every 'auto' of `rc` for `device`, and apply the host-memory policy. The chunked
    loss is single-process only: DDP/FSDP2 need the wrapper's forward, not `hidden_states`."""
    host_memory = resolve_host_memory(rc.host_memory, device)
    if host_memory == "keep" and not keep_freed_host_memory():
        host_memory = "release"  # not glibc: the C library's own behaviour stays
    return Runtime(
        device=device,
        precision=resolve_precision(rc.precision, device),
        compiled=resolve_compile(rc.compile, device),
        chunked_loss=world_size == 1 and resolve_chunked_loss(rc.chunked_loss, device),
        fast_dropout=resolve_fast_dropout(rc.fast_dropout, device),
        host_memory=host_memory,
        muon_dtype=resolve_muon_dtype(device),
    )


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch -> device; on CUDA through pinned memory, so the copy does not block."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
    """(peak matmul FLOP/s for `dtype`, its source): a data sheet, else a cached benchmark."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAKS.items():
            if key in name:
                return value, f"data sheet ({key})"
    return measured_matmul_flops(device, dtype), "measured"


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Best-of-5 FLOP/s of an n x n matmul in `dtype`, cached in GPTLAB_CACHE/peak_flops.json."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    ident = f"{platform.node()}|{name}|{dtype}|{torch.get_num_threads()}|{torch.__version__}"
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
    with contextlib.suppress(OSError):  # a cache that cannot be written costs only time
        write_text(cache, json.dumps(table, indent=1))
    return flops


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
