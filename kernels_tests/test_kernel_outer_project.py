"""outer_project: Triton kernel vs reference vs float64 truth."""

from __future__ import annotations

import pytest
import torch

from bergson_kernels import outer_project, reference

DTYPES = [
    pytest.param(d, id=i) for d, i in [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")]
]

# (id, cu_seqlens, T, O, p, q, with row_scale); rows past cu_seqlens[-1] are NaN and must be ignored
CASES = [
    ("T1-O97-p8-q24", [0, 1], 1, 97, 8, 24, False),
    ("empty-segment-tail-ignored", [0, 3, 3, 10], 13, 97, 16, 16, True),
    ("ragged-1-and-150", [0, 1, 151], 151, 97, 24, 8, True),
    ("p1-q16", [0, 5, 40], 40, 33, 1, 16, False),
    ("p64-q24-tail-ignored", [0, 30, 31, 64], 70, 97, 64, 24, True),
    ("all-segments-empty", [0, 0, 0], 5, 20, 8, 8, True),
]


def make_inputs(cu, T, O, p, q, with_scale):
    delta = torch.randn(T, O, dtype=torch.float64)
    x_tilde = torch.randn(T, q, dtype=torch.float64)
    delta[cu[-1] :] = float("nan")
    x_tilde[cu[-1] :] = float("nan")
    L = torch.randn(p, O, dtype=torch.float64) / p**0.5
    alpha = torch.rand(O, dtype=torch.float64) + 0.5 if with_scale else None
    return delta, x_tilde, L, alpha


def truth(delta, x_tilde, L, cu, alpha):
    """float64 per-example token loop, independent of reference.py."""
    out = torch.zeros(len(cu) - 1, L.shape[0], x_tilde.shape[1], dtype=torch.float64)
    for n in range(len(cu) - 1):
        for t in range(cu[n], cu[n + 1]):
            d = delta[t] if alpha is None else alpha * delta[t]
            out[n] += torch.outer(L @ d, x_tilde[t])
    return out


def run_case(cu, T, O, p, q, with_scale, dtype, check, *, cu_dtype=torch.int32, l_dtype=None, x_dtype=None):
    delta, x_tilde, L, alpha = make_inputs(cu, T, O, p, q, with_scale)
    args = (
        delta.to(dtype),
        x_tilde.to(x_dtype or dtype),
        L.to(l_dtype or dtype),
        torch.tensor(cu, dtype=cu_dtype),
        None if alpha is None else alpha.to(dtype),
    )
    check(outer_project(*args), reference.outer_project(*args), truth(delta, x_tilde, L, cu, alpha), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cu,T,O,p,q,with_scale", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_matches_truth(cu, T, O, p, q, with_scale, dtype, check):
    run_case(cu, T, O, p, q, with_scale, dtype, check)


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=["cu-int32", "cu-int64"])
def test_cu_seqlens_dtypes(cu_dtype, check):
    run_case([0, 7, 7, 60], 64, 97, 24, 16, True, torch.float32, check, cu_dtype=cu_dtype)


def test_several_p_and_q_blocks(check):
    run_case([0, 20, 45], 45, 40, 136, 130, True, torch.float32, check)


@pytest.mark.parametrize(
    "dtype,l_dtype,x_dtype",
    [(torch.bfloat16, torch.float32, torch.float32), (torch.float16, torch.float32, torch.float32)],
    ids=["delta-bf16-L-x_tilde-fp32", "delta-fp16-L-x_tilde-fp32"],
)
def test_mixed_dtypes(dtype, l_dtype, x_dtype, check):
    """The collector's usual call: half-precision delta, fp32 projection and x_tilde."""
    run_case([0, 40, 41, 100], 100, 97, 16, 16, True, dtype, check, l_dtype=l_dtype, x_dtype=x_dtype)


@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_non_contiguous(dtype, check, layout):
    cu = [0, 9, 9, 50]
    delta, x_tilde, L, alpha = make_inputs(cu, 56, 97, 24, 16, True)
    args = (
        layout(delta.to(dtype), "transposed"),
        layout(x_tilde.to(dtype), "strided"),
        layout(L.to(dtype), "transposed"),
        torch.tensor(cu).repeat_interleave(2)[::2],  # int64 with stride 2
        layout(alpha.to(dtype), "strided"),
    )
    assert not any(t.is_contiguous() for t in args)
    check(outer_project(*args), reference.outer_project(*args), truth(delta, x_tilde, L, cu, alpha), dtype)


def test_no_examples():
    out = outer_project(torch.randn(4, 8), torch.randn(4, 3), torch.randn(5, 8), torch.zeros(1, dtype=torch.int32))
    assert out.shape == (0, 5, 3)


def test_per_example_equals_batch_of_one():
    """Each example's result is what a call with that example alone gives (Opacus-style)."""
    cu = [0, 5, 5, 30, 31]
    delta, x_tilde, L, alpha = (t.float() for t in make_inputs(cu, 31, 40, 16, 8, True))
    batched = outer_project(delta, x_tilde, L, torch.tensor(cu), alpha)
    for n in range(len(cu) - 1):
        s, e = cu[n], cu[n + 1]
        alone = outer_project(delta[s:e], x_tilde[s:e], L, torch.tensor([0, e - s]), alpha)
        torch.testing.assert_close(batched[n], alone[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_tolerances_can_fail(dtype, check):
    """A kernel that dropped one token of 150, or was off by 3e-5 in fp32, must not pass."""
    cu = [0, 150]
    delta, x_tilde, L, alpha = make_inputs(cu, 150, 97, 16, 16, True)
    args = [delta.to(dtype), x_tilde.to(dtype), L.to(dtype), torch.tensor(cu), alpha.to(dtype)]
    expected = truth(delta, x_tilde, L, cu, alpha)
    ref = reference.outer_project(*args)
    out = outer_project(*args)
    check(out, ref, expected, dtype)
    with pytest.raises(AssertionError):
        check(outer_project(*args[:3], torch.tensor([0, 149]), args[4]), ref, expected, dtype)
    if dtype == torch.float32:
        with pytest.raises(AssertionError):
            check(out * (1 + 3e-5), ref, expected, dtype)
