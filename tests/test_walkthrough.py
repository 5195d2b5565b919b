"""The `walkthrough` preset against the walk-through's own training loop.

The reference below is chapter 5's recipe written out plainly, as the book does it:
`torch.manual_seed(123)`, a sliding-window Dataset in torch DataLoaders (train shuffled,
val in order), `torch.manual_seed(123)` again before the model, AdamW over
`model.parameters()`, and its step/evaluation loop with `calc_loss_loader` on fresh loader
iterators. `gptlab train --preset walkthrough` must print and record the same losses, bit
for bit, and resume mid-epoch without changing them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import make_corpus_text
from reference_walkthrough import RefGPTModel
from run_helpers import assert_same_tensors, losses_by_step, records, weights
from torch.utils.data import DataLoader, Dataset

from gptlab.cli import main as cli
from gptlab.config.schema import GPT_CONFIG_124M, apply_nested
from gptlab.data.corpus import DataLoaderWindowLoader, TokenWindowLoader, load_corpus, make_loaders
from gptlab.data.tokenizer import GPT2Tokenizer
from gptlab.errors import GptlabError
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.model import loss as loss_mod
from gptlab.model.gpt import GPTModel
from gptlab.recipes.presets import preset
from gptlab.train.loop import Trainer
from gptlab.train.objectives import LanguageModeling
from gptlab.train.run import stop_on_signals

SMALL = {"emb_dim": 32, "n_layers": 2, "n_heads": 2, "context_length": 16}
EPOCHS = 3
RATIO = 0.8  # the book's 0.9 would leave this short text one validation window
EVAL_LINE = re.compile(r"Ep \d+ \(Step \d{6}\): Train loss [\d.]+, Val loss [\d.]+$")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A short text: 13 training windows of 16 tokens (6 batches of 2 per epoch, so the
    step that ends epoch 1 is an evaluation step) and 3 validation windows (a partial
    last batch)."""
    path = tmp_path_factory.mktemp("walk") / "story.txt"
    path.write_text(make_corpus_text(6)[:1200], encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the book's loop


class Windows(Dataset):
    """Inputs ids[i : i+T] and targets ids[i+1 : i+T+1] for i in range(0, len - T, stride)."""

    def __init__(self, ids: list[int], T: int, stride: int):
        self.ids = torch.tensor(ids)
        self.starts = range(0, len(ids) - T, stride)
        self.T = T

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s = self.starts[i]
        return self.ids[s : s + self.T], self.ids[s + 1 : s + self.T + 1]


def book_loss_loader(loader, model, num_batches):
    total = 0.0
    num_batches = min(num_batches, len(loader))
    for i, (x, y) in enumerate(loader):
        if i < num_batches:
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        else:
            break
    return total / num_batches


def book_run(text: str, model_cls, num_epochs: int = EPOCHS):
    """Chapter 5's run on `text` with a small model: (per-step losses, [(train, val)] of
    each evaluation, the printed evaluation lines)."""
    tokenizer = GPT2Tokenizer()
    cfg = {**GPT_CONFIG_124M, **SMALL}
    T = cfg["context_length"]
    split_idx = int(RATIO * len(text))
    torch.manual_seed(123)
    train_loader = DataLoader(
        Windows(tokenizer.encode(text[:split_idx]), T, T),
        batch_size=2,
        shuffle=True,
        drop_last=True,
        num_workers=0,
    )
    val_loader = DataLoader(
        Windows(tokenizer.encode(text[split_idx:]), T, T),
        batch_size=2,
        shuffle=False,
        drop_last=False,
        num_workers=0,
    )
    torch.manual_seed(123)
    model = model_cls(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
    step_losses, evals, lines = [], [], []
    global_step = -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(input_batch).flatten(0, 1), target_batch.flatten())
            loss.backward()
            optimizer.step()
            global_step += 1
            step_losses.append(loss.item())
            if global_step % 5 == 0:
                model.eval()
                with torch.no_grad():
                    train_loss = book_loss_loader(train_loader, model, 5)
                    val_loss = book_loss_loader(val_loader, model, 5)
                model.train()
                evals.append((train_loss, val_loss))
                lines.append(
                    f"Ep {epoch + 1} (Step {global_step:06d}): "
                    f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
                )
        # the book prints a greedy sample here: no random draws
    assert len(train_loader) == 6 and len(val_loader) == 2  # what the text was cut for
    return step_losses, evals, lines


def gptlab_model(cfg):
    return GPTModel({**cfg, "attention": "manual"})


# --------------------------------------------------------------------------- the CLI


def cli_run(text_file, out, capsys, *extra: str):
    rc = cli.main(
        [
            "train",
            "--preset",
            "walkthrough",
            "--data",
            str(text_file),
            "--out",
            str(out),
            "--epochs",
            str(EPOCHS),
            "--device",
            "cpu",
            "--train.log_every",
            "1",
            "--train.sample_tokens",
            "4",
            "--data.train_ratio",
            str(RATIO),
            *(f"--model.{k}={v}" for k, v in SMALL.items()),
            *extra,
        ]
    )
    assert rc == 0
    return [ln for ln in capsys.readouterr().out.splitlines() if EVAL_LINE.match(ln)]


@pytest.fixture(scope="module")
def reference(text_file):
    return book_run(text_file.read_text(encoding="utf-8"), gptlab_model)


def test_cli_prints_and_records_the_books_losses_bit_for_bit(
    text_file, reference, tmp_path, capsys
):
    step_losses, evals, lines = reference
    run = tmp_path / "run"
    printed = cli_run(text_file, run, capsys)

    assert list(losses_by_step(run).values()) == step_losses  # every step's loss
    recorded = [(r["train_loss"], r["val_loss"]) for r in records(run, "eval")]
    # The CLI adds a final evaluation after the last step (18, not an evaluation step).
    assert len(step_losses) == 6 * EPOCHS and (len(step_losses) - 1) % 5
    assert recorded[:-1] == evals
    assert printed[:-1] == lines
    assert "Ep 1 (Step 000005)" in lines[1]  # the step that ends epoch 1 is in epoch 1
    assert printed[-1].startswith(f"Ep {EPOCHS} (Step {6 * EPOCHS - 1:06d})")

    # What the preset pins, as the run recorded it.
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["weight_decay_on"] == "all"
    assert (saved["data"]["split"], saved["data"]["order"]) == ("chars", "dataloader")
    start = records(run, "start")[0]
    assert (start["precision"], start["compiled"], start["chunked_loss"]) == ("fp32", False, False)
    assert start["fast_dropout"] is False


def test_the_books_model_gives_the_same_losses_to_float_rounding(text_file, reference):
    """With the walk-through's own model code (hand-written LayerNorm and GELU) instead of
    gptlab's fused calls, the same draws give the same curve up to float rounding."""
    ref_steps, ref_evals, _ = book_run(text_file.read_text(encoding="utf-8"), RefGPTModel)
    step_losses, evals, _ = reference
    assert ref_steps == pytest.approx(step_losses, rel=1e-5, abs=0)
    assert ref_evals == [pytest.approx(e, rel=1e-5, abs=0) for e in evals]


def test_resume_mid_epoch_is_bit_exact(text_file, tmp_path, monkeypatch):
    """Stopped inside epoch 2 (its order already drawn, a checkpoint in the middle of it)
    and resumed, the run repeats the uninterrupted one: the checkpoint carries the
    epoch's drawn order, and the RNG state carries what the next draws need."""
    cfg = preset("walkthrough")
    apply_nested(cfg, {"model": SMALL, "train": {"epochs": 2, "log_every": 1, "sample_tokens": 4}})
    cfg.data.source, cfg.data.train_ratio = str(text_file), RATIO
    corpus = load_corpus(str(text_file), "gpt2", RATIO, split="chars")
    Trainer(copy.deepcopy(cfg), LanguageModeling(corpus), tmp_path / "ref").run()

    run, k = tmp_path / "run", 9  # stop after step 9 of 12: epoch 2 is half done
    first = Trainer(copy.deepcopy(cfg), LanguageModeling(corpus), run)
    real = loss_mod.model_loss

    def loss_that_signals(model, x, y, **kwargs):
        if first.state.step + 1 == k:
            os.kill(os.getpid(), signal.SIGTERM)  # finish this step, save and stop
        return real(model, x, y, **kwargs)

    monkeypatch.setattr(loss_mod, "model_loss", loss_that_signals)
    with stop_on_signals(first):
        end = first.run()
    monkeypatch.undo()
    assert (end["reason"], end["step"]) == ("SIGTERM", k)
    saved = ckpt_lib.load_state(ckpt_lib.latest_checkpoint(run))["data"]["loader"]
    assert saved["epoch"] == 1 and len(saved["order"]) == 12

    second = Trainer(copy.deepcopy(cfg), LanguageModeling(corpus), run, resume=True)
    assert second.state.step == k
    second.run()
    assert losses_by_step(run) == losses_by_step(tmp_path / "ref")
    assert losses_by_step(run, "eval", "train_loss") == losses_by_step(
        tmp_path / "ref", "eval", "train_loss"
    )
    assert_same_tensors(
        weights(ckpt_lib.latest_checkpoint(run)),
        weights(ckpt_lib.latest_checkpoint(tmp_path / "ref")),
    )


# --------------------------------------------------------------------------- the pieces


def test_char_split_cuts_the_text_then_tokenizes_each_part(text_file):
    text = text_file.read_text(encoding="utf-8")
    corpus = load_corpus(str(text_file), "gpt2", 0.9, split="chars")
    cut = int(0.9 * len(text))
    tok = GPT2Tokenizer()
    assert corpus.train.tolist() == tok.encode(text[:cut])
    assert corpus.val.tolist() == tok.encode(text[cut:])
    by_tokens = load_corpus(str(text_file), "gpt2", 0.9)
    assert by_tokens.fingerprint != corpus.fingerprint  # a resume cannot mix the two


def test_dataloader_order_draws_from_the_global_rng_like_a_dataloader():
    """Each epoch and each pass over the loader draw as a fresh DataLoader iterator does."""
    tokens = torch.arange(200).numpy()
    loader = DataLoaderWindowLoader(tokens, 2, 8)  # 24 windows, 12 batches
    dataset = Windows(list(range(200)), 8, 8)
    plain = DataLoader(dataset, batch_size=2, shuffle=True, drop_last=True)
    torch.manual_seed(0)
    ours = [loader.batch(0, i)[0] for i in range(len(loader))]
    ours_eval = [x for x, _ in loader]
    ours_next = [loader.batch(1, i)[0] for i in range(len(loader))]
    after = torch.rand(1)
    torch.manual_seed(0)
    theirs = [x for x, _ in plain]
    theirs_eval = [x for x, _ in plain]
    theirs_next = [x for x, _ in plain]
    assert torch.equal(torch.rand(1), after)  # the same draws from the global RNG
    for a, b in zip(ours + ours_eval + ours_next, theirs + theirs_eval + theirs_next, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(torch.stack(ours), torch.stack(ours_next))
    with pytest.raises(ValueError, match="epoch 0"):
        loader.batch(0, 0)  # drawn and left behind


def test_dataloader_order_state_round_trip():
    loader = DataLoaderWindowLoader(torch.arange(200).numpy(), 2, 8)
    assert loader.state_dict() == {}
    torch.manual_seed(1)
    first = [loader.batch(3, i)[0] for i in range(len(loader))]
    other = DataLoaderWindowLoader(torch.arange(200).numpy(), 2, 8)
    other.load_state_dict(loader.state_dict())
    torch.manual_seed(2)  # the restored epoch draws nothing
    assert all(torch.equal(other.batch(3, i)[0], x) for i, x in enumerate(first))
    assert sorted(other.order(3).tolist()) == list(range(other.num_windows))
    assert other.order(3).tolist() == loader.order(3).tolist()
    assert TokenWindowLoader(torch.arange(200).numpy(), 2, 8).state_dict() == {}


def test_make_loaders_picks_the_kind_and_refuses_dataloader_order_under_torchrun(text_file):
    corpus = load_corpus(str(text_file), "gpt2", 0.9, split="chars")
    cfg = preset("walkthrough")
    apply_nested(cfg, {"model": SMALL})
    train, val = make_loaders(cfg, corpus)
    assert isinstance(train, DataLoaderWindowLoader) and train.shuffle and train.drop_last
    assert isinstance(val, DataLoaderWindowLoader) and not val.shuffle and not val.drop_last
    with pytest.raises(GptlabError, match="--data.order seeded"):
        make_loaders(cfg, corpus, world_size=2)
    cfg.data.order = "seeded"
    train, val = make_loaders(cfg, corpus, world_size=2)
    assert type(train) is TokenWindowLoader and train.seed == cfg.train.seed


def test_weight_decay_on_all_is_one_group_of_every_parameter():
    from gptlab.train.optim import build_optimizer

    cfg = preset("walkthrough")
    apply_nested(cfg, {"model": {**SMALL, "vocab_size": 97}})
    model = GPTModel(cfg.model)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["params"] == list(model.parameters())
    assert opt.param_groups[0]["weight_decay"] == 0.1 and not opt.defaults["fused"]
    cfg.train.weight_decay_on = "matrices"
    assert len(build_optimizer(model, cfg.train, torch.device("cpu")).param_groups) == 2


@pytest.mark.parametrize(
    "key, value",
    [("data.split", "words"), ("data.order", "random"), ("train.weight_decay_on", "x")],
)
def test_new_choices_are_checked(key, value, text_file, capsys):
    rc = cli.main(["train", "--preset", "walkthrough", "--data", str(text_file), f"--{key}", value])
    assert rc == 2
    err = capsys.readouterr().err
    assert key in err and "must be one of" in err and len(err.strip().splitlines()) == 1


def test_the_preset_is_the_walkthroughs_recipe():
    cfg = preset("walkthrough")
    assert {k: getattr(cfg.model, k) for k in GPT_CONFIG_124M} == {
        **GPT_CONFIG_124M,
        "context_length": 256,
    }
    t = cfg.train
    assert (t.lr, t.schedule, t.warmup_steps, t.grad_clip) == (4e-4, "constant", 0, 0.0)
    assert (t.batch_size, t.epochs, t.eval_freq, t.eval_iter, t.seed) == (2, 10, 5, 5, 123)
    assert (t.weight_decay, t.weight_decay_on) == (0.1, "all")
    assert (cfg.data.train_ratio, cfg.data.split, cfg.data.order) == (0.9, "chars", "dataloader")
