"""Refactor guard: a fingerprint of what gptlab's users see, to show that a change which
must not change it (issue 33: the stage packages) did not, bit for bit.

    python benchmarks/refactor_guard.py record before.json [--workdir DIR]
    ... change the code, same machine, same torch ...
    python benchmarks/refactor_guard.py record after.json
    python benchmarks/refactor_guard.py compare before.json after.json   # exit 0: all same

`record` runs the real command line, each command a fresh `python -m gptlab` process on
the CPU with one thread (OMP_NUM_THREADS=1 and --threads 1: a sum split over another
number of threads rounds differently), in a fresh GPTLAB_CACHE (so the BPE is trained and
the text tokenized every time, not read from whatever an older gptlab cached):

    train-cpu            gptlab train --preset cpu --max-steps 20 (the built-in plays)
    train-walkthrough    gptlab train --preset walkthrough --max-steps 3 on a story-sized text:
                         the book's story when --story names a copy of it (gptlab ships
                         none), else the first 20,479 characters of the built-in plays
    finetune-instructions, finetune-lora (--lora-rank 4), finetune-classification
                         gptlab finetune --init-from train-cpu on tests/data/finetune's records
    eval-*               gptlab eval: the task suite of tests/data/tasks (--task suite.toml),
                         the loss of train-cpu, of the instructions run, the classifier's accuracy
    generate-*           gptlab generate: greedy from train-cpu, seeded sampling from it,
                         greedy chats (--chat) with the instructions and LoRA runs
    serve-instructions   gptlab serve on the instructions run: greedy and seeded sampled
                         /v1/completions requests, a greedy /v1/chat/completions one

and writes one JSON: for every run its train records' (step, loss) and its eval records
(floats exactly as metrics.jsonl has them), its other records, its resolved config, a
digest of its final weights and of its tokenizer; the eval reports; the generated texts;
the server's answers; and the environment (torch, CPU model and flags) and gptlab commit.
What varies with the clock (times, tokens/s, MFU, peak memory, the measured peak FLOPs) is
left out; paths under the work directory are written as $WORKDIR/..., so two records
compare wherever they ran (the default work directory is a temporary one, removed after). `compare` prints each item "same" or its first difference, floats
compared by repr, and exits 0 only when every item is identical.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STORY_CHARS = 20_479  # the length of the walk-through's story, the-verdict.txt
FINETUNE_DATA = REPO / "tests" / "data" / "finetune"
TASK_DATA = REPO / "tests" / "data" / "tasks"

# Every command runs on one CPU thread: gptlab's own choice reads the machine's load, and
# OMP_NUM_THREADS covers anything torch starts before gptlab sets its threads.
DEVICE = ["--device", "cpu", "--threads", "1"]
PROMPT = "Every effort moves you"
INSTRUCTION = "Give the plural of the noun: marble"
NEW_TOKENS = "20"

# metrics.jsonl fields read off the clock or the machine's memory: they differ between two
# runs of the same code and say nothing about the numbers.
VOLATILE = {"time", "elapsed", "train_time", "tokens_per_s", "mfu", "peak_mem_mib", "peak_flops"}
# fields of an OpenAI-shaped answer that are new on every request
VOLATILE_ANSWER = {"id", "created"}
CPU_FLAGS = ("avx512_bf16", "amx_tile", "amx_bf16")


# ----------------------------------------------------------------------------- record


def record(out: Path, workdir: Path, story: Path | None = None) -> None:
    """Run every command in `workdir` (which must be empty or absent) and write the
    fingerprint to `out`; `story` is the walk-through's text, if the user has a copy."""
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    if any(workdir.iterdir()):
        sys.exit(f"refactor_guard: {workdir} is not empty: give a new --workdir")
    inputs = copy_inputs(workdir, story)
    runs = workdir / "runs"
    env = cli_env(workdir)
    items: dict[str, Any] = {
        "inputs": {str(p.relative_to(inputs)): sha256(p) for p in sorted(inputs.rglob("*.*"))}
    }

    def gptlab(name: str, *args: str) -> str:
        print(f"refactor_guard: {name}", file=sys.stderr, flush=True)
        return run_cli(list(args), workdir, env)

    # (1) the default preset, held to a step budget: --max-steps switches it from the time
    # budget, and --train.sizing preset keeps its shape whatever this machine measures
    gptlab("train-cpu", "train", "--preset", "cpu", "--max-steps", "20",
           "--train.sizing", "preset", "--train.log_every", "1", "--train.eval_freq", "10",
           "--out", str(runs / "cpu"), *DEVICE, "--quiet")  # fmt: skip
    items.update(run_items("train-cpu", runs / "cpu"))

    # (2) the walk-through's chapter 5 run (GPT-2 124M): its first evaluation is the book's
    # 9.781 / 9.933; three steps, as each one is seconds on one thread
    gptlab("train-walkthrough", "train", "--preset", "walkthrough",
           "--data", str(inputs / "story.txt"), "--max-steps", "3", "--train.log_every",
           "1", "--out", str(runs / "walkthrough"), *DEVICE, "--quiet")  # fmt: skip
    items.update(run_items("train-walkthrough", runs / "walkthrough"))
    # its checkpoint is ~2 GB (weights and AdamW moments): nothing below reads it
    shutil.rmtree(runs / "walkthrough" / "checkpoints")

    # (3)-(5) finetunes of the cpu run (bf16 where the CPU has it, as the cpu preset trains)
    finetunes = {
        # 60 steps: fewer leave a model whose greedy answers are one token and the end
        "instructions": ["instructions.jsonl", "--max-steps", "60", "--train.lr", "2e-3",
                         "--train.eval_freq", "20"],
        "lora": ["instructions.jsonl", "--max-steps", "6", "--train.lr", "3e-3",
                 "--train.eval_freq", "3", "--lora-rank", "4", "--lora-targets", "all"],
        "classification": ["classification.jsonl", "--max-steps", "6", "--train.lr", "2e-3",
                           "--train.eval_freq", "3", "--finetune.train_blocks", "1"],
    }  # fmt: skip
    for name, (records, *flags) in finetunes.items():
        gptlab(f"finetune-{name}", "finetune", "--init-from", str(runs / "cpu"),
               "--data", str(inputs / records), *flags, "--train.eval_iter", "5",
               "--train.log_every", "1", "--out", str(runs / name), *DEVICE, "--quiet")  # fmt: skip
        items.update(run_items(f"finetune-{name}", runs / name))

    evals = {
        "eval-tasks": [runs / "cpu", "--task", str(inputs / "tasks" / "suite.toml")],
        "eval-loss-cpu": [runs / "cpu", "--max-batches", "4"],
        "eval-loss-instructions": [runs / "instructions"],
        "eval-accuracy-classification": [runs / "classification", "--split", "test"],
    }
    for name, (run, *flags) in evals.items():
        report = gptlab(name, "eval", "--checkpoint", str(run), *flags, "--json", *DEVICE)
        items[name] = json.loads(report)

    greedy = ["--temperature", "0", "--max-new-tokens", NEW_TOKENS, *DEVICE]
    generations = {
        "generate-cpu-greedy": [runs / "cpu", "--prompt", PROMPT, *greedy],
        # sampling draws from its own seeded generator: a repeatable, more sensitive text
        "generate-cpu-sampled": [runs / "cpu", "--prompt", PROMPT, "--temperature", "0.8",
                                 "--top-k", "50", "--seed", "1", "--max-new-tokens",
                                 NEW_TOKENS, *DEVICE],
        "generate-instructions-chat": [runs / "instructions", "--chat", "--prompt", INSTRUCTION,
                                       *greedy],
        "generate-lora-chat": [runs / "lora", "--chat", "--prompt", INSTRUCTION, *greedy],
    }  # fmt: skip
    for name, (run, *flags) in generations.items():
        items[name] = gptlab(name, "generate", "--checkpoint", str(run), *flags)

    print("refactor_guard: serve-instructions", file=sys.stderr, flush=True)
    items.update(serve_items("serve-instructions", runs / "instructions", workdir, env))

    fingerprint = {
        "about": about(),
        "environment": environment(),
        "items": normalise(items, {str(workdir): "$WORKDIR"}),
    }
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(fingerprint, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"refactor_guard: {len(items)} items in {out}", file=sys.stderr)


