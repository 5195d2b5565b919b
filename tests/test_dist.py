"""Data-parallel training: DDP and FSDP2 under torchrun give the single-process run.

The multi-process tests launch `python -m torch.distributed.run --standalone
--nproc_per_node 2 -m gptlab train ...` in a subprocess, exactly as a user would, on CPU
with gloo, and compare against the same command run in one process (fp32, dropout 0,
no compile). Tolerance: 1e-5 absolute on every logged loss and on the saved weights; the
runs differ only in the order float sums are taken (gradient all-reduce, split
evaluation), which moves losses by ~1e-7 here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tolerances
import torch
import torch.distributed as tdist
from conftest import make_corpus_text
from safetensors import safe_open
from safetensors.torch import load_file

from gptlab.cli import main as cli
from gptlab.config.schema import TrainConfig
from gptlab.data.corpus import TokenWindowLoader
from gptlab.errors import GptlabError
from gptlab.model.gpt import GPTModel
from gptlab.recipes.presets import preset
from gptlab.runtime import dist as dist_lib
from gptlab.train.optim import build_optimizer

STEPS = 8
LR = 3e-3
# Two processes sum each step's gradients in another order than one (the all-reduce):
# the runs differ by rounding alone, which AdamW carries into the weights (tolerances.py).
# The losses are smooth in the weights and drift no further in these runs.
TOL = tolerances.adamw_weights(LR, STEPS)


def _tiny_model_config():
    cfg = preset("tiny").model  # ties tok_emb and out_head
    cfg.vocab_size = 128  # the preset's GPT-2 vocabulary would be most of the work
    return cfg


if not (tdist.is_available() and tdist.is_gloo_available()):  # pragma: no cover
    pytest.skip("this PyTorch build has no gloo backend", allow_module_level=True)


# --------------------------------------------------------------------------- the slicing, directly


@pytest.mark.parametrize("world,per_rank", [(1, 4), (2, 1), (2, 3), (4, 2)])
def test_ranks_take_disjoint_micro_batches_that_cover_the_step(world, per_rank):
    accum = world * per_rank
    loader = TokenWindowLoader(np.arange(5000) % 997, 3, 8, seed=7)
    for step in range(3):
        single = {int(i) for i in range(step * accum, (step + 1) * accum)}
        seen: list[int] = []
        windows: list[tuple[int, ...]] = []
        for rank in range(world):
            mine = dist_lib.micro_batch_indices(step, accum, rank, world)
            assert len(mine) == per_rank
            seen += mine
            for i in mine:
                x, _ = loader.batch(0, i)
                windows += [tuple(row.tolist()) for row in x]
        assert sorted(seen) == sorted(single)  # disjoint (no repeats) and complete
        expected = [tuple(row.tolist()) for i in sorted(single) for row in loader.batch(0, i)[0]]
        assert sorted(windows) == sorted(expected)  # the same token windows as one process
        assert len(set(windows)) == len(windows)


def test_evaluation_batches_are_shared_out_with_equal_counts():
    for n in range(1, 9):
        for world in (1, 2, 3):
            plans = [dist_lib.eval_batch_indices(n, r, world) for r in range(world)]
            assert len({len(p) for p in plans}) == 1  # same number of forwards on each rank
            real = sorted(i for p in plans for i in p if i is not None)
            assert real == list(range(n))


def test_accumulation_steps_follow_the_world_size():
    assert dist_lib.accum_per_rank(4096, 512, 1) == 8
    assert dist_lib.accum_per_rank(4096, 512, 4) == 2
    assert dist_lib.accum_per_rank(0, 512, 4) == 1  # one micro-batch per rank
    with pytest.raises(GptlabError, match=r"multiple of 1536; use --train.batch_tokens 3072"):
        dist_lib.accum_per_rank(4096, 512, 3)


def test_environment_detection(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    d = dist_lib.detect()
    assert (d.enabled, d.rank, d.world_size, d.is_main) == (False, 0, 1, True)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    d = dist_lib.detect()
    assert (d.enabled, d.rank, d.local_rank, d.world_size, d.is_main) == (True, 3, 1, 4, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(GptlabError, match="inconsistent torchrun environment"):
        dist_lib.detect()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(GptlabError, match="RANK='x' is not an integer"):
        dist_lib.detect()


def test_single_process_is_left_alone():
    model = GPTModel(_tiny_model_config())
    d = dist_lib.Dist()
    assert dist_lib.parallelize(model, "fsdp", d) is model
    t = torch.tensor([1.5, 2.0])
    assert d.mean(t) is t and d.agree(3) == 3 and d.agree_on_reason("epochs", ()) == "epochs"
    with pytest.raises(GptlabError, match="runtime.parallel must be one of ddp, fsdp"):
        dist_lib.parallelize(model, "zero3", d)


def test_optimizer_state_names_round_trip():
    torch.manual_seed(0)
    model = GPTModel(_tiny_model_config())  # ties tok_emb and out_head
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    model(torch.randint(0, 100, (2, 8))).sum().backward()
    opt.step()
    osd = opt.state_dict()
    named = dist_lib.optimizer_state_to_names(osd, model, opt)
    assert "tok_emb.weight" in named["state"]  # a tied matrix under its first name, once
    assert len(named["state"]) == len(osd["state"])
    back = dist_lib.optimizer_state_to_ids(named)
    assert back["param_groups"] == osd["param_groups"]
    assert back["state"].keys() == osd["state"].keys()
    for i, s in osd["state"].items():
        for k, v in s.items():
            assert torch.equal(back["state"][i][k], v)


def test_materialize_keeps_tied_weights_tied():
    with torch.device("meta"):
        model = GPTModel(_tiny_model_config())
    model = dist_lib.materialize(model, torch.device("cpu"))
    assert model.out_head.weight is model.tok_emb.weight
    assert model.tok_emb.weight.device.type == "cpu"


# --------------------------------------------------------------------------- runs under torchrun


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, gptlab_cache):
    """A corpus for char-level runs; GPTLAB_CACHE (set by conftest) is inherited by torchrun."""
    root = tmp_path_factory.mktemp("dist")
    (root / "corpus.txt").write_text(make_corpus_text(60), encoding="utf-8")
    return root


def _args(workdir: Path, out: Path) -> list[str]:
    # 4 micro-batches of 4 x 32 tokens per step: 4 in one process, 2 per rank in two;
    # eval_iter 3 splits unevenly over 2 ranks on purpose.
    return [
        "train",
        "--preset", "tiny",
        "--data", str(workdir / "corpus.txt"),
        "--data.tokenizer", "char",
        "--max-steps", str(STEPS),
        "--train.batch_size", "4",
        "--train.batch_tokens", "512",
        "--train.lr", str(LR),
        "--train.log_every", "1",
        "--train.eval_freq", "4",
        "--train.eval_iter", "3",
        "--train.sample_tokens", "5",
        "--train.checkpoint_every", "4",
        "--train.keep_last", "5",
        "--precision", "fp32",
        "--compile", "off",
        "--device", "cpu",
        "--out", str(out),
        "--quiet",
    ]  # fmt: skip


def _torchrun(args: list[str], env: dict[str, str] | None = None, timeout: float = 180):
    """Run `gptlab ARGS` as `torchrun --standalone --nproc_per_node 2 -m gptlab ...`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [*cmd, "-m", "gptlab", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,  # a guard against a hang, not a measurement
    )


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _curve(run: Path) -> dict[str, list[float]]:
    recs = _records(run)
    train = {r["step"]: r["loss"] for r in recs if r["event"] == "train"}
    assert sorted(train) == list(range(1, STEPS + 1))
    evals = [(r["step"], r["train_loss"], r["val_loss"]) for r in recs if r["event"] == "eval"]
    return {"train": [train[s] for s in sorted(train)], "eval": evals}


