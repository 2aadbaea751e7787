"""project_scale: Triton kernel vs reference vs float64 truth."""

from __future__ import annotations

import pytest
import torch

from bergson_kernels import project_scale, reference

DTYPES = [
    pytest.param(d, id=i) for d, i in [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")]
]

# (id, T, I, q, with col_scale)
CASES = [
    ("T1-I341-q24", 1, 341, 24, False),
    ("T63-I341-q8-beta", 63, 341, 8, True),
    ("T150-I97-q64-beta", 150, 97, 64, True),
    ("T20-I50-q1", 20, 50, 1, False),
    ("T17-I50-q130-beta-two-q-blocks", 17, 50, 130, True),
]


def make_inputs(T: int, I: int, q: int, with_scale: bool):
    x = torch.randn(T, I, dtype=torch.float64)
    R = torch.randn(q, I, dtype=torch.float64) / q**0.5
    beta = torch.rand(I, dtype=torch.float64) + 0.5 if with_scale else None
    return x, R, beta


def truth(x, R, beta):
    """float64, one token at a time, independent of reference.py."""
    scale = beta if beta is not None else torch.ones_like(x[0])
    return torch.stack([R @ (x[t] * scale) for t in range(x.shape[0])])


def cast(t, dtype):
    return None if t is None else t.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I,q,with_scale", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_matches_truth(T, I, q, with_scale, dtype, check):
    x, R, beta = make_inputs(T, I, q, with_scale)
    args = (x.to(dtype), R.to(dtype), cast(beta, dtype))
    check(project_scale(*args), reference.project_scale(*args), truth(x, R, beta), dtype)


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize(
    "x_kind,r_kind,b_kind",
    [("strided", "transposed", "strided"), ("transposed", "strided", "contig")],
    ids=["x-strided-R-transposed-beta-strided", "x-transposed-R-strided"],
)
def test_non_contiguous(x_kind, r_kind, b_kind, dtype, check, layout):
    x, R, beta = make_inputs(70, 97, 24, True)
    args = (layout(x.to(dtype), x_kind), layout(R.to(dtype), r_kind), layout(beta.to(dtype), b_kind))
    assert not args[0].is_contiguous() and not args[1].is_contiguous()
    check(project_scale(*args), reference.project_scale(*args), truth(x, R, beta), dtype)


@pytest.mark.parametrize(
    "x_dtype,r_dtype,judge",
    [
        (torch.bfloat16, torch.float32, torch.bfloat16),
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.bfloat16, torch.bfloat16),
    ],
    ids=["x-bf16-R-fp32", "x-fp32-R-bf16", "x-fp16-R-bf16"],
)
def test_mixed_dtypes(x_dtype, r_dtype, judge, check):
    """Judged by the tolerance of the least precise input (the kernel rounds R ⊙ β to x's dtype)."""
    x, R, beta = make_inputs(40, 97, 16, True)
    args = (x.to(x_dtype), R.to(r_dtype), beta.float())
    check(project_scale(*args), reference.project_scale(*args), truth(x, R, beta), judge)


def test_empty_token_axis():
    out = project_scale(torch.randn(0, 12), torch.randn(5, 12))
    assert out.shape == (0, 5) and out.dtype == torch.float32
