"""adam_project: Triton kernel vs reference vs float64 truth."""

from __future__ import annotations

import pytest
import torch

from bergson_kernels import adam_project, reference

DTYPES = [
    pytest.param(d, id=i) for d, i in [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")]
]

# (id, cu_seqlens, T, O, I, p, q); rows past cu_seqlens[-1] are NaN and must be ignored
CASES = [
    ("O97-I341-empty-segment-tail-ignored", [0, 3, 3, 10], 12, 97, 341, 16, 8),
    ("T1-p8-q24", [0, 1], 1, 40, 70, 8, 24),
    ("ragged-1-and-150", [0, 1, 151], 151, 40, 70, 24, 16),
    ("p1-q16", [0, 6, 20], 20, 33, 50, 1, 16),
    ("p72-q24-two-p-blocks", [0, 9, 30], 30, 40, 70, 72, 24),
]


def make_inputs(cu, T, O, I, p, q):
    delta = torch.randn(T, O, dtype=torch.float64)
    x = torch.randn(T, I, dtype=torch.float64)
    delta[cu[-1] :] = float("nan")
    x[cu[-1] :] = float("nan")
    L = torch.randn(p, O, dtype=torch.float64) / p**0.5
    R = torch.randn(q, I, dtype=torch.float64) / q**0.5
    v = torch.rand(O, I, dtype=torch.float64) * 0.9 + 0.1
    return delta, x, L, R, v


def truth(delta, x, L, R, v, cu, eps):
    """float64: materialize each G_n token by token, normalize, project (independent of reference.py)."""
    out = torch.zeros(len(cu) - 1, L.shape[0], R.shape[0], dtype=torch.float64)
    for n in range(len(cu) - 1):
        G = torch.zeros(delta.shape[1], x.shape[1], dtype=torch.float64)
        for t in range(cu[n], cu[n + 1]):
            G += torch.outer(delta[t], x[t])
        out[n] = L @ (G / (v.sqrt() + eps)) @ R.T
    return out


def run_case(cu, T, O, I, p, q, dtype, check, *, eps=1e-8, splits=None, v_dtype=torch.float32, cu_dtype=torch.int32):
    delta, x, L, R, v = make_inputs(cu, T, O, I, p, q)
    args = (delta.to(dtype), x.to(dtype), L.to(dtype), R.to(dtype), v.to(v_dtype), torch.tensor(cu, dtype=cu_dtype))
    out = adam_project(*args, eps, splits=splits)
    check(out, reference.adam_project(*args, eps), truth(delta, x, L, R, v.to(v_dtype).double(), cu, eps), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cu,T,O,I,p,q", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_matches_truth(cu, T, O, I, p, q, dtype, check):
    run_case(cu, T, O, I, p, q, dtype, check)


@pytest.mark.parametrize("splits", [1, 3, 20], ids=["splits1", "splits3", "splits20-more-than-tiles"])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=["cu-int32", "cu-int64"])
def test_splits_are_reduced(splits, cu_dtype, check):
    run_case([0, 3, 3, 10], 12, 97, 341, 16, 8, torch.float32, check, splits=splits, cu_dtype=cu_dtype)


def test_splits_are_deterministic():
    delta, x, L, R, v = (t.float() for t in make_inputs([0, 5, 12], 12, 97, 341, 16, 8))
    cu = torch.tensor([0, 5, 12])
    a = adam_project(delta, x, L, R, v, cu, splits=4)
    b = adam_project(delta, x, L, R, v, cu, splits=4)
    assert torch.equal(a, b)


def test_eps_zero_and_bf16_v(check):
    run_case([0, 4, 11], 11, 40, 70, 16, 16, torch.bfloat16, check, eps=0.0, v_dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_non_contiguous(dtype, check, layout):
    cu = [0, 9, 9, 25]
    delta, x, L, R, v = make_inputs(cu, 27, 40, 70, 24, 16)
    args = (
        layout(delta.to(dtype), "transposed"),
        layout(x.to(dtype), "strided"),
        layout(L.to(dtype), "strided"),
        layout(R.to(dtype), "transposed"),
        layout(v.float(), "transposed"),
        torch.tensor(cu).repeat_interleave(2)[::2],
    )
    assert not any(t.is_contiguous() for t in args)
    out = adam_project(*args, splits=2)
    check(out, reference.adam_project(*args), truth(delta, x, L, R, v, cu, 1e-8), dtype)


def test_no_examples():
    out = adam_project(
        torch.randn(4, 8),
        torch.randn(4, 6),
        torch.randn(5, 8),
        torch.randn(3, 6),
        torch.rand(8, 6),
        torch.zeros(1, dtype=torch.int64),
    )
    assert out.shape == (0, 5, 3)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_larger_shapes(dtype, check):
    run_case([0, 100, 100, 260, 300], 310, 200, 300, 64, 64, dtype, check, splits=3)
