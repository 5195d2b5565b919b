"""The speed-ladder script composes its rows as documented and runs one through the trainer.

No timing is asserted: figures belong in BENCHMARKS.md, not in tests.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_ladder_starts_plain_and_ends_with_every_switch(bench, device):
    rows = bench.ladder(device)
    first = bench.row_settings("small", rows, 0)
    assert first["model.attention"] == "manual" and first["runtime.precision"] == "fp32"
    assert not first["train.fused_optimizer"] and first["runtime.compile"] == "off"
    assert first["runtime.host_memory"] == "release" and first["runtime.fast_dropout"] == "off"
    last = bench.row_settings("small", rows, len(rows) - 1)
    assert last["model.attention"] == "sdpa" and last["runtime.precision"] == "bf16"
    assert last["train.fused_optimizer"] and last["runtime.compile"] == "on"
    assert last["runtime.chunked_loss"] == "on" and last["model.vocab_multiple"] == 64
    assert last["train.batch_size"] == 2 * bench.WORKLOADS["small"]["train"]["batch_size"]
    # 4 micro-batches of the doubled batch per optimizer step
    assert last["train.batch_tokens"] == 4 * last["train.batch_size"] * last["model.context_length"]
    # the host-side switches are CPU rows only (on CUDA they would change nothing)
    host_rows = [
        name
        for name, change in rows
        if "runtime.host_memory" in change or "runtime.fast_dropout" in change
    ]
    assert len(host_rows) == (2 if device == "cpu" else 0)
    if device == "cpu":
        assert last["runtime.host_memory"] == "keep" and last["runtime.fast_dropout"] == "on"
    # the switch auto leaves off on this device comes last
    assert rows[-1][0] == ("+ compile" if device == "cpu" else "+ chunked loss")


# A model that steps in milliseconds, for the scripts' own code paths.
TINY = {
    "model.vocab_size": 97,
    "model.context_length": 16,
    "model.emb_dim": 32,
    "model.n_heads": 2,
    "model.n_layers": 1,
    "runtime.compile": "off",
}


def test_a_row_runs_through_the_trainer(bench):
    settings = {**TINY, "train.batch_size": 2}
    r = bench.run_row(settings, "cpu", steps=3, warmup=1, max_seconds=5.0)
    assert r["steps"] == 3 and r["tokens_per_s"] > 0 and r["peak_mem_mib"] > 0
    assert r["batch_size"] == 2 and r["context_length"] == 16 and r["chunked_loss"] is True
    assert r["micro_batches"] == 1
    # with batch_tokens, a step runs its micro-batches over data sized for them
    r = bench.run_row(
        {**settings, "train.batch_tokens": 3 * 2 * 16}, "cpu", steps=3, warmup=1, max_seconds=5.0
    )
    assert r["micro_batches"] == 3 and r["steps"] == 3 and r["tokens_per_s"] > 0


def test_the_bare_step_of_the_probe_trains_the_model():
    """benchmarks/probe_step.py times bare steps against the trainer's; its bare loop must
    be a real training step (forward, backward, clip, AdamW) or the comparison is void."""
    spec = importlib.util.spec_from_file_location("probe_step", SCRIPT.with_name("probe_step.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    settings = {**TINY, "model.drop_rate": 0.0, "train.batch_size": 4, "train.lr": 1e-2}
    for read_loss in (True, False):
        r = probe.bare_row(settings, "cpu", steps=12, warmup=1, read_loss=read_loss)
        assert r["steps"] == 12 and r["tokens_per_s"] > 0
        # one fixed batch, 13 AdamW steps at lr 1e-2: the model must fit it markedly
        assert r["last_loss"] < r["first_loss"] - 1.0, r
