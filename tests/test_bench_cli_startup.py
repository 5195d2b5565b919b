"""The CLI start-up benchmark measures fresh processes and reports their heavy imports.

No timing is asserted: figures belong in BENCHMARKS.md, not in tests.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cli_startup.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cli_startup", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_help_runs_once_without_torch_and_makes_one_table_row(bench):
    rows = bench.measure((("--help",),), runs=1)
    assert len(rows) == 1
    row = rows[0]
    assert (row.command, row.runs, row.exit_code) == ("gptlab --help", 1, 0)
    assert 0 < row.best_s <= row.median_s
    assert "torch" not in row.heavy
    lines = bench.format_table(rows).splitlines()
    assert len(lines) == 3  # header, rule, one row
    assert all(line.count("|") == 7 for line in lines)
    assert "`gptlab --help`" in lines[2]


def test_the_import_check_sees_a_heavy_module_when_one_is_imported(bench):
    # otherwise its "torch not imported" for --help would prove nothing
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import numpy"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert bench.heavy_in(res.stderr) == ["numpy"]
