"""Downstream tasks scored by log-likelihood, as lm-evaluation-harness scores them.

The core is `score_requests(model, [(context ids, continuation ids), ...])`: for each pair,
the sum of log p(continuation token | everything before it) and whether greedy decoding
would have produced the continuation exactly. Everything else builds on it:

- `encode_pair(tokenizer, context, continuation)`: text -> ids the way lm-eval does it
  (context's trailing spaces move to the continuation; context+continuation is encoded
  whole and split after the context's tokens, so " word" keeps its leading-space token);
- multiple choice (HellaSwag, ARC, PIQA, COPA, gptlab jsonl): accuracy by the largest
  log-likelihood, `acc_norm` by the largest log-likelihood per *character* of the choice
  (lm-eval's `acc_norm`: `len(choice)` in characters) and `acc_bytes` per UTF-8 byte
  (lm-eval's `acc_bytes`);
- cloze (LAMBADA's `text`): the last word's log-likelihood (perplexity) and whether greedy
  decoding produces it exactly (`acc`);
- suites (`load_suite`, `run_suite`): several tasks with few-shot counts, and a *centred*
  score per task, (acc - chance) / (1 - chance), whose mean is "core" as in nanochat's CORE.

Exactness: a batch is padded on the right, and the model is causal, so padding never
changes the logits of the positions scored; requests whose model input is token for token
the same (e.g. one-token choices after one context) share one row. Batched scores are
those of scoring each request alone (to float rounding of the batched matmuls).

Left-truncation follows lm-eval: the model reads the last `context_length` tokens of
context + continuation minus its final token; a request whose context lost tokens is
counted as truncated; one whose continuation alone does not fit is an error.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from gptlab.atomic import write_json
from gptlab.errors import GptlabError
from gptlab.model.gpt import GPTModel, softcap
from gptlab.runtime.device import PRECISION_DTYPES, autocast

if TYPE_CHECKING:  # only a type: runs.open_run makes it, and runs sits above this module
    from gptlab.interop.runs import Run


@dataclass
class Score:
    """The log-likelihood of one continuation given its context."""

    logprob: float  # sum of log p(continuation token | everything before it), nats
    greedy: bool  # every continuation token is the argmax at its position
    n_tokens: int  # continuation tokens scored
    truncated: bool  # the context was left-truncated to fit


def _model_input(
    context: Sequence[int], continuation: Sequence[int], context_length: int, eot_id: int | None
) -> tuple[tuple[int, ...], bool]:
    """The ids the model reads for one request (at most context_length), and whether the
    context was cut. The continuation's tokens are predicted at the input's last
    len(continuation) positions."""
    if not continuation:
        raise GptlabError("a continuation has no tokens; every choice must be non-empty text")
    if len(continuation) > context_length:
        raise GptlabError(
            f"a continuation of {len(continuation)} tokens does not fit the model's context of "
            f"{context_length}; shorten the choices or use a model with a longer context"
        )
    if not context:
        if eot_id is None:
            raise GptlabError(
                "a request has an empty context: pass eot_id (the tokenizer's <|endoftext|>) "
                "so the first token is scored after it"
            )
        context = [eot_id]
    whole = list(context) + list(continuation)
    keep = whole[-(context_length + 1) :][:-1]  # (<= T,): the last T+1, minus the final token
    return tuple(keep), len(whole) - 1 > context_length


@torch.no_grad()
def score_requests(
    model: nn.Module,
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    context_length: int,
    batch_size: int = 16,
    device=None,
    eot_id: int | None = None,
    min_forwards: int = 0,
) -> list[Score]:
    """(context ids, continuation ids) pairs -> one Score each, in input order.

    The model maps ids (B, T) to logits (B, T, V) and is causal. A context longer than
    `context_length` (with its continuation) is left-truncated, as lm-eval does; an empty
    context means "score the first continuation token after `eot_id`" (the tokenizer's
    <|endoftext|>, which lm-eval puts there too). Requests are sorted longest first and
    batched `batch_size` at a time, padded on the right. `device`: where the ids go
    (default: the model's parameters'). `min_forwards`: run at least this many forward
    passes (extra ones on a one-token dummy), so every rank of a sharded (FSDP) job runs
    as many as the others. The model is put in eval mode and restored afterwards.
    """
    if batch_size < 1:
        raise GptlabError(f"batch_size must be at least 1, got {batch_size}")
    if device is None:
        device = next(model.parameters()).device
    inputs = [_model_input(c, k, context_length, eot_id) for c, k in requests]
    rows: dict[tuple[int, ...], int] = {}  # identical inputs share one row
    for ids, _ in inputs:
        rows.setdefault(ids, len(rows))
    unique = sorted(rows, key=lambda ids: (-len(ids), ids))  # longest first: least padding
    wanted: dict[tuple[int, ...], list[int]] = {}  # row -> requests scored on it
    for i, (ids, _) in enumerate(inputs):
        wanted.setdefault(ids, []).append(i)

    was_training = model.training
    model.eval()
    out: list[Score | None] = [None] * len(requests)
    n_forwards = 0
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        T = len(chunk[0])
        x = torch.zeros((len(chunk), T), dtype=torch.long)  # (B, T), right-padded with 0
        for b, ids in enumerate(chunk):
            x[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        todo = [(b, i) for b, ids in enumerate(chunk) for i in wanted[ids]]
        rows, cols, targets, sizes = [], [], [], []
        for b, i in todo:
            cont, end = requests[i][1], len(chunk[b])
            rows += [b] * len(cont)
            cols += range(end - len(cont), end)  # the positions that predict cont
            targets += cont
            sizes.append(len(cont))
        logits = _logits_at(model, x.to(device), rows, cols).float()  # (N, V), N = sum(sizes)
        target = torch.tensor(targets, dtype=torch.long, device=logits.device)  # (N,)
        logp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]  # (N,)
        hit = logits.argmax(dim=-1) == target  # (N,)
        n_forwards += 1
        for (_, i), lp, ok in zip(todo, logp.split(sizes), hit.split(sizes), strict=True):
            out[i] = Score(lp.sum().item(), bool(ok.all().item()), len(lp), inputs[i][1])
    while n_forwards < min_forwards:
        model(torch.zeros((1, 1), dtype=torch.long, device=device))
        n_forwards += 1
    model.train(was_training)
    return out  # type: ignore[return-value]


def _logits_at(model: nn.Module, x: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """Logits (N, V) at positions (rows[n], cols[n]) of the batch x (B, T).

    A plain GPTModel runs its output head on those positions only (the head is most of a
    small model's FLOPs, and only continuation positions are scored), as `forward` would
    compute them; anything else (DDP, FSDP, compiled or foreign modules) runs its forward.
    """
    r = torch.tensor(rows, device=x.device)
    c = torch.tensor(cols, device=x.device)
    if type(model) is GPTModel:
        h = model.hidden_states(x)[r, c]  # (N, D)
        logits = model.out_head(h)[..., : model.cfg.vocab_size]  # (N, V)
        return softcap(logits, model.cfg.logit_softcap)
    return model(x)[r, c]  # (B, T, V) -> (N, V)


def n_forwards_needed(
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    context_length: int,
    batch_size: int = 16,
    eot_id: int | None = None,
) -> int:
    """How many forward passes `score_requests` runs for these requests."""
    rows = {_model_input(c, k, context_length, eot_id)[0] for c, k in requests}
    return -(-len(rows) // batch_size)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one request, tokenised as lm-eval does.

    Trailing whitespace of the context moves to the start of the continuation; then
    context + continuation is encoded whole and the continuation is what follows the
    context's own tokens. An empty context gives [<|endoftext|>] as context (the first
    continuation token is scored after it).
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        eot = getattr(tokenizer, "eot_token", None)
        if eot is None:
            raise GptlabError("an empty context needs a tokenizer with an <|endoftext|> token")
        return [eot], _encode(tokenizer, continuation)
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


def _encode(tokenizer, text: str) -> list[int]:
    # The tokenizer's own default for "<|endoftext|>" in text (the special token, as a
    # Hugging Face tokenizer under lm-eval would read it).
    return list(tokenizer.encode(text))


# --------------------------------------------------------------------------- task formats

FORMATS = ("hellaswag", "arc", "piqa", "copa", "mc", "lambada")
METRICS = ("acc", "acc_norm", "acc_bytes")
FEWSHOT_DELIMITER = "\n\n"  # between few-shot examples and before the item, as lm-eval
DEFAULT_SEED = 1234  # lm-eval's default few-shot seed
FIELDS = {  # what each format's items hold (for messages and the README)
    "hellaswag": "ctx or activity_label/ctx_a/ctx_b, endings, label",
    "arc": "question.stem and question.choices, or question and choices; answerKey",
    "piqa": "goal, sol1, sol2, label",
    "copa": "premise, choice1, choice2, question (cause or effect), label",
    "mc": "context, choices, answer",
    "lambada": "text",
}
_FORMAT_HELP = "; ".join(f"{k} ({v})" for k, v in FIELDS.items())


@dataclass
class Item:
    """One task item as text: the model reads `context` and each `delimiter + choice`.

    A cloze item (LAMBADA) has one choice, the last word, and is right when greedy decoding
    produces it. `choices` are lm-eval's `doc_to_choice` strings, the ones acc_norm measures.
    """

    context: str
    choices: list[str]
    answer: int
    delimiter: str = " "  # lm-eval's target_delimiter


class _Bad(Exception):
    """An item's problem; the loader adds the file and the item number."""


def _field(rec: dict, name: str, kind: type | tuple[type, ...] = str):
    if name not in rec:
        raise _Bad(f"missing field {name!r} (fields: {', '.join(list(rec)[:8])})")
    value = rec[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Bad(f"field {name!r} is {type(value).__name__}, not {names}")
    return value


def _index(value, n: int, what: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Bad(f"{what} {value!r} is not a choice number (0 to {n - 1})")
    if not 0 <= value < n:
        raise _Bad(f"{what} {value} is out of range for {n} choices; answers count from 0")
    return value


def _strings(value, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise _Bad(f"{what} must be a list of strings")
    if not value:
        raise _Bad(f"{what} is empty; give at least two choices")
    if any(not c for c in value):
        raise _Bad(f"{what} holds an empty string; every choice needs text")
    return value


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow's " [title]" becomes ". ", other [tags] go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(rec: dict) -> Item:
    if all(k in rec for k in ("activity_label", "ctx_a", "ctx_b")):
        ctx = _field(rec, "ctx_a") + " " + _field(rec, "ctx_b").capitalize()
        query = hellaswag_preprocess(_field(rec, "activity_label") + ": " + ctx)
    else:
        query = hellaswag_preprocess(_field(rec, "ctx"))
    endings = [hellaswag_preprocess(e) for e in _strings(_field(rec, "endings", list), "endings")]
    return Item(query, endings, _index(rec.get("label"), len(endings), "label"))


def _arc(rec: dict) -> Item:
    q = _field(rec, "question", (str, dict))
    if isinstance(q, dict):  # the published jsonl: question {stem, choices [{text, label}]}
        stem, choices = _field(q, "stem"), _field(q, "choices", list)
        if not all(isinstance(c, dict) for c in choices):
            raise _Bad("question.choices must be a list of {text, label} objects")
        texts = _strings([c.get("text") for c in choices], "question.choices")
        labels = [str(c.get("label")) for c in choices]
    else:  # the Hugging Face layout: question, choices {text: [...], label: [...]}
        stem, ch = q, _field(rec, "choices", dict)
        texts = _strings(ch.get("text"), "choices.text")
        labels = [str(x) for x in ch.get("label") or []]
    if len(labels) != len(texts):
        raise _Bad(f"{len(texts)} choices but {len(labels)} labels")
    key = str(_field(rec, "answerKey", (str, int)))
    if key not in labels:
        raise _Bad(f"answerKey {key!r} is none of the choice labels {labels}")
    return Item(f"Question: {stem}\nAnswer:", texts, labels.index(key))


def _piqa(rec: dict) -> Item:
    choices = _strings([_field(rec, "sol1"), _field(rec, "sol2")], "sol1/sol2")
    if "label" not in rec:
        raise _Bad("no 'label' (PIQA's published labels are a separate .lst: add each as label)")
    return Item(
        f"Question: {_field(rec, 'goal')}\nAnswer:", choices, _index(rec["label"], 2, "label")
    )


def _copa(rec: dict) -> Item:
    connector = {"cause": "because", "effect": "therefore"}.get(_field(rec, "question"))
    if connector is None:
        raise _Bad(f"question {rec['question']!r} must be 'cause' or 'effect'")
    premise = _field(rec, "premise").strip()
    c1, c2 = _strings([_field(rec, "choice1"), _field(rec, "choice2")], "choice1/choice2")
    # lm-eval's COPA: the premise's final period dropped, the connector, the choice
    # lower-cased. Its choices already start with a space; lm-eval's default delimiter adds
    # another (it warns about it); we add none, so the text reads "... because the sun rose".
    choices = [" " + c[0].lower() + c[1:] for c in (c1, c2)]
    return Item(f"{premise[:-1]} {connector}", choices, _index(rec.get("label"), 2, "label"), "")


def _mc(rec: dict) -> Item:
    choices = _strings(_field(rec, "choices", list), "choices")
    return Item(_field(rec, "context"), choices, _index(rec.get("answer"), len(choices), "answer"))


def _lambada(rec: dict) -> Item:
    words = _field(rec, "text").split(" ")
    if len(words) < 2 or not words[-1]:
        raise _Bad("text needs at least two words, the last one not empty (the word to guess)")
    return Item(" ".join(words[:-1]), [" " + words[-1]], 0, "")  # lm-eval's lambada_openai


_PARSERS = {
    "hellaswag": _hellaswag,
    "arc": _arc,
    "piqa": _piqa,
    "copa": _copa,
    "mc": _mc,
    "lambada": _lambada,
}


def detect_format(rec: dict) -> str | None:
    """The format whose fields the record has, or None."""
    if not isinstance(rec, dict):
        return None
    keys = set(rec)
    if "endings" in keys:
        return "hellaswag"
    if "answerKey" in keys:
        return "arc"
    if {"goal", "sol1", "sol2"} <= keys:
        return "piqa"
    if {"premise", "choice1", "choice2"} <= keys:
        return "copa"
    if {"context", "choices"} <= keys:
        return "mc"
    if "text" in keys:
        return "lambada"
    return None


def _records(source: str) -> list[tuple[int, dict]]:
    """(line number, record) of a jsonl file, or (row + 1, record) of `hf:NAME[:CONFIG][@SPLIT]`."""
    if source.startswith("hf:"):
        return _hf_records(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise GptlabError(f"task file {source!r} not found; give a .jsonl file of items")
    out = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append((line_no, json.loads(line)))
            except json.JSONDecodeError as e:
                raise GptlabError(
                    f"{source}: line {line_no} is not JSON ({e.msg}); a task file has one "
                    f"JSON object per line"
                ) from None
    return out


def _hf_records(source: str) -> list[tuple[int, dict]]:
    name, _, split = source[3:].partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise GptlabError(
            f"{source} needs the `datasets` package: pip install datasets (and the network)"
        ) from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "validation")
    except Exception as e:  # offline, unknown name, gated: the library has many kinds
        first = (str(e).splitlines() or [""])[0][:160]
        raise GptlabError(
            f"cannot load Hugging Face dataset {name!r} ({type(e).__name__}: {first}); check "
            "hf:NAME[:CONFIG][@SPLIT] and the network, or give a local .jsonl"
        ) from None
    return [(i + 1, dict(r)) for i, r in enumerate(ds)]


def load_items(source: str, format: str | None = None) -> tuple[str, list[Item]]:
    """(format, items) of a task file (.jsonl, one item per line) or `hf:` dataset.

    `format` is one of FORMATS, or None to detect it from the first item's fields. Any bad
    item is a GptlabError naming the file, the item number (and line) and the fix.
    """
    if format is not None and format not in FORMATS:
        raise GptlabError(f"unknown task format {format!r}; choose one of {', '.join(FORMATS)}")
    records = _records(source)
    if not records:
        raise GptlabError(f"{source} holds no items; give a file with one JSON object per line")
    if format is None:
        format = detect_format(records[0][1])
        if format is None:
            raise GptlabError(
                f"{source}: item 1 (line {records[0][0]}) has no known task fields; the "
                f"formats are {_FORMAT_HELP}"
            )
    parse = _PARSERS[format]
    items = []
    for n, (line_no, rec) in enumerate(records, start=1):
        try:
            if not isinstance(rec, dict):
                raise _Bad(f"is {type(rec).__name__}, not a JSON object")
            items.append(parse(rec))
        except _Bad as e:
            raise GptlabError(
                f"{source}: item {n} (line {line_no}): {e} ({format} items have {FIELDS[format]})"
            ) from None
    return format, items


# --------------------------------------------------------------------------- tasks and suites


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
    """A suite file (TOML): top-level `name`, `seed` (few-shot draws, default 1234) and a
    `[[tasks]]` table per task with `data` (a .jsonl path relative to the suite file, or
    hf:NAME[:CONFIG][@SPLIT]) and optional `name`, `format`, `num_fewshot`, `limit`,
    `random_baseline` (chance accuracy) and `metric` (acc, acc_norm or acc_bytes: what is
    centred). Every task's items are read and checked now."""
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
        task = make_task(
            data,
            spec.get("format"),
            name=spec.get("name"),
            num_fewshot=spec.get("num_fewshot", 0),
            limit=spec.get("limit"),
            random_baseline=spec.get("random_baseline"),
            metric=spec.get("metric", "acc"),
        )
        if task.name in names:
            raise GptlabError(f"{where}: a second task named {task.name!r}; give each its own name")
        names.add(task.name)
        tasks.append(task)
    return Suite(str(raw.get("name", path.stem)), tasks, seed)


def fewshot_context(task: Task, index: int, seed: int = DEFAULT_SEED) -> str:
    """The context the model reads for item `index`: `num_fewshot` other items of the same
    file, each with its right answer, then the item, separated by blank lines (lm-eval's
    "\\n\\n"). The examples are drawn with their own RNG seeded by (seed, index): the same
    every time and on every rank, whichever items are scored."""
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
    """The accuracy of guessing: `random_baseline`, else the mean of 1/len(choices) (0 for
    cloze)."""
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
    n = len(task.items)
    for cap in (task.limit, max_items):
        if cap is not None:
            n = min(n, cap)
    return n


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
    """One task's report: n_items, n_truncated (items whose context was cut), acc, and for
    multiple choice acc_norm (per character, lm-eval's) and acc_bytes (per UTF-8 byte), for
    cloze perplexity (exp of minus the mean log-likelihood of the word) and logprob; chance
    and centred. With a torchrun `dist`, items are shared out (item i to rank i mod world)
    and the counts summed: every rank gets the one-process report."""
    n = _n_scored(task, max_items)
    rank, world = (dist.rank, dist.world_size) if dist is not None and dist.enabled else (0, 1)
    mine = list(range(rank, n, world))
    reqs, owner = _requests(task, tokenizer, mine, seed, context_length)
    eot = getattr(tokenizer, "eot_token", None)
    forwards = 0
    if dist is not None and dist.enabled:  # every rank runs as many passes (FSDP gathers in each)
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
    # [items, right, right per char, right per byte, truncated, sum logprob]
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
    if dist is not None and dist.enabled:
        t = dist.sum(torch.tensor(counts, dtype=torch.float64, device=dist.device))
        counts = t.tolist()
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
        report["acc_norm"] = right_norm / n_items
        report["acc_bytes"] = right_bytes / n_items
    base = chance(task, range(n))
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
    """A JSON-able report of every task in `suite` (see `run_task`), under "tasks" by name,
    and "core": the mean of their centred scores. `max_items` caps each task's items."""
    tasks = {
        t.name: run_task(
            model,
            tokenizer,
            t,
            context_length=context_length,
            batch_size=batch_size,
            device=device,
            dist=dist,
            max_items=max_items,
            seed=suite.seed,
        )  # fmt: skip
        for t in suite.tasks
    }
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
    """A one-task Suite from `gptlab eval --task NAME_OR_FILE [--task-data PATH]`.

    `task` is a format name (FORMATS) with `data` the items, or a .jsonl file (its format
    detected), or a suite .toml (then `num_fewshot` and `limit` apply to none of its tasks
    unless given: they override each task's).
    """
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
    """`run_suite` on a run opened with `gptlab.interop.runs.open_run`, at its context length, with
    "checkpoint" added to the report."""
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
    """Write the report as JSON atomically (a temporary file beside it, fsynced, renamed):
    a reader sees the old file or the whole new one, never a part."""
    return write_json(check_report_path(path), report, indent=2)
