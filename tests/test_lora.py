"""LoRA (gptlab.model.lora): adapters that start as the identity, merge to the same outputs, train
alone, are all a checkpoint holds, resume bit for bit, and refuse a base that is not theirs.

The reference for "before the first step" is the base model itself (B = 0 must add exact
zeros); for merging, the unmerged adapted model (W x + s B A x against (W + s B A) x).
"""

from __future__ import annotations

import copy
import json
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tolerances
import torch
from conftest import jitter
from run_helpers import CHILD_ENV, losses_by_step, records, release, run_cli, wait_for_gate
from test_finetune import COMMON, GATED_FINETUNE, _finetune, _records

from gptlab.cli import main as cli
from gptlab.config.schema import LORA_TARGET_NAMES, FinetuneConfig, ModelConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.interop.runs import open_run
from gptlab.model import lora
from gptlab.model.gpt import GPTModel
from gptlab.train.optim import build_optimizer

TINY = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
SHAPES = {
    "gpt2": ModelConfig(**TINY, qkv_bias=True),
    "llama": ModelConfig(
        **TINY, mlp="swiglu", norm="rmsnorm", positions="rope", bias=False, tie_weights=False
    ),
}


def _model(shape: str, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return jitter(GPTModel(SHAPES[shape]), 0.2).eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the math


def test_every_target_name_is_one_the_module_maps():
    assert set(LORA_TARGET_NAMES) == {*lora.GROUPS, *lora.ATTN, *lora.MLP_NAMES}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("targets", ["attn", "mlp", "all", "W_value,out_proj"])
def test_zero_b_gives_exactly_the_base_logits(shape, targets):
    model, x = _model(shape), _ids()
    with torch.no_grad():
        want = model(x)
        lora.add_adapters(model, rank=4, alpha=8.0, targets=targets)
        got = model(x)
    assert lora.lora_layers(model)  # something was adapted
    assert torch.equal(got, want)


def test_targets_choose_the_layers_by_the_models_names():
    gpt2 = lora.target_layers(_model("gpt2"), "attn")
    assert gpt2 == [f"trf_blocks.{i}.att.{n}" for i in (0, 1) for n in lora.ATTN]
    mlp = lora.target_layers(_model("gpt2"), "mlp")
    assert mlp == [f"trf_blocks.{i}.ff.layers.{j}" for i in (0, 1) for j in (0, 2)]
    swiglu = lora.target_layers(_model("llama"), "fc1,fc3")
    assert swiglu == [f"trf_blocks.{i}.ff.{n}" for i in (0, 1) for n in ("fc1", "fc3")]
    every = lora.target_layers(_model("llama"), "all")
    assert len(every) == 2 * (4 + 3) and not any("out_head" in n for n in every)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_merged_logits_equal_the_adapted_models(shape):
    model, x = _model(shape), _ids()
    lora.add_adapters(model, rank=4, alpha=16.0, targets="all")
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():  # trained-looking adapters
            layer.lora_B.normal_(0, 0.05)
        adapted = model(x)
        base_w = model.trf_blocks[0].att.W_query.weight.clone()
        merged_model = lora.merge_lora(model)
        merged = merged_model(x)
    assert not lora.has_lora(merged_model)
    assert isinstance(merged_model.trf_blocks[0].att.W_query, torch.nn.Linear)
    assert not torch.equal(merged_model.trf_blocks[0].att.W_query.weight, base_w)  # it moved
    assert not torch.allclose(adapted, _model(shape)(x), atol=1e-3)  # the adapters matter
    # (W + s B A) x adds the products in another order than W x + s B (A x): the adapted
    # model in float64 says how far fp32 rounding alone goes (tolerances.py)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x)
    tolerances.assert_close_to_rounding(merged, adapted, exact)
    # a plain GPTModel with plain keys: the merged weights load into a fresh one
    fresh = GPTModel(SHAPES[shape]).eval()
    fresh.load_state_dict(merged_model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), merged)


