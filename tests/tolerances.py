"""Tolerances for comparing two computations of the same thing, derived from what they
compare instead of tuned on one CPU.

Two floating-point computations that add the same terms in another order (a matmul
blocked differently by another CPU's kernels, a sum split over threads or over DDP ranks, a
fused kernel, a chunked loss) differ by rounding alone, and how much depends on the dtype,
the size of the terms and how many there are, not on the machine:

- `reordered_sum`: one sum of `terms` values of size up to `scale`, in two orders. Each
  order's error is at most ~terms x eps x scale (the classic bound, gamma_n x sum |x_i|), so
  the two differ by at most twice that. Rounding errors mostly cancel (the typical error
  grows like sqrt(terms)), so the bound holds with room on every CPU.
- `assert_close_to_rounding` and `assert_as_accurate`: for a deep computation (a whole
  model's logits or gradients) no such bound is practical; the reference is the same
  computation in float64, which measures the rounding of the plain fp32 path on this CPU.
  The path under test may differ from the plain one by a few times that rounding (or be
  about as close to float64): a wrong mask or a wrong weight is off by far more.
- `adamw_weights`: two training runs that differ only in summation order (DDP against one
  process) drift apart through the optimizer, which amplifies rounding: AdamW normalises each
  gradient coordinate by its own running scale, so a coordinate whose gradient is nearly
  zero moves by up to lr whatever its size, and the rounding of its sign decides the
  direction. The bound is a fraction of the largest distance the weights can move.
"""

from __future__ import annotations

import torch

# A coordinate whose gradient cancels to ~1e-4 of its terms' size has its AdamW step moved
# by rounding at ~1e-3 of lr (fp32's eps, 1.2e-7, over that cancellation), every step. The
# largest drift measured between two processes and one was 3.0e-4 of lr x steps (the LoRA
# DDP test on an AMD EPYC without AMX: 1.19e-5 after 4 steps at 1e-2); the Intel (AMX)
# development CPU stayed under 1e-5 in every such test. 2e-3 leaves ~7x room.
ADAMW_ROUNDING_SHARE = 2e-3


def eps(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps


def reordered_sum(terms: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """The largest difference between two orders of one sum of `terms` values of magnitude
    up to `scale` in `dtype`: 2 x terms x eps x scale (each order's worst-case error)."""
    return 2.0 * terms * eps(dtype) * scale


def adamw_weights(lr: float, steps: int) -> float:
    """How far two AdamW runs' weights may drift apart after `steps` steps at learning rates
    up to `lr` when they differ only in the order of their gradient sums (see above)."""
    return ADAMW_ROUNDING_SHARE * lr * steps


def assert_close_to_rounding(
    got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor, factor: float = 4.0
) -> None:
    """`got` (the path under test) and `want` (the plain path) compute what `exact` computes
    in float64, in other orders: they may differ by about twice the rounding error of one of
    them, so `factor` (4) times `want`'s largest error against `exact`, plus a few eps of
    the values' scale for a `want` that happens to be exact. A real defect (a wrong mask, a
    missing term, a stale cache entry) is off by orders of magnitude more."""
    exact = exact.detach().double()
    want_err = (want.detach().double() - exact).abs().max().item()
    diff = (got.detach().double() - want.detach().double()).abs().max().item()
    floor = 8 * eps(want.dtype) * max(exact.abs().max().item(), 1e-30)
    allowed = factor * want_err + floor
    assert diff <= allowed, (
        f"{diff:.3g} apart, where rounding alone explains {allowed:.3g} (the plain path is "
        f"{want_err:.3g} from float64)"
    )


def assert_as_accurate(
    got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor, factor: float = 4.0
) -> None:
    """`got` (the path under test) is at most `factor` times as far from `exact` (float64)
    as `want` (the plain fp32 path), plus a few eps of the values' scale."""
    exact = exact.detach().double()
    err_got = (got.detach().double() - exact).abs().max().item()
    err_want = (want.detach().double() - exact).abs().max().item()
    floor = 8 * eps(got.dtype) * max(exact.abs().max().item(), 1e-30)
    assert err_got <= factor * err_want + floor, (
        f"error against float64 {err_got:.3g}, the plain fp32 path's {err_want:.3g} "
        f"(allowed {factor:g}x that + {floor:.3g})"
    )
