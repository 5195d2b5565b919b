"""Each speed switch changes speed, not math.

A tiny model is trained for a few steps through the CLI trainer's own step with one switch
flipped, from the same initial weights on the same batches, and its losses are compared
with the plain run's (fp32, manual attention, unfused AdamW, full logits, no padding).
Tolerances: switches that keep fp32 arithmetic agree to 1e-5 (only the order of floating
point sums differs); bf16 autocast, which rounds matmul inputs to 8 significant bits,
agrees to 5e-3 nats over 6 steps (it measured 1e-4).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tolerances
import torch

from gptlab.config.schema import ModelConfig, RunConfig, TrainConfig, set_field
from gptlab.data.corpus import Corpus
from gptlab.data.tokenizer import CharTokenizer
from gptlab.infer.sampling import generate, generate_text_simple
from gptlab.model.gpt import GPTModel, count_parameters
from gptlab.train.loop import Trainer
from gptlab.train.objectives import LanguageModeling
from gptlab.train.optim import lr_at, param_groups

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
    "and by opposing end them. To die: to sleep; no more; and by a sleep to say we end the "
    "heart-ache and the thousand natural shocks that flesh is heir to. "
) * 6

PLAIN = {
    "model.vocab_size": 0,  # set from the tokenizer below
    "model.context_length": 16,
    "model.emb_dim": 32,
    "model.n_heads": 4,
    "model.n_layers": 2,
    "model.drop_rate": 0.0,
    "model.attention": "manual",
    "model.vocab_multiple": 1,
    "model.init": "gpt2",
    "train.batch_size": 4,
    "train.lr": 3e-3,
    "train.warmup_steps": 2,
    "train.max_steps": 6,
    "runtime.precision": "fp32",
    "runtime.compile": "off",
    "train.fused_optimizer": False,
    "runtime.chunked_loss": "off",
    "runtime.device": "cpu",
    "train.start_context": "To be",  # every character is in the char vocabulary
    "train.seed": 7,
}


def _corpus() -> Corpus:
    tok = CharTokenizer.from_text(TEXT)
    ids = np.asarray(tok.encode(TEXT), dtype=np.uint16)
    split = int(0.9 * len(ids))
    return Corpus(ids[:split], ids[split:], tok, "test")


HAS_CUDA = torch.cuda.is_available()


def _trainer(tmp_path, name: str, **changes) -> Trainer:
    corpus = _corpus()
    cfg = RunConfig()
    settings = {**PLAIN, "model.vocab_size": corpus.tokenizer.n_vocab, **changes}
    for key, value in settings.items():
        set_field(cfg, key, value)
    return Trainer(cfg, LanguageModeling(corpus), tmp_path / name)


def _copy_weights(src: GPTModel, dst: GPTModel) -> None:
    """Give dst src's weights; a padded embedding/head gets src's rows and zeros below."""
    with torch.no_grad():
        for (name, p), q in zip(src.named_parameters(), dst.parameters(), strict=True):
            assert q.shape[1:] == p.shape[1:], name
            q.zero_()
            q[: p.shape[0]].copy_(p)


def _losses(trainer: Trainer, steps: int = 6) -> list[float]:
    return [trainer.train_step()[0] for _ in range(steps)]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    trainer = _trainer(tmp_path_factory.mktemp("plain"), "plain")
    initial = GPTModel(trainer.cfg.model)
    initial.load_state_dict(trainer.model.state_dict())
    return initial, _losses(trainer)


# An fp32 switch sums in another order (a fused kernel, another blocking, chunks): the
# runs differ by rounding that AdamW carries through 6 steps at lr 3e-3 (tolerances.py).
FP32 = tolerances.adamw_weights(3e-3, 6)
# bf16 autocast rounds every matmul's inputs to 8 significant bits (eps 7.8e-3): each
# token's log-probability (near 4) moves by up to ~eps x 4, and their mean over the batch's
# 4 x 16 tokens by about that / sqrt(64) = 4e-3.
BF16 = 5e-3
SWITCHES = [
    ("sdpa attention", {"model.attention": "sdpa"}, FP32),
    ("fused adamw", {"train.fused_optimizer": True}, FP32),
    ("padded vocab", {"model.vocab_multiple": 64}, FP32),
    ("chunked loss", {"runtime.chunked_loss": "on"}, FP32),
    ("activation checkpointing", {"runtime.activation_checkpointing": True}, FP32),
    (
        "all fp32 switches",
        {
            "model.attention": "sdpa",
            "train.fused_optimizer": True,
            "model.vocab_multiple": 64,
            "runtime.chunked_loss": "on",
        },
        FP32,
    ),
    ("bf16 autocast", {"runtime.precision": "bf16"}, BF16),
    (
        "bf16 + chunked loss + sdpa",
        {"runtime.precision": "bf16", "runtime.chunked_loss": "on", "model.attention": "sdpa"},
        BF16,
    ),
]


@pytest.mark.parametrize("name, changes, tol", SWITCHES, ids=[s[0] for s in SWITCHES])
def test_switch_keeps_the_losses(tmp_path, plain_run, name, changes, tol):
    initial, plain_losses = plain_run
    trainer = _trainer(tmp_path, "switched", **changes)
    _copy_weights(initial, trainer.model)
    losses = _losses(trainer)
    assert plain_losses[-1] < plain_losses[0] - 0.2  # the runs do learn something
    np.testing.assert_allclose(losses, plain_losses, rtol=0, atol=tol)


@pytest.mark.skipif(
    not os.environ.get("GPTLAB_TEST_COMPILE"),
    reason="torch.compile takes about a minute on 2 CPU cores; set GPTLAB_TEST_COMPILE=1",
)
@pytest.mark.parametrize("chunked", ["off", "on"])
def test_compile_keeps_the_losses(tmp_path, plain_run, chunked):
    initial, plain_losses = plain_run
    trainer = _trainer(
        tmp_path, "compiled", **{"runtime.compile": "on", "runtime.chunked_loss": chunked}
    )
    _copy_weights(initial, trainer.model)
    np.testing.assert_allclose(_losses(trainer), plain_losses, rtol=0, atol=1e-4)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_fast_path_keeps_the_losses(tmp_path, plain_run):
    """Every switch at once on a GPU (bf16, compile, chunked loss, fused AdamW, padded
    vocabulary, prefetched pinned batches) against the plain CPU run."""
    initial, plain_losses = plain_run
    fast = {
        "runtime.device": "cuda",
        "runtime.precision": "bf16",
        "runtime.compile": "on",
        "runtime.chunked_loss": "on",
        "train.fused_optimizer": True,
        "model.attention": "sdpa",
        "model.vocab_multiple": 64,
    }
    trainer = _trainer(tmp_path, "cuda", **fast)
    _copy_weights(initial, trainer.model)
    np.testing.assert_allclose(_losses(trainer), plain_losses, rtol=0, atol=5e-3)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_loss_compiles_as_one_graph(chunked, precision):
    """torch.compile sees model and loss whole: no graph breaks (dynamo's trace only)."""
    from gptlab.model.loss import make_loss_fn
    from gptlab.runtime.device import autocast

    cfg = ModelConfig(
        vocab_size=100, context_length=16, emb_dim=32, n_heads=2, n_layers=2, vocab_multiple=64
    )
    model = GPTModel(cfg)
    loss_fn = make_loss_fn(model, chunked=chunked, compiled=False)
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    with autocast(torch.device("cpu"), precision):
        explained = torch._dynamo.explain(loss_fn)(x, y)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    T = PLAIN["model.context_length"]
    big = _trainer(tmp_path, "big", **{"train.batch_size": 8})
    accum = _trainer(tmp_path, "accum", **{"train.batch_size": 2, "train.batch_tokens": 8 * T})
    assert (big.accum, accum.accum) == (1, 4)
    assert big.steps_per_epoch == accum.steps_per_epoch
    accum.model.load_state_dict(big.model.state_dict())
    np.testing.assert_allclose(_losses(accum, 3), _losses(big, 3), rtol=0, atol=1e-6)
    for (name, a), b in zip(accum.model.named_parameters(), big.model.parameters(), strict=True):
        # Adam divides by sqrt(v): fp32 rounding in a near-zero gradient element moves
        # its update by a fraction of lr (3e-3), hence 1e-5 here and 1e-6 on the losses
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "skip_on_device, device",
    [(True, "cpu"), (False, "cpu")] + ([(True, "cuda")] if HAS_CUDA else []),
)
def test_nonfinite_step_changes_nothing(tmp_path, skip_on_device, device):
    trainer = _trainer(tmp_path, "nan", **{"train.fused_optimizer": True, "runtime.device": device})
    assert trainer._fused_can_skip  # fused AdamW takes the no-sync path on CPU and CUDA
    trainer._fused_can_skip = skip_on_device
    _losses(trainer, 2)
    params = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    opt_state = [
        {k: v.clone() for k, v in s.items()}
        for s in trainer.optimizer.state_dict()["state"].values()
    ]
    finite_loss = trainer.loss_fn
    trainer.loss_fn = lambda x, y: finite_loss(x, y) * float("nan")
    loss, _ = trainer.train_step()
    assert np.isnan(loss) and trainer.state.skipped_steps == 1 and trainer.state.bad_steps == 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, params[k]), k
    for before, after in zip(
        opt_state, trainer.optimizer.state_dict()["state"].values(), strict=True
    ):
        for k in before:
            assert torch.equal(before[k], after[k]), k
    trainer.loss_fn = finite_loss
    assert np.isfinite(trainer.train_step()[0]) and trainer.state.bad_steps == 0


