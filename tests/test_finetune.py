"""Finetuning: the book's chapter-7 collate and masking, its chapter-6 classifier, packing,
bad input, and `gptlab finetune` runs (from a gptlab run and a Hugging Face folder, resumed
after kill -9, under torchrun).

The book's code is written out plainly below (the `book_*` functions), from its chapters 6
and 7 and exercise 7.2, as the yardstick for gptlab.finetune.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlab import cli
from gptlab import checkpoint as ckpt_lib
from gptlab.config import FinetuneConfig, ModelConfig
from gptlab.finetune import (
    IGNORE_INDEX,
    ClassExample,
    Example,
    classification_accuracy,
    classification_loss,
    collate,
    collate_classes,
    example_tensors,
    lm_loss,
    load_finetune_data,
    pack,
    render_instruction,
    set_trainable,
    truncate,
)
from gptlab.model import GPTModel
from gptlab.tokenizer import GPT2Tokenizer
from conftest import jitter
from reference_walkthrough import RefGPTModel

DATA = Path(__file__).parent / "data" / "finetune"


def _records(name: str, n: int | None = None) -> list[dict]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


# --------------------------------------------------------------------------- the book, plainly


def book_format_input(entry):
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def book_encode(entries, tokenizer):
    """InstructionDataset: the whole text encoded at once; and exercise 7.2's instruction
    lengths (the prompt without the response header)."""
    encoded, instruction_lengths = [], []
    for entry in entries:
        instruction_plus_input = book_format_input(entry)
        response_text = f"\n\n### Response:\n{entry['output']}"
        encoded.append(tokenizer.encode(instruction_plus_input + response_text))
        instruction_lengths.append(len(tokenizer.encode(instruction_plus_input)))
    return encoded, instruction_lengths


def book_custom_collate_fn(
    batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, instruction_lengths=None
):
    """Chapter 7's custom_collate_fn; with `instruction_lengths`, exercise 7.2's variant that
    also masks the instruction."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for n, item in enumerate(batch):
        new_item = item.copy()
        new_item += [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if instruction_lengths is not None:
            targets[: instruction_lengths[n] - 1] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


def book_calc_loss_batch_classifier(input_batch, target_batch, model):
    logits = model(input_batch)[:, -1, :]  # logits of the last output token
    return F.cross_entropy(logits, target_batch)


def book_calc_accuracy(input_batch, target_batch, model):
    with torch.no_grad():
        logits = model(input_batch)[:, -1, :]
    predicted_labels = torch.argmax(logits, dim=-1)
    return (predicted_labels == target_batch).sum().item() / len(target_batch)


def book_pad_texts(encoded, max_length, pad_token_id=50256):
    """SpamDataset: every text truncated to, then padded to, max_length."""
    return [e[:max_length] + [pad_token_id] * (max_length - len(e[:max_length])) for e in encoded]


# --------------------------------------------------------------------------- chapter 7


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


def _examples(entries, tokenizer, mask):
    return [Example(*render_instruction(e, tokenizer, mask)) for e in entries]


def test_rendering_is_the_books_text_token_for_token(gpt2):
    entries = _records("instructions.jsonl", 60)
    book, _ = book_encode(entries, gpt2)
    for entry, ex, want in zip(entries, _examples(entries, gpt2, "padding"), book, strict=True):
        assert ex.ids == want + [50256], entry  # the collate's appended end-of-text is ours


@pytest.mark.parametrize("size", [1, 3, 8])
def test_collate_with_padding_masked_is_the_books_custom_collate_fn(gpt2, size):
    entries = _records("instructions.jsonl", 24)
    book, _ = book_encode(entries, gpt2)
    exs = _examples(entries, gpt2, "padding")
    for start in range(0, len(entries), size):
        x, y = collate(exs[start : start + size], pad_id=50256)
        bx, by = book_custom_collate_fn(book[start : start + size])
        assert torch.equal(x, bx) and torch.equal(y, by)


def test_collate_with_the_instruction_masked_is_the_books_exercise(gpt2):
    entries = _records("instructions.jsonl", 16)
    book, lengths = book_encode(entries, gpt2)
    exs = _examples(entries, gpt2, "instruction")
    for start in range(0, 16, 4):
        x, y = collate(exs[start : start + 4], pad_id=50256)
        bx, by = book_custom_collate_fn(
            book[start : start + 4], instruction_lengths=lengths[start : start + 4]
        )
        assert torch.equal(x, bx) and torch.equal(y, by)


def test_response_masking_learns_only_the_output_and_its_end(gpt2):
    entries = _records("instructions.jsonl", 16)
    book, _ = book_encode(entries, gpt2)
    # The exercise's variant with the response header counted as instruction too.
    lengths = [len(gpt2.encode(book_format_input(e) + "\n\n### Response:\n")) for e in entries]
    x, y = collate(_examples(entries, gpt2, "response"), pad_id=50256)
    bx, by = book_custom_collate_fn(book, instruction_lengths=lengths)
    assert torch.equal(x, bx) and torch.equal(y, by)
    for row, entry in zip(y, entries, strict=True):
        learned = row[row != IGNORE_INDEX].tolist()
        assert gpt2.decode(learned) == entry["output"] + "<|endoftext|>"


def test_truncation_is_the_books_allowed_max_length(gpt2):
    entries = [e for e in _records("instructions.jsonl", 40) if e["input"]][:8]
    book, _ = book_encode(entries, gpt2)
    T = max(len(b) for b in book) - 3  # the longest lose their last tokens
    exs = []
    for e in _examples(entries, gpt2, "padding"):
        ids, learn, _ = truncate(e.ids, e.learn, T, "test")
        exs.append(Example(ids, learn))
    x, y = collate(exs, pad_id=50256)
    bx, by = book_custom_collate_fn(book, allowed_max_length=T)
    assert torch.equal(x, bx) and torch.equal(y, by)


def test_an_example_with_no_response_left_in_the_context_is_refused():
    ids, learn = list(range(10)), [False] * 8 + [True] * 2
    assert truncate(ids, learn, 8, "f:1")[2] is True  # one learned token survives
    with pytest.raises(Exception, match=r"f:1: the example is longer than the context \(7"):
        truncate(ids, learn, 7, "f:1")


# --------------------------------------------------------------------------- padded = packed = alone


def _random_examples(n: int, vocab: int, T: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, T // 2)
        ids = [rng.randrange(vocab - 1) for _ in range(length)] + [vocab - 1]
        split = rng.randint(1, length - 1)
        out.append(Example(ids, [False] * split + [True] * (length + 1 - split)))
    return out


def _alone(model, exs) -> tuple[float, int]:
    """Sum of the learned tokens' losses, one example at a time, and their count."""
    total, count = 0.0, 0
    for ex in exs:
        x, y = example_tensors(ex)
        n = int((y != IGNORE_INDEX).sum())
        total += lm_loss(model, x[None], y[None]).item() * n
        count += n
    return total, count


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"attention": "manual"},
        {"positions": "rope", "norm": "rmsnorm", "qk_norm": True, "n_kv_heads": 1},
    ],
    ids=["sdpa-learned", "manual", "rope-gqa"],
)
def test_padded_and_packed_batches_give_the_one_at_a_time_loss(options):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50, context_length=24, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0,
        **options,
    )  # fmt: skip
    model = jitter(GPTModel(cfg), 0.3).eval()
    exs = _random_examples(9, cfg.vocab_size, cfg.context_length)
    total, count = _alone(model, exs)
    with torch.no_grad():
        padded = lm_loss(model, *collate(exs, pad_id=0)).item()
        x, y = pack(exs, cfg.context_length, pad_id=0)
        assert len(x) < len(exs)  # several examples share a row
        packed = lm_loss(model, x, y).item()
    assert padded == pytest.approx(total / count, abs=1e-6, rel=0)
    assert packed == pytest.approx(total / count, abs=1e-6, rel=0)


