"""Task evaluation speed: `gptlab eval --task` against `lm_eval --model hf`, same model, same items.

The model is a gptlab run (--checkpoint RUN), or by default random weights in the
cpu-gpt2 preset's shape (GPT-2's tokenizer; nothing is downloaded) written as a run. It is
exported with `gptlab convert to-hf`'s code for lm-evaluation-harness to load. The items
are made up here (--items of them, four choices each, deterministic), written once as a
gptlab jsonl and declared to lm-eval in a local task YAML (`--include_path`), so both score
exactly the same requests; the table says whether their accuracies agree.

Both tools run as fresh processes, timed end to end (start-up and model loading
included), and gptlab's scoring alone is timed in this process too. The lm_eval row is
left out when lm-eval is not installed (pip install lm-eval).

    python benchmarks/bench_tasks.py                          # CPU, 200 items
    python benchmarks/bench_tasks.py --items 2000 --device cuda --batch-size 64
    python benchmarks/bench_tasks.py --checkpoint runs/latest --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORDS = (
    "the a harbour lamp ship keeper counted numbers ledger green rain roof gull quiet hour "
    "baker oven bread morning letter string salt tide boat pier chapel door red clerk wrote "
    "small old bright cold warm window river stone field dog ran fetched stick"
).split()


def make_items(n: int, seed: int = 0) -> list[dict]:
    """n multiple-choice items in gptlab's jsonl format: a 20-40 word context, four
    5-12 word choices."""
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [
        {"context": words(20, 40).capitalize(), "choices": [words(5, 12) for _ in range(4)],
         "answer": rng.randrange(4)}
        for _ in range(n)
    ]  # fmt: skip


LM_EVAL_YAML = """task: gptlab_bench
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def random_run(out: Path) -> Path:
    """A run directory holding random cpu-gpt2-shaped weights with GPT-2's tokenizer."""
    from gptlab.config.schema import RunConfig
    from gptlab.interop import checkpoint as ckpt_lib
    from gptlab.model.gpt import GPTModel
    from gptlab.recipes.presets import preset

    cfg = preset("cpu-gpt2")
    torch.manual_seed(0)
    model = GPTModel(cfg.model).eval()
    meta = {"config": RunConfig(model=cfg.model).to_dict(), "tokenizer": {"type": "gpt2"}}
    ckpt_lib.save_checkpoint(out, 1, model, meta)
    return out


def time_gptlab_in_process(run_dir: Path, data: Path, batch_size: int, device: str):
    """(seconds of scoring alone, report) for the items through gptlab.evals.tasks."""
    from gptlab.evals.tasks import evaluate_run_tasks, task_suite
    from gptlab.interop.runs import open_run

    run = open_run(run_dir, device)
    suite = task_suite("mc", str(data))
    t0 = time.perf_counter()
    report = evaluate_run_tasks(run, suite, batch_size=batch_size)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, report["tasks"]["mc"]


def time_command(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    return time.perf_counter() - t0, p


def lm_eval_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def lm_eval_scores(out_dir: Path) -> dict:
    """acc and acc_norm from lm_eval's results file under out_dir."""
    files = sorted(out_dir.rglob("results*.json"))
    res = json.loads(files[-1].read_text())["results"]["gptlab_bench"]
    return {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a gptlab run (default: random cpu-gpt2 weights)")
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-lm-eval", action="store_true", help="gptlab only")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    try:
        from gptlab.interop import hf

        run_dir = Path(args.checkpoint) if args.checkpoint else random_run(work / "run")
        hf_dir = work / "hf"
        hf.convert_to_hf(run_dir, hf_dir)
        data = work / "items.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_items(args.items)))
        n = args.items
        rows = []

        score_s, ours = time_gptlab_in_process(run_dir, data, args.batch_size, args.device)
        rows.append({"tool": "gptlab (scoring only)", "seconds": score_s, **_acc(ours)})
        cmd = [sys.executable, "-m", "gptlab", "eval", "--checkpoint", str(run_dir),
               "--task", "mc", "--task-data", str(data), "--json",
               "--batch-size", str(args.batch_size), "--device", args.device]  # fmt: skip
        secs, proc = time_command(cmd)
        if proc.returncode != 0:
            print(f"gptlab eval failed: {proc.stderr.strip()[-400:]}", file=sys.stderr)
            return 1
        rows.append(
            {"tool": "gptlab eval --task", "seconds": secs,
             **_acc(json.loads(proc.stdout)["tasks"]["mc"])}
        )  # fmt: skip

        if args.no_lm_eval:
            pass
        elif not lm_eval_installed():
            print(
                "lm_eval is not installed (pip install lm-eval): its row is left out",
                file=sys.stderr,
            )
        else:
            tasks_dir = work / "lm_eval_tasks"
            tasks_dir.mkdir()
            (tasks_dir / "gptlab_bench.yaml").write_text(LM_EVAL_YAML.format(data=data))
            cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
                   "--model_args", f"pretrained={hf_dir},dtype=float32",
                   "--tasks", "gptlab_bench", "--include_path", str(tasks_dir),
                   "--batch_size", str(args.batch_size), "--device", args.device,
                   "--output_path", str(work / "lm_eval_out")]  # fmt: skip
            secs, proc = time_command(cmd)
            if proc.returncode != 0:
                print(f"lm_eval failed: {proc.stderr.strip()[-600:]}", file=sys.stderr)
                return 1
            rows.append(
                {"tool": "lm_eval --model hf", "seconds": secs,
                 **lm_eval_scores(work / "lm_eval_out")}
            )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for r in rows:
        r["items"] = n
        r["items_per_s"] = n / r["seconds"]
        r["same_acc_as_gptlab"] = (r["acc"], r["acc_norm"]) == (rows[0]["acc"], rows[0]["acc_norm"])
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"{args.items} items x 4 choices, batch {args.batch_size}, {args.device}")
    print("| tool | seconds | items/s | acc | acc_norm | same acc as gptlab |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['tool']} | {r['seconds']:.2f} | {r['items_per_s']:.1f} | {r['acc']:.4f} | "
            f"{r['acc_norm']:.4f} | {'yes' if r['same_acc_as_gptlab'] else 'NO'} |"
        )
    return 0


def _acc(report: dict) -> dict:
    return {"acc": report["acc"], "acc_norm": report["acc_norm"]}


if __name__ == "__main__":
    sys.exit(main())
