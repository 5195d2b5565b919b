"""Time to quality: the held-out bits per byte each recipe reaches in a wall-clock budget.

    python benchmarks/bench_quality.py --recipe cpu --recipe "cpu data.tokenizer=bpe:4096"
    python benchmarks/bench_quality.py --recipe cpu --recipe "cpu model.n_layers=6 train.lr=3e-3" \\
        --recipe my.toml --steps 300 --json quality.jsonl

A recipe is a preset name or the path of a TOML file (`gptlab train --config`'s format; it
may name its preset), then any `section.field=value` overrides; a recipe that starts with
an override starts from the default preset. Each recipe is trained by
`gptlab.train.loop.train`, the function behind `gptlab train`, on --data (the built-in
Shakespeare by default), one after another in this process (never side by side). Then the
final checkpoint is evaluated as `gptlab eval` does (`gptlab.evals.loss.evaluate_run`, fp32)
over the whole validation split: non-overlapping windows of the model's context, every
window whole (the tail shorter than one window, under 0.1% of the bytes here, is left out).

Limits: `--budget S` runs every recipe under the same time budget (train.budget = time,
train.max_time = S seconds of training steps; periodic evaluations, samples and
checkpoints are not counted, as in `gptlab train`; gptlab.train.budget): each recipe's schedule
spans S seconds on this machine, and a recipe written in steps keeps its warm-up as the
same fraction of the run (warmup_frac = warmup_steps / max_steps). `--steps N` instead
trains exactly N steps with no time limit: the way to compare recipes at equal steps,
whose losses do not depend on the machine's load. With neither, each recipe keeps its own
limits (the default's time budget, cpu-gpt2's 1,000 steps). train.epochs is set to 0 in
every case (the budget or the steps decide).

`--threads N` runs with N torch threads (default: gptlab's thread policy, gptlab.runtime.threads);
`--threads 1` on a 2-core machine is a machine half as fast, to show that a time budget's
schedule adapts (fewer steps, still decayed to its floor). `nanogpt-cpu` is nanoGPT's
README CPU recipe written as a gptlab recipe (RECIPES): char-level, 4 layers x 128, 4
heads, context 64, 12 sequences a step, no dropout, AdamW at 1e-3 (beta2 0.99, decay to
1e-4 after 100 warm-up steps of 2,000), no biases, tied head, fp32, no compile. Its
differences from nanoGPT itself: gptlab's AdamW decays only the blocks' matrices (nanoGPT
also the embeddings) and its batches are drawn from a seeded shuffle of all windows
(nanoGPT's at random offsets).

Bits per byte are the held-out text's total loss in bits over its UTF-8 bytes
(`evaluate.bits_per_byte`: loss x tokens / (ln 2 x bytes), each token's bytes from
`tokenizer.token_byte_lengths`, `<|endoftext|>` counting none), which compares tokenizers
only if they all score the same text. With data.split = "tokens" (the presets' default),
the validation split is the last 10% of each tokenizer's tokens, so its text differs by
tokenizer: on the built-in corpus GPT-2's is the last 491,387 bytes, a BPE of 2,048 ids
trained on the corpus scores 479,916 and one of 8,192 ids 461,703 (a corpus-trained BPE
packs the text it was trained on tighter than the held-out text, so its 90% of the tokens
reach further into the text): up to 6% of the held-out text (whole scenes) differs. So this
benchmark sets data.split = "chars" for every recipe, after the preset and TOML file and
before the overrides: the cut is at 90% of the characters and every tokenizer scores the
same held-out characters (the bytes column shows it; only the left-out tail differs).

Columns: steps, tokens seen (steps x tokens per step), train s (seconds of training steps,
what max_time limits), wall s (the whole `train()` call: loading, a `bpe:N` tokenizer's
training, periodic evaluations, the final checkpoint), tokens/s (tokens over train s),
eval s, validation loss (nats/token) and bits per byte, the held-out bytes scored, the
parameters and the machine's 1-minute load average before the run. `--json FILE` appends
one JSON line per recipe with every figure and the resolved config, as each finishes.
Ctrl-C (or SIGTERM) stops the recipe in training after its step and ends the benchmark
with the table of the recipes finished before it.

The search loop (issue 34): `--equal-time S --plans FILE` trains each recipe on the
schedule an S-second time budget gives it at its measured speed, without reading the
clock: N = tokens/s x S / tokens per step steps, replayed as a time budget's progress
(0, 2/N, 3/N, ..., 1: warm-up, evaluations and decay where an S-second run at constant
speed has them; gptlab.train.budget). The speed and the resolved config (the corpus
sizing's choice included) of each recipe are measured once, on a quiet machine, by a
`--probe` second run and kept in FILE, so that every later run of the recipe is a pure
function of the recipe and may run beside other work: the figures do not depend on the
machine's load. `--slice F` is the proxy: the first F of the training characters (the
same held-out text, the full text's tokenizer) for F x N steps, the same passes over
the data as the whole run in F of its time. `benchmarks/rank_agreement.py` compares the
proxy's ranking with the whole run's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gptlab.config import schema as C
from gptlab.errors import GptlabError
from gptlab.recipes import presets as P
from gptlab.train.resolve import size_to_corpus

# Named recipes besides the presets: a base preset, then overrides.
RECIPES = {
    "nanogpt-cpu": (
        "cpu-gpt2 data.tokenizer=char model.context_length=64 model.emb_dim=128 "
        "model.n_heads=4 model.n_layers=4 model.drop_rate=0.0 model.bias=false "
        "model.tie_weights=true model.vocab_multiple=1 train.batch_size=12 train.lr=1e-3 "
        "train.beta2=0.99 train.min_lr_ratio=0.1 train.warmup_steps=100 train.max_steps=2000 "
        "train.weight_decay=0.1 train.grad_clip=1.0 runtime.precision=fp32 runtime.compile=off"
    ),
}

COLUMNS = (
    ("recipe", "recipe", "{}"),
    ("steps", "steps", "{:,}"),
    ("tokens", "tokens", "{:,}"),
    ("train s", "train_s", "{:.1f}"),
    ("wall s", "wall_s", "{:.1f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("eval s", "eval_s", "{:.1f}"),
    ("val loss", "val_loss", "{:.4f}"),
    ("bits/byte", "bits_per_byte", "{:.4f}"),
    ("val bytes", "val_bytes", "{:,}"),
    ("params", "params", "{:,}"),
    ("threads", "threads", "{}"),
    ("load", "load_before", "{:.2f}"),
)


def parse_recipe(
    recipe: str, budget: float | None, steps: int | None, data: str
) -> tuple[C.RunConfig, str]:
    """(the config a recipe describes, with this benchmark's data, split and limits, and
    the recipe's preset name). See the module docstring for the order of what applies."""
    words = shlex.split(recipe)
    if not words:
        raise GptlabError("an empty --recipe; give a preset, a TOML file or overrides")
    if words[0] in RECIPES:
        words = shlex.split(RECIPES[words[0]]) + words[1:]
    base, overrides = (words[0], words[1:]) if "=" not in words[0] else (None, words)
    if base is None or base in P.PRESETS:
        name = base or P.DEFAULT_PRESET
        cfg = P.preset(name)
    else:
        file_cfg = C.load_toml(base)
        name = file_cfg.pop("preset", P.DEFAULT_PRESET)
        cfg = P.preset(name)
        C.apply_nested(cfg, file_cfg, origin=f"config file {base}")
    cfg.data.source = data
    cfg.data.split = "chars"  # the same held-out characters for every tokenizer
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise GptlabError(f"recipe {recipe!r}: {item!r} is not section.field=value")
        C.set_field(cfg, key.strip(), value.strip())
    _set_limits(cfg.train, budget, steps)
    cfg.validate()
    if cfg.train.sizing == "corpus" and cfg.train.budget == "time":
        # as `gptlab train` sizes it (gptlab.recipes.sizing); the recipe's own fields and this
        # benchmark's budget (equal time for every recipe) are the user's
        given = {k.partition("=")[0].strip() for k in overrides}
        if base is not None and base not in P.PRESETS:
            given |= {
                f"{s}.{k}" for s, t in C.load_toml(base).items() if isinstance(t, dict) for k in t
            }
        if budget is not None:
            given.add("train.max_time")
        size_to_corpus(cfg, given)
    return cfg.validate(), name


def _set_limits(tc: C.TrainConfig, budget: float | None, steps: int | None) -> None:
    """This benchmark's limits over the recipe's: a time budget, a step count, or (neither)
    the recipe's own; never an epoch limit."""
    tc.epochs = 0
    if steps is not None:
        tc.budget, tc.max_steps, tc.max_time = "steps", steps, 0.0
    elif budget is not None:
        if tc.budget == "steps" and tc.max_steps and tc.warmup_steps and not tc.warmup_frac:
            tc.warmup_frac = min(tc.warmup_steps / tc.max_steps, 0.5)
        tc.budget, tc.max_time, tc.max_steps = "time", float(budget), 0


def probe_plan(recipe: str, seconds: float, probe: float, data: str, out: Path) -> dict:
    """A recipe's plan for `--equal-time`: its config resolved for an S-second run (the
    corpus sizing's choice and the speed it measured pinned in it) and its training speed,
    measured by training it `probe` seconds. Take it on a quiet machine."""
    import torch

    from gptlab.train.run import train

    cfg, name = parse_recipe(recipe, seconds, None, data)
    trial = C.RunConfig.from_dict(cfg.to_dict())
    trial.train.max_time, trial.train.eval_every_frac = probe, 0.0
    end = train(trial, out, name=name).end
    return {
        "recipe": recipe,
        "name": name,
        "tokens_per_s": end["tokens"] / end["train_time"],
        "tokens_per_step": end["tokens"] // end["step"],
        "probe_s": probe,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "config": cfg.to_dict(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return "unknown"


def planned_config(plan: dict, seconds: float, fraction: float, out: Path) -> C.RunConfig:
    """The run `plan` makes in `seconds` at its measured speed, on the first `fraction` of
    the training text (1: all of it): a replayed time budget of F x N steps (the module
    docstring), written under `out`."""
    from gptlab.train.budget import write_schedule

    cfg = C.RunConfig.from_dict(plan["config"])
    cfg.train.sizing = "preset"  # the plan holds the sizing's choice already
    steps = max(2, round(plan["tokens_per_s"] * seconds * fraction / plan["tokens_per_step"]))
    out.mkdir(parents=True, exist_ok=True)
    if fraction < 1:
        slice_corpus(cfg, fraction, out)
    progress = [0.0] + [(i + 1) / steps for i in range(1, steps)]
    cfg.train.max_time = seconds * fraction
    cfg.train.replay_schedule = str(write_schedule(out, seconds * fraction, progress))
    return cfg.validate()


def slice_corpus(cfg: C.RunConfig, fraction: float, out: Path) -> None:
    """Point cfg's data at its proxy, in place: the first `fraction` of the training
    characters, then the same held-out characters, in out/slice.jsonl (split = chars at
    exactly that cut), tokenized by the tokenizer the whole training text gives."""
    from gptlab.data.corpus import corpus_bpe
    from gptlab.data.sources import read_documents
    from gptlab.data.tokenizer import ENDOFTEXT

    if cfg.data.split != "chars":
        raise GptlabError("--slice needs data.split = chars (the same held-out characters)")
    docs = read_documents(cfg.data.source, text_field=cfg.data.text_field)
    size = C.corpus_bpe_size(cfg.data.tokenizer)
    if size is not None:
        path = out / "tokenizer.json"
        path.write_text(corpus_bpe(docs, size, cfg.data.train_ratio).to_json(), "utf-8")
        cfg.data.tokenizer = str(path)
    text = ENDOFTEXT.join(docs)
    cut = int(cfg.data.train_ratio * len(text))
    keep = int(fraction * cut)
    sliced = text[:keep] + text[cut:]
    path = out / "slice.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc in sliced.split(ENDOFTEXT):
            f.write(json.dumps({"text": doc}) + "\n")
    cfg.data.source, cfg.data.text_field = str(path), "text"
    cfg.data.train_ratio = (keep + 0.5) / len(sliced)  # int(ratio x length) == keep


def run_recipe(recipe: str, cfg: C.RunConfig, name: str, out: Path) -> dict[str, Any]:
    """Train `cfg` into `out`, evaluate its final checkpoint over the whole validation
    split, and return one row: every figure of the table, the end reason and the config."""
    from gptlab.evals.loss import evaluate_run
    from gptlab.interop.runs import open_run
    from gptlab.train.run import train

    records: dict[str, dict[str, Any]] = {}

    task_eval_s = 0.0  # train.eval_tasks' evaluations, when the recipe has them

    def keep(record: dict[str, Any]) -> None:
        nonlocal task_eval_s
        records[record["event"]] = record  # the last of each kind: start, end, ...
        task_eval_s += record.get("seconds", 0.0) if record["event"] == "tasks" else 0.0

    import torch

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = train(cfg, out, on_event=keep, name=name)
    wall = time.perf_counter() - t0
    end, start = result.end, records["start"]
    if end["reason"] in ("SIGINT", "SIGTERM"):
        raise KeyboardInterrupt  # the user stopped the benchmark, not only this recipe
    t0 = time.perf_counter()
    run = open_run(result.run_dir, cfg.runtime.device)
    ev = evaluate_run(run, split="val", batch_size=cfg.train.batch_size, precision="fp32")
    eval_s = time.perf_counter() - t0
    return {
        "recipe": recipe,
        "steps": end["step"],
        "tokens": end["tokens"],
        "batch_tokens": start["batch_tokens"],
        "train_s": end["train_time"],
        "wall_s": wall,
        "tokens_per_s": end["tokens"] / end["train_time"] if end["train_time"] else 0.0,
        "eval_s": eval_s,
        "task_eval_s": task_eval_s,
        "val_loss": ev["loss"],
        "bits_per_byte": ev["bits_per_byte"],
        "val_tokens": ev["tokens"],
        "val_bytes": ev["bytes"],
        "val_windows": ev["windows"],
        "params": start["params"],
        "device": start["device"],
        "precision": start["precision"],
        "end_reason": end["reason"],
        "threads": torch.get_num_threads(),
        "budget": cfg.train.budget,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "run_dir": str(result.run_dir),
        "config": result.config.to_dict(),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table, one row per recipe, columns as COLUMNS lists them."""
    cells = [[fmt.format(r[key]) for _, key, fmt in COLUMNS] for r in rows]
    heads = [head for head, _, _ in COLUMNS]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]

    def line(values: list[str]) -> str:
        parts = [
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    rule = (
        "| "
        + " | ".join("-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths))
        + " |"
    )
    return "\n".join([line(heads), rule, *(line(c) for c in cells)])


def _slug(recipe: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", recipe)[:80].strip("_") or "recipe"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--recipe",
        action="append",
        required=True,
        help='a preset or TOML path, then section.field=value overrides (e.g. "cpu model.n_layers=6")',
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="run every recipe under a time budget of this many seconds of training",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (1: a machine half as fast on 2 cores); 0 = gptlab's policy",
    )
    p.add_argument("--steps", type=int, default=None, help="train exactly N steps, no time limit")
    p.add_argument("--data", default="shakespeare", help="the text (default: built-in Shakespeare)")
    p.add_argument("--out", default=None, help="keep the runs under DIR (default: a temp dir)")
    p.add_argument("--json", default=None, help="append one JSON line per recipe to this file")
    p.add_argument(
        "--equal-time",
        type=float,
        default=None,
        metavar="S",
        help="train each recipe the steps S seconds give it at its planned speed (see --plans)",
    )
    p.add_argument(
        "--plans",
        default=None,
        help="JSON file of each recipe's resolved config and speed; missing ones are probed",
    )
    p.add_argument("--probe", type=float, default=45.0, help="seconds of a speed probe")
    p.add_argument(
        "--slice",
        type=float,
        default=1.0,
        metavar="F",
        help="with --equal-time: the proxy, the first F of the training text for F of the steps",
    )
    args = p.parse_args(argv)
    if args.equal_time is not None and (args.plans is None or args.equal_time <= 0):
        p.error("--equal-time takes positive seconds and a --plans file")
    if not 0 < args.slice <= 1 or (args.slice < 1 and args.equal_time is None):
        p.error("--slice takes a fraction in (0, 1], with --equal-time")
    if (args.steps is not None and args.steps < 1) or (
        args.budget is not None and args.budget <= 0
    ):
        p.error("--steps and --budget must be positive")
    if args.steps is not None and args.budget is not None:
        p.error("--steps and --budget are two ways to limit a run; give one")
    if args.threads < 0:
        p.error("--threads must be 0 (auto) or more")
    if args.equal_time is not None:
        try:
            return search(args)
        except GptlabError as e:
            print(f"bench_quality: error: {e}", file=sys.stderr)
            return 2
    try:
        plans = [(r, *parse_recipe(r, args.budget, args.steps, args.data)) for r in args.recipe]
    except GptlabError as e:  # every recipe is checked before the first one trains
        print(f"bench_quality: error: {e}", file=sys.stderr)
        return 2
    import torch

    from gptlab.runtime.threads import choose_threads

    threads, note = choose_threads(args.threads or None)
    torch.set_num_threads(threads)
    if note:
        print(f"bench_quality: {note}", file=sys.stderr)
    return run_recipes(args, lambda n, recipe, root: (*plans[n][1:], {}))


def search(args: argparse.Namespace) -> int:
    """`--equal-time`: plan the recipes that have no plan yet (a probe each, the plan
    written to --plans at once), then train each one's planned run, in full or on its
    slice."""
    import torch

    from gptlab.runtime.threads import choose_threads

    torch.set_num_threads(choose_threads(args.threads or None)[0])
    path = Path(args.plans)
    plans = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def planned(n: int, recipe: str, root: Path) -> tuple[C.RunConfig, str, dict[str, Any]]:
        key = f"{recipe} @ {args.data}"
        if key not in plans:
            print(f"[probe] {recipe}", file=sys.stderr, flush=True)
            probe_dir = root / f"probe-{n:02d}-{_slug(recipe)}"
            plans[key] = probe_plan(recipe, args.equal_time, args.probe, args.data, probe_dir)
            path.write_text(json.dumps(plans, indent=1) + "\n", encoding="utf-8")
        plan = plans[key]
        inputs = root / f"{n:02d}-{_slug(recipe)}-inputs"
        cfg = planned_config(plan, args.equal_time, args.slice, inputs)
        extra = dict(equal_time=args.equal_time, slice=args.slice, data=args.data)
        return cfg, plan["name"], {**extra, "plan_tokens_per_s": plan["tokens_per_s"]}

    return run_recipes(args, planned)


def run_recipes(args: argparse.Namespace, plan_run) -> int:
    """Train and score args.recipe one after another; `plan_run(n, recipe, root)` gives
    each one's (config, preset name, extra row fields). Rows go to --json as they finish;
    the table is printed at the end, or of the finished ones on Ctrl-C."""
    with contextlib.ExitStack() as stack:
        root = (
            Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        rows = []
        try:
            for n, recipe in enumerate(args.recipe):
                cfg, name, extra = plan_run(n, recipe, root)
                print(f"[{n + 1}/{len(args.recipe)}] {recipe}", file=sys.stderr, flush=True)
                row = {**run_recipe(recipe, cfg, name, root / f"{n:02d}-{_slug(recipe)}"), **extra}
                rows.append(row)
                if args.json:
                    with open(args.json, "a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
        except KeyboardInterrupt:
            print("bench_quality: stopped; the recipes finished so far:", file=sys.stderr)
            if rows:
                print(format_table(rows))
            return 130
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
