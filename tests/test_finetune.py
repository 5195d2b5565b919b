"""Finetuning: the book's chapter-7 collate and masking, its chapter-6 classifier, packing,
bad input, and `gptlab finetune` runs (from a gptlab run and a Hugging Face folder, resumed
after kill -9, under torchrun).

The book's code is written out plainly below (the `book_*` functions), from its chapters 6
and 7 and exercise 7.2, as the yardstick for gptlab.finetune.data and .objectives.
"""

from __future__ import annotations

import copy
import json
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tolerances
import torch
import torch.nn.functional as F
from conftest import jitter
from reference_walkthrough import RefGPTModel

from gptlab.cli import main as cli
from gptlab.config.schema import FinetuneConfig, ModelConfig
from gptlab.data.tokenizer import GPT2Tokenizer
from gptlab.finetune.data import (
    IGNORE_INDEX,
    ClassExample,
    Example,
    collate,
    collate_classes,
    example_tensors,
    load_finetune_data,
    pack,
    render_instruction,
    truncate,
)
from gptlab.finetune.objectives import (
    classification_accuracy,
    classification_loss,
    lm_loss,
    set_trainable,
)
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.model.gpt import GPTModel

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


def test_the_head_on_learned_rows_only_gives_the_full_logits_loss_and_gradients():
    """lm_loss runs a bare model's head on the learned positions only: the same loss and
    the same gradients as the full (B, T, V) logits with ignore_index (a wrapped model's
    path), padded vocabulary and soft cap included."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50, context_length=24, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0,
        vocab_multiple=64, logit_softcap=5.0,
    )  # fmt: skip
    model = jitter(GPTModel(cfg), 0.3)
    x, y = collate(_random_examples(6, cfg.vocab_size, cfg.context_length), pad_id=0)
    assert (y == IGNORE_INDEX).any()
    losses, grads = [], []
    exact_model = copy.deepcopy(model).double()  # how far fp32 rounding alone goes
    for m, full in ((model, False), (model, True), (exact_model, True)):
        m.zero_grad()
        if full:
            logits = m(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
        else:
            loss = lm_loss(m, x, y)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    # the learned rows' head is a smaller matmul than the full one: other roundings
    tolerances.assert_close_to_rounding(*losses)
    tolerances.assert_close_to_rounding(*grads)


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
    with torch.no_grad():
        total, count = _alone(model, exs)
        exact, _ = _alone(copy.deepcopy(model).double(), exs)  # fp32's rounding, measured
        padded = lm_loss(model, *collate(exs, pad_id=0))
        x, y = pack(exs, cfg.context_length, pad_id=0)
        assert len(x) < len(exs)  # several examples share a row
        packed = lm_loss(model, x, y)
    # one example alone, padded beside others, or packed with them: other matmul shapes
    alone, exact = torch.tensor(total / count), torch.tensor(exact / count, dtype=torch.float64)
    tolerances.assert_close_to_rounding(padded, alone, exact)
    tolerances.assert_close_to_rounding(packed, alone, exact)


def test_a_packed_example_sees_only_itself():
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=40, context_length=20, emb_dim=16, n_heads=2, n_layers=2)
    model = jitter(GPTModel(cfg), 0.3).eval()
    exs = _random_examples(5, cfg.vocab_size, cfg.context_length, seed=3)
    x, y = pack(exs, cfg.context_length, pad_id=0)
    exact_model = copy.deepcopy(model).double()  # how far fp32 rounding alone goes
    with torch.no_grad():
        logits = model(x, doc_ids=y[:, 1])  # (R, T, V)
        row, at, n = 0, 0, 0
        for ex in exs:
            ids = example_tensors(ex)[0][None]
            alone, exact = model(ids)[0], exact_model(ids)[0]  # (L, V)
            if int(y[row, 1, at]) != n or at + len(alone) > cfg.context_length:
                row, at, n = row + 1, 0, 0
            # a row of several examples runs a masked attention over a longer sequence
            tolerances.assert_close_to_rounding(logits[row, at : at + len(alone)], alone, exact)
            at, n = at + len(alone), n + 1
        # without doc_ids the model is unchanged: one example in a row is the plain forward
        one = torch.arange(10)[None]
        tolerances.assert_close_to_rounding(
            model(one, doc_ids=torch.zeros_like(one)), model(one), exact_model(one)
        )


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
    assert all(
        x[i, y[i, 1] + 1 :].eq(50256).all() for i in range(8)
    )  # padding after the last token


# --------------------------------------------------------------------------- gptlab finetune runs

from run_helpers import (  # noqa: E402
    CHILD_ENV,
    losses_by_step,
    records,
    release,
    run_cli,
    wait_for_gate,
    weights,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained run (a 400-id BPE, context 256) on text made from the records."""
    root = tmp_path_factory.mktemp("finetune")
    parts = ["Below is an instruction that describes a task. Write a response that appropriately "
             "completes the request.\n\n### Instruction:\n### Input:\n### Response:\n"]  # fmt: skip
    for r in _records("instructions.jsonl"):
        parts.append(f"{r['instruction']}\n{r['input']}\n{r['output']}")
    parts += [r["text"] for r in _records("classification.jsonl")]
    (root / "base.txt").write_text("\n\n".join(parts), encoding="utf-8")
    out = root / "base"
    flags = ["train", "--data", str(root / "base.txt"), "--preset", "tiny", "--out", str(out),
             "--max-steps", "4", "--data.tokenizer", "bpe:400", "--model.context_length", "256",
             *COMMON]  # fmt: skip
    assert cli.main(flags) == 0
    return out


