"""Full finetuning against LoRA at the same batch: examples per second and peak memory.

    python benchmarks/bench_finetune.py [--shape gpt2-small] [--batch 8] [--seq 256]
        [--steps 10] [--warmup 2] [--rank 8] [--targets attn] [--threads N] [--preset-head]
        [--checkpointing] [--allocator finetune|exact]

Each mode runs in a fresh process (`--mode full|lora` is the child's own flag), so its peak
memory is its own: the process's resident-set high-water mark (getrusage ru_maxrss), read
after the timed steps, and the RSS just before the first step (model, optimizer and batch
built; the optimizer's moments are allocated at the first step). What that high-water mark
holds besides live tensors depends on the C library's allocator, so `--allocator` picks it:

- `finetune` (the default): `gptlab finetune`'s own on CPU (runtime.host_memory = keep:
  glibc keeps every freed block for reuse, the speed the run has). Its peak is what the
  machine pays for the run, holes between reused blocks included.
- `exact`: every block of 64 KiB or more is its own mapping, returned to the OS when freed
  (MALLOC_MMAP_THRESHOLD_=65536), so the high-water mark follows the live tensors: the
  figure `torch.cuda.max_memory_allocated` gives on a GPU, plus the fixed runtime. Slower
  (each large block is page-faulted afresh); its speed is not the run's.

The model has the preset's shape with random weights (`gpt2-small` with GPT-2's tied head
and q/k/v biases: GPT-2 124M; the speed and memory depend on the shape, not the values). One step is what `gptlab finetune` runs:
the masked loss (gptlab.finetune.objectives.lm_loss) on a batch of `--batch` examples of `--seq` tokens
(the last quarter of each example learned, the rest masked as a prompt), backward, gradient
clipping and AdamW (gptlab's parameter groups, fused where available) over what trains:
every parameter, or the adapters alone. Examples per second = batch x steps / seconds of the
timed steps (after `--warmup` untimed ones). `--checkpointing` turns on activation
checkpointing (runtime.activation_checkpointing) in both modes, so the two are still compared
at the same settings. Figures go in BENCHMARKS.md, not in this file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def _rss_mib() -> float:
    """This process's current resident set (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> dict:
    from gptlab.config.schema import TrainConfig
    from gptlab.finetune.data import IGNORE_INDEX
    from gptlab.finetune.objectives import lm_loss
    from gptlab.model import lora
    from gptlab.model.gpt import GPTModel, use_activation_checkpointing
    from gptlab.recipes.presets import preset
    from gptlab.runtime.device import keep_freed_host_memory
    from gptlab.train.optim import build_optimizer

    if args.allocator == "finetune":
        keep_freed_host_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.shape).model
    cfg.drop_rate = 0.0
    if not args.preset_head:  # GPT-2's own: the head tied to the embedding, q/k/v biases
        cfg.tie_weights, cfg.qkv_bias = True, True
    model = GPTModel(cfg).train()
    if args.mode == "lora":
        lora.add_adapters(model, args.rank, 2.0 * args.rank, args.targets)
    use_activation_checkpointing(model, args.checkpointing)
    trainable, total = lora.count_trainable(model)
    device = torch.device("cpu")
    opt = build_optimizer(model, TrainConfig(lr=5e-5, weight_decay=0.1), device)
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen)
    targets[:, : 3 * args.seq // 4] = IGNORE_INDEX  # the prompt is masked, as finetune does
    params = [p for p in model.parameters() if p.requires_grad]
    ready_mib = _rss_mib()

    def step() -> float:
        loss = lm_loss(model, inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - t0
    return {
        "mode": args.mode,
        "trainable": trainable,
        "total": total,
        "examples_per_s": args.batch * args.steps / seconds,
        "seconds": seconds,
        "ready_mib": ready_mib,
        "peak_mib": _peak_mib(),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="gpt2-small", help="a gptlab preset's model shape")
    p.add_argument("--batch", type=int, default=8, help="examples per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per example")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--targets", default="attn", help="LoRA targets (finetune.lora_targets)")
    p.add_argument(
        "--preset-head",
        action="store_true",
        help="keep the preset's head and biases (gpt2-small: the walk-through's untied 163M); "
        "default: GPT-2's own tied head and q/k/v biases (124M)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation checkpointing in both modes (runtime.activation_checkpointing)",
    )
    p.add_argument(
        "--allocator",
        choices=("finetune", "exact"),
        default="finetune",
        help="finetune: keep freed memory as gptlab finetune does on CPU; exact: return "
        "large blocks when freed, so the peak follows the live tensors",
    )
    p.add_argument("--mode", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:  # the child: one mode, one JSON line
        print(json.dumps(child(args)))
        return
    rows = []
    env = dict(os.environ)
    if args.allocator == "exact":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc at start-up
    for mode in ("full", "lora"):
        flags = list(sys.argv[1:])
        out = subprocess.run(
            [sys.executable, __file__, *flags, "--mode", mode],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    full, lo = rows
    print(
        f"{args.shape}, batch {args.batch} x {args.seq} tokens, {args.steps} timed steps after "
        f"{args.warmup}, LoRA rank {args.rank} on {args.targets}, {full['threads']} threads, "
        f"activation checkpointing {'on' if args.checkpointing else 'off'}; "
        f"memory: RSS high-water of a fresh process per mode, {args.allocator} allocator"
    )
    print(
        f"| {'mode':<5} | {'trainable':>26} | {'examples/s':>10} | {'RSS before step 1 MiB':>21} "
        f"| {'peak RSS MiB':>12} |"
    )
    print(f"|{'-' * 7}|{'-' * 28}|{'-' * 12}|{'-' * 23}|{'-' * 14}|")
    for r in rows:
        share = f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%)"
        print(
            f"| {r['mode']:<5} | {share:>26} | {r['examples_per_s']:>10.2f} | "
            f"{r['ready_mib']:>21.0f} | {r['peak_mib']:>12.0f} |"
        )
    print(
        f"LoRA / full: {lo['examples_per_s'] / full['examples_per_s']:.2f}x the examples per "
        f"second, {100 * lo['peak_mib'] / full['peak_mib']:.0f}% of the peak memory"
    )


if __name__ == "__main__":
    main()
