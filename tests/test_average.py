"""The regularisers for repeated text. train.ema (gptlab.train.average): the saved weights
are the exponential moving average of the raw trajectory, which the average leaves
untouched; the evaluations score the average. train.token_dropout: random ids in a share
of the inputs, never in the targets."""

from __future__ import annotations

import copy

import pytest
import torch
from run_helpers import losses_by_step, tiny_config, tiny_corpus, weights, write_corpus

from gptlab.config.schema import RunConfig
from gptlab.errors import GptlabError
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.train.loop import Trainer
from gptlab.train.objectives import LanguageModeling

STEPS = 9
DECAY = 0.8


def test_saved_weights_are_the_average_of_the_plain_runs_weights(tmp_path):
    text = write_corpus(tmp_path / "corpus.txt")
    cfg = tiny_config(STEPS, ema=DECAY, checkpoint_every=1, keep_last=STEPS + 1)
    corpus = tiny_corpus(text, cfg)
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.train.ema = 0.0
    plain = Trainer(plain_cfg, LanguageModeling(corpus), tmp_path / "plain")
    average = {k: v.detach().clone() for k, v in plain.model.state_dict().items()}
    plain.run()
    Trainer(copy.deepcopy(cfg), LanguageModeling(corpus), tmp_path / "ema").run()

    # the same steps: averaging changes what is evaluated and saved, not the training
    assert losses_by_step(tmp_path / "ema") == losses_by_step(tmp_path / "plain")
    plain_val = losses_by_step(tmp_path / "plain", "eval", "val_loss")
    assert losses_by_step(tmp_path / "ema", "eval", "val_loss").keys() == plain_val.keys()
    assert losses_by_step(tmp_path / "ema", "eval", "val_loss") != plain_val
    # the average, step by step over the plain run's checkpoints (each step's raw weights)
    for step in range(1, STEPS + 1):
        raw = weights(tmp_path / "plain" / "checkpoints" / f"step-{step:08d}")
        average = {k: torch.lerp(average[k], raw[k], 1.0 - DECAY) for k in raw}
    saved = weights(ckpt_lib.latest_checkpoint(tmp_path / "ema"))
    assert saved.keys() == average.keys()
    for k in saved:
        assert torch.equal(saved[k], average[k]), k
    # the saved weights are the average, not the raw weights of the last step
    raw_last = weights(ckpt_lib.latest_checkpoint(tmp_path / "plain"))
    assert all(not torch.equal(saved[k], raw_last[k]) for k in saved)


def test_ema_is_checked():
    cfg = tiny_config(ema=0.5)
    cfg.runtime.parallel = "fsdp"
    with pytest.raises(GptlabError, match="train.ema keeps whole weights"):
        cfg.validate()
    with pytest.raises(GptlabError, match="train.ema"):
        RunConfig.from_dict({"train": {"ema": 1.0}}).validate()


def test_token_dropout_replaces_a_share_of_the_inputs_only(tmp_path, monkeypatch):
    from gptlab.train import objectives

    text = write_corpus(tmp_path / "corpus.txt")
    corpus = tiny_corpus(text, tiny_config(3))
    n_vocab = corpus.tokenizer.n_vocab
    seen = []

    def step_loss(inputs, targets):
        seen.append((inputs, targets))
        return inputs.float().mean()

    monkeypatch.setattr(objectives, "make_loss_fn", lambda *args: step_loss)
    assert LanguageModeling(corpus).loss_fn(None, False, False) is step_loss  # off: as before
    loss_fn = LanguageModeling(corpus, token_dropout=0.25).loss_fn(None, False, False)
    x = torch.randint(0, n_vocab, (64, 64), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, dims=1)
    torch.manual_seed(0)
    loss_fn(x, y)
    inputs, targets = seen[0]
    assert targets is y and inputs.shape == x.shape
    changed = (inputs != x).float().mean().item()
    # 25% redrawn, 1/n_vocab of them to the same id; over 4,096 ids 3 sigma is ~0.02
    assert abs(changed - 0.25 * (1 - 1 / n_vocab)) < 0.03
    assert int(inputs.max()) < n_vocab
