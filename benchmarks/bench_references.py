"""gptlab against the reference implementations, on this machine, at the same shapes.

    python benchmarks/bench_references.py --workload small --book ~/src/LLMs-from-scratch \
        --nanogpt ~/src/nanoGPT --litgpt-python ~/litgpt-env/bin/python [--json]
    python benchmarks/bench_references.py --workload gpt2-124m --device cuda \
        --nanogpt ~/src/nanoGPT [--json]

The references are not part of gptlab: clone them (and `pip install litgpt` into an
environment of its own) and pass their places; a row whose reference is not given is
left out. Each row runs in a fresh process on the same random token ids, warms up, then
times whole training steps:

- the book (LLMs-from-scratch, ch05/01_main-chapter-code): its `GPTModel` and
  `calc_loss_batch`, and the step of its `train_model_simple` (zero_grad, loss, backward,
  AdamW lr 4e-4, weight decay 0.1), as the chapter runs them;
- nanoGPT: its own `train.py`. On CPU as its README runs it there (`--device=cpu
  --compile=False`: fp32, it has no autocast on CPU), and with its default
  `--compile=True`; on a GPU with its defaults (bf16 autocast, compile). One micro-batch
  per step at the workload's shapes, and (row nanogpt-gpt2) with the batching of its own
  GPT-2 configuration: 40 micro-batches of 12 per step, no biases. The time is its own
  per-iteration print;
- litgpt: `litgpt.pretrain.setup` called from Python with its defaults for a CPU
  (bf16-mixed, torch.compile always, AdamW, clipping); the time is its own per-iteration
  print. Its models have no learned positions and no dropout: rotary embeddings on the
  whole head stand in, and the row "gptlab defaults, no dropout" is its counterpart;
- gptlab: the walk-through's configuration (fp32, manual attention, nothing switched on),
  the defaults (`auto`), the defaults kept in fp32 (what bf16 does not explain), without
  dropout, and with 4 micro-batches per optimizer step.

Shapes: the workload's context, batch, width, depth and heads (`bench_train.py`'s
workloads), its dropout (0.1 for small and seed124m, none for gpt2-124m), GPT-2's
vocabulary. Each implementation keeps its own model otherwise (nanoGPT ties its head to
the embedding and pads the vocabulary to 50,304; the book keeps an untied head, as do
gptlab's small and seed124m workloads). Peak memory: the row's max RSS on CPU, the most
CUDA memory allocated on a GPU ("-" where the reference does not say).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import WORKLOADS, row_settings  # noqa: E402

BOOK_CODE = Path("ch05") / "01_main-chapter-code"


def shapes(workload: str) -> dict[str, Any]:
    """The workload's shapes, with the defaults of gptlab's ModelConfig filled in."""
    from gptlab.config.schema import ModelConfig

    m = ModelConfig(**{"drop_rate": 0.1, **WORKLOADS[workload]["model"]})
    return {
        "batch_size": WORKLOADS[workload]["train"]["batch_size"],
        "context_length": m.context_length,
        "emb_dim": m.emb_dim,
        "n_heads": m.n_heads,
        "n_layers": m.n_layers,
        "drop_rate": m.drop_rate,
        "vocab_size": m.vocab_size,
    }


def random_tokens(n: int, vocab_size: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab_size, n, dtype=np.uint16)


# --------------------------------------------------------------------------- rows (children)


def book_row(book: Path, s: dict[str, Any], steps: int, warmup: int, device: str) -> Timed:
    """Seconds per step of the book's own model, loss and optimizer."""
    import torch

    sys.path.insert(0, str(book / BOOK_CODE))
    from gpt_train import calc_loss_batch  # the chapter's own function
    from previous_chapters import GPTModel

    torch.manual_seed(123)
    cfg = {
        "vocab_size": s["vocab_size"],
        "context_length": s["context_length"],
        "emb_dim": s["emb_dim"],
        "n_heads": s["n_heads"],
        "n_layers": s["n_layers"],
        "drop_rate": s["drop_rate"],
        "qkv_bias": False,
    }
    model = GPTModel(cfg).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
    B, T = s["batch_size"], s["context_length"]
    data = torch.from_numpy(random_tokens((warmup + steps) * B * (T + 1), cfg["vocab_size"]))
    windows = data.long().view(warmup + steps, B, T + 1)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x, y = windows[i, :, :-1], windows[i, :, 1:]
        optimizer.zero_grad()  # as train_model_simple does it
        loss = calc_loss_batch(x, y, model, device)  # it moves the batch to the device
        loss.backward()
        optimizer.step()
        loss.item()  # waits for the device
        times.append(time.perf_counter() - t0)
    return Timed(times[warmup:], B * T, _cuda_peak_mib(device))


