"""The speed ladder: tokens/s of gptlab's training step, one switch at a time.

    python benchmarks/bench_train.py --workload small --ladder
    python benchmarks/bench_train.py --workload gpt2-124m --ladder --device cuda --json

Each row trains a fresh model for a few steps through the CLI trainer's own step
(`Trainer.train_step`: its optimizer, autocast, loss path, clipping, host syncs) on random
token ids. On CPU each row runs in a fresh process, so its peak memory (max RSS) is its
own; on CUDA the rows share one process (peak memory is reset, compiled graphs are
dropped) to save start-up time. Rows warm up before they are timed (the first step
compiles), and the device is synchronised before every timer read. Without --ladder only
the last row (gptlab's defaults) runs.

Columns: tokens/s, ms/step, MFU (model FLOPs per token, 6N + 12 L H Hd T, times tokens/s,
over the device's bf16 matmul peak measured once by `gptlab.observe.metrics`), peak memory
(CUDA: max allocated; CPU: the process's max RSS) and the first step's time (which
includes compilation). With --json, one JSON line per row as well.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

WORKLOADS: dict[str, dict[str, Any]] = {
    # the walk-through's own setting: GPT-2 small at context 256, batch 2, dropout 0.1
    "seed124m": {
        "model": {"context_length": 256, "drop_rate": 0.1},
        "train": {"batch_size": 2},
        "steps": 4,
    },
    "small": {
        "model": {
            "context_length": 256,
            "emb_dim": 384,
            "n_heads": 6,
            "n_layers": 6,
            "init": "gpt2",
        },
        "train": {"batch_size": 8},
        "steps": 6,
    },
    # nanoGPT's GPT-2 124M: context 1024, tied head, no dropout
    "gpt2-124m": {
        "model": {"context_length": 1024, "drop_rate": 0.0, "tie_weights": True, "init": "gpt2"},
        "train": {"batch_size": 16},
        "steps": 20,
    },
}

# The plain configuration: the walk-through's model and optimizer, nothing switched on.
PLAIN = {
    "model": {"attention": "manual", "vocab_multiple": 1},
    "train": {"fused_optimizer": False},
    "runtime": {
        "precision": "fp32",
        "compile": "off",
        "chunked_loss": "off",
        "fast_dropout": "off",
        "host_memory": "release",
    },
}


def ladder(device_type: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows as (name, settings changed from the row before), cumulative. A switch that the
    trainer's `auto` leaves off on this device comes last, so the rows before it show what
    `auto` runs: torch.compile on CPU (it has not paid off there), the chunked loss on
    CUDA (the compiled full-logits loss was faster there)."""
    steps = [
        ("+ sdpa attention", {"model.attention": "sdpa"}),
        ("+ bf16 autocast", {"runtime.precision": "bf16"}),
        ("+ fused adamw", {"train.fused_optimizer": True}),
        # host-side switches: the CPU's allocator and dropout masks (no-ops on CUDA)
        ("+ malloc keeps freed memory", {"runtime.host_memory": "keep"}),
        ("+ fast dropout masks", {"runtime.fast_dropout": "on"}),
        ("+ compile", {"runtime.compile": "on"}),
        ("+ vocab padded to 64", {"model.vocab_multiple": 64}),
        ("+ chunked loss", {"runtime.chunked_loss": "on"}),
        ("+ 2x batch", {"train.batch_size": "x2"}),
        # one optimizer step (and clip, and host sync) per 4 micro-batches (nanoGPT's
        # default GPT-2 config accumulates 40): per-step work is paid once per 4x the tokens
        ("+ 4 micro-batches per step", {"train.batch_tokens": "accum4"}),
    ]
    last = "+ compile" if device_type == "cpu" else "+ chunked loss"
    steps.append(steps.pop([name for name, _ in steps].index(last)))
    if device_type != "cpu":
        steps = [
            (name, change)
            for name, change in steps
            if "runtime.host_memory" not in change and "runtime.fast_dropout" not in change
        ]
    return [("fp32, manual attention", {})] + steps


def row_settings(workload: str, rows: list[tuple[str, dict[str, Any]]], k: int) -> dict[str, Any]:
    """The full settings of row k: the plain configuration plus rows 1..k's changes."""
    w = WORKLOADS[workload]
    settings: dict[str, Any] = {}
    for section in ("model", "train", "runtime"):
        for key, value in {**PLAIN[section], **w.get(section, {})}.items():
            settings[f"{section}.{key}"] = value
    for _, change in rows[1 : k + 1]:
        for key, value in change.items():
            if value == "x2":
                value = settings[key] * 2
            elif value == "accum4":  # batch_tokens of 4 micro-batches at the row's shapes
                value = 4 * settings["train.batch_size"] * settings["model.context_length"]
            settings[key] = value
    return settings