def _assert_same_curve(run: Path, ref: Path) -> None:
    got, want = _curve(run), _curve(ref)
    assert got["train"] == pytest.approx(want["train"], abs=TOL, rel=0)
    assert [e[0] for e in got["eval"]] == [e[0] for e in want["eval"]]
    for g, w in zip(got["eval"], want["eval"], strict=True):
        assert g[1:] == pytest.approx(w[1:], abs=TOL, rel=0)


def _assert_same_weights(ckpt: Path, ref_ckpt: Path) -> None:
    a, b = load_file(ckpt / "model.safetensors"), load_file(ref_ckpt / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=TOL, rtol=0)
    with (
        safe_open(ckpt / "model.safetensors", "pt") as f,
        safe_open(ref_ckpt / "model.safetensors", "pt") as g,
    ):
        assert f.metadata() == g.metadata()  # the tied matrix is stored once, the same way


def _interrupted_copy(run: Path, dest: Path, step: int) -> Path:
    """A copy of `run` as if it had stopped right after saving checkpoint `step`."""
    shutil.copytree(run, dest)
    ckpts = dest / "checkpoints"
    for p in ckpts.glob("step-*"):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    (ckpts / "latest").unlink()
    return dest


@pytest.fixture(scope="module")
def ref_run(workdir):
    out = workdir / "ref"
    assert cli.main(_args(workdir, out)) == 0
    return out


@pytest.fixture(scope="module")
def ddp_run(workdir):
    out = workdir / "ddp"
    res = _torchrun(_args(workdir, out) + ["--parallel", "ddp"])
    assert res.returncode == 0, res.stdout + res.stderr
    return out, res