def story_text(story: Path | None) -> str:
    """The walk-through run's text: the user's copy of the book's story, or a slice of the
    built-in plays as long as the story (gptlab ships no copy of it)."""
    if story is not None:
        return story.read_text(encoding="utf-8")
    from gptlab.data.sources import shakespeare_plays

    return "\n\n".join(shakespeare_plays())[:STORY_CHARS]


def copy_inputs(workdir: Path, story: Path | None = None) -> Path:
    """Copy the inputs into the work directory, so that every path a run records (its
    config, its eval reports) is under it and compares after normalisation."""
    inputs = workdir / "inputs"
    inputs.mkdir()
    (inputs / "story.txt").write_text(story_text(story), encoding="utf-8")
    for name in ("instructions.jsonl", "classification.jsonl"):
        shutil.copy(FINETUNE_DATA / name, inputs / name)
    shutil.copytree(TASK_DATA, inputs / "tasks")
    return inputs


def cli_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        GPTLAB_CACHE=str(workdir / "cache"),
        CUDA_VISIBLE_DEVICES="",  # --device cpu says it too; this keeps CUDA from starting
        PYTHONHASHSEED="0",
    )
    return env


def run_cli(args: list[str], workdir: Path, env: dict[str, str]) -> str:
    """`python -m gptlab ARGS` in `workdir` (so that nothing lands in the caller's runs/);
    returns its stdout, or exits with its stderr when it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "gptlab", *args],
        cwd=workdir, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"refactor_guard: gptlab {' '.join(args)} failed ({done.returncode}):\n"
                 f"{done.stderr[-3000:]}")  # fmt: skip
    return done.stdout


def run_items(name: str, run_dir: Path) -> dict[str, Any]:
    """A run directory's fingerprint: losses and evaluations as metrics.jsonl has them,
    every record without its clock fields, the resolved config, and digests of the final
    weights, the tokenizer's and (where there is one) the chat template's content."""
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    steady = [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]
    items = {
        f"{name}/losses": [[r["step"], r["loss"]] for r in records if r["event"] == "train"],
        f"{name}/evals": [r for r in steady if r["event"] == "eval"],
        f"{name}/records": steady,
        f"{name}/config": json.loads((run_dir / "config.json").read_text(encoding="utf-8")),
        f"{name}/tokenizer": json_digest(run_dir / "tokenizer.json"),
        f"{name}/weights": weights_digest(final_checkpoint(run_dir) / "model.safetensors"),
    }
    if (run_dir / "chat_template.json").is_file():
        items[f"{name}/chat_template"] = json_digest(run_dir / "chat_template.json")
    return items


def final_checkpoint(run_dir: Path) -> Path:
    latest = run_dir / "checkpoints" / "latest"  # a file naming the newest step directory
    return run_dir / "checkpoints" / latest.read_text(encoding="utf-8").strip()


def weights_digest(path: Path) -> str:
    """sha256 over a safetensors file's tensors, by name, with their dtypes and shapes: the
    weights bit for bit, whatever order or metadata the file's header has."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        for key in sorted(header):
            tensor = header[key]
            start, end = tensor["data_offsets"]  # relative to the end of the header
            f.seek(8 + header_len + start)
            digest.update(f"{key} {tensor['dtype']} {tensor['shape']}\n".encode())
            digest.update(f.read(end - start))
    return digest.hexdigest()


