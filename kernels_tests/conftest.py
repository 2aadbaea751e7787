"""Kernel tests run on CPU through Triton's interpreter unless told otherwise.

The environment is set here, before anything imports ``bergson_kernels``: Triton reads
``TRITON_INTERPRET`` when the kernel modules are imported.  ``BERGSON_KERNELS_DEBUG_FILL``
makes the wrappers allocate NaN-filled outputs, so every ``isfinite`` check below also
catches an element a kernel forgot to write.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("BERGSON_KERNELS_DEBUG_FILL", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Per-dtype tolerance table for err(kernel, truth) = ||kernel - truth||_F / ||truth||_F, where
# truth is float64 math on the unrounded float64 inputs.  float32: absolute bound.  Half
# precision: at most `ratio` × the error of the PyTorch reference run on the same rounded
# inputs, plus `slack` (the kernel additionally rounds intermediates for its tensor-core dots).
TOLERANCES = {
    torch.float32: dict(bound=1e-5),
    torch.bfloat16: dict(ratio=2.0, slack=1e-3),
    torch.float16: dict(ratio=2.0, slack=2e-4),
}

DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_against_truth(out: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> None:
    """Kernel vs reference vs float64 truth, per the tolerance table; raises AssertionError."""
    assert out.dtype == torch.float32, out.dtype
    assert out.shape == truth.shape, (tuple(out.shape), tuple(truth.shape))
    assert torch.isfinite(out).all(), "non-finite output (an element left unwritten?)"
    if truth.numel() == 0 or truth.norm() == 0:
        assert (out == 0).all()
        return
    e_kernel, e_ref = rel_err(out, truth), rel_err(ref, truth)
    tol = TOLERANCES[dtype]
    if "bound" in tol:
        assert e_kernel <= tol["bound"], f"kernel err {e_kernel:.3g} > {tol['bound']:.1g} (reference: {e_ref:.3g})"
        assert e_ref <= tol["bound"], f"reference err {e_ref:.3g} > {tol['bound']:.1g}"
    else:
        limit = tol["ratio"] * e_ref + tol["slack"]
        assert e_kernel <= limit, f"kernel err {e_kernel:.3g} > {tol['ratio']}×{e_ref:.3g} + {tol['slack']:.1g}"


@pytest.fixture
def check():
    return check_against_truth


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def relayout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Same values, different memory layout: "contig", "transposed" (column-major), "strided"."""
    if kind == "contig":
        return t.contiguous()
    if kind == "transposed":
        return t.T.contiguous().T if t.dim() == 2 else t.contiguous()
    if kind == "strided":  # every other element of a buffer twice as wide
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    raise ValueError(kind)


@pytest.fixture
def layout():
    return relayout