@pytest.fixture(scope="module")
def fsdp_run(workdir):
    out = workdir / "fsdp"
    res = _torchrun(_args(workdir, out) + ["--parallel", "fsdp"])
    assert res.returncode == 0, res.stdout + res.stderr
    return out, res


def test_ddp_reproduces_the_single_process_run(ddp_run, ref_run):
    out, res = ddp_run
    _assert_same_curve(out, ref_run)
    _assert_same_weights(
        out / "checkpoints" / "step-00000008", ref_run / "checkpoints" / "step-00000008"
    )
    # rank 0 alone logs and talks: one start record, one summary line
    assert [r["event"] for r in _records(out)].count("start") == 1
    start = next(r for r in _records(out) if r["event"] == "start")
    assert (start["world_size"], start["parallel"], start["accum"]) == (2, "ddp", 4)
    assert res.stdout.count("done (max_steps)") == 1


def test_fsdp_reproduces_the_single_process_run(fsdp_run, ref_run):
    out, _ = fsdp_run
    _assert_same_curve(out, ref_run)
    # the gathered checkpoint is the single-process format, weights and optimizer alike
    ckpt, ref_ckpt = (
        out / "checkpoints" / "step-00000008",
        ref_run / "checkpoints" / "step-00000008",
    )
    _assert_same_weights(ckpt, ref_ckpt)
    got = torch.load(ckpt / "state.pt", weights_only=True)["optimizer"]
    want = torch.load(ref_ckpt / "state.pt", weights_only=True)["optimizer"]
    assert got["param_groups"] == want["param_groups"]
    for i, s in want["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(got["state"][i][k], v, atol=TOL, rtol=0)


# Every architecture option on (rotary, RMSNorm, QK-norm, ReLU^2, no biases, multi-query
# attention, soft-capped logits, an untied head): new parameters (q_norm, k_norm), missing
# ones (biases, the position table) and smaller k/v matrices, through DDP and FSDP2 alike.
MODERN = [
    "--model.positions", "rope", "--model.norm", "rmsnorm", "--model.qk_norm", "true",
    "--model.mlp", "relu2", "--model.bias", "false", "--model.n_kv_heads", "1",
    "--model.logit_softcap", "15", "--model.tie_weights", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def modern_ref(workdir):
    out = workdir / "modern-ref"
    assert cli.main(_args(workdir, out) + MODERN) == 0
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_architecture_option_runs_under_torchrun_as_in_one_process(mode, workdir, modern_ref):
    out = workdir / f"modern-{mode}"
    res = _torchrun(_args(workdir, out) + MODERN + ["--parallel", mode])
    assert res.returncode == 0, res.stdout + res.stderr
    _assert_same_curve(out, modern_ref)
    _assert_same_weights(
        out / "checkpoints" / "step-00000008", modern_ref / "checkpoints" / "step-00000008"
    )


@pytest.mark.parametrize("which", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_on_one_process(which, ddp_run, fsdp_run, ref_run, workdir):
    run = {"ddp": ddp_run, "fsdp": fsdp_run}[which][0]
    resumed = _interrupted_copy(run, workdir / f"{which}-to-1", step=4)
    assert cli.main(_args(workdir, resumed) + ["--resume"]) == 0
    _assert_same_curve(resumed, ref_run)
    _assert_same_weights(
        resumed / "checkpoints" / "step-00000008", ref_run / "checkpoints" / "step-00000008"
    )


def test_one_process_checkpoint_resumes_on_two_fsdp_processes(ref_run, workdir):
    resumed = _interrupted_copy(ref_run, workdir / "1-to-fsdp", step=4)
    res = _torchrun(_args(workdir, resumed) + ["--parallel", "fsdp", "--resume"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming from" in res.stdout
    _assert_same_curve(resumed, ref_run)
    _assert_same_weights(
        resumed / "checkpoints" / "step-00000008", ref_run / "checkpoints" / "step-00000008"
    )


# Muon's Newton-Schulz iteration runs in bf16: the ~1e-7 differences in summation order
# between one and two processes flip some bf16 roundings, which moves the weights by up to
# ~3e-3 after 8 steps (measured: 2.1e-3 DDP, 2.5e-3 FSDP2) and the losses by ~5e-5.
MUON_LOSS_TOL, MUON_TOL = 2e-4, 1e-2


@pytest.fixture(scope="module")
def muon_ref_run(workdir):
    out = workdir / "muon-ref"
    assert cli.main(_args(workdir, out) + ["--train.optimizer", "muon"]) == 0
    return out


def _assert_close_muon_run(run: Path, ref: Path) -> None:
    got, want = _curve(run), _curve(ref)
    assert got["train"] == pytest.approx(want["train"], abs=MUON_LOSS_TOL, rel=0)
    a, b = (r / "checkpoints" / "step-00000008" for r in (run, ref))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=MUON_TOL, rtol=0)
    # the single-process layout: {"adamw": ..., "muon": ...}, numbered the same way
    sa = torch.load(a / "state.pt", weights_only=True)["optimizer"]
    sb = torch.load(b / "state.pt", weights_only=True)["optimizer"]
    assert sa.keys() == sb.keys() == {"adamw", "muon"}
    for part in sb:
        assert _tuples(sa[part]["param_groups"]) == _tuples(sb[part]["param_groups"])
        assert sa[part]["state"].keys() == sb[part]["state"].keys()
        for i, s in sb[part]["state"].items():
            for k, v in s.items():
                torch.testing.assert_close(sa[part]["state"][i][k], v, atol=MUON_TOL, rtol=0)


def _tuples(groups: list[dict]) -> list[dict]:
    """Param groups with list values as tuples: a state that went through FSDP2's loader
    comes back with betas and ns_coefficients as lists (the same numbers)."""
    return [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in groups
    ]


def test_muon_under_ddp_follows_the_single_process_run(muon_ref_run, workdir):
    out = workdir / "muon-ddp"
    res = _torchrun(_args(workdir, out) + ["--parallel", "ddp", "--train.optimizer", "muon"])
    assert res.returncode == 0, res.stdout + res.stderr
    _assert_close_muon_run(out, muon_ref_run)


def test_muon_under_fsdp_resumes_a_one_process_run_and_saves_its_format(muon_ref_run, workdir):
    """FSDP2 shards every matrix; torch.optim.Muon's ops on the DTensor shards still
    orthogonalise the whole matrix. The run loads a one-process checkpoint into shards (both
    optimizers' state) and gathers its own back into the one-process format."""
    resumed = _interrupted_copy(muon_ref_run, workdir / "muon-1-to-fsdp", step=4)
    muon = ["--train.optimizer", "muon"]
    res = _torchrun(_args(workdir, resumed) + ["--parallel", "fsdp", "--resume", *muon])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming from" in res.stdout
    _assert_close_muon_run(resumed, muon_ref_run)
    assert cli.main(["generate", "--checkpoint", str(resumed), "--max-new-tokens", "2"]) == 0


def test_fsdp_checkpoint_generates_on_one_process(fsdp_run, capsys):
    out, _ = fsdp_run
    capsys.readouterr()
    args = ["generate", "--checkpoint", str(out), "--prompt", "Every", "--max-new-tokens", "8"]
    assert cli.main(args + ["--seed", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Every") and len(text.strip()) > len("Every")


def test_an_error_on_rank_1_ends_the_job(workdir):
    res = _torchrun(
        _args(workdir, workdir / "fail"), env={dist_lib.FAIL_RANK_ENV: "1"}, timeout=120
    )
    assert res.returncode != 0
    assert "injected failure on rank 1 at step 2" in res.stdout + res.stderr


def test_a_hung_rank_is_ended_by_the_process_group_timeout(workdir):
    res = _torchrun(
        # 10 s: well above start-up skew between ranks on a busy machine, which must not
        # trip it; the hung rank's peer waits it out once.
        _args(workdir, workdir / "hang") + ["--runtime.dist_timeout", "10"],
        env={dist_lib.FAIL_RANK_ENV: "1:hang"},
        timeout=120,
    )
    assert res.returncode != 0
    # it hung in training, not while starting up: the first step's evaluation was printed
    assert "(Step 000000)" in res.stdout
    assert "Timed out" in res.stdout + res.stderr


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(workdir, ref_run):
    out = workdir / "signal"
    res = _torchrun(
        _args(workdir, out) + ["--parallel", "fsdp"], env={dist_lib.FAIL_RANK_ENV: "1:signal"}
    )
    assert res.returncode != 0  # 143 from every rank, as a single process stopped by SIGTERM
    assert "stopped by SIGTERM at step 2" in res.stdout  # rank 0 got no signal, yet stopped
    end = [r for r in _records(out) if r["event"] == "end"]
    assert [(e["step"], e["reason"]) for e in end] == [(2, "SIGTERM")]
    # the final save gathered every rank's shards: a complete checkpoint at step 2
    assert (out / "checkpoints" / "step-00000002" / "state.pt").is_file()
    ref = load_file(ref_run / "checkpoints" / "step-00000004" / "model.safetensors")
    got = load_file(out / "checkpoints" / "step-00000002" / "model.safetensors")
    assert got.keys() == ref.keys()
    train = [r["loss"] for r in _records(out) if r["event"] == "train"]
    assert train == pytest.approx(_curve(ref_run)["train"][:2], abs=TOL, rel=0)
