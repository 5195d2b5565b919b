"""train.ema (gptlab.train.average): the saved weights are the exponential moving average
of the raw trajectory, which the average leaves untouched; the evaluations score the
average."""

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
