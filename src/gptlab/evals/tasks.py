"""Downstream tasks scored by log-likelihood, as lm-evaluation-harness scores them.

A task is a file of items (items.py) with a few-shot count. Multiple choice (HellaSwag,
ARC, PIQA, COPA, mc) is right when the answer has the largest log-likelihood (`acc`), per
character (`acc_norm`) or per UTF-8 byte (`acc_bytes`); cloze (LAMBADA) when greedy
decoding gives the last word. A suite scores several tasks, each with a *centred* score,
(acc - chance) / (1 - chance), whose mean is "core" as in nanochat's CORE.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from gptlab.atomic import write_json
from gptlab.errors import GptlabError
from gptlab.evals.items import FORMATS, Item, load_items
from gptlab.evals.scoring import Score, encode_pair, n_forwards_needed, score_requests
from gptlab.runtime.device import PRECISION_DTYPES, autocast

if TYPE_CHECKING:  # only a type: runs.open_run makes it, and runs sits above this module
    from gptlab.interop.runs import Run


METRICS = ("acc", "acc_norm", "acc_bytes")
FEWSHOT_DELIMITER = "\n\n"  # between few-shot examples and before the item, as lm-eval
DEFAULT_SEED = 1234  # lm-eval's default few-shot seed


@dataclass
class Task:
    """A task ready to score: its items, few-shot count and how its centred score is made."""

    name: str
    format: str  # one of FORMATS
    source: str  # the file or hf: dataset, for messages and the report
    items: list[Item]
    num_fewshot: int = 0
    limit: int | None = None  # score only the first `limit` items
    random_baseline: float | None = None  # chance accuracy; None: mean of 1/len(choices)
    metric: str = "acc"  # which accuracy the centred score uses

    @property
    def cloze(self) -> bool:
        return self.format == "lambada"


@dataclass
class Suite:
    """Several tasks, scored together (`run_suite`); `core` is their mean centred score."""

    name: str
    tasks: list[Task]
    seed: int = DEFAULT_SEED  # the few-shot draws


def make_task(
    source: str,
    format: str | None = None,
    *,
    name: str | None = None,
    num_fewshot: int = 0,
    limit: int | None = None,
    random_baseline: float | None = None,
    metric: str = "acc",
) -> Task:
    """A Task from a .jsonl file or hf: dataset (its format detected when None)."""
    if metric not in METRICS:
        raise GptlabError(f"{source}: metric {metric!r} must be one of {', '.join(METRICS)}")
    if num_fewshot < 0:
        raise GptlabError(f"{source}: num_fewshot must be 0 or more, got {num_fewshot}")
    if limit is not None and limit < 1:
        raise GptlabError(f"{source}: limit must be at least 1, got {limit}")
    if random_baseline is not None and not 0 <= random_baseline < 1:
        raise GptlabError(f"{source}: random_baseline must be in [0, 1), got {random_baseline}")
    fmt, items = load_items(source, format)
    if num_fewshot and num_fewshot > len(items) - 1:
        raise GptlabError(
            f"{source}: {num_fewshot} few-shot examples asked for, but the file has only "
            f"{len(items) - 1} other items; lower num_fewshot or add items"
        )
    default_name = Path(source).stem if not source.startswith("hf:") else source[3:]
    return Task(
        name or default_name, fmt, source, items, num_fewshot, limit, random_baseline, metric
    )


_SUITE_KEYS = {"name", "seed", "tasks"}
_TASK_KEYS = {"name", "data", "format", "num_fewshot", "limit", "random_baseline", "metric"}


def load_suite(path: str | Path) -> Suite:
    """A suite file (TOML): `name`, `seed` (few-shot draws) and a `[[tasks]]` table per task
    with `data` (a path relative to the suite file, or hf:NAME[:CONFIG][@SPLIT]) and
    optionally make_task's keywords. Every task's items are read and checked now."""
    import tomllib

    path = Path(path).expanduser()
    if not path.is_file():
        raise GptlabError(f"suite file {str(path)!r} not found; give a .toml file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"{path}: not valid TOML ({e})") from None
    unknown = set(raw) - _SUITE_KEYS
    if unknown:
        raise GptlabError(f"{path}: unknown key {sorted(unknown)[0]!r}; a suite has {_SUITE_KEYS}")
    specs = raw.get("tasks")
    if not isinstance(specs, list) or not specs:
        raise GptlabError(f"{path}: no [[tasks]] tables; add one per task with data = 'FILE'")
    seed = raw.get("seed", DEFAULT_SEED)
    if not isinstance(seed, int):
        raise GptlabError(f"{path}: seed must be an integer, got {seed!r}")
    tasks, names = [], set()
    for n, spec in enumerate(specs, start=1):
        where = f"{path}: task {n}"
        bad = set(spec) - _TASK_KEYS
        if bad:
            raise GptlabError(
                f"{where}: unknown key {sorted(bad)[0]!r}; keys are {sorted(_TASK_KEYS)}"
            )
        data = spec.get("data")
        if not isinstance(data, str):
            raise GptlabError(f"{where}: needs data = 'FILE.jsonl' (or 'hf:NAME')")
        if not data.startswith("hf:"):
            data = str((path.parent / data).expanduser())
        for key, kind in (("num_fewshot", int), ("limit", int), ("random_baseline", (int, float))):
            if key in spec and (not isinstance(spec[key], kind) or isinstance(spec[key], bool)):
                raise GptlabError(f"{where}: {key} must be a number, got {spec[key]!r}")
        options = {k: v for k, v in spec.items() if k not in ("data", "format")}  # make_task's
        task = make_task(data, spec.get("format"), **options)
        if task.name in names:
            raise GptlabError(f"{where}: a second task named {task.name!r}; give each its own name")
        names.add(task.name)
        tasks.append(task)
    return Suite(str(raw.get("name", path.stem)), tasks, seed)


def fewshot_context(task: Task, index: int, seed: int = DEFAULT_SEED) -> str:
    """The context for item `index`: `num_fewshot` other items with their right answers,
    then the item, apart by blank lines. The examples are drawn by an RNG seeded with
    (seed, index): the same every time and on every rank."""
    item = task.items[index]
    k = task.num_fewshot
    if not k:
        return item.context
    rng = random.Random(f"{seed}:{index}")
    # As lm-eval: draw one more than needed, drop the item itself, keep k.
    picks = [j for j in rng.sample(range(len(task.items)), k + 1) if j != index][:k]
    shots = [task.items[j] for j in picks]
    shown = [s.context + s.delimiter + s.choices[s.answer] for s in shots]
    return FEWSHOT_DELIMITER.join([*shown, item.context])


def _requests(task: Task, tokenizer, indices: Sequence[int], seed: int, T: int):
    """The (context, continuation) ids of the items at `indices`, and each one's item."""
    reqs, owner = [], []
    for i in indices:
        item = task.items[i]
        ctx = fewshot_context(task, i, seed)
        for j, choice in enumerate(item.choices):
            c, k = encode_pair(tokenizer, ctx, item.delimiter + choice)
            if not k:
                raise GptlabError(
                    f"{task.source}: item {i + 1}: choice {j} encodes to no tokens; give it text"
                )
            if len(k) > T:
                raise GptlabError(
                    f"{task.source}: item {i + 1}: choice {j} is {len(k)} tokens, more than the "
                    f"model's context of {T} can read with nothing left; shorten it or drop the item"
                )
            reqs.append((c, k))
            owner.append(i)
    return reqs, owner