def nanogpt_row(
    nanogpt: Path,
    s: dict[str, Any],
    steps: int,
    warmup: int,
    device: str,
    compile: bool,
    gpt2_config: bool = False,
) -> Timed:
    """Seconds per iteration that nanoGPT's train.py prints, run in a scratch folder: at
    the workload's shapes with one micro-batch per step, or (`gpt2_config`) with the
    batching and biases of its own GPT-2 configuration (12 x 40 micro-batches, no biases)."""
    B, accum = (12, 40) if gpt2_config else (s["batch_size"], 1)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for name in ("train.py", "model.py", "configurator.py"):
            (work / name).symlink_to(nanogpt / name)
        data = work / "data" / "bench"
        data.mkdir(parents=True)
        n = (warmup + steps + 8) * B * (s["context_length"] + 1)
        random_tokens(n, s["vocab_size"]).tofile(data / "train.bin")
        random_tokens(n, s["vocab_size"]).tofile(data / "val.bin")
        args = {
            "device": device,
            "compile": compile,
            # on CPU it computes in fp32 whatever dtype says (no autocast there); on a GPU
            # its default is bf16 autocast where the card has bf16
            "dtype": "float32" if device == "cpu" else "bfloat16",
            "dataset": "bench",
            "out_dir": str(work / "out"),
            "batch_size": B,
            "block_size": s["context_length"],
            "n_layer": s["n_layers"],
            "n_head": s["n_heads"],
            "n_embd": s["emb_dim"],
            "dropout": s["drop_rate"],
            "bias": not gpt2_config,  # GPT-2's biases, as the other rows have them
            "gradient_accumulation_steps": accum,
            "learning_rate": 4e-4,
            "max_iters": warmup + steps - 1,  # it runs iterations 0 to max_iters
            "eval_interval": 10**9,  # one tiny evaluation at iteration 0, none after
            "eval_iters": 1,
            "log_interval": 1,
            "always_save_checkpoint": False,
            "wandb_log": False,
        }
        cmd = [sys.executable, "train.py"] + [f"--{k}={v}" for k, v in args.items()]
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["(no output)"])[-1])
    times = {
        int(m[1]): float(m[2]) / 1000
        for m in re.finditer(r"^iter (\d+): loss \S+, time ([\d.]+)ms", proc.stdout, re.M)
    }
    # Iteration 0's time holds the start-up evaluation (and, compiled, the compilation).
    timed = [times[i] for i in sorted(times) if i >= warmup]
    return Timed(timed, accum * B * s["context_length"], None)


def litgpt_row(s: dict[str, Any], steps: int, warmup: int) -> Timed:
    """Seconds per iteration that `litgpt pretrain` prints, called from Python with its
    defaults for a CPU (bf16-mixed, torch.compile, AdamW) on a data module of our tokens."""
    import torch
    from litgpt.args import EvalArgs, TrainArgs
    from litgpt.config import Config
    from litgpt.data import DataModule
    from litgpt.pretrain import setup
    from torch.utils.data import DataLoader

    B, T = s["batch_size"], s["context_length"]
    windows = torch.from_numpy(
        random_tokens(4 * (warmup + steps + 4) * B * (T + 1), s["vocab_size"]).astype("int64")
    ).view(-1, T + 1)

    class Tokens(DataModule):
        def connect(self, tokenizer=None, batch_size=1, max_seq_length=None, **kwargs):
            self.batch_size = batch_size

        def train_dataloader(self):
            return DataLoader(windows, batch_size=self.batch_size)

        def val_dataloader(self):
            return DataLoader(windows[: 2 * self.batch_size], batch_size=self.batch_size)

    # GPT-2's shapes in litgpt's terms (it has no learned positions nor dropout: rotary
    # embeddings on the whole head instead, and no dropout at all)
    config = Config(
        name="bench",
        block_size=T,
        vocab_size=s["vocab_size"],
        padding_multiple=64,
        n_layer=s["n_layers"],
        n_head=s["n_heads"],
        n_embd=s["emb_dim"],
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=True,
        norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP",
        intermediate_size=4 * s["emb_dim"],
        gelu_approximate="tanh",
    )
    # its final checkpoint saves "the command line's" hyperparameters by parsing sys.argv
    sys.argv = [sys.argv[0], "bench"]
    with tempfile.TemporaryDirectory() as d, _captured() as out:
        setup(
            "bench",
            model_config=config,
            out_dir=Path(d),
            data=Tokens(),
            train=TrainArgs(
                save_interval=None,
                log_interval=1,
                global_batch_size=B,
                micro_batch_size=B,
                max_tokens=(warmup + steps) * B * T,
                max_norm=1.0,
                lr_warmup_steps=1,
                min_lr=4e-5,
            ),
            eval=EvalArgs(interval=10**9, max_iters=1, final_validation=False),
            optimizer={
                "class_path": "torch.optim.AdamW",
                "init_args": {"lr": 4e-4, "weight_decay": 0.1},
            },
            devices=1,
            logger_name="csv",
        )
    times = {
        int(m[1]): float(m[2]) / 1000
        for m in re.finditer(r"\| iter (\d+) step .*? iter time: ([\d.]+) ms", out.getvalue())
    }
    # iterations count from 1; the first ones compile
    return Timed([times[i] for i in sorted(times) if i > warmup], B * T, None)


