"""Finetuning data: records -> rendered examples -> batches.

Records (.jsonl, or a .json array) come in three formats: instructions (`instruction`,
optional `input`, `output`: the book's chapter 7, in its Alpaca-style prompt), chat
(`messages: [{role, content}, ...]`, rendered by a chat template the caller passes) and
classification (`text`, `label`: the book's chapter 6).

An instructions or chat record becomes an `Example`: its token ids, ending with one
end-of-text token, and per token whether the model learns to produce it. `finetune.mask`
picks those: response (the output or the assistant turns, and the end-of-text);
instruction (the book's exercise 7.2: the response header too); padding (every token).

Batches are (inputs, targets), targets -100 where nothing is learned, padded to their
longest example (`collate`) or packed into rows of context_length tokens (`pack`): then
targets (B, 2, T) carry each position's example number, and the model keeps attention
inside each example. A `ClassExample`'s batches are inputs (B, T) and targets (B, 2): the
label and the position of the last real token, whose logits the head scores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from gptlab.data.chat import ALPACA
from gptlab.data.records import Record, detect_format, read_records
from gptlab.errors import GptlabError

IGNORE_INDEX = -100  # cross-entropy skips these targets (the book's ignore_index)
# finetune.format = auto: the fields that tell a record's format, tried in this order
FORMAT_FIELDS = {
    "chat": ("messages",),
    "classification": ("label",),
    "instructions": ("instruction",),
}
ROLES = ("system", "user", "assistant")

# The prompt's text lives in its chat template, so that training and chat read one copy.
RESPONSE_HEADER = ALPACA.response_prompt  # "\n\n### Response:\n"

# (messages, add_generation_prompt) -> (ids, learn): gptlab.data.chat's render, bound
ChatRender = Callable[[list[dict[str, str]], bool], tuple[list[int], list[bool]]]
Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets)


def format_input(entry: dict[str, Any]) -> str:
    """The book's Alpaca-style prompt of an instructions record, without the response header."""
    return ALPACA.format_input(entry["instruction"], entry.get("input") or "")


def instruction_prompt(entry: dict[str, Any]) -> str:
    """What the model sees before it answers: `format_input` and the response header."""
    return format_input(entry) + RESPONSE_HEADER


def _text_field(where: str, r: dict[str, Any], key: str, fmt: str, optional: bool = False) -> str:
    value = r.get(key, "" if optional else None)
    if value is None:
        needs = {
            "instructions": "instruction and output (input optional)",
            "classification": "text and label",
            "chat": "messages",
        }[fmt]
        raise GptlabError(f"{where}: missing field {key!r}; each {fmt} record needs {needs}")
    if not isinstance(value, str):
        raise GptlabError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def check_messages(where: str, r: dict[str, Any]) -> list[dict[str, str]]:
    """A chat record's messages, checked: known roles, a non-empty assistant turn."""
    msgs = r.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise GptlabError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects"
        )
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise GptlabError(f"{where}: message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise GptlabError(
                f"{where}: message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise GptlabError(f"{where}: message {i}'s content must be a string")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise GptlabError(
            f"{where}: no assistant turn with content: nothing to learn; add the reply"
        )
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


@dataclass
class Example:
    """A rendered instructions or chat record."""

    ids: list[int]  # the tokens, ending with the end-of-text token
    learn: list[bool]  # per token: the model should learn to produce it (a target)
    where: str = ""  # "file:line", for messages

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ClassExample:
    """A rendered classification record."""

    ids: list[int]
    label: int  # index into FinetuneData.labels
    where: str = ""


def render_instruction(
    entry: dict[str, Any], tokenizer: Any, mask: str
) -> tuple[list[int], list[bool]]:
    """(ids, learn) of an instructions record: the prompt, the response header and the
    output, each encoded on its own (as at inference), then end-of-text."""
    head = tokenizer.encode(format_input(entry))
    header = tokenizer.encode(RESPONSE_HEADER)
    out = tokenizer.encode(entry["output"]) + [tokenizer.eot_token]
    learn = [mask == "padding"] * len(head) + [mask != "response"] * len(header) + [True] * len(out)
    return head + header + out, learn