def chance(task: Task, indices: Sequence[int] | None = None) -> float:
    """The accuracy of guessing: `random_baseline`, else the mean 1/len(choices) (cloze: 0)."""
    if task.random_baseline is not None:
        return float(task.random_baseline)
    if task.cloze:
        return 0.0
    idx = range(_n_scored(task)) if indices is None else indices
    return sum(1 / len(task.items[i].choices) for i in idx) / max(1, len(idx))


def centred(acc: float, chance_acc: float) -> float:
    """(acc - chance) / (1 - chance): 0 at guessing, 1 when every item is right (CORE's)."""
    return (acc - chance_acc) / (1 - chance_acc)


def _n_scored(task: Task, max_items: int | None = None) -> int:
    return min([len(task.items)] + [c for c in (task.limit, max_items) if c is not None])


def run_task(
    model: nn.Module,
    tokenizer,
    task: Task,
    *,
    context_length: int,
    batch_size: int = 16,
    device=None,
    dist=None,
    max_items: int | None = None,
    seed: int = DEFAULT_SEED,
) -> dict:
    """One task's report: n_items, n_truncated (items whose context was cut), acc, then
    acc_norm and acc_bytes (multiple choice) or logprob and perplexity (cloze), chance and
    centred. With a torchrun `dist`, item i goes to rank i mod world and the counts are
    summed: every rank gets the one-process report."""
    n = _n_scored(task, max_items)
    shared = dist is not None and dist.enabled
    rank, world = (dist.rank, dist.world_size) if shared else (0, 1)
    reqs, owner = _requests(task, tokenizer, range(rank, n, world), seed, context_length)
    eot = getattr(tokenizer, "eot_token", None)
    forwards = 0
    if shared:  # every rank runs as many passes (FSDP gathers in each)
        need = n_forwards_needed(
            reqs, context_length=context_length, batch_size=batch_size, eot_id=eot
        )
        forwards = dist.agree(need)
    scores = score_requests(
        model, reqs, context_length=context_length, batch_size=batch_size, device=device,
        eot_id=eot, min_forwards=forwards,
    )  # fmt: skip
    by_item: dict[int, list[Score]] = {}
    for i, s in zip(owner, scores, strict=True):
        by_item.setdefault(i, []).append(s)
    counts = _counts(task, by_item)
    if shared:
        counts = dist.sum(torch.tensor(counts, dtype=torch.float64, device=dist.device)).tolist()
    return _report(task, counts, chance(task, range(n)))