def default_settings(workload: str) -> dict[str, Any]:
    """gptlab's defaults (auto precision, compile and loss) at the workload's shapes."""
    w = WORKLOADS[workload]
    settings = {f"model.{k}": v for k, v in w["model"].items()}
    settings.update({f"train.{k}": v for k, v in w["train"].items()})
    settings["model.vocab_multiple"] = 64
    return settings


# --------------------------------------------------------------------------- one row


class _RandomTokens:
    """Stands in for a tokenizer: the trainer asks for the vocabulary size, the identity and
    (to check train.start_context before step 1) an encoding; no sample is drawn."""

    name = "random"

    def __init__(self, n_vocab: int):
        self.n_vocab = n_vocab

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "n_vocab": self.n_vocab}

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        return [b % self.n_vocab for b in text.encode()]


def run_row(
    settings: dict[str, Any], device: str, steps: int, warmup: int, max_seconds: float
) -> dict[str, Any]:
    """Time up to `steps` trainer steps (at least 3, stopping after `max_seconds`) after
    `warmup` untimed ones; returns the row's figures."""
    import numpy as np
    import torch

    from gptlab.config.schema import RunConfig, set_field
    from gptlab.data.corpus import Corpus
    from gptlab.runtime.device import measured_matmul_flops, peak_memory_mib, sync
    from gptlab.train.loop import Trainer
    from gptlab.train.objectives import LanguageModeling

    cfg = RunConfig()
    for key, value in settings.items():
        set_field(cfg, key, value)
    set_field(cfg, "runtime.device", device)
    set_field(cfg, "train.max_steps", warmup + steps)
    B, T = cfg.train.batch_size, cfg.model.context_length
    rng = np.random.default_rng(0)
    accum = max(1, cfg.train.batch_tokens // (B * T))  # micro-batches per step
    n_tokens = (warmup + steps + 1) * accum * B * (T + 1) + T + 1
    V = cfg.model.vocab_size
    tokens = rng.integers(0, V, n_tokens, dtype=np.uint16)
    corpus = Corpus(tokens, tokens[: 2 * (T + 1)], _RandomTokens(V), "random")
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, LanguageModeling(corpus), run_dir)
        dev = trainer.device
        trainer.model.train()
        t0 = time.perf_counter()
        trainer.train_step()
        sync(dev)
        first_step = time.perf_counter() - t0
        for _ in range(warmup - 1):
            trainer.train_step()
        sync(dev)
        t0, cpu0 = time.perf_counter(), time.process_time()
        losses: list[float] = []
        while len(losses) < steps and (len(losses) < 3 or time.perf_counter() - t0 < max_seconds):
            losses.append(trainer.train_step()[0])  # train_step reads the loss: a sync
        sync(dev)
        elapsed = time.perf_counter() - t0
        cpu_seconds = time.process_time() - cpu0
        steps = len(losses)
        trainer.metrics.close()
    tokens_per_step = trainer.accum * B * T
    tps = steps * tokens_per_step / elapsed
    peak = measured_matmul_flops(dev, torch.bfloat16)
    return {
        "device": _device_name(dev),
        "precision": trainer.rt.precision,
        "compiled": trainer.rt.compiled,
        "chunked_loss": trainer.rt.chunked_loss,
        "batch_size": B,
        "micro_batches": trainer.accum,
        "context_length": T,
        "tokens_per_s": round(tps, 1),
        "ms_per_step": round(1000 * elapsed / steps, 2),
        # CPU time of this process (all its threads) per step: on a shared machine, a
        # steadier figure than wall time for comparing rows
        "cpu_s_per_step": round(cpu_seconds / steps, 3),
        "mfu": round(tps * trainer.flops_per_token / peak, 4),
        "peak_bf16_flops": peak,
        "peak_mem_mib": round(peak_memory_mib(dev), 1),
        "first_step_s": round(first_step, 2),
        "last_loss": round(losses[-1], 4),
        "steps": steps,
    }


def _device_name(dev) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu x{torch.get_num_threads()} threads"