def serve_items(name: str, run_dir: Path, workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    """Start `gptlab serve` on a free port, send a greedy completion, a seeded sampled one
    and a greedy chat completion, stop it with Ctrl-C, and return the answers without their
    ids and times."""
    log = workdir / "serve.log"
    with open(log, "w", encoding="utf-8") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "gptlab", "serve", "--checkpoint", str(run_dir),
             "--port", str(free_port()), *DEVICE],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        url = wait_for_url(server, log)
        completion = post(f"{url}/v1/completions", {
            "prompt": PROMPT, "max_tokens": int(NEW_TOKENS), "temperature": 0})  # fmt: skip
        sampled = post(f"{url}/v1/completions", {
            "prompt": PROMPT, "max_tokens": int(NEW_TOKENS), "temperature": 0.8,
            "seed": 1})  # fmt: skip
        chat = post(f"{url}/v1/chat/completions", {
            "messages": [{"role": "user", "content": INSTRUCTION}],
            "max_tokens": int(NEW_TOKENS), "temperature": 0})  # fmt: skip
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return {
        f"{name}/completion": completion,
        f"{name}/completion-sampled": sampled,
        f"{name}/chat": chat,
    }


def free_port() -> int:
    """A loopback port nothing listens on now (written before `gptlab serve --port 0`
    existed; kept so that old and new trees record alike)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_url(server: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    """The URL from serve's "serving RUN at http://HOST:PORT" line, printed once its
    socket listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r" at (http://[^\s:]+:\d+)", log.read_text(encoding="utf-8"))
        if found:
            return found.group(1)
        if server.poll() is not None:
            sys.exit(f"refactor_guard: gptlab serve ended early:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    sys.exit(f"refactor_guard: gptlab serve did not listen within {timeout:.0f} s")


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return {k: v for k, v in answer.items() if k not in VOLATILE_ANSWER}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def json_digest(path: Path) -> str:
    """A digest of a JSON file's content, not its layout (a final newline, key order or
    indent is how a file is written, not what a run holds)."""
    content = json.loads(path.read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def normalise(value: Any, paths: dict[str, str]) -> Any:
    """`value` with each path prefix in `paths` replaced by its name, in every string."""
    if isinstance(value, dict):
        return {k: normalise(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, paths) for v in value]
    if isinstance(value, str):
        for path, placeholder in paths.items():
            value = value.replace(path, placeholder)
    return value


def environment() -> dict[str, Any]:
    """What must be the same for two fingerprints to compare: torch, the CPU and the
    threads (a different build or instruction set rounds differently)."""
    return {
        "torch": package_version("torch"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "threads": 1,
    }


def about() -> dict[str, Any]:
    """Which gptlab made the fingerprint: reported by `compare`, never compared."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip()

    spec = importlib.util.find_spec("gptlab")
    return {
        "commit": git("rev-parse", "HEAD"),
        "src_changed": bool(git("status", "--porcelain", "--", "src")),
        "gptlab": str(Path(spec.origin).parent) if spec and spec.origin else None,
        "recorded": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def package_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    done = subprocess.run(["lscpu"], capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """Which of the instruction sets that change gptlab's CPU arithmetic this CPU has
    (bf16 autocast and Muon's dtype follow AVX512-BF16 / AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return []
    flags = set(re.findall(r"\S+", "".join(re.findall(r"^flags\s*:(.*)$", text, re.M)[:1])))
    return [f for f in CPU_FLAGS if f in flags]


# ----------------------------------------------------------------------------- compare


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """Where `a` and `b` first differ, as "path: A vs B", or None when they are identical:
    floats by repr (so -0.0 differs from 0.0 and NaN equals NaN), an int never equals a
    float, dict keys in any order."""
    if type(a) is not type(b):
        return f"{where or 'value'}: {short(a)} vs {short(b)}"
    if isinstance(a, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if key not in b or key not in a:
                side = "A" if key in a else "B"
                return f"{where}.{key}: only in {side}"
            found = first_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):  # lengths: below
            found = first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        if len(a) != len(b):
            return f"{where or 'value'}: {len(a)} entries vs {len(b)}"
        return None
    same = repr(a) == repr(b) if isinstance(a, float) else a == b
    return None if same else f"{where or 'value'}: {short(a)} vs {short(b)}"


def short(value: Any, width: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def compare(a: dict, b: dict) -> tuple[list[str], int]:
    """Lines that say, for the environment and each item, "same" or the first difference;
    and how many differ (the environment counts: fingerprints from different machines or
    torch builds are not comparable)."""
    lines = [
        f"{side}: commit {f['about']['commit'][:12]}, src/ changed: {f['about']['src_changed']}"
        for side, f in (("A", a), ("B", b))
    ]
    differing = 0
    env = first_difference(a["environment"], b["environment"])
    if env:
        differing += 1
        lines.append(f"environment: DIFFERS ({env}): record both on one machine and torch")
    else:
        e = a["environment"]
        lines.append(f"environment: same (torch {e['torch']}, {e['cpu']}, {e['threads']} thread)")
    items_a, items_b = a["items"], b["items"]
    for name in [*items_a, *(k for k in items_b if k not in items_a)]:
        if name not in items_a or name not in items_b:
            found = f"only in {'A' if name in items_a else 'B'}"
        else:
            found = first_difference(items_a[name], items_b[name])
        differing += found is not None
        lines.append(f"{name}: {'same' if found is None else 'DIFFERS: ' + found}")
    total = len(set(items_a) | set(items_b)) + 1
    lines.append(
        f"all {total} same"
        if not differing
        else f"{differing} of {total} differ (environment included)"
    )
    return lines, differing


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run the commands and write their fingerprint")
    rec.add_argument("out", type=Path, help="the fingerprint, a .json file")
    rec.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary one)")
    rec.add_argument("--story", type=Path, help="a copy of the walk-through's the-verdict.txt")
    cmp_ = sub.add_parser("compare", help="compare two fingerprints; exit 0 when all same")
    cmp_.add_argument("a", type=Path)
    cmp_.add_argument("b", type=Path)
    args = parser.parse_args(argv)

    if args.command == "record":
        if args.workdir is not None:
            record(args.out, args.workdir, args.story)
        else:
            with tempfile.TemporaryDirectory(prefix="refactor-guard-") as tmp:
                record(args.out, Path(tmp), args.story)
        return 0
    a, b = (json.loads(p.read_text(encoding="utf-8")) for p in (args.a, args.b))
    lines, differing = compare(a, b)
    print("\n".join(lines))
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