def test_a_packed_example_sees_only_itself():
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=40, context_length=20, emb_dim=16, n_heads=2, n_layers=2)
    model = jitter(GPTModel(cfg), 0.3).eval()
    exs = _random_examples(5, cfg.vocab_size, cfg.context_length, seed=3)
    x, y = pack(exs, cfg.context_length, pad_id=0)
    with torch.no_grad():
        logits = model(x, doc_ids=y[:, 1])  # (R, T, V)
        row, at, n = 0, 0, 0
        for ex in exs:
            alone = model(example_tensors(ex)[0][None])[0]  # (L, V)
            if int(y[row, 1, at]) != n or at + len(alone) > cfg.context_length:
                row, at, n = row + 1, 0, 0
            torch.testing.assert_close(logits[row, at : at + len(alone)], alone, atol=1e-5, rtol=0)
            at, n = at + len(alone), n + 1
    # without doc_ids the model is unchanged: one example in a row is the plain forward
    one = torch.arange(10)[None]
    torch.testing.assert_close(model(one, doc_ids=torch.zeros_like(one)), model(one), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- chapter 6


BOOK_CFG = {
    "vocab_size": 50257, "context_length": 64, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
    "drop_rate": 0.0, "qkv_bias": True,
}  # fmt: skip


@pytest.fixture(scope="module")
def classifiers():
    """The book's model with its classification head, and ours loaded with its weights."""
    torch.manual_seed(123)
    book = jitter(RefGPTModel(BOOK_CFG), 0.05)
    torch.manual_seed(123)
    book.out_head = torch.nn.Linear(BOOK_CFG["emb_dim"], 2)  # the book's replacement head
    ours = GPTModel(ModelConfig(**BOOK_CFG, num_classes=2))
    ours.load_state_dict(book.state_dict())
    return book.eval(), ours.eval()


def _texts(gpt2, n: int = 12):
    recs = _records("classification.jsonl", n)
    labels = torch.tensor([int(r["label"] == "good") for r in recs])
    return [gpt2.encode(r["text"]) for r in recs], labels


def test_classifier_loss_and_accuracy_are_the_books_on_its_padded_batches(classifiers, gpt2):
    book, ours = classifiers
    encoded, labels = _texts(gpt2)
    L = max(len(e) for e in encoded)
    x = torch.tensor(book_pad_texts(encoded, L))  # (B, L), padded as SpamDataset pads
    last = torch.full_like(labels, L - 1)  # the book's position -1
    targets = torch.stack([labels, last], dim=1)
    with torch.no_grad():
        want = book_calc_loss_batch_classifier(x, labels, book).item()
        got = classification_loss(ours, x, targets).item()
    assert got == pytest.approx(want, abs=1e-6, rel=0)

    class OneBatch:
        def __len__(self):
            return 1

        def batch(self, epoch, index):
            return x, targets

    assert classification_accuracy(ours, OneBatch(), "cpu") == book_calc_accuracy(x, labels, book)


def test_classifier_on_our_batches_scores_each_text_as_if_alone(classifiers, gpt2):
    book, ours = classifiers
    encoded, labels = _texts(gpt2)
    exs = [ClassExample(e, int(t)) for e, t in zip(encoded, labels, strict=True)]
    with torch.no_grad():
        alone = torch.stack(  # the book's loss on each text, no padding at all
            [book(torch.tensor([e]))[0, -1] for e in encoded]
        )  # (B, 2)
        got = classification_loss(ours, *collate_classes(exs, pad_id=50256)).item()
    assert got == pytest.approx(F.cross_entropy(alone, labels).item(), abs=1e-6, rel=0)


def test_trainable_parameters_are_the_books_last_block_final_norm_and_head(classifiers):
    book, ours = classifiers
    for p in book.parameters():  # the book's recipe, spelled out
        p.requires_grad = False
    for module in (book.trf_blocks[-1], book.final_norm, book.out_head):
        for p in module.parameters():
            p.requires_grad = True
    set_trainable(ours, 1)
    want = {n for n, p in book.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == want
    set_trainable(ours, -1)  # leaves everything as it was
    assert not all(p.requires_grad for p in ours.parameters())
    for p in ours.parameters():
        p.requires_grad_(True)


def test_classification_splits_and_labels(gpt2):
    fc = FinetuneConfig(format="auto", val_ratio=0.1, test_ratio=0.1)
    data = load_finetune_data(fc, str(DATA / "classification.jsonl"), gpt2, 64, seed=1)
    assert data.format == "classification" and data.labels == ["bad", "good"]
    assert (len(data.train), len(data.val), len(data.test)) == (160, 20, 20)
    x, y = data.loader("val", 8, 1).batch(0, 0)
    assert x.shape[0] == 8 and y.shape == (8, 2)
    assert all(x[i, y[i, 1] + 1 :].eq(50256).all() for i in range(8))  # padding after the last token