# --------------------------------------------------------------------------- the ladder (parent)


def _resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run(
    settings: dict[str, Any], args: argparse.Namespace, device: str, steps: int, isolate: bool
) -> tuple[dict[str, Any] | None, str]:
    """One row, in a child process or in this one; (figures, "") or (None, why it failed)."""
    if not isolate:
        import gc

        import torch

        try:
            return run_row(settings, device, steps, args.warmup, args.max_seconds), ""
        except Exception as e:  # a row that fails (out of memory, say) must not end the ladder
            return None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        finally:
            gc.collect()
            torch._dynamo.reset()  # a fresh model: no stale compiled graphs nor cache limits
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    cmd = [sys.executable, os.path.abspath(__file__), "--workload", args.workload]
    cmd += ["--device", device, "--steps", str(steps), "--warmup", str(args.warmup)]
    cmd += ["--max-seconds", str(args.max_seconds), "--_row", json.dumps(settings)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.row_timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return None, f"cut after {args.row_timeout:.0f} s"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return None, "failed: " + (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return json.loads(lines[-1]), ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="small")
    p.add_argument("--ladder", action="store_true", help="every row, not only gptlab's defaults")
    p.add_argument("--json", action="store_true", help="also one JSON line per row")
    p.add_argument("--steps", type=int, help="timed steps per row (default: per workload)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--rows", help="only these row numbers, e.g. 0,3,5")
    p.add_argument(
        "--max-seconds", type=float, default=15.0, help="stop timing a row after this (default 15)"
    )
    p.add_argument(
        "--isolate",
        choices=("auto", "yes", "no"),
        default="auto",
        help="a process per row (auto: on CPU, where peak RSS cannot be reset; on CUDA rows "
        "share one process and skip its start-up)",
    )
    p.add_argument("--row-timeout", type=float, default=600.0, help="seconds before a row is cut")
    p.add_argument("--_row", help=argparse.SUPPRESS)  # internal: run one row, print its JSON
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be at least 1")
    steps = args.steps or WORKLOADS[args.workload]["steps"]

    if args._row:
        settings = json.loads(args._row)
        row = run_row(settings, args.device, steps, args.warmup, args.max_seconds)
        print(json.dumps(row), flush=True)
        return 0

    device = _resolve_device(args.device)
    rows = ladder("cuda" if device.startswith("cuda") else device)
    plan = [
        (f"{k}. {name}", row_settings(args.workload, rows, k)) for k, (name, _) in enumerate(rows)
    ]
    plan.append((f"{len(rows)}. defaults (auto), padded vocab", default_settings(args.workload)))
    if args.rows:
        try:
            plan = [plan[int(k)] for k in args.rows.split(",")]
        except (ValueError, IndexError):
            p.error(f"--rows takes row numbers from 0 to {len(plan) - 1}, e.g. 0,3,5")
    elif not args.ladder:
        plan = plan[-1:]

    print(
        f"workload {args.workload}: {json.dumps(WORKLOADS[args.workload]['model'])}, "
        f"batch {WORKLOADS[args.workload]['train']['batch_size']}; {steps} timed steps per row "
        f"after {args.warmup} warm-up; device {device}",
        flush=True,
    )
    header = (
        f"{'config':32s} {'tokens/s':>10s} {'ms/step':>9s} {'MFU':>6s} {'peak MiB':>9s} "
        f"{'1st step s':>10s} {'speed-up':>8s}"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    base_tps, peak = None, None
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not device.startswith("cuda"))
    for name, settings in plan:
        t0 = time.perf_counter()
        r, error = _run(settings, args, device, steps, isolate)
        if r is None:
            print(f"{name:32s} {error}", flush=True)
            continue
        base_tps = base_tps or r["tokens_per_s"]
        peak = (r["device"], r["peak_bf16_flops"])
        print(
            f"{name:32s} {r['tokens_per_s']:10,.0f} {r['ms_per_step']:9.1f} "
            f"{100 * r['mfu']:5.1f}% {r['peak_mem_mib']:9,.0f} {r['first_step_s']:10.1f} "
            f"{r['tokens_per_s'] / base_tps:7.2f}x   ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        if args.json:
            record = {"workload": args.workload, "config": name, **r, "settings": settings}
            print(json.dumps(record), flush=True)
    if peak:
        print(
            f"MFU is against the measured bf16 matmul peak of {peak[1] / 1e12:.1f} TFLOP/s on {peak[0]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