@contextlib.contextmanager
def _captured():
    """Collect what a reference prints (its own log lines) instead of showing it."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        yield buf


def gptlab_row(settings: dict[str, Any], steps: int, warmup: int, device: str) -> Timed:
    """Seconds per step of gptlab's trainer (Trainer.train_step), as in bench_train.py."""
    from bench_train import run_row

    r = run_row(settings, device, steps, warmup, max_seconds=float("inf"))
    tokens_per_step = r["micro_batches"] * r["batch_size"] * r["context_length"]
    peak = r["peak_mem_mib"] if device.startswith("cuda") else None
    return Timed([r["ms_per_step"] / 1000] * r["steps"], tokens_per_step, peak)


def _cuda_peak_mib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def gptlab_settings(workload: str, kind: str) -> dict[str, Any]:
    """gptlab's settings for a row: the plain configuration of bench_train's row 0, or the
    defaults (auto), kept in fp32, without dropout or with 4 micro-batches per step for
    `kind` fp32, nodrop or accum4; the workload's shapes and dropout (none for nodrop)."""
    if kind == "plain":
        s = row_settings(workload, [("plain", {})], 0)
    else:
        s = {f"model.{k}": v for k, v in WORKLOADS[workload]["model"].items()}
        s.update({f"train.{k}": v for k, v in WORKLOADS[workload]["train"].items()})
        s["model.vocab_multiple"] = 64
        if kind == "fp32":
            s["runtime.precision"] = "fp32"
        elif kind == "accum4":  # 4 micro-batches per optimizer step, as nanoGPT accumulates
            s["train.batch_tokens"] = 4 * s["train.batch_size"] * shapes(workload)["context_length"]
    s["model.drop_rate"] = 0.0 if kind == "nodrop" else shapes(workload)["drop_rate"]
    return s


ROWS = {
    "book": "LLMs-from-scratch ch05 (the book)",
    "nanogpt": "nanoGPT train.py, compile=False",
    "nanogpt-compile": "nanoGPT train.py, compile=True",
    "nanogpt-gpt2": "nanoGPT, its GPT-2 batching (12x40)",
    "litgpt": "litgpt pretrain (bf16-mixed, compile)",
    "gptlab-plain": "gptlab, the walk-through's config",
    "gptlab-fp32": "gptlab defaults, fp32",
    "gptlab": "gptlab defaults (auto)",
    "gptlab-nodrop": "gptlab defaults, no dropout",
    "gptlab-accum4": "gptlab defaults, 4 micro-batches",
}
# What runs without --rows: on CPU every reference as its README runs it there; on a GPU
# nanoGPT's default (bf16, compile), as given and with its own batching, against gptlab's.
DEFAULT_ROWS = {
    "cpu": [
        "book",
        "nanogpt",
        "nanogpt-compile",
        "litgpt",
        "gptlab-plain",
        "gptlab-fp32",
        "gptlab",
        "gptlab-nodrop",
    ],
    "cuda": ["nanogpt-compile", "nanogpt-gpt2", "gptlab", "gptlab-accum4"],
}


class Timed(NamedTuple):
    """A row's timed steps: seconds each, tokens each, and the peak device memory (MiB)
    where the row can tell it (else the process's max RSS is reported)."""

    seconds: list[float]
    tokens_per_step: int
    peak_mem_mib: float | None


