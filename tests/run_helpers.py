"""Shared pieces of the resume, checkpoint and guard tests: a tiny corpus, a tiny run
config (fp32, compile off, dropout on so RNG restoration matters) and readers of what a
run leaves on disk."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file

from gptlab.config.schema import RunConfig
from gptlab.data.corpus import Corpus, load_corpus
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.observe.metrics import read_metrics
from gptlab.recipes.presets import preset

STEPS = 21  # crosses two epoch boundaries of the tiny corpus (8 steps per epoch)
WORDS = "the king queen sword castle river night morning speaks walks brave old young gold".split()


def write_corpus(path: Path) -> Path:
    """~1.5k characters of made-up lines; they contain every character of the default
    sample prompt, so the char tokenizer can encode it."""
    rng = random.Random(0)
    lines = ["Every effort moves you."]
    for _ in range(40):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))).capitalize())
    path.write_text("\n".join(lines) + "\n")
    return path


# The same run, as CLI flags and as a RunConfig; tests change what they study.
def cli_flags(text: Path, out: Path, steps: int = STEPS) -> list[str]:
    return [
        "train",
        "--data",
        str(text),
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--precision",
        "fp32",
        "--compile",
        "off",
        "--device",
        "cpu",
        "--data.tokenizer",
        "char",
        "--model.drop_rate",
        "0.1",
        "--train.log_every",
        "1",
        "--train.eval_freq",
        "5",
        "--train.sample_tokens",
        "8",
    ]


def tiny_config(steps: int = STEPS, **settings: object) -> RunConfig:
    """The tiny preset on characters for `steps` steps; `settings` are train or runtime
    fields by name (a name neither has is a mistake in the test)."""
    cfg = preset("tiny")
    cfg.data.tokenizer = "char"
    cfg.model.drop_rate = 0.1
    cfg.train.epochs = 0
    cfg.train.max_steps = steps
    cfg.runtime.precision = "fp32"
    cfg.runtime.compile = "off"
    cfg.runtime.device = "cpu"
    cfg.train.log_every = 1
    cfg.train.eval_freq = 5
    cfg.train.sample_tokens = 8
    for key, value in settings.items():
        section = next(s for s in (cfg.train, cfg.runtime) if hasattr(s, key))
        setattr(section, key, value)
    return cfg


def tiny_corpus(text: Path, cfg: RunConfig) -> Corpus:
    corpus = load_corpus(str(text), "char", cfg.data.train_ratio)
    cfg.data.source = str(text)
    cfg.model.vocab_size = corpus.tokenizer.n_vocab
    return corpus


# --------------------------------------------------------------------------- reading a run


def records(run_dir: Path, event: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == event]


def losses_by_step(run_dir: Path, event: str = "train", key: str = "loss") -> dict[int, float]:
    """{step: value} of one event's records; fails on a duplicated step."""
    out: dict[int, float] = {}
    for r in records(run_dir, event):
        assert r["step"] not in out, f"step {r['step']} has two {event!r} records"
        out[r["step"]] = r[key]
    return out


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / ckpt_lib.WEIGHTS))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def latest_step(run_dir: Path) -> int:
    return ckpt_lib.read_meta(ckpt_lib.latest_checkpoint(run_dir))["step"]


# --------------------------------------------------------------------------- subprocesses

# The child runs the real CLI with one change: at a chosen point it prints a line and
# waits for one on stdin. The parent reads that line, sends its signal while the child is
# provably mid-run, then lets it go on. No timing is involved.
#   step:K  pause inside training step K, before its loss is computed
#   save:N  pause inside the N-th checkpoint save, after the weights file was written
#           and before the training state is
GATED_CHILD = """
import sys
import torch
from gptlab.cli import main as cli
from gptlab.model import loss

kind, n = sys.argv[1].split(":")
calls = [0]

def gated(real):
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(n):
            print("gate: paused", flush=True)
            sys.stdin.readline()
        return real(*args, **kwargs)
    return wrapper

if kind == "step":
    loss.model_loss = gated(loss.model_loss)
else:
    torch.save = gated(torch.save)
sys.exit(cli.main(sys.argv[2:]))
"""


# One thread, as conftest.py sets for in-process tests: a tiny model's kernels take
# microseconds, and on a busy machine two OpenMP threads waiting for each other make them
# 50x slower. Every process whose results are compared runs alike.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def spawn(flags: list[str], gate: str) -> subprocess.Popen:
    """`gptlab FLAGS` in a child process that pauses at `gate` (see GATED_CHILD), with
    stdout and stderr merged into one pipe."""
    proc = subprocess.Popen(
        [sys.executable, "-c", GATED_CHILD, gate, *flags],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=CHILD_ENV,
    )
    # A safety net only: a hung child fails the test instead of hanging the suite.
    timer = threading.Timer(120, proc.kill)
    timer.daemon = True
    timer.start()
    return proc


def wait_for_gate(proc: subprocess.Popen) -> list[str]:
    """The lines the child printed until it paused at its gate."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("gate: paused"):
            return seen
    raise AssertionError("the child ended before its gate:\n" + "".join(seen))


def release(proc: subprocess.Popen) -> str:
    """Let a paused child go on; its remaining output once it has exited."""
    proc.stdin.write("\n")
    proc.stdin.close()
    rest = proc.stdout.read()
    proc.wait()
    return rest


def run_cli(flags: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptlab", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env=CHILD_ENV,
    )