def test_one_layer_is_w_x_plus_scaled_b_a_x_written_out():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 6)
    layer = lora.LoRALinear(linear, rank=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
        x = torch.randn(5, 8)
        want = x @ linear.weight.T + linear.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * 1.5
        torch.testing.assert_close(layer(x), want)
        # one sum of 8 products plus the adapter's, in another order (tolerances.py)
        scale = (x.abs() @ (linear.weight + 1.5 * layer.lora_B @ layer.lora_A).abs().T).max()
        tol = tolerances.reordered_sum(8 + 2, scale.item())
        torch.testing.assert_close(layer.merged()(x), want, rtol=0, atol=tol)
    assert layer.weight is linear.weight  # shared, not copied


def test_only_the_adapters_get_gradients_and_optimizer_state():
    model = _model("gpt2").train()
    lora.add_adapters(model, rank=2, alpha=4.0, targets="attn")
    trainable, total = lora.count_trainable(model)
    assert trainable == 2 * 4 * (2 * 32 + 2 * 32)  # 2 blocks x 4 matrices x (A: 2x32, B: 32x2)
    assert total == sum(p.numel() for p in GPTModel(SHAPES["gpt2"]).parameters()) + trainable
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i] for i in in_opt) == sorted(lora.trained_state_dict(model))
    assert all(".lora_" in names[i] for i in in_opt)
    x = _ids()
    model(x[:, :-1]).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name
        if ".lora_B" in name:
            assert p.grad.abs().sum() > 0  # B's gradient is not zero even though B is
    opt.step()
    assert all(".lora_" in names[id(p)] for p in opt.state)  # no state for the base


def test_a_classifier_head_trains_whole_beside_the_adapters():
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**TINY, num_classes=3))
    lora.prepare(model, FinetuneConfig(lora_rank=2, lora_targets="attn"))
    keys = set(lora.trained_state_dict(model))
    assert {"out_head.weight", "out_head.bias"} <= keys
    assert all(k.startswith("out_head.") or ".lora_" in k for k in keys)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(GptlabError, match="rank must be 1 or more"):
        lora.add_adapters(_model("gpt2"), rank=0, alpha=1.0)
    model, x = _model("gpt2"), _ids()
    with torch.no_grad():
        want = model(x)
    with pytest.raises(GptlabError, match="exceeds trf_blocks.0.att.W_query's smallest side"):
        lora.add_adapters(model, rank=33, alpha=1.0)
    with pytest.raises(GptlabError, match="alpha must be above 0"):
        lora.add_adapters(model, rank=2, alpha=0.0)
    assert not lora.has_lora(model) and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), want)  # a refusal leaves the model as it was
    with pytest.raises(GptlabError, match="'fc1' names no linear layer of this model"):
        lora.add_adapters(_model("gpt2"), rank=2, alpha=1.0, targets="fc1")
    with pytest.raises(GptlabError, match="unknown target 'wq'"):
        FinetuneConfig(lora_rank=2, lora_targets="attn,wq").validate()
    with pytest.raises(GptlabError, match="train_blocks and LoRA"):
        FinetuneConfig(lora_rank=2, train_blocks=1).validate()
    model = _model("gpt2")
    lora.add_adapters(model, rank=2, alpha=1.0)
    with pytest.raises(GptlabError, match="already has LoRA adapters"):
        lora.add_adapters(model, rank=2, alpha=1.0)


def test_the_fingerprint_follows_the_weights_not_the_object():
    a, b = _model("gpt2"), _model("gpt2")
    assert lora.weights_fingerprint(a) == lora.weights_fingerprint(b)
    with torch.no_grad():
        b.trf_blocks[1].att.W_key.weight[0, 0] += 1e-6
    assert lora.weights_fingerprint(a) != lora.weights_fingerprint(b)


# --------------------------------------------------------------------------- gptlab finetune --lora-rank


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained run (a 400-id BPE, context 256), as test_finetune's base."""
    root = tmp_path_factory.mktemp("lora-base")
    parts = [
        f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in _records("instructions.jsonl")
    ]
    parts += [r["text"] for r in _records("classification.jsonl")]
    (root / "base.txt").write_text("\n\n".join(parts), encoding="utf-8")
    out = root / "base"
    flags = ["train", "--data", str(root / "base.txt"), "--preset", "tiny", "--out", str(out),
             "--max-steps", "4", "--data.tokenizer", "bpe:400", "--model.context_length", "256",
             *COMMON]  # fmt: skip
    assert cli.main(flags) == 0
    return out


