"""benchmarks/bench_references.py runs gptlab's rows in the configurations it names and reads
nanoGPT's own per-iteration times. The references themselves are not installed here: a
stand-in train.py prints what nanoGPT's does. No timing is asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def refs():
    sys.path.insert(0, str(BENCHMARKS))  # it imports its sibling bench_train
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_references", BENCHMARKS / "bench_references.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_gptlab_rows_are_the_configurations_they_name(refs):
    import bench_train

    plain = refs.gptlab_settings("small", "plain")
    assert plain == {
        **bench_train.row_settings("small", [("plain", {})], 0),
        "model.drop_rate": 0.1,
    }
    assert plain["runtime.precision"] == "fp32" and plain["model.attention"] == "manual"
    auto = refs.gptlab_settings("small", "auto")
    assert "runtime.precision" not in auto and "runtime.compile" not in auto  # left to auto
    assert auto["model.vocab_multiple"] == 64 and auto["model.drop_rate"] == 0.1
    assert auto["train.batch_size"] == plain["train.batch_size"] == 8
    assert refs.gptlab_settings("small", "fp32") == {**auto, "runtime.precision": "fp32"}
    assert refs.gptlab_settings("small", "nodrop") == {**auto, "model.drop_rate": 0.0}
    accum = refs.gptlab_settings("gpt2-124m", "accum4")
    assert accum["train.batch_tokens"] == 4 * 16 * 1024 and accum["model.drop_rate"] == 0.0


FAKE_NANOGPT = """
import sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
open("data/bench/train.bin", "rb").close()  # the tokens it was given
for i in range(int(args["max_iters"]) + 1):  # nanoGPT runs iterations 0..max_iters
    print(f"iter {i}: loss 10.9, time {100.0 * (i + 1):.2f}ms, mfu -100.00%")
print("ARGS", args)
"""


@pytest.fixture
def fake_nanogpt(tmp_path):
    fake = tmp_path / "nanoGPT"
    fake.mkdir()
    (fake / "train.py").write_text(FAKE_NANOGPT)
    for name in ("model.py", "configurator.py"):
        (fake / name).write_text("")
    return fake


def test_nanogpt_times_are_read_from_its_own_prints(refs, fake_nanogpt):
    shapes = refs.shapes("small")
    timed = refs.nanogpt_row(fake_nanogpt, shapes, steps=3, warmup=2, device="cpu", compile=False)
    # iterations 2, 3 and 4: the warm-up ones (0 holds its start-up evaluation) are dropped
    assert timed.seconds == pytest.approx([0.3, 0.4, 0.5])
    assert timed.tokens_per_step == 8 * 256 and timed.peak_mem_mib is None


def test_nanogpt_with_its_own_gpt2_batching_counts_every_micro_batch(refs, fake_nanogpt):
    shapes = refs.shapes("gpt2-124m")
    timed = refs.nanogpt_row(
        fake_nanogpt, shapes, steps=2, warmup=1, device="cpu", compile=False, gpt2_config=True
    )
    assert len(timed.seconds) == 2
    assert timed.tokens_per_step == 12 * 40 * 1024  # 40 micro-batches of 12 windows


def test_nanogpt_is_given_its_gpu_defaults_on_cuda(refs, monkeypatch, fake_nanogpt):
    seen = {}
    real_run = refs.subprocess.run

    def run(cmd, **kwargs):
        seen.update(a[2:].split("=", 1) for a in cmd[2:])
        # the stand-in runs on this CPU whatever device it is told
        return real_run([c if c != "--device=cuda" else "--device=cpu" for c in cmd], **kwargs)

    monkeypatch.setattr(refs.subprocess, "run", run)
    refs.nanogpt_row(fake_nanogpt, refs.shapes("gpt2-124m"), 1, 1, device="cuda", compile=True)
    assert seen["device"] == "cuda" and seen["dtype"] == "bfloat16" and seen["compile"] == "True"
    assert seen["dropout"] == "0.0" and seen["block_size"] == "1024"
    assert seen["batch_size"] == "16" and seen["gradient_accumulation_steps"] == "1"


def test_a_reference_folder_without_its_code_is_refused(refs, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        refs.main(["--nanogpt", str(tmp_path)])
    assert e.value.code == 2
    assert "has no train.py; pass the root of a clone" in capsys.readouterr().err