def test_warmup_cosine_hits_its_anchors():
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1, schedule="cosine")
    total = 25  # steps 0..24; decay from step 4 to step 24: midpoint at step 14
    assert lr_at(0, cfg, total) == pytest.approx(1e-3 / 4)  # start
    assert lr_at(3, cfg, total) == pytest.approx(1e-3)  # end of warmup
    assert lr_at(4, cfg, total) == pytest.approx(1e-3)  # decay starts at the peak
    assert lr_at(14, cfg, total) == pytest.approx((1e-3 + 1e-4) / 2)  # midpoint
    assert lr_at(24, cfg, total) == pytest.approx(1e-4)  # the last step runs at the floor
    lrs = [lr_at(s, cfg, total) for s in range(4, total)]
    assert all(a >= b for a, b in zip(lrs[:-1], lrs[1:], strict=True))  # monotone decay
    linear = TrainConfig(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1, schedule="linear")
    assert lr_at(14, linear, total) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(24, linear, total) == pytest.approx(1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_no_decay_groups_hold_exactly_biases_norms_and_embeddings(tie):
    cfg = ModelConfig(
        vocab_size=40,
        context_length=8,
        emb_dim=16,
        n_heads=2,
        n_layers=2,
        qkv_bias=True,
        tie_weights=tie,
        vocab_multiple=64,
    )
    model = GPTModel(cfg)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # a tied matrix is listed once
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}

    matrices = {"att.W_query", "att.W_key", "att.W_value", "att.out_proj", "ff.layers.0"}
    matrices |= {"ff.layers.2"}
    expected_decay = {f"trf_blocks.{i}.{m}.weight" for i in range(2) for m in matrices}
    if not tie:
        expected_decay.add("out_head.weight")
    expected_no_decay = {"tok_emb.weight", "pos_emb.weight", "final_norm.scale", "final_norm.shift"}
    for i in range(2):
        expected_no_decay |= {
            f"trf_blocks.{i}.norm{k}.{p}" for k in (1, 2) for p in ("scale", "shift")
        }
        expected_no_decay |= {f"trf_blocks.{i}.{m}.bias" for m in matrices}
    assert decay_names == expected_decay
    assert no_decay_names == expected_no_decay
    n_listed = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert n_listed == count_parameters(model)


