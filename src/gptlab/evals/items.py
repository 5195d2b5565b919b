"""Task files: the formats of downstream-task items and how each becomes an `Item`.

A task file is any source of records (gptlab.data.records: .jsonl, a .json array, .parquet,
or `hf:NAME[:CONFIG][@SPLIT]`, split `validation` by default). Its format is named or
detected from the first record's fields; each builds the text lm-evaluation-harness builds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gptlab.data.records import BadRecord, detect_format, read_records
from gptlab.errors import GptlabError

FIELDS = {  # what each format's items hold (for messages and the README)
    "hellaswag": "ctx or activity_label/ctx_a/ctx_b, endings, label",
    "arc": "question.stem and question.choices, or question and choices; answerKey",
    "piqa": "goal, sol1, sol2, label",
    "copa": "premise, choice1, choice2, question (cause or effect), label",
    "mc": "context, choices, answer",
    "lambada": "text",
}
FORMATS = tuple(FIELDS)
_SIGNS = {  # the fields that tell each format, tried in this order when none is named
    "hellaswag": ("endings",),
    "arc": ("answerKey",),
    "piqa": ("goal", "sol1", "sol2"),
    "copa": ("premise", "choice1", "choice2"),
    "mc": ("context", "choices"),
    "lambada": ("text",),
}


@dataclass
class Item:
    """One task item as text: the model reads `context` and each `delimiter + choice`
    (lm-eval's `doc_to_choice` strings). A cloze item (LAMBADA) has one choice, the last
    word, right when greedy decoding produces it."""

    context: str
    choices: list[str]
    answer: int
    delimiter: str = " "  # lm-eval's target_delimiter


def _field(rec: dict, name: str, kind: type | tuple[type, ...] = str):
    if name not in rec:
        raise BadRecord(f"missing field {name!r} (fields: {', '.join(list(rec)[:8])})")
    value = rec[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BadRecord(f"field {name!r} is {type(value).__name__}, not {names}")
    return value


def _index(value, n: int, what: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRecord(f"{what} {value!r} is not a choice number (0 to {n - 1})")
    if not 0 <= value < n:
        raise BadRecord(f"{what} {value} is out of range for {n} choices; answers count from 0")
    return value


def _strings(value, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise BadRecord(f"{what} must be a list of strings")
    if not value:
        raise BadRecord(f"{what} is empty; give at least two choices")
    if any(not c for c in value):
        raise BadRecord(f"{what} holds an empty string; every choice needs text")
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
            raise BadRecord("question.choices must be a list of {text, label} objects")
        texts = _strings([c.get("text") for c in choices], "question.choices")
        labels = [str(c.get("label")) for c in choices]
    else:  # the Hugging Face layout: question, choices {text: [...], label: [...]}
        stem, ch = q, _field(rec, "choices", dict)
        texts = _strings(ch.get("text"), "choices.text")
        labels = [str(x) for x in ch.get("label") or []]
    if len(labels) != len(texts):
        raise BadRecord(f"{len(texts)} choices but {len(labels)} labels")
    key = str(_field(rec, "answerKey", (str, int)))
    if key not in labels:
        raise BadRecord(f"answerKey {key!r} is none of the choice labels {labels}")
    return Item(f"Question: {stem}\nAnswer:", texts, labels.index(key))


def _piqa(rec: dict) -> Item:
    choices = _strings([_field(rec, "sol1"), _field(rec, "sol2")], "sol1/sol2")
    if "label" not in rec:
        raise BadRecord(
            "no 'label' (PIQA's published labels are a separate .lst: add each as label)"
        )
    question = f"Question: {_field(rec, 'goal')}\nAnswer:"
    return Item(question, choices, _index(rec["label"], 2, "label"))


def _copa(rec: dict) -> Item:
    connector = {"cause": "because", "effect": "therefore"}.get(_field(rec, "question"))
    if connector is None:
        raise BadRecord(f"question {rec['question']!r} must be 'cause' or 'effect'")
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
        raise BadRecord("text needs at least two words, the last one not empty (the word to guess)")
    return Item(" ".join(words[:-1]), [" " + words[-1]], 0, "")  # lm-eval's lambada_openai


_PARSERS = {
    "hellaswag": _hellaswag,
    "arc": _arc,
    "piqa": _piqa,
    "copa": _copa,
    "mc": _mc,
    "lambada": _lambada,
}


def load_items(source: str, format: str | None = None) -> tuple[str, list[Item]]:
    """(format, items) of a task file or `hf:` dataset; `format` (one of FORMATS) is
    detected when None. A bad item is a GptlabError naming where it is and the fix."""
    if format is not None and format not in FORMATS:
        raise GptlabError(f"unknown task format {format!r}; choose one of {', '.join(FORMATS)}")
    records = read_records(source, split="validation")
    if format is None:
        format = detect_format(records, _SIGNS, "--task (or a suite's format =)")
    parse = _PARSERS[format]
    items = []
    for n, (where, rec) in enumerate(records, start=1):
        try:
            items.append(parse(rec))
        except BadRecord as e:
            raise GptlabError(
                f"{where}: item {n}: {e} ({format} items have {FIELDS[format]})"
            ) from None
    return format, items