COMMON = ["--device", "cpu", "--compile", "off", "--precision", "fp32", "--quiet"]


def _finetune(base_run: Path, data: str, out: Path, *more: str) -> list[str]:
    return ["finetune", "--init-from", str(base_run), "--data", str(DATA / data),
            "--out", str(out), *COMMON, *more]  # fmt: skip


def _eval_json(run: Path, capsys, *more: str) -> dict:
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(run), "--json", *more]) == 0
    return json.loads(capsys.readouterr().out)


INSTRUCT = ("--max-steps", "8", "--train.lr", "2e-3", "--train.eval_freq", "4",
            "--train.eval_iter", "10", "--train.log_every", "1")  # fmt: skip


@pytest.fixture(scope="module")
def instruct_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("instruct") / "run"
    assert cli.main(_finetune(base, "instructions.jsonl", out, *INSTRUCT)) == 0
    return out


def test_an_instructions_finetune_is_a_normal_run_and_eval_reports_its_masked_loss(
    instruct_run, capsys
):
    cfg = json.loads((instruct_run / "config.json").read_text())
    assert cfg["finetune"]["format"] == "instructions" and cfg["train"]["lr"] == 2e-3
    assert cfg["model"]["context_length"] == 256  # the base model's
    evals = records(instruct_run, "eval")
    assert [e["step"] for e in evals] == [1, 5, 8]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.1  # it learns
    assert (instruct_run / "loss-plot.png").is_file()
    ckpt_lib.load_state(ckpt_lib.latest_checkpoint(instruct_run))  # resumable
    sample = records(instruct_run, "sample")[-1]["text"]
    assert sample.startswith("Below is an instruction") and "### Response:\n" in sample
    # gptlab eval: the same masked validation loss as the run's last evaluation (all of
    # the 30 validation records fit in its eval_iter batches)
    r = _eval_json(instruct_run, capsys)
    assert r["format"] == "instructions" and r["examples"] == 30
    assert r["loss"] == pytest.approx(evals[-1]["val_loss"], abs=1e-6)


def test_finetune_from_a_hugging_face_folder_starts_from_the_same_weights(
    base, instruct_run, tmp_path
):
    hf_dir = tmp_path / "hf"
    assert cli.main(["convert", "to-hf", str(base), str(hf_dir)]) == 0
    out = tmp_path / "run"
    assert cli.main(_finetune(hf_dir, "instructions.jsonl", out, *INSTRUCT)) == 0
    # Step 1's loss is the first batch's under the starting weights: the same model. (Later
    # steps differ a little: GPT-2's format adds q/k/v biases, zero here, that then train.)
    assert losses_by_step(out)[1] == pytest.approx(losses_by_step(instruct_run)[1], abs=1e-5)
    assert json.loads((out / "config.json").read_text())["model"]["qkv_bias"] is True