def _counts(task: Task, by_item: dict[int, list[Score]]) -> list[float]:
    """[items, right, right per char, right per byte, truncated, sum of logprobs] over
    `by_item` (each item's scores, one per choice)."""
    counts = [0.0] * 6
    for i, ss in by_item.items():
        item = task.items[i]
        lls = [s.logprob for s in ss]
        counts[0] += 1
        counts[4] += any(s.truncated for s in ss)
        if task.cloze:
            counts[1] += ss[0].greedy
            counts[5] += lls[0]
            continue
        chars = [len(c) for c in item.choices]
        nbytes = [len(c.encode("utf-8")) for c in item.choices]
        counts[1] += _argmax(lls) == item.answer
        counts[2] += _argmax([x / c for x, c in zip(lls, chars, strict=True)]) == item.answer
        counts[3] += _argmax([x / b for x, b in zip(lls, nbytes, strict=True)]) == item.answer
    return counts


def _report(task: Task, counts: list[float], base: float) -> dict:
    """A task's report (see `run_task`) from its summed `counts` and chance accuracy `base`."""
    n_items, right, right_norm, right_bytes, n_trunc, sum_lp = counts
    report: dict = {
        "format": task.format,
        "data": task.source,
        "num_fewshot": task.num_fewshot,
        "n_items": int(n_items),
        "n_truncated": int(n_trunc),
        "acc": right / n_items,
    }
    if task.cloze:
        report["logprob"] = sum_lp / n_items
        report["perplexity"] = math.exp(-sum_lp / n_items) if -sum_lp / n_items < 700 else math.inf
    else:
        report.update(acc_norm=right_norm / n_items, acc_bytes=right_bytes / n_items)
    report["metric"] = task.metric if not task.cloze else "acc"
    report["chance"] = base
    report["centred"] = centred(report[report["metric"]], base)
    return report


def _argmax(xs: Sequence[float]) -> int:
    """The first index of the largest value (numpy's argmax tie rule, as lm-eval)."""
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def run_suite(
    model: nn.Module,
    tokenizer,
    suite: Suite,
    *,
    context_length: int,
    batch_size: int = 16,
    device=None,
    dist=None,
    max_items: int | None = None,
) -> dict:
    """A JSON-able report: each task's `run_task` report under "tasks" by name, and "core",
    the mean of their centred scores. `max_items` caps each task's items."""
    tasks = {
        t.name: run_task(
            model, tokenizer, t, context_length=context_length, batch_size=batch_size,
            device=device, dist=dist, max_items=max_items, seed=suite.seed,
        )
        for t in suite.tasks
    }  # fmt: skip
    core = sum(r["centred"] for r in tasks.values()) / len(tasks)
    return {"suite": suite.name, "tasks": tasks, "core": core}


def task_suite(
    task: str,
    data: str | None = None,
    *,
    num_fewshot: int = 0,
    limit: int | None = None,
    seed: int = DEFAULT_SEED,
) -> Suite:
    """The Suite of `gptlab eval --task NAME_OR_FILE [--task-data PATH]`: `task` is a format
    name (FORMATS) with `data` the items, a task file (format detected), or a suite .toml
    (loaded as is)."""
    if task.endswith(".toml"):
        if data:
            raise GptlabError("--task-data goes with a task name or file, not a suite .toml")
        return load_suite(task)
    if task in FORMATS:
        if not data:
            raise GptlabError(
                f"--task {task} needs its items: --task-data FILE.jsonl (or hf:NAME[:CONFIG][@SPLIT])"
            )
        t = make_task(data, task, name=task, num_fewshot=num_fewshot, limit=limit)
    elif data:
        raise GptlabError(
            f"--task {task!r} is no known format ({', '.join(FORMATS)}); with --task-data, "
            "name the format, or give the file as --task"
        )
    else:
        t = make_task(task, None, num_fewshot=num_fewshot, limit=limit)
    return Suite(t.name, [t], seed)


def evaluate_run_tasks(
    run: Run,
    suite: Suite,
    *,
    batch_size: int = 16,
    precision: str = "fp32",
    dist=None,
    max_items: int | None = None,
) -> dict:
    """`run_suite` on an opened run at its context length, with "checkpoint" added."""
    if precision not in PRECISION_DTYPES:
        raise GptlabError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    with autocast(run.device, precision):
        report = run_suite(
            run.model, run.tokenizer, suite, context_length=run.config.model.context_length,
            batch_size=batch_size, device=run.device, dist=dist, max_items=max_items,
        )  # fmt: skip
    return {"checkpoint": str(run.checkpoint) if run.checkpoint else None, **report}


def check_report_path(path: str | Path) -> Path:
    """The report's path, checked before any scoring: a file name in an existing folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise GptlabError(f"--out {str(path)!r} is a directory; give a file name (report.json)")
    if not path.parent.is_dir():
        raise GptlabError(f"--out {str(path)!r}: folder {str(path.parent)!r} does not exist")
    return path


def write_report(path: str | Path, report: dict) -> Path:
    """Write the report as JSON atomically: a reader sees the old file or the whole new one."""
    return write_json(check_report_path(path), report, indent=2)
