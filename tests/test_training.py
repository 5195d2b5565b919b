"""Loss, evaluation and the walk-through's training loop."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch

from gptlab import (
    CharTokenizer,
    GPT2Tokenizer,
    GPTModel,
    calc_loss_batch,
    calc_loss_loader,
    create_dataloader,
    evaluate_model,
    train_model_simple,
)
from gptlab.data.tokenizer import gpt2_encoding


def bigram_conditional_entropy(loader) -> float:
    """H(target | current token) over exactly the (input, target) pairs a loader yields.

    Any model whose prediction depends on the current token alone has a mean cross-entropy
    of at least this on those pairs, so a loss well below it proves the model uses (and has
    memorised) longer context.
    """
    pairs, current = Counter(), Counter()
    for x, y in loader:
        for a, b in zip(x.flatten().tolist(), y.flatten().tolist(), strict=True):
            pairs[a, b] += 1
            current[a] += 1
    n = sum(pairs.values())
    return -sum(c / n * math.log(c / current[a]) for (a, _), c in pairs.items())


def test_tiny_model_overfits_short_text(corpus_text):
    text = corpus_text[:400]
    tok = CharTokenizer.from_text(text)
    T = 16

    def loader(shuffle: bool, batch_size: int):
        return create_dataloader(
            text, batch_size, T, 4, shuffle=shuffle, drop_last=False, tokenizer=tok
        )

    eval_loader = loader(False, 64)
    h_bigram = bigram_conditional_entropy(eval_loader)
    torch.manual_seed(0)
    cfg = dict(vocab_size=tok.n_vocab, context_length=T, emb_dim=48, n_heads=4, n_layers=2)
    model = GPTModel({**cfg, "drop_rate": 0.0, "qkv_bias": False})
    model.eval()
    start = calc_loss_loader(eval_loader, model, "cpu")
    # An untrained model is close to uniform over the vocabulary.
    assert abs(start - math.log(tok.n_vocab)) < 0.5
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(30):  # ~180 steps, about a second
        for x, y in loader(True, 16):
            optimizer.zero_grad()
            calc_loss_batch(x, y, model, "cpu").backward()
            optimizer.step()
    model.eval()
    final = calc_loss_loader(eval_loader, model, "cpu")
    # Measured ~0.15 nats against a bigram floor of ~1.8: a quarter of the floor leaves a wide
    # margin and still needs memorisation (the text is only ~400 characters).
    assert final < h_bigram / 4, (final, h_bigram)


def test_calc_loss_loader_averages_first_batches(tiny_model_cfg):
    torch.manual_seed(0)
    model = GPTModel(tiny_model_cfg).eval()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randint(0, 97, (2, 16), generator=g), torch.randint(0, 97, (2, 16), generator=g))
        for _ in range(4)
    ]
    with torch.no_grad():
        losses = [calc_loss_batch(x, y, model, "cpu").item() for x, y in batches]
        assert calc_loss_loader(batches, model, "cpu") == pytest.approx(sum(losses) / 4)
        assert calc_loss_loader(batches, model, "cpu", 2) == pytest.approx(sum(losses[:2]) / 2)
        assert calc_loss_loader(batches, model, "cpu", 99) == pytest.approx(sum(losses) / 4)
        assert math.isnan(calc_loss_loader([], model, "cpu"))


def test_evaluate_model_uses_eval_mode_no_grad_and_restores_train(tiny_model_cfg):
    tiny_model_cfg.drop_rate = 0.5
    torch.manual_seed(0)
    model = GPTModel(tiny_model_cfg)
    model.train()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randint(0, 97, (2, 16), generator=g),) * 2 for _ in range(3)]
    a = evaluate_model(model, data, data[:1], "cpu", eval_iter=2)
    b = evaluate_model(model, data, data[:1], "cpu", eval_iter=2)
    assert a == b  # dropout off: repeatable
    assert model.training  # back to train mode
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert a[1] == pytest.approx(calc_loss_batch(*data[0], model, "cpu").item())


@pytest.mark.parametrize("tokenizer", ["tiktoken", "gptlab"])
def test_train_model_simple_records_and_prints(corpus_text, capsys, tokenizer):
    tok = gpt2_encoding() if tokenizer == "tiktoken" else GPT2Tokenizer()
    B, T = 2, 8
    train_loader = create_dataloader(
        corpus_text[:1400], B, T, T, shuffle=True, drop_last=True, tokenizer=tok
    )
    val_loader = create_dataloader(
        corpus_text[1400:1800], B, T, T, shuffle=False, drop_last=False, tokenizer=tok
    )
    torch.manual_seed(123)
    cfg = dict(vocab_size=50257, context_length=T, emb_dim=16, n_heads=2, n_layers=1)
    model = GPTModel({**cfg, "drop_rate": 0.1, "qkv_bias": False, "tie_weights": True})
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    num_epochs, eval_freq = 2, 5
    steps = num_epochs * len(train_loader)
    assert steps % eval_freq  # a case where ceil and floor differ

    train_losses, val_losses, tokens_seen = train_model_simple(
        model,
        train_loader,
        val_loader,
        optimizer,
        "cpu",
        num_epochs=num_epochs,
        eval_freq=eval_freq,
        eval_iter=2,
        start_context="Every effort moves you",
        tokenizer=tok,
    )
    n_evals = math.ceil(steps / eval_freq)
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == n_evals > 0
    # tokens seen after the 0-based steps 0, eval_freq, 2*eval_freq, ...
    assert tokens_seen == [(s + 1) * B * T for s in range(0, steps, eval_freq)]
    assert all(math.isfinite(v) and v > 0 for v in train_losses + val_losses)

    lines = capsys.readouterr().out.splitlines()
    eval_lines = [ln for ln in lines if re.match(r"Ep \d+ \(Step \d{6}\): Train loss", ln)]
    assert len(eval_lines) == n_evals
    assert eval_lines[-1].startswith(f"Ep {num_epochs} (Step {steps - 1 - (steps - 1) % 5:06d})")
    samples = [ln for ln in lines if ln.startswith("Every effort moves you")]
    assert len(samples) == num_epochs
    assert all(len(s) > len("Every effort moves you") for s in samples)


def test_the_default_preset_runs_its_whole_schedule(tmp_path):
    """The cpu preset's cosine spans its time budget; an epoch or step limit would cut the
    run (and its schedule) short on a small corpus such as the built-in plays (673 steps an
    epoch)."""
    import numpy as np

    from gptlab.data.corpus import Corpus
    from gptlab.data.tokenizer import CharTokenizer
    from gptlab.recipes.presets import PRESETS, preset
    from gptlab.train.loop import Trainer
    from gptlab.train.objectives import LanguageModeling

    text = "Every effort moves you to say more than you mean. " * 400
    tok = CharTokenizer.from_text(text)
    ids = np.asarray(tok.encode(text), dtype=np.uint16)
    cfg = preset("cpu")
    cfg.runtime.device = "cpu"
    corpus = Corpus(ids[:18000], ids[18000:], tok, "test")
    trainer = Trainer(cfg, LanguageModeling(corpus), tmp_path / "run")
    assert cfg.train.budget == "time" and trainer.total_steps == 0  # no step or epoch limit
    assert trainer.budget.seconds == cfg.train.max_time == PRESETS["cpu"]["train"]["max_time"]
    assert trainer.budget.progress(0.0, 0, 0) == 0.0


def test_the_loop_takes_what_varies_from_its_objective(tmp_path):
    """The Trainer asks its objective for the batches, the loss, the sample prompt and an
    evaluation's metrics: an objective that writes no text and adds a metric changes the
    run's records, with no branch in the loop."""
    from run_helpers import records, tiny_config, tiny_corpus, write_corpus

    from gptlab.train.loop import Trainer
    from gptlab.train.objectives import LanguageModeling

    class Quiet(LanguageModeling):
        def sample_prompt(self, cfg):
            return None

        def metrics(self, model, loaders, device, num_batches):
            return {"splits": ",".join(split for split, _ in loaders), "batches": num_batches}

    cfg = tiny_config(steps=4)
    cfg.train.eval_freq = 2
    corpus = tiny_corpus(write_corpus(tmp_path / "text.txt"), cfg)
    end = Trainer(cfg, Quiet(corpus), tmp_path / "run").run()
    assert (end["reason"], end["step"]) == ("max_steps", 4)
    evals = records(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [1, 3, 4]
    assert all((r["splits"], r["batches"]) == ("train,val", cfg.train.eval_iter) for r in evals)
    assert not records(tmp_path / "run", "sample")  # a final sample is skipped too