def test_a_packed_finetune_trains_and_evaluates_on_the_same_tokens(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(_finetune(base, "instructions.jsonl", out, *INSTRUCT, "--finetune.pack", "true"))
        == 0
    )
    evals = records(out, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    start = records(out, "start")[0]
    assert start["steps_per_epoch"] < 240 // 8  # rows hold several examples
    assert _eval_json(out, capsys)["loss"] == pytest.approx(evals[-1]["val_loss"], abs=1e-6)


def test_a_classifier_trains_its_top_block_and_reports_accuracy_on_three_splits(
    base, tmp_path, capsys
):
    out = tmp_path / "run"
    flags = ["--epochs", "2", "--train.lr", "2e-3", "--finetune.train_blocks", "1"]
    assert cli.main(_finetune(base, "classification.jsonl", out, *flags)) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["num_classes"] == 2 and json.loads(cfg["finetune"]["labels"]) == [
        "bad",
        "good",
    ]
    acc = records(out, "accuracy")[0]
    assert set(acc) >= {"train_acc", "val_acc", "test_acc"}
    assert all(0 <= acc[k] <= 1 for k in ("train_acc", "val_acc", "test_acc"))
    evals = records(out, "eval")
    assert "val_acc" in evals[-1] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    # only the top block, the final norm and the new head moved
    before = weights(ckpt_lib.latest_checkpoint(base))
    after = weights(ckpt_lib.latest_checkpoint(out))
    assert after["out_head.weight"].shape == (2, 32) and "out_head.bias" in after
    for k, v in after.items():
        if k.startswith("out_head."):
            continue
        start = before.get(k, before["out_head.weight"])  # the base ties tok_emb to its head
        moved = not torch.equal(v, start)
        assert moved == k.startswith(("trf_blocks.1.", "final_norm.")), k
    r = _eval_json(out, capsys, "--split", "test")
    assert r["accuracy"] == pytest.approx(acc["test_acc"])


# --------------------------------------------------------------------------- bad input


def _write(path: Path, recs: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


GOOD_INSTR = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(20)]
GOOD_CLS = [{"text": f"text {i}", "label": ["a", "b"][i % 2]} for i in range(20)]


@pytest.mark.parametrize(
    "recs, extra, message",
    [
        ([*GOOD_INSTR, {"instruction": "x", "input": ""}], (),
         r"data.jsonl:21: missing field 'output'; each instructions record needs instruction and output"),
        ([*GOOD_INSTR, {"instruction": "x", "output": "  "}], (), r"data.jsonl:21: empty 'output'"),
        ([*GOOD_INSTR, {"instruction": "x " * 400, "output": "y"}], (),
         r"data.jsonl:21: the example is longer than the context \(256 tokens\) and no response"),
        ([{"messages": [{"role": "robot", "content": "hi"}]}] * 5, (),
         r"data.jsonl:\d: message 0 has role 'robot'; roles are system, user, assistant"),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}] * 5, (),
         r"data.jsonl:\d: no assistant turn with content"),
        ([*GOOD_CLS[:-1], {"text": "t"}], ("--finetune.format", "classification"),
         r"data.jsonl:20: missing field 'label'"),
        (GOOD_CLS, ("--finetune.val", "VAL"), r"val.jsonl:1: label 'c' is not among the training labels \(a, b\)"),
        (GOOD_INSTR, ("--finetune.mask", "everything"), r"finetune.mask must be one of response, instruction, padding"),
        ([{"prompt": "x"}], (), r"cannot tell the format from its fields \['prompt'\]"),
        (["not an object"], (), r"data.jsonl:1: a record must be a JSON object"),
        (GOOD_CLS, ("--finetune.pack", "true"), r"a classifier scores each text on its own"),
        (GOOD_INSTR, ("--finetune.template", "gptlab-chat"),
         r"finetune.template 'gptlab-chat' is for chat records, but these are instructions"),
    ],
    ids=["missing", "empty-response", "too-long", "role", "empty-assistant", "no-label",
         "unseen-label", "bad-option", "unknown-format", "not-object", "pack-classes",
         "template-for-instructions"],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    base, tmp_path, capsys, recs, extra, message
):
    data = _write(tmp_path / "data.jsonl", recs)
    _write(tmp_path / "val.jsonl", [{"text": "odd", "label": "c"}])
    extra = [str(tmp_path / "val.jsonl") if e == "VAL" else e for e in extra]
    out = tmp_path / "run"
    flags = [
        "finetune",
        "--init-from",
        str(base),
        "--data",
        str(data),
        "--out",
        str(out),
        *COMMON,
        *extra,
    ]
    capsys.readouterr()
    assert cli.main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gptlab: error: "), err
    assert re.search(message, err), err
    assert not out.exists()


