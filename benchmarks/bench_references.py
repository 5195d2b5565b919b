"""gptlab against the reference implementations, on this machine, at the same shapes.

    python benchmarks/bench_references.py --workload small --book ~/src/LLMs-from-scratch \
        --nanogpt ~/src/nanoGPT --litgpt-python ~/litgpt-env/bin/python [--json]

The references are not part of gptlab: clone them (and `pip install litgpt` into an
environment of its own) and pass their places; a row whose reference is not given is
left out. Each row runs in a fresh process on the same random token ids, warms up, then
times whole training steps:

- the book (LLMs-from-scratch, ch05/01_main-chapter-code): its `GPTModel` and
  `calc_loss_batch`, and the step of its `train_model_simple` (zero_grad, loss, backward,
  AdamW lr 4e-4, weight decay 0.1), as the chapter runs them;
- nanoGPT: its own `train.py`, run as its README says for a CPU (`--device=cpu
  --compile=False`; on CPU it trains in fp32, without autocast), and once with its default
  `--compile=True`; one micro-batch per step; the time is its own per-iteration print;
- litgpt: `litgpt.pretrain.setup` called from Python with its defaults for a CPU
  (bf16-mixed, torch.compile always, AdamW, clipping); the time is its own per-iteration
  print. Its models have no learned positions and no dropout: rotary embeddings on the
  whole head stand in, and the row "gptlab defaults, no dropout" is its counterpart;
- gptlab: the walk-through's configuration (fp32, manual attention, nothing switched on),
  the defaults (`auto`), the defaults kept in fp32 (what bf16 does not explain), and the
  defaults without dropout.

Shapes: the workload's context, batch, width, depth and heads (`bench_train.py`'s
workloads), dropout 0.1, GPT-2's vocabulary. Each implementation keeps its own model
otherwise (nanoGPT ties its head to the embedding and pads the vocabulary to 50,304; the
book and the gptlab workloads keep an untied head). Peak memory is the row's max RSS.
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
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import WORKLOADS, row_settings  # noqa: E402

BOOK_CODE = Path("ch05") / "01_main-chapter-code"


def shapes(workload: str) -> dict[str, Any]:
    """The workload's shapes, with the defaults of gptlab's ModelConfig filled in."""
    from gptlab.config import ModelConfig

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


def book_row(book: Path, s: dict[str, Any], steps: int, warmup: int) -> list[float]:
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
    model = GPTModel(cfg)
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
        loss = calc_loss_batch(x, y, model, "cpu")
        loss.backward()
        optimizer.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    return times[warmup:]


def nanogpt_row(
    nanogpt: Path, s: dict[str, Any], steps: int, warmup: int, compile: bool
) -> list[float]:
    """Seconds per iteration that nanoGPT's train.py prints, run in a scratch folder."""
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for name in ("train.py", "model.py", "configurator.py"):
            (work / name).symlink_to(nanogpt / name)
        data = work / "data" / "bench"
        data.mkdir(parents=True)
        n = (warmup + steps + 8) * s["batch_size"] * (s["context_length"] + 1)
        random_tokens(n, s["vocab_size"]).tofile(data / "train.bin")
        random_tokens(n, s["vocab_size"]).tofile(data / "val.bin")
        args = {
            "device": "cpu",
            "compile": compile,
            "dtype": "float32",  # what it computes in on CPU anyway: no autocast there
            "dataset": "bench",
            "out_dir": str(work / "out"),
            "batch_size": s["batch_size"],
            "block_size": s["context_length"],
            "n_layer": s["n_layers"],
            "n_head": s["n_heads"],
            "n_embd": s["emb_dim"],
            "dropout": s["drop_rate"],
            "bias": True,  # GPT-2's biases, as the other rows have them
            "gradient_accumulation_steps": 1,
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
    return [times[i] for i in sorted(times) if i >= warmup]


def litgpt_row(s: dict[str, Any], steps: int, warmup: int) -> list[float]:
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
    return [times[i] for i in sorted(times) if i > warmup]


@contextlib.contextmanager
def _captured():
    """Collect what a reference prints (its own log lines) instead of showing it."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        yield buf


def gptlab_row(settings: dict[str, Any], steps: int, warmup: int) -> list[float]:
    """Seconds per step of gptlab's trainer (Trainer.train_step), as in bench_train.py."""
    from bench_train import run_row

    r = run_row(settings, "cpu", steps, warmup, max_seconds=float("inf"))
    return [r["ms_per_step"] / 1000] * r["steps"]


def gptlab_settings(workload: str, kind: str) -> dict[str, Any]:
    """gptlab's settings for a row: the plain configuration of bench_train's row 0, or the
    defaults (auto), kept in fp32 or without dropout for `kind` fp32 or nodrop; the
    workload's shapes, with dropout 0.1 unless nodrop."""
    if kind == "plain":
        s = row_settings(workload, [("plain", {})], 0)
    else:
        s = {f"model.{k}": v for k, v in WORKLOADS[workload]["model"].items()}
        s.update({f"train.{k}": v for k, v in WORKLOADS[workload]["train"].items()})
        s["model.vocab_multiple"] = 64
        if kind == "fp32":
            s["train.precision"] = "fp32"
    s["model.drop_rate"] = 0.0 if kind == "nodrop" else shapes(workload)["drop_rate"]
    return s


ROWS = {
    "book": "LLMs-from-scratch ch05 (the book)",
    "nanogpt": "nanoGPT train.py, CPU (fp32)",
    "nanogpt-compile": "nanoGPT train.py, compile=True",
    "litgpt": "litgpt pretrain (bf16-mixed, compile)",
    "gptlab-plain": "gptlab, the walk-through's config",
    "gptlab-fp32": "gptlab defaults, fp32",
    "gptlab": "gptlab defaults (auto)",
    "gptlab-nodrop": "gptlab defaults, no dropout",
}


def child(args: argparse.Namespace) -> int:
    s = json.loads(args._shapes)
    if args._row == "book":
        times = book_row(Path(args.book), s, args.steps, args.warmup)
    elif args._row.startswith("nanogpt"):
        compile = args._row == "nanogpt-compile"
        times = nanogpt_row(Path(args.nanogpt), s, args.steps, args.warmup, compile)
    elif args._row == "litgpt":
        times = litgpt_row(s, args.steps, args.warmup)
    else:
        kind = args._row.removeprefix("gptlab").lstrip("-") or "auto"
        times = gptlab_row(gptlab_settings(args.workload, kind), args.steps, args.warmup)
    if not times:
        raise RuntimeError("no timed steps")
    rss_kib = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    sec = statistics.fmean(times)
    print(
        json.dumps(
            {
                "tokens_per_s": round(s["batch_size"] * s["context_length"] / sec, 1),
                "ms_per_step": round(1000 * sec, 1),
                "steps": len(times),
                "peak_mem_mib": round(rss_kib / 1024, 1),
            }
        )
    )
    return 0


# --------------------------------------------------------------------------- the table (parent)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("small", "seed124m"), default="small")
    p.add_argument("--book", help="a clone of rasbt/LLMs-from-scratch")
    p.add_argument("--nanogpt", help="a clone of karpathy/nanoGPT")
    p.add_argument("--steps", type=int, default=8, help="timed steps per row (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--rows", help=f"only these rows, comma-separated: {', '.join(ROWS)}")
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

    wanted = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}")
    for flag, path, marker in (
        ("--book", args.book, BOOK_CODE / "previous_chapters.py"),
        ("--nanogpt", args.nanogpt, Path("train.py")),
    ):
        if path and not (Path(path) / marker).is_file():
            p.error(f"{flag} {path!r} has no {marker}; pass the root of a clone")
    if not args.book:
        wanted = [r for r in wanted if r != "book"]
    if not args.nanogpt:
        wanted = [r for r in wanted if not r.startswith("nanogpt")]
    if not args.litgpt_python:
        wanted = [r for r in wanted if r != "litgpt"]

    s = shapes(args.workload)
    print(
        f"workload {args.workload}: {json.dumps(s)}; {args.steps} timed steps per row after "
        f"{args.warmup} warm-up; cpu, {os.cpu_count()} cores",
        flush=True,
    )
    header = (
        f"{'implementation':36s} {'tokens/s':>9s} {'ms/step':>9s} {'peak MiB':>9s} {'vs 1st':>7s}"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    base = None
    for row in wanted:
        python = args.litgpt_python if row == "litgpt" else sys.executable
        cmd = [python, os.path.abspath(__file__), "--workload", args.workload]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--_row", row]
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
        print(
            f"{ROWS[row]:36s} {r['tokens_per_s']:9,.0f} {r['ms_per_step']:9,.1f} "
            f"{r['peak_mem_mib']:9,.0f} {r['tokens_per_s'] / base:6.2f}x",
            flush=True,
        )
        if args.json:
            print(json.dumps({"workload": args.workload, "config": ROWS[row], **r}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