def child(args: argparse.Namespace) -> int:
    s = json.loads(args._shapes)
    row, device = args._row, args.device
    if row == "book":
        timed = book_row(Path(args.book), s, args.steps, args.warmup, device)
    elif row.startswith("nanogpt"):
        compile = row == "nanogpt-compile" or (row == "nanogpt-gpt2" and device != "cpu")
        timed = nanogpt_row(
            Path(args.nanogpt), s, args.steps, args.warmup, device, compile, row == "nanogpt-gpt2"
        )
    elif row == "litgpt":
        timed = litgpt_row(s, args.steps, args.warmup)
    else:
        kind = row.removeprefix("gptlab").lstrip("-") or "auto"
        timed = gptlab_row(gptlab_settings(args.workload, kind), args.steps, args.warmup, device)
    if not timed.seconds:
        raise RuntimeError("no timed steps")
    peak = timed.peak_mem_mib
    if peak is None and device == "cpu":
        rss_kib = max(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        )
        peak = rss_kib / 1024
    sec = statistics.fmean(timed.seconds)
    record = {
        "tokens_per_s": round(timed.tokens_per_step / sec, 1),
        "ms_per_step": round(1000 * sec, 1),
        "tokens_per_step": timed.tokens_per_step,
        "steps": len(timed.seconds),
        "peak_mem_mib": None if peak is None else round(peak, 1),
    }
    print(json.dumps(record))
    return 0


# --------------------------------------------------------------------------- the table (parent)


def _device_line(device: str) -> str:
    if device == "cpu":
        return f"cpu, {os.cpu_count()} cores"
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_references.py: --device cuda, but this machine has no CUDA GPU")
    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="small")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--book", help="a clone of rasbt/LLMs-from-scratch")
    p.add_argument("--nanogpt", help="a clone of karpathy/nanoGPT")
    p.add_argument("--steps", type=int, default=8, help="timed steps per row (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument(
        "--rows",
        help=f"these rows, comma-separated, of: {', '.join(ROWS)} "
        "(default: every reference on CPU; nanoGPT's defaults and gptlab's on CUDA)",
    )
    p.add_argument("--json", action="store_true", help="also one JSON line per row")
    p.add_argument(
        "--litgpt-python",
        help="the Python of an environment with litgpt installed (pip install litgpt)",
    )
    p.add_argument("--_row", help=argparse.SUPPRESS)  # internal: run one row, print its JSON
    p.add_argument("--_shapes", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    if args._row:
        return child(args)

    wanted = args.rows.split(",") if args.rows else DEFAULT_ROWS[args.device]
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}")
    for flag, path, marker in (
        ("--book", args.book, BOOK_CODE / "previous_chapters.py"),
        ("--nanogpt", args.nanogpt, Path("train.py")),
    ):
        if path and not (Path(path) / marker).is_file():
            p.error(f"{flag} {path!r} has no {marker}; pass the root of a clone")
    given = {"--book": args.book, "--nanogpt": args.nanogpt, "--litgpt-python": args.litgpt_python}
    left_out = [flag for flag, path in given.items() if not path]
    if not args.book:
        wanted = [r for r in wanted if r != "book"]
    if not args.nanogpt:
        wanted = [r for r in wanted if not r.startswith("nanogpt")]
    if not args.litgpt_python:
        wanted = [r for r in wanted if r != "litgpt"]

    s = shapes(args.workload)
    print(
        f"workload {args.workload}: {json.dumps(s)}; {args.steps} timed steps per row after "
        f"{args.warmup} warm-up; {_device_line(args.device)}",
        flush=True,
    )
    if left_out:
        print(f"(references left out: give {', '.join(left_out)} to time them too)", flush=True)
    header = (
        f"{'implementation':36s} {'tokens/s':>9s} {'ms/step':>9s} {'peak MiB':>9s} {'vs 1st':>7s}"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    base = None
    for row in wanted:
        python = args.litgpt_python if row == "litgpt" else sys.executable
        cmd = [python, os.path.abspath(__file__), "--workload", args.workload]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--_row", row]
        cmd += ["--device", args.device]
        cmd += ["--_shapes", json.dumps(s)]
        cmd += [f"--book={args.book or ''}", f"--nanogpt={args.nanogpt or ''}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            why = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{ROWS[row]:36s} failed: {why[:200]}", flush=True)
            continue
        r = json.loads(lines[-1])
        base = base or r["tokens_per_s"]
        peak = "-" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:,.0f}"
        print(
            f"{ROWS[row]:36s} {r['tokens_per_s']:9,.0f} {r['ms_per_step']:9,.1f} "
            f"{peak:>9s} {r['tokens_per_s'] / base:6.2f}x",
            flush=True,
        )
        if args.json:
            print(json.dumps({"workload": args.workload, "config": ROWS[row], **r}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
