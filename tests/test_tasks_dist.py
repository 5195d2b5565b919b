"""Task evaluation shared across two processes (torchrun, gloo on CPU) reports exactly what
one process reports: items are dealt out by rank and the counts all-reduced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as tdist

from gptlab.cli.main import main

DATA = Path(__file__).parent / "data" / "tasks"

if not (tdist.is_available() and tdist.is_gloo_available()):  # pragma: no cover
    pytest.skip("this PyTorch build has no gloo backend", allow_module_level=True)


def test_two_processes_report_what_one_does(tiny_run, tmp_path):
    # 7 items: the ranks get 4 and 3, so one rank runs a padding forward pass
    items = [
        {"context": f"Item {i} says", "choices": ["yes", "no", "maybe"][: 2 + i % 2], "answer": i % 2}
        for i in range(7)
    ]  # fmt: skip
    (tmp_path / "mc7.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    suite = tmp_path / "suite.toml"
    suite.write_text(
        (DATA / "suite.toml").read_text().replace('data = "', f'data = "{DATA}/')
        + '\n[[tasks]]\nname = "odd"\ndata = "mc7.jsonl"\nnum_fewshot = 2\n'
    )
    flags = ["eval", "--checkpoint", str(tiny_run), "--suite", str(suite), "--device", "cpu"]
    assert main([*flags, "--out", str(tmp_path / "one.json")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two.json"
    p = subprocess.run(
        [*cmd, "-m", "gptlab", *flags, "--out", str(out), "--batch-size", "2"],
        env=env, capture_output=True, text=True, timeout=300,  # a guard against a hang
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads(out.read_text())
    assert p.stdout.count("core (mean centred)") == 1  # only rank 0 reports
    assert set(one["tasks"]) == set(two["tasks"]) and len(one["tasks"]) == 7
    for name, a in one["tasks"].items():
        b = two["tasks"][name]
        for key in ("n_items", "n_truncated", "acc", "acc_norm", "acc_bytes", "centred"):
            assert a.get(key) == b.get(key), (name, key)
        if "logprob" in a:  # a sum in another order: equal to rounding. Each item is scored
            # in another batch (other matmul blockings): fp32's eps (1.2e-7) for every
            # token's log-probability, over a handful of tokens: 1e-6 of the total
            assert b["logprob"] == pytest.approx(a["logprob"], rel=1e-6)
    assert two["core"] == pytest.approx(one["core"], abs=1e-12)
