"""Task scores of a trained run against the same model at random init: the README's table.

    python benchmarks/task_scores.py --checkpoint runs/latest            # the default run
    python benchmarks/task_scores.py --checkpoint RUN --suite my.toml    # any suite instead

By default the items are made here from the run's own held-out text: the last
(1 - train_ratio) of its characters (exactly the validation text of a `split = "chars"`
run, the default preset's), so no item was trained on and none is copied from a benchmark:
- `ending` (HellaSwag-like, 4 choices): two lines of the play and the first half of the
  third; which of four second halves is the one that follows (the other three are the
  second halves of other lines);
- `last-word` (LAMBADA-like cloze): three lines without their last word; whether greedy
  decoding gives the word, and its perplexity.
The random-init model is the run's config built afresh (seed 0), with the run's tokenizer.
Prints a markdown table (task, items, random init, trained, centred of each) and "core".

    python benchmarks/task_scores.py --write-suite DIR   # the same suite, before any run

writes the suite for the default preset's held-out text into DIR (for train.eval_tasks:
the in-training evaluation's cost in BENCHMARKS.md) and prints its path.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

from gptlab.data.sources import read_documents
from gptlab.data.tokenizer import ENDOFTEXT
from gptlab.evals.tasks import load_suite, run_suite
from gptlab.interop.runs import open_run
from gptlab.model.gpt import GPTModel
from gptlab.recipes.presets import DEFAULT_PRESET, preset


def held_out_lines(dc) -> list[str]:
    """The lines of four or more words of a data config's held-out text (see the module
    docstring)."""
    text = ENDOFTEXT.join(read_documents(dc.source, text_field=dc.text_field))
    val = text[int(dc.train_ratio * len(text)) :].replace(ENDOFTEXT, "\n")
    return [line.strip() for line in val.splitlines() if len(line.strip().split()) >= 4]


def make_suite(lines: list[str], out: Path, n: int, seed: int = 0) -> Path:
    """Write `ending.jsonl`, `last-word.jsonl` and `suite.toml` into out; returns the suite."""
    rng = random.Random(seed)
    ending, last = [], []
    for _ in range(n):
        i = rng.randrange(2, len(lines))
        words = lines[i].split()
        cut = len(words) // 2
        before = "\n".join(lines[i - 2 : i]) + "\n" + " ".join(words[:cut])
        others = [lines[j].split() for j in rng.sample(range(len(lines)), 3) if j != i]
        choices = [" ".join(words[cut:])] + [" ".join(w[len(w) // 2 :]) for w in others[:3]]
        if len(choices) < 4 or len(set(choices)) < 4:
            continue
        order = list(range(4))
        rng.shuffle(order)
        ending.append(
            {"context": before, "choices": [choices[k] for k in order], "answer": order.index(0)}
        )
        last.append({"text": "\n".join(lines[i - 2 : i + 1])})
    if not ending:
        sys.exit("task_scores: the held-out text has too few distinct lines; give --suite")
    for name, items in (("ending", ending), ("last-word", last)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    suite = out / "suite.toml"
    suite.write_text(
        'name = "held-out"\n'
        '[[tasks]]\nname = "ending"\ndata = "ending.jsonl"\nformat = "mc"\nrandom_baseline = 0.25\n'
        '[[tasks]]\nname = "last-word"\ndata = "last-word.jsonl"\nformat = "lambada"\n'
    )
    return suite


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/latest")
    p.add_argument("--suite", help="a suite .toml (default: items from the run's held-out text)")
    p.add_argument("--items", type=int, default=500, help="items per made-up task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.add_argument("--write-suite", metavar="DIR", help="write the default preset's suite; exit")
    args = p.parse_args(argv)
    if args.write_suite:
        out = Path(args.write_suite)
        out.mkdir(parents=True, exist_ok=True)
        print(make_suite(held_out_lines(preset(DEFAULT_PRESET).data), out, args.items))
        return 0

    run = open_run(args.checkpoint, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.suite or make_suite(held_out_lines(run.config.data), Path(tmp), args.items)
        suite = load_suite(path)
    torch.manual_seed(0)
    fresh = GPTModel(run.config.model).to(run.device).eval()
    T = run.config.model.context_length
    kw = dict(context_length=T, batch_size=args.batch_size, device=run.device)
    reports = {
        "random init": run_suite(fresh, run.tokenizer, suite, **kw),
        "trained": run_suite(run.model, run.tokenizer, suite, **kw),
    }
    if args.json:
        print(json.dumps(reports))
        return 0
    print("| task (metric) | items | random init | trained | centred: random | centred: trained |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in reports["trained"]["tasks"].items():
        z = reports["random init"]["tasks"][name]
        m = r["metric"]
        print(
            f"| {name} ({m}) | {r['n_items']} | {z[m]:.3f} | {r[m]:.3f} | "
            f"{z['centred']:.3f} | {r['centred']:.3f} |"
        )
    z, r = reports["random init"]["core"], reports["trained"]["core"]
    print(f"| core (mean centred) | | | | {z:.3f} | {r:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