def truncate(ids: list[int], learn: list[bool], context_length: int, where: str):
    """(ids, learn, truncated?) cut to context_length + 1 tokens (the book's
    allowed_max_length); an error when nothing learned remains."""
    if len(ids) <= context_length + 1:
        return ids, learn, False
    ids, learn = ids[: context_length + 1], learn[: context_length + 1]
    if not any(learn[1:]):
        raise GptlabError(
            f"{where}: the example is longer than the context ({context_length} tokens) and no "
            "response token is left after cutting it; shorten the record or use a model with a "
            "longer context"
        )
    return ids, learn, True


def example_tensors(ex: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """One example as (inputs, targets), each (n - 1,); targets IGNORE_INDEX where not learned."""
    ids = torch.tensor(ex.ids, dtype=torch.long)
    learn = torch.tensor(ex.learn, dtype=torch.bool)
    targets = torch.where(learn[1:], ids[1:], IGNORE_INDEX)
    return ids[:-1], targets


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Pad a batch to its longest example: inputs (B, L) padded with pad_id, targets (B, L)
    with IGNORE_INDEX (the book's custom_collate_fn)."""
    pairs = [example_tensors(ex) for ex in examples]
    L = max(len(x) for x, _ in pairs)
    inputs = torch.full((len(pairs), L), pad_id, dtype=torch.long)  # (B, L)
    targets = torch.full((len(pairs), L), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    for i, (x, y) in enumerate(pairs):
        inputs[i, : len(x)] = x
        targets[i, : len(y)] = y
    return inputs, targets


def pack(examples: Sequence[Example], context_length: int, pad_id: int) -> Batch:
    """Examples packed in order into rows of context_length positions: inputs (R, T) and
    targets (R, 2, T), [:, 1] each position's example number in the row."""
    rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[]]
    used = 0
    for ex in examples:
        x, y = example_tensors(ex)
        if used + len(x) > context_length and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append((x, y))
        used += len(x)
    T = context_length
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (R, T)
    targets = torch.full((len(rows), 2, T), IGNORE_INDEX, dtype=torch.long)  # (R, 2, T)
    for r, row in enumerate(rows):
        at = 0
        for n, (x, y) in enumerate(row):
            inputs[r, at : at + len(x)] = x
            targets[r, 0, at : at + len(y)] = y
            targets[r, 1, at : at + len(x)] = n
            at += len(x)
        targets[r, 1, at:] = len(row)  # the padding: its own example, never scored
    return inputs, targets


def _stack_rows(rows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def collate_classes(examples: Sequence[ClassExample], pad_id: int) -> Batch:
    """Classification batch: inputs (B, L) padded with pad_id, targets (B, 2): the label and
    the last real token's position."""
    L = max(len(ex.ids) for ex in examples)
    inputs = torch.full((len(examples), L), pad_id, dtype=torch.long)  # (B, L)
    targets = torch.zeros((len(examples), 2), dtype=torch.long)  # (B, 2)
    for i, ex in enumerate(examples):
        inputs[i, : len(ex.ids)] = torch.tensor(ex.ids, dtype=torch.long)
        targets[i] = torch.tensor([ex.label, len(ex.ids) - 1])
    return inputs, targets


@dataclass
class ExampleLoader:
    """Batches of examples (or packed rows) in an order fixed by (seed, epoch), with the
    interface of data.TokenWindowLoader that the Trainer uses."""

    units: Sequence[Any]
    batch_size: int
    make_batch: Callable[[list[Any]], Batch]
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = True

    @property
    def num_windows(self) -> int:
        return len(self.units)

    def __len__(self) -> int:
        n, b = len(self.units), self.batch_size
        return n // b if self.drop_last else (n + b - 1) // b

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.units)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def batch(self, epoch: int, index: int) -> Batch:
        sel = self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        return self.make_batch([self.units[i] for i in sel])

    def __iter__(self):
        for i in range(len(self)):
            yield self.batch(0, i)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the order is a pure function of (seed, epoch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class FinetuneData:
    """Split, rendered finetuning examples: what the Trainer is given in place of a Corpus."""

    format: str  # instructions, chat or classification
    train: list[Any]  # Examples or ClassExamples
    val: list[Any]
    test: list[Any]
    tokenizer: Any
    fingerprint: str  # the records, the rendering and the tokenizer (a resume must match)
    pad_id: int
    context_length: int
    pack: bool = False
    labels: list[str] = field(default_factory=list)  # classification: names in head order
    truncated: int = 0  # examples cut to the context
    sample_ids: list[int] | None = None  # the first validation prompt (None: classification)

    @property
    def is_classifier(self) -> bool:
        return self.format == "classification"

    def sizes(self) -> dict[str, Any]:
        """The format, the tokens and records of each split, the examples truncated."""
        out: dict[str, Any] = {"format": self.format}
        for split in ("train", "val", "test"):
            examples = getattr(self, split)
            out[f"{split}_tokens"] = sum(len(ex.ids) for ex in examples)
            out[f"{split}_examples"] = len(examples)
        out["truncated"] = self.truncated
        return out

    def loader(self, split: str, batch_size: int, seed: int, train: bool = False) -> ExampleLoader:
        """The loader over one split; a training one shuffles and drops a partial batch."""
        items: list[Any] = getattr(self, split)
        if self.is_classifier:
            batch: Callable = partial(collate_classes, pad_id=self.pad_id)
        elif self.pack:
            inputs, targets = pack(items, self.context_length, self.pad_id)
            items = list(zip(inputs, targets, strict=True))
            batch = _stack_rows
        else:
            batch = partial(collate, pad_id=self.pad_id)
        return ExampleLoader(items, batch_size, batch, shuffle=train, seed=seed, drop_last=train)

    def loaders(self, batch_size: int, seed: int) -> tuple[ExampleLoader, ExampleLoader]:
        """(train, val) loaders for the Trainer."""
        train = self.loader("train", batch_size, seed, train=True)
        return train, self.loader("val", batch_size, seed)


def _fingerprint(settings: list[Any], splits: list[list[Any]]) -> str:
    """A hash of the settings and of every example's ids, mask and label, split by split."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for examples in splits:
        h.update(b"|split|")
        for ex in examples:
            h.update(np.asarray(ex.ids, dtype=np.int64).tobytes())
            extra = ex.learn if isinstance(ex, Example) else [ex.label]
            h.update(b"/" + np.asarray(extra, dtype=np.int64).tobytes() + b";")
    return h.hexdigest()[:16]


def split_records(
    records: list[tuple[str, dict[str, Any]]], val_ratio: float, test_ratio: float, seed: int
) -> tuple[list, list, list]:
    """(train, val, test) records: a permutation fixed by `seed`, cut by the ratios (at
    least one record when a ratio is above 0)."""
    n = len(records)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_ratio)) if test_ratio > 0 else 0
    n_val = max(1, round(n * val_ratio)) if val_ratio > 0 else 0
    if n - n_test - n_val < 1:
        raise GptlabError(
            f"{n} records leave none for training after the validation and test splits; "
            "give more records or lower --finetune.val_ratio / --finetune.test_ratio"
        )
    picked = [records[i] for i in perm]
    return picked[n_test + n_val :], picked[n_test : n_test + n_val], picked[:n_test]


def _labels_of(records) -> list[str]:
    seen = {str(_label(w, r)) for w, r in records}
    try:
        return sorted(seen, key=lambda s: (0, int(s), s))
    except ValueError:
        return sorted(seen)


def _label(where: str, r: dict[str, Any]) -> Any:
    if "label" not in r:
        raise GptlabError(
            f"{where}: missing field 'label'; each classification record needs text and label"
        )
    v = r["label"]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise GptlabError(f"{where}: 'label' must be a string or an integer, got {v!r}")
    return v


def load_finetune_data(
    fc: Any,
    train_source: str,
    tokenizer: Any,
    context_length: int,
    seed: int,
    chat_render: ChatRender | None = None,
    labels: list[str] | None = None,
) -> FinetuneData:
    """The finetuning data of the records in `train_source` for the FinetuneConfig `fc`, checked
    record by record; `labels` fixes the class names (else the training labels, sorted)."""
    records = read_records(train_source)
    fmt = fc.format
    if fmt == "auto":
        fmt = detect_format(records, FORMAT_FIELDS, "--finetune.format")
    splits = _splits(records, fc, seed)
    if fmt == "classification" and fc.pack:
        raise GptlabError(
            "finetune.pack packs instructions and chat records; a classifier scores each text "
            "on its own: drop --finetune.pack"
        )
    if fmt == "classification":
        labels = labels or _labels_of(splits[0])
        examples, truncated = _class_examples(splits, tokenizer, context_length, labels)
    else:
        labels = []
        examples, truncated = _text_examples(
            splits, fmt, fc.mask, tokenizer, context_length, chat_render
        )
    fingerprint = _fingerprint(
        [fmt, fc.mask, fc.pack, fc.template, context_length, tokenizer.identity(), labels], examples
    )
    return FinetuneData(
        fmt,
        *examples,
        tokenizer,
        fingerprint,
        tokenizer.eot_token,
        context_length,
        fc.pack,
        labels,
        truncated,
        _sample_prompt(fmt, splits[1][0], tokenizer, chat_render),
    )


def _splits(records: list[Record], fc: Any, seed: int) -> list[list[Record]]:
    """[train, val, test]: the finetune.val / .test files where given, else split by the ratios."""
    if fc.val or fc.test:
        val = read_records(fc.val) if fc.val else []
        test = read_records(fc.test) if fc.test else []
        train = records
        if not fc.val:
            train, val, _ = split_records(records, fc.val_ratio, 0.0, seed)
    else:
        train, val, test = split_records(records, fc.val_ratio, fc.test_ratio, seed)
    if not val:
        raise GptlabError(
            "no validation records; set --finetune.val FILE or a --finetune.val_ratio above 0"
        )
    return [train, val, test]


def _class_examples(
    splits: list[list[Record]], tokenizer: Any, context_length: int, labels: list[str]
) -> tuple[list[list[ClassExample]], int]:
    """Each split's records as ClassExamples (cut to the context), and how many were cut."""
    index = {name: i for i, name in enumerate(labels)}
    out, truncated = [], 0
    for recs in splits:
        exs = []
        for where, r in recs:
            text = _text_field(where, r, "text", "classification")
            name = str(_label(where, r))
            if name not in index:
                raise GptlabError(
                    f"{where}: label {name!r} is not among the training labels "
                    f"({', '.join(labels)}); fix the label or add training records with it"
                )
            ids = tokenizer.encode(text)
            if not ids:
                raise GptlabError(f"{where}: empty text; give each record some text")
            if len(ids) > context_length:
                ids, truncated = ids[:context_length], truncated + 1
            exs.append(ClassExample(ids, index[name], where))
        out.append(exs)
    if len(labels) < 2:
        raise GptlabError(
            f"the training records have {len(labels)} label(s) ({', '.join(labels)}); "
            "a classifier needs at least two"
        )
    return out, truncated


def _text_examples(
    splits: list[list[Record]],
    fmt: str,
    mask: str,
    tokenizer: Any,
    context_length: int,
    chat_render: ChatRender | None,
) -> tuple[list[list[Example]], int]:
    """Each split's records as Examples (cut to the context), and how many were cut."""
    out, truncated = [], 0
    for recs in splits:
        exs = []
        for where, r in recs:
            if fmt == "chat":
                ids, learn = _render_chat(where, r, mask, chat_render)
            else:
                _text_field(where, r, "instruction", fmt)
                _text_field(where, r, "input", fmt, optional=True)
                if not _text_field(where, r, "output", fmt).strip():
                    raise GptlabError(
                        f"{where}: empty 'output': nothing to learn; write the response "
                        "or drop the record"
                    )
                ids, learn = render_instruction(r, tokenizer, mask)
            ids, learn, cut = truncate(ids, learn, context_length, where)
            truncated += cut
            exs.append(Example(ids, learn, where))
        out.append(exs)
    return out, truncated


def _render_chat(
    where: str, r: dict[str, Any], mask: str, chat_render: ChatRender | None
) -> tuple[list[int], list[bool]]:
    msgs = check_messages(where, r)
    if chat_render is None:
        raise GptlabError(
            "the chat format needs a chat template (gptlab.data.chat); set --finetune.template"
        )
    ids, learn = chat_render(msgs, False)
    if mask == "padding":
        learn = [True] * len(ids)
    return ids, learn


def _sample_prompt(
    fmt: str, first_val: Record, tokenizer: Any, chat_render: ChatRender | None
) -> list[int] | None:
    """The ids of the first validation record's prompt, which the run's samples answer
    (None: a classifier, or a chat whose last assistant turn comes first)."""
    if fmt == "instructions":
        return tokenizer.encode(instruction_prompt(first_val[1]))
    if fmt == "chat":
        msgs = check_messages(*first_val)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return chat_render(msgs[:last], True)[0] if last else None
    return None