def test_finetune_needs_a_base_model_and_records(base, tmp_path, capsys):
    assert (
        cli.main(
            ["finetune", "--data", str(DATA / "instructions.jsonl"), "--out", str(tmp_path / "r")]
        )
        == 2
    )
    assert "needs --init-from SRC" in capsys.readouterr().err
    assert cli.main(["finetune", "--init-from", str(base), "--out", str(tmp_path / "r")]) == 2
    assert "needs --data FILE.jsonl" in capsys.readouterr().err
    missing = tmp_path / "nope.jsonl"
    assert (
        cli.main(
            [
                "finetune",
                "--init-from",
                str(base),
                "--data",
                str(missing),
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert cli.main(["finetune", "--preset", "cpu", "--init-from", str(base), "--data", "x"]) == 2
    assert "drop --preset" in capsys.readouterr().err


def test_a_finished_run_is_not_overwritten(instruct_run, base, capsys):
    before = (instruct_run / "metrics.jsonl").read_bytes()
    assert cli.main(_finetune(base, "instructions.jsonl", instruct_run, *INSTRUCT)) == 2
    assert "add --resume" in capsys.readouterr().err
    assert (instruct_run / "metrics.jsonl").read_bytes() == before


# --------------------------------------------------------------------------- exact resume

# The child finetunes through the real CLI and pauses at the N-th call of the finetuning
# loss (training steps and evaluations alike), so the parent can kill it mid-run.
GATED_FINETUNE = """
import sys
from gptlab.cli import main as cli
from gptlab.finetune import objectives

n, calls, real = int(sys.argv[1]), [0], objectives.lm_loss

def gated(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        print("gate: paused", flush=True)
        sys.stdin.readline()
    return real(*args, **kwargs)

objectives.lm_loss = gated
sys.exit(cli.main(sys.argv[2:]))
"""

RESUME = ("--max-steps", "10", "--train.lr", "2e-3", "--train.eval_freq", "3",
          "--train.log_every", "1", "--model.drop_rate", "0.1", "--checkpoint-every", "3")  # fmt: skip


def test_finetune_killed_then_resumed_is_bit_identical_to_uninterrupted(base, tmp_path):
    ref = tmp_path / "ref"
    done = run_cli(_finetune(base, "instructions.jsonl", ref, *RESUME))
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "run"
    n = random.randint(12, 30)  # a call after the first checkpoint (step 3) and before the end
    proc = subprocess.Popen(
        [sys.executable, "-c", GATED_FINETUNE, str(n), *_finetune(base, "instructions.jsonl", run, *RESUME)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=CHILD_ENV,
    )  # fmt: skip
    try:
        wait_for_gate(proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            release(proc)
    assert proc.returncode == -signal.SIGKILL
    assert max(losses_by_step(run)) < 10
    done = run_cli(["finetune", "--out", str(run), "--resume"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert losses_by_step(run) == losses_by_step(ref)
    assert losses_by_step(run, "eval", "val_loss") == losses_by_step(ref, "eval", "val_loss")
    a, b = weights(ckpt_lib.latest_checkpoint(run)), weights(ckpt_lib.latest_checkpoint(ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- torchrun


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_finetune_is_the_one_process_run(base, tmp_path, mode):
    flags = ("--max-steps", "4", "--train.lr", "2e-3", "--train.eval_freq", "2",
             "--train.eval_iter", "3", "--train.log_every", "1",
             "--train.batch_size", "4", "--train.batch_tokens", str(2 * 4 * 256))  # fmt: skip
    ref = tmp_path / "ref"
    assert cli.main(_finetune(base, "instructions.jsonl", ref, *flags)) == 0
    out = tmp_path / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    res = subprocess.run(
        [*cmd, "-m", "gptlab", *_finetune(base, "instructions.jsonl", out, *flags, "--parallel", mode)],
        env=CHILD_ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    got, want = losses_by_step(out), losses_by_step(ref)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    # the ranks' gradients are summed in another order: rounding that AdamW carries into
    # the weights, 4 steps at lr 2e-3 (tolerances.py)
    tol = tolerances.adamw_weights(2e-3, 4)
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=tol)
    for a, b in zip(records(out, "eval"), records(ref, "eval"), strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=tol)
    assert records(out, "start")[0]["world_size"] == 2


# --------------------------------------------------------------------------- chat


def test_chat_records_learn_only_the_assistant_turns_and_their_end(gpt2):
    from gptlab.data import chat
    from gptlab.data.tokenizer import WithSpecialTokens

    tok = WithSpecialTokens(gpt2, list(chat.DEFAULT.special_tokens))

    def render(messages, add_generation_prompt):
        return chat.render(chat.DEFAULT, tok, messages, add_generation_prompt)

    fc = FinetuneConfig(format="auto", test_ratio=0.0)
    data = load_finetune_data(fc, str(DATA / "chat.jsonl"), tok, 128, seed=0, chat_render=render)
    assert data.format == "chat" and len(data.val) == 30
    by_where = {f"{DATA / 'chat.jsonl'}:{i + 1}": json.loads(line) for i, line in
                enumerate((DATA / "chat.jsonl").read_text().splitlines())}  # fmt: skip
    for ex in data.train[:40]:
        x, y = example_tensors(ex)
        learned = tok.decode(y[y != IGNORE_INDEX].tolist())
        replies = [m["content"] for m in by_where[ex.where]["messages"] if m["role"] == "assistant"]
        assert learned == "".join(r + "<|end|>" for r in replies)
    # the run's samples answer the first validation conversation
    assert tok.decode(data.sample_ids).endswith("<|assistant|>")


CHAT = ("--train.lr", "2e-3", "--train.eval_freq", "3", "--train.eval_iter", "10",
        "--train.log_every", "1", "--checkpoint-every", "3")  # fmt: skip


def test_a_chat_finetune_grows_the_vocabulary_saves_its_template_and_resumes(
    base, tmp_path, capsys
):
    ref = tmp_path / "ref"
    assert cli.main(_finetune(base, "chat.jsonl", ref, *CHAT, "--max-steps", "6")) == 0
    base_vocab = json.loads((base / "config.json").read_text())["model"]["vocab_size"]
    cfg = json.loads((ref / "config.json").read_text())
    assert cfg["finetune"]["format"] == "chat"
    assert cfg["model"]["vocab_size"] == base_vocab + 4  # <|system|> <|user|> <|assistant|> <|end|>
    assert (ref / "chat_template.json").is_file()
    assert records(ref, "sample")[-1]["text"].startswith("<|endoftext|><|")
    r = _eval_json(ref, capsys)
    assert r["format"] == "chat" and r["loss"] == pytest.approx(
        records(ref, "eval")[-1]["val_loss"], abs=1e-6
    )
    # stopped after step 3, then resumed to step 6: the uninterrupted run
    run = tmp_path / "run"
    assert cli.main(_finetune(base, "chat.jsonl", run, *CHAT, "--max-steps", "3")) == 0
    assert cli.main(["finetune", "--out", str(run), "--resume", "--max-steps", "6", "--quiet"]) == 0
    assert losses_by_step(run) == losses_by_step(ref)
    a, b = weights(ckpt_lib.latest_checkpoint(run)), weights(ckpt_lib.latest_checkpoint(ref))
    assert all(torch.equal(a[k], b[k]) for k in b)


# --------------------------------------------------------------------------- instructions chat


@pytest.fixture(scope="module")
def alpaca_run(base, tmp_path_factory):
    """An instructions finetune trained long enough (150 steps, ~2 s) that greedy replies
    end at the <|endoftext|> it learned after each output."""
    out = tmp_path_factory.mktemp("alpaca") / "run"
    flags = ("--max-steps", "150", "--train.lr", "3e-3", "--train.eval_freq", "150")
    assert cli.main(_finetune(base, "instructions.jsonl", out, *flags)) == 0
    return out


def _greedy(model, ids: list[int], n: int, end: int) -> tuple[list[int], bool]:
    """Plain greedy decoding, no cache: the ids before `end`, and whether it came."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == end:
                return out, True
            out.append(nxt)
    return out, False


def test_an_instructions_run_chats_in_its_alpaca_prompt_everywhere(alpaca_run, tmp_path, capsys):
    """generate --chat, serve's /v1/chat/completions and the exported folder's
    apply_chat_template + generate all answer with the greedy tokens of the book's prompt
    written out plainly, ending at <|endoftext|>; a second turn follows the first
    exchange rendered whole (chat.InstructionTemplate's rule for earlier turns)."""
    pytest.importorskip("starlette")
    openai = pytest.importorskip("openai")
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptlab.data import chat
    from gptlab.finetune.data import instruction_prompt
    from gptlab.infer.serve import ServerThread, build
    from gptlab.interop.runs import open_run

    saved = json.loads((alpaca_run / "chat_template.json").read_text())
    assert saved["template"]["kind"] == "instruction"
    run = open_run(alpaca_run, "cpu")
    assert run.chat_template == chat.ALPACA
    tok, end = run.tokenizer, run.tokenizer.eot_token
    first, second = "Write the word backwards.", "Add the two numbers: 34 and 17"
    ids = tok.encode(instruction_prompt({"instruction": first}))
    want, ended = _greedy(run.model, ids, 60, end)
    assert ended and want  # the reply stops where the finetune taught it to
    text = tok.decode(want)
    history = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": text},
        {"role": "user", "content": second},
    ]
    ids2, _ = chat.render(chat.ALPACA, tok, history, add_generation_prompt=True)
    room = run.config.model.context_length + 1 - len(ids2)  # as generate --chat caps it
    assert room > 10
    want2, _ = _greedy(run.model, ids2, min(60, room), end)

    capsys.readouterr()
    flags = ["--temperature", "0", "--max-new-tokens", "60", "--device", "cpu"]
    chat_cmd = ["generate", "--chat", "--checkpoint", str(alpaca_run), *flags]
    assert cli.main([*chat_cmd, "--prompt", first, "--prompt", second]) == 0
    assert capsys.readouterr().out == f"{text}\n{tok.decode(want2)}\n"

    app, engine = build(run, max_batch=2)
    try:
        with ServerThread(app) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
            r = client.chat.completions.create(
                model="m", messages=history[:1], max_tokens=60, temperature=0
            )
            with pytest.raises(openai.BadRequestError, match="but 'user' comes next"):
                client.chat.completions.create(model="m", messages=history[1:2], max_tokens=4)
            info = client.get("/run", cast_to=object)  # what the page reads: a chat is offered
    finally:
        engine.close()
    assert info["chat_template"] == chat.ALPACA.to_dict()
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want) + 1

    assert cli.main(["convert", "to-hf", str(alpaca_run), str(tmp_path / "hf")]) == 0
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    for messages, prompt, reply in [(history[:1], ids, want), (history, ids2, want2)]:
        n = min(60, run.config.model.context_length + 1 - len(prompt))
        hf_ids = hf_tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        assert list(hf_ids) == prompt
        got = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=end,
            pad_token_id=end,
        )[0, len(prompt) :].tolist()  # fmt: skip
        assert got[: len(reply)] == reply and got[len(reply) :] in ([end], [])


def test_a_classifier_is_refused_where_text_is_needed(base, tmp_path, capsys):
    out = tmp_path / "cls"
    assert cli.main(_finetune(base, "classification.jsonl", out, "--max-steps", "2")) == 0
    capsys.readouterr()
    for flags, message in [
        (
            ["generate", "--checkpoint", str(out), "--prompt", "The film"],
            "generate needs a language model",
        ),
        (["convert", "to-hf", str(out), str(tmp_path / "hf")], "is a classifier (2 classes"),
        (
            _finetune(out, "instructions.jsonl", tmp_path / "again"),
            "is a classifier (gptlab finetune)",
        ),
    ]:
        assert cli.main(flags) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "again").exists()


def test_an_example_longer_than_the_context_is_cut_and_counted(gpt2, tmp_path):
    recs = [{"instruction": "Repeat.", "input": "", "output": "word " * n} for n in (5, 200, 6, 7)]
    path = _write(tmp_path / "long.jsonl", recs * 5)
    fc = FinetuneConfig(val_ratio=0.2, test_ratio=0.0)
    data = load_finetune_data(fc, str(path), gpt2, 128, seed=0)
    assert data.truncated == 5 and data.sizes()["truncated"] == 5
    cut = [ex for ex in data.train + data.val if len(ex.ids) == 129]
    assert len(cut) == 5 and all(ex.ids[-1] != gpt2.eot_token for ex in cut)  # the end was cut
