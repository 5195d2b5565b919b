"""The CPU-side speed switches: fast dropout masks and the allocator that keeps memory.

Fast dropout must be dropout (the same distribution, scaling and gradient) and must stay
off for the walk-through's model, which consumes the random stream exactly as its readers'
code does. The allocator switch is checked by its mechanism (a freed block comes back
without page faults), each case in a fresh process since the setting is process-wide.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from reference_walkthrough import RefGPTModel

from gptlab.model.gpt import Dropout, GPTModel, fast_dropout_mask, use_fast_dropout

# ----------------------------------------------------------------------------- fast dropout


def _fast(p: float) -> Dropout:
    d = Dropout(p)
    d.fast = True
    return d.train()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fast_dropout_drops_p_and_scales_the_rest(p):
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    y = _fast(p)(x)
    dropped = (y == 0).float().mean().item()
    # binomial standard error at 1e6 draws is at most 5e-4; the 15-bit threshold adds < 2e-5
    assert abs(dropped - p) < 3e-3
    kept = y[y != 0]
    assert torch.all(kept == 1.0 / (1.0 - p))
    assert abs(y.mean().item() - 1.0) < 6e-3  # dropout keeps the expectation


def test_fast_dropout_lanes_are_independent_of_position():
    """Each 64-bit draw feeds 4 elements; every lane must drop at the same rate (a biased
    lane, e.g. from the sign bit, would show as one of 4 positions dropping differently)."""
    torch.manual_seed(1)
    keep = fast_dropout_mask((250_000, 4), 0.5, "cpu").float()
    rates = 1 - keep.mean(dim=0)
    assert torch.all((rates - 0.5).abs() < 5e-3), rates


def test_fast_dropout_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    x = torch.randn(64, 33, requires_grad=True)
    y = _fast(0.25)(x)
    y.sum().backward()
    expected = (y != 0).float() / 0.75
    torch.testing.assert_close(x.grad, expected)
    torch.testing.assert_close(y, x.detach() * expected)


def test_fast_dropout_follows_the_seed_and_is_off_in_eval():
    d = _fast(0.3)
    x = torch.randn(1000)
    torch.manual_seed(5)
    a = d(x)
    torch.manual_seed(5)
    assert torch.equal(d(x), a)  # the global generator drives it: resume replays it
    assert not torch.equal(d(x), a)
    d.eval()
    assert torch.equal(d(x), x)
    assert torch.equal(_fast(0.0)(x), x)


def test_the_walkthrough_model_keeps_pytorch_dropout(walkthrough_cfg):
    """Without use_fast_dropout, train-mode outputs equal the reference's bit for bit from
    the same seed: dropout draws its masks exactly as the walk-through's nn.Dropout."""
    cfg = {**walkthrough_cfg, "drop_rate": 0.2, "attention": "manual"}
    torch.manual_seed(123)
    ours = GPTModel(cfg).train()
    torch.manual_seed(123)
    ref = RefGPTModel({k: v for k, v in cfg.items() if k != "attention"}).train()
    assert all(not m.fast for m in ours.modules() if isinstance(m, Dropout))
    x = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]))
    torch.manual_seed(9)
    a = ours(x)
    torch.manual_seed(9)
    b = ref(x)
    # No float64 reference here: dropout draws its masks per dtype. The two models order
    # their sums differently; 1e-5 is ~80 fp32 eps, far above that rounding (it held with
    # AVX512 and AVX2 kernels and on two threads) and far below one mask drawn otherwise.
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sdpa_model_with_fast_dropout_takes_the_explicit_path(walkthrough_cfg):
    """SDPA has no fast masks: with them on, the sdpa model computes attention the explicit
    way with the same masks, so it matches the manual model draw for draw."""
    cfg = {**walkthrough_cfg, "drop_rate": 0.3}
    models = []
    for attention in ("sdpa", "manual"):
        torch.manual_seed(123)
        m = GPTModel({**cfg, "attention": attention}).train()
        use_fast_dropout(m)
        models.append(m)
    x = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]))
    torch.manual_seed(4)
    a = models[0](x)
    torch.manual_seed(4)
    b = models[1](x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # as above: same masks, other sums
    use_fast_dropout(models[0], False)
    torch.manual_seed(4)
    assert not torch.allclose(models[0](x), a)  # PyTorch's own masks: another stream


# ----------------------------------------------------------------------------- the allocator

_PROBE = textwrap.dedent(
    """
    import resource, sys
    import torch
    from gptlab.runtime.device import keep_freed_host_memory
    if sys.argv[1] == "keep":
        assert keep_freed_host_memory()
    sizes = [96, 40, 64, 40]  # MiB, all above glibc's largest mmap threshold (32 MiB)
    faults = []
    for step in range(6):  # like training steps: the same large tensors made and freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        held = [torch.ones(size * 2**20, dtype=torch.uint8) for size in sizes]  # touched
        del held
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(*faults)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults():
    """Measured on a training step of the 6x384 model: ~600k page faults per step by
    default, ~0 with the memory kept. The probe repeats a step's pattern of large tensors."""
    faults = {}
    for mode in ("release", "keep"):
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
        )
        faults[mode] = [int(f) for f in out.stdout.split()]
    pages = 240 * 2**20 // 4096  # all four tensors, 4 KiB pages
    assert all(f > pages // 2 for f in faults["release"])  # mapped afresh every step
    assert faults["keep"][0] > pages // 2  # the first step maps its memory once
    # then reuses it. glibc's heap settles over a few steps (a freed block is split or
    # merged in another place): up to 20,480 faults in one later step and 24,576 over the
    # five (20 probes on an AMD EPYC; a fixed 1/50 of a step after step 3 failed there
    # one run in two). Released memory maps five steps' worth; kept, under one.
    assert sum(faults["keep"][1:]) < pages