LORA = ("--lora-rank", "4", "--lora-alpha", "16", "--lora-targets", "all", "--max-steps", "8", "--train.lr", "3e-3",
        "--train.eval_freq", "4", "--train.eval_iter", "10", "--train.log_every", "1")  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert cli.main(_finetune(base, "instructions.jsonl", out, *LORA)) == 0
    return out


def _eval(run: Path, capsys) -> dict:
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(run), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_lora_finetune_saves_only_its_adapters_and_a_pointer_to_the_base(base, lora_run, capsys):
    cfg = json.loads((lora_run / "config.json").read_text())["finetune"]
    base_ckpt = ckpt_lib.latest_checkpoint(base)
    assert cfg["lora_rank"] == 4 and cfg["base"] == str(base_ckpt.resolve())
    assert cfg["base_sha256"] == lora.weights_fingerprint(open_run(base, "cpu").model)
    start = records(lora_run, "start")[0]
    # 2 blocks: 4 attention matrices of 32 x 32, the MLP's 32 -> 128 -> 32; A and B of rank 4
    assert 0 < start["trainable"] == 2 * 4 * (4 * (32 + 32) + 2 * (32 + 128)) < start["params"] / 5
    ckpt = ckpt_lib.latest_checkpoint(lora_run)
    from safetensors import safe_open

    with safe_open(str(ckpt / ckpt_lib.WEIGHTS), "pt") as f:
        keys = sorted(f.keys())
    assert len(keys) == 2 * 6 * 2 and all(re.fullmatch(r".*\.lora_[AB]", k) for k in keys)
    size = (ckpt / ckpt_lib.WEIGHTS).stat().st_size
    assert size * 5 < (base_ckpt / ckpt_lib.WEIGHTS).stat().st_size
    # the optimizer state holds the adapters' moments only
    state = ckpt_lib.load_state(ckpt)["optimizer"]["state"]
    assert len(state) == len(keys)
    # it learns, and eval (which rebuilds base + adapters) reports the run's last loss
    evals = records(lora_run, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.05
    assert _eval(lora_run, capsys)["loss"] == pytest.approx(evals[-1]["val_loss"], abs=1e-6)
    assert cli.main(["generate", "--checkpoint", str(lora_run), "--max-new-tokens", "5"]) == 0


def test_the_base_stays_frozen(base, lora_run):
    run, plain = open_run(lora_run, "cpu").model, open_run(base, "cpu").model
    adapted = {k for k in run.state_dict() if ".lora_" in k}
    for k, v in plain.state_dict().items():
        assert torch.equal(run.state_dict()[k], v), k
    assert adapted and all(not torch.equal(v, torch.zeros_like(v)) for k, v in
                           run.state_dict().items() if k.endswith("lora_B"))  # fmt: skip


def test_merge_lora_writes_a_plain_run_with_the_same_outputs(lora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli.main(["convert", "merge-lora", str(lora_run), str(out)]) == 0
    keys = set(ckpt_lib.load_trained_model(out)[0].state_dict())
    assert not any("lora" in k for k in keys)
    assert json.loads((out / "config.json").read_text())["finetune"]["lora_rank"] == 0
    a, b = open_run(lora_run, "cpu").model, open_run(out, "cpu").model
    x = torch.randint(0, 400, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # merged weights sum in another order (see the test above)
        tolerances.assert_close_to_rounding(b(x), a(x), copy.deepcopy(a).double()(x))
    # a token's log-softmax moves at most twice its logits' largest move, which the check
    # above holds to fp32's rounding, and the mean loss no more: 1e-5 leaves room
    assert _eval(out, capsys)["loss"] == pytest.approx(_eval(lora_run, capsys)["loss"], abs=1e-5)
    # a plain run has nothing to merge; to-hf asks for the merge first
    assert cli.main(["convert", "merge-lora", str(out), str(tmp_path / "again")]) == 2
    assert "not a LoRA run" in capsys.readouterr().err
    assert cli.main(["convert", "to-hf", str(lora_run), str(tmp_path / "hf")]) == 2
    assert "convert merge-lora" in capsys.readouterr().err
    assert not (tmp_path / "again").exists() and not (tmp_path / "hf").exists()


def test_a_lora_classifier_trains_its_head_and_adapters(base, tmp_path, capsys):
    out = tmp_path / "cls"
    flags = ("--lora-rank", "2", "--lora-targets", "mlp", "--max-steps", "4", "--train.lr", "1e-2")
    assert cli.main(_finetune(base, "classification.jsonl", out, *flags)) == 0
    from safetensors.torch import load_file

    saved = load_file(str(ckpt_lib.latest_checkpoint(out) / ckpt_lib.WEIGHTS))
    assert {"out_head.weight", "out_head.bias"} <= set(saved)
    assert all(k.startswith("out_head.") or ".ff.layers." in k for k in saved)
    assert "accuracy" in _eval(out, capsys)


# --------------------------------------------------------------------------- exact resume


RESUME = ("--lora-rank", "4", "--lora-dropout", "0.1", "--max-steps", "10", "--train.lr", "1e-2",
          "--train.eval_freq", "3", "--train.log_every", "1", "--checkpoint-every", "3")  # fmt: skip


def test_a_lora_finetune_killed_then_resumed_is_bit_identical(base, tmp_path):
    ref = tmp_path / "ref"
    done = run_cli(_finetune(base, "instructions.jsonl", ref, *RESUME))
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "run"
    n = random.randint(12, 30)  # a loss call after the first checkpoint (step 3), before the end
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
    from safetensors.torch import load_file

    a = load_file(str(ckpt_lib.latest_checkpoint(run) / ckpt_lib.WEIGHTS))
    b = load_file(str(ckpt_lib.latest_checkpoint(ref) / ckpt_lib.WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- bad input


def _one_line_error(capsys, flags: list[str], message: str) -> None:
    capsys.readouterr()
    assert cli.main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gptlab: error: "), err
    assert re.search(message, err), err


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--lora-rank", "0"), r"--lora-rank: must be an integer 1 or more, got '0'"),
        (("--lora-rank", "4", "--lora-alpha", "-2"), r"--lora-alpha: must be a number greater than 0, got .-2."),
        (("--lora-rank", "4", "--lora-targets", "attn,qkv"), r"unknown target 'qkv'"),
        (("--lora-rank", "4", "--lora-dropout", "1"), r"--lora-dropout: must be a number in \[0, 1\), got .1."),
        (("--lora-rank", "100"), r"LoRA rank 100 exceeds trf_blocks.0.att.W_query's smallest side \(32\)"),
        (("--lora-rank", "4", "--finetune.train_blocks", "1"), r"train_blocks and LoRA"),
        (("--lora-rank", "4", "--parallel", "fsdp"), r"use --parallel ddp"),
        (("--lora-rank", "4", "--lora-targets", "fc1"), r"'fc1' names no linear layer"),
    ],
    ids=["rank-0", "negative-alpha", "unknown-target", "dropout-1", "rank-too-big",
         "train-blocks", "fsdp", "absent-layer"],
)  # fmt: skip
def test_bad_lora_options_are_one_line_exit_2_and_nothing_written(
    base, tmp_path, capsys, extra, message
):
    out = tmp_path / "run"
    _one_line_error(capsys, _finetune(base, "instructions.jsonl", out, *extra), message)
    assert not out.exists()


def test_a_lora_run_on_a_changed_or_missing_base_is_refused(base, tmp_path, capsys):
    own = tmp_path / "base"
    shutil.copytree(base, own)
    run = tmp_path / "run"
    flags = ("--lora-rank", "2", "--max-steps", "3", "--checkpoint-every", "2")
    assert cli.main(_finetune(own, "instructions.jsonl", run, *flags)) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # the base's weights change under the run (trained on, overwritten, ...)
    weights = ckpt_lib.latest_checkpoint(own) / ckpt_lib.WEIGHTS
    original = weights.read_bytes()
    model = open_run(own, "cpu").model
    with torch.no_grad():
        model.final_norm.scale.add_(0.5)
    from safetensors.torch import save_model

    save_model(model, str(weights))
    base_at = re.escape(str(ckpt_lib.latest_checkpoint(own).resolve()))
    different = rf"the base model '{base_at}' is not the one this LoRA run trained on .*restore"
    resume = ["finetune", "--out", str(run), "--resume", "--max-steps", "5", "--quiet"]
    _one_line_error(capsys, resume, different)
    _one_line_error(capsys, ["generate", "--checkpoint", str(run)], different)
    _one_line_error(capsys, ["eval", "--checkpoint", str(run)], different)
    # gone altogether
    shutil.rmtree(own)
    missing = rf"the base model '{base_at}' of this LoRA run is missing; put it back"
    _one_line_error(capsys, resume, missing)
    _one_line_error(capsys, ["convert", "merge-lora", str(run), str(tmp_path / "m")], missing)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before and not (tmp_path / "m").exists()
    # a copy of the right base, named on resume, is accepted
    shutil.copytree(base, own)
    (ckpt_lib.latest_checkpoint(own) / ckpt_lib.WEIGHTS).write_bytes(original)
    moved = tmp_path / "moved"
    shutil.move(own, moved)
    new_base = str(ckpt_lib.latest_checkpoint(moved))
    assert cli.main([*resume, "--finetune.base", new_base]) == 0
    assert max(losses_by_step(run)) == 5


def test_a_chat_lora_on_a_base_without_the_turn_tokens_is_refused(base, tmp_path, capsys):
    out = tmp_path / "chat"
    flags = _finetune(base, "chat.jsonl", out, "--lora-rank", "2")
    _one_line_error(capsys, flags, r"LoRA keeps the embedding frozen.*finetune fully")
    assert not out.exists()


def test_a_lora_run_is_a_base_like_any_other(lora_run, tmp_path):
    """--init-from a LoRA run starts from its merged weights (full finetuning or more LoRA)."""
    out = tmp_path / "again"
    flags = ("--max-steps", "1", "--train.lr", "1e-9", "--train.log_every", "1")
    assert cli.main(_finetune(lora_run, "instructions.jsonl", out, *flags)) == 0
    merged = lora.merge_lora(open_run(lora_run, "cpu").model)
    started = ckpt_lib.load_trained_model(out)[0]
    for k, v in merged.state_dict().items():  # one step at lr 1e-9 barely moves a weight
        torch.testing.assert_close(started.state_dict()[k], v, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- torchrun


def test_two_process_ddp_lora_is_the_one_process_run(base, tmp_path):
    flags = ("--lora-rank", "4", "--max-steps", "4", "--train.lr", "1e-2",
             "--train.eval_freq", "2", "--train.eval_iter", "3", "--train.log_every", "1",
             "--train.batch_size", "4", "--train.batch_tokens", str(2 * 4 * 256))  # fmt: skip
    ref = tmp_path / "ref"
    assert cli.main(_finetune(base, "instructions.jsonl", ref, *flags)) == 0
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    res = subprocess.run(
        [*cmd, "-m", "gptlab", *_finetune(base, "instructions.jsonl", out, *flags, "--parallel", "ddp")],
        env=CHILD_ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    got, want = losses_by_step(out), losses_by_step(ref)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    # the all-reduce sums the gradients in another order: rounding that AdamW carries into
    # the adapters, 4 steps at lr 1e-2 (tolerances.py; 1.2e-5 measured on an AMD EPYC)
    tol = tolerances.adamw_weights(1e-2, 4)
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=tol)
    for a, b in zip(records(out, "eval"), records(ref, "eval"), strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=tol)
    from safetensors.torch import load_file

    a = load_file(str(ckpt_lib.latest_checkpoint(out) / ckpt_lib.WEIGHTS))
    b = load_file(str(ckpt_lib.latest_checkpoint(ref) / ckpt_lib.WEIGHTS))
    assert a.keys() == b.keys() and all(".lora_" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol)


def test_a_chat_lora_on_a_chat_base_keeps_the_template_and_reloads(base, tmp_path, capsys):
    chat_base = tmp_path / "chat-base"
    flags = ("--max-steps", "2", "--train.lr", "1e-3")
    assert cli.main(_finetune(base, "chat.jsonl", chat_base, *flags)) == 0
    out = tmp_path / "chat-lora"
    more = ("--lora-rank", "2", "--max-steps", "3", "--train.lr", "1e-2", "--train.eval_freq", "3")
    assert cli.main(_finetune(chat_base, "chat.jsonl", out, *more)) == 0
    run = open_run(out, "cpu")
    assert run.chat_template is not None and lora.has_lora(run.model)
    assert run.config.model.vocab_size == open_run(chat_base, "cpu").config.model.vocab_size
    r = _eval(out, capsys)
    assert r["format"] == "chat"
    assert r["loss"] == pytest.approx(records(out, "eval")[-1]["val_loss"], abs=1e-6)
