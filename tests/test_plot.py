"""The loss plot files are real PDF and PNG images."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from gptlab import plot_losses
from gptlab.errors import GptlabError
from gptlab.observe.plot import plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_pdf(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"%PDF-")
    assert data.rstrip().endswith(b"%%EOF")
    assert len(data) > 1000


def check_png(path: Path) -> tuple[int, int]:
    """Asserts a PNG with an IHDR chunk and image data; returns (width, height)."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert b"IDAT" in data and data.endswith(b"IEND\xaeB`\x82")
    assert len(data) > 5000  # a drawn figure, not an empty canvas
    return width, height


def test_plot_losses_writes_pdf_and_png(tmp_path):
    out = tmp_path / "plots"
    fig = plot_losses(
        [0.0, 0.5, 1.0, 1.5, 2.0],
        [0, 1000, 2000, 3000, 4000],
        [10.0, 7.0, 5.5, 4.8, 4.2],
        [10.1, 7.5, 6.4, 6.2, 6.3],
        out,
    )
    check_pdf(out / "loss-plot.pdf")
    w, h = check_png(out / "loss-plot.png")
    assert (w, h) == (750, 450)  # 5 x 3 inches at 150 dpi
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["Training loss", "Validation loss"]
    assert list(ax.lines[1].get_ydata()) == [10.1, 7.5, 6.4, 6.2, 6.3]
    assert fig.axes[1].get_xlabel() == "Tokens seen"


def test_plot_run_errors(tmp_path):
    with pytest.raises(GptlabError, match="no metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n')
    with pytest.raises(GptlabError, match="no evaluations"):
        plot_run(tmp_path)