def _model_favouring_padded_ids() -> GPTModel:
    """A model whose padded head rows would win every argmax if they were not cut off."""
    cfg = ModelConfig(
        vocab_size=10, context_length=8, emb_dim=16, n_heads=2, n_layers=1, vocab_multiple=64
    )
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.final_norm.scale.zero_()
        model.final_norm.shift.fill_(1.0)  # every hidden state is all ones
        model.out_head.weight.zero_()
        model.out_head.weight[10:] = 5.0  # padded ids 10..63 score 80, real ids score 0
    return model


def test_padded_logits_never_appear_in_samples():
    model = _model_favouring_padded_ids()
    assert model.out_head.weight.shape[0] == 64
    idx = torch.zeros(3, 2, dtype=torch.long)
    assert model(idx).shape == (3, 2, 10)
    greedy = generate_text_simple(model, idx, max_new_tokens=6, context_size=8)
    sampled = generate(model, idx, 20, temperature=1.5, seed=0)
    assert int(greedy.max()) < 10 and int(sampled.max()) < 10
    # and they are never scored: the loss is that of 10 equal logits, whichever path
    y = torch.zeros(3, 2, dtype=torch.long)
    from gptlab.model.loss import model_loss

    for chunked in (False, True):
        loss = model_loss(model, idx, y, chunked=chunked)
        assert loss.item() == pytest.approx(np.log(10), rel=1e-6)


def test_a_compiler_failure_is_one_line_with_the_way_out(tmp_path):
    """A broken compiler (no C++ compiler, a corrupt inductor cache) fails the first step;
    the user gets what failed and how to go on, not inductor's traceback."""
    from torch._inductor.exc import InductorError

    from gptlab.errors import GptlabError

    trainer = _trainer(tmp_path, "compiled", **{"runtime.compile": "on"})
    assert trainer.rt.compiled

    def broken(x, y):
        raise InductorError(ImportError("main.so: file too short"), None)

    trainer.loss_fn = broken
    with pytest.raises(GptlabError) as e:
        trainer.run()
    msg = str(e.value)
    assert "torch.compile failed" in msg and "file too short" in msg
    assert "--compile off" in msg and "\n" not in msg
