"""The refactor guard's comparison (benchmarks/refactor_guard.py) on hand-made fingerprints:
identical ones pass, and the first difference of any kind is named. Recording runs the
whole command line for minutes, so it is not tested here."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "refactor_guard.py"


@pytest.fixture(scope="module")
def guard():
    spec = importlib.util.spec_from_file_location("refactor_guard", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fingerprint(**items) -> dict:
    return {
        "about": {"commit": "0" * 40, "src_changed": False},
        "environment": {"torch": "2.13.0", "cpu": "Some CPU", "threads": 1},
        "items": {
            "train/losses": [[1, 8.25], [2, 7.5]],
            "train/evals": [{"step": 2, "val_loss": 7.75}],
            "generate": "Every effort moves you",
            **items,
        },
    }


def test_identical_fingerprints_are_all_same(guard):
    lines, differing = guard.compare(fingerprint(), fingerprint())
    assert differing == 0 and lines[-1] == "all 4 same"
    assert "train/losses: same" in lines


@pytest.mark.parametrize(
    "a, b, where",
    [
        (1.0, math.nextafter(1.0, 2.0), "value"),  # one unit in the last place
        (0.0, -0.0, "value"),  # equal by ==, not by repr
        (1, 1.0, "value"),  # an int never equals a float
        ([[1, 8.25], [2, 7.5]], [[1, 8.25], [2, 7.25]], "[1][1]"),
        ([1, 2], [1, 2, 3], "value"),
        ({"a": 1, "b": 2}, {"a": 1}, ".b"),
        ({"a": 1}, {"a": 1, "c": 2}, ".c"),
        ({"x": {"y": "one"}}, {"x": {"y": "two"}}, ".x.y"),
    ],
)
def test_the_first_difference_is_named(guard, a, b, where):
    found = guard.first_difference(a, b)
    assert found is not None and found.startswith(where + ":")


def test_equal_values_have_no_difference(guard):
    nan = float("nan")
    assert guard.first_difference({"l": [nan, 1e-300]}, {"l": [nan, 1e-300]}) is None
    assert guard.first_difference({"a": 1, "b": 2}, {"b": 2, "a": 1}) is None  # key order


def test_a_differing_item_or_environment_fails(guard):
    lines, differing = guard.compare(
        fingerprint(), fingerprint(**{"train/losses": [[1, 8.25], [2, 7.5000001]]})
    )
    assert differing == 1 and "train/losses: DIFFERS: [1][1]: 7.5 vs 7.5000001" in lines
    other = fingerprint()
    other["environment"]["torch"] = "2.12.0"
    lines, differing = guard.compare(fingerprint(), other)
    assert differing == 1 and lines[2].startswith("environment: DIFFERS")
    lines, differing = guard.compare(fingerprint(extra="x"), fingerprint())
    assert differing == 1 and "extra: DIFFERS: only in A" in lines


def test_compare_from_the_command_line(guard, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(fingerprint()))
    b.write_text(json.dumps(fingerprint(generate="Every effort moves me")))
    assert guard.main(["compare", str(a), str(a)]) == 0
    assert guard.main(["compare", str(a), str(b)]) == 1
    assert "generate: DIFFERS" in capsys.readouterr().out
