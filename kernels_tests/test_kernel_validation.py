"""Every public kernel function rejects bad arguments with a ValueError naming expected vs actual."""

from __future__ import annotations

import re

import pytest
import torch

from bergson_kernels import adam_project, outer_project, project_scale

T, O, I, P, Q = 97, 40, 30, 8, 6


def ps_args(**over):
    args = dict(x=torch.randn(T, I), R=torch.randn(Q, I), col_scale=torch.rand(I))
    return {**args, **over}


def op_args(**over):
    args = dict(
        delta=torch.randn(T, O),
        x_tilde=torch.randn(T, Q),
        L=torch.randn(P, O),
        cu_seqlens=torch.tensor([0, 50, T], dtype=torch.int32),
        row_scale=torch.rand(O),
    )
    return {**args, **over}


def ad_args(**over):
    args = dict(
        delta=torch.randn(T, O),
        x=torch.randn(T, I),
        L=torch.randn(P, O),
        R=torch.randn(Q, I),
        v=torch.rand(O, I),
        cu_seqlens=torch.tensor([0, 50, T]),
    )
    return {**args, **over}


META = torch.device("meta")

CASES = [
    # project_scale
    ("ps-x-1d", project_scale, ps_args(x=torch.randn(I)), "expected x to have 2 dimension(s), got shape (30,)"),
    ("ps-R-cols", project_scale, ps_args(R=torch.randn(Q, I - 1)), "expected R.shape[1] == 30 (x.shape[1]), got 29"),
    (
        "ps-beta-size",
        project_scale,
        ps_args(col_scale=torch.rand(I + 1)),
        "expected col_scale.shape[0] == 30 (x.shape[1]), got 31",
    ),
    ("ps-q0", project_scale, ps_args(R=torch.randn(0, I)), "expected R.shape[0] >= 1, got 0"),
    (
        "ps-I0",
        project_scale,
        ps_args(x=torch.randn(T, 0), R=torch.randn(Q, 0), col_scale=None),
        "expected x.shape[1] >= 1, got 0",
    ),
    ("ps-float64", project_scale, ps_args(x=torch.randn(T, I, dtype=torch.float64)), "x is float64"),
    (
        "ps-int",
        project_scale,
        ps_args(R=torch.ones(Q, I, dtype=torch.int32)),
        "expected R to be float32, bfloat16 or float16, got torch.int32",
    ),
    ("ps-not-tensor", project_scale, ps_args(R=[[1.0] * I]), "expected R to be a torch.Tensor, got list"),
    (
        "ps-device",
        project_scale,
        ps_args(R=torch.randn(Q, I, device=META)),
        "expected R on cpu (the device of x), got meta",
    ),
    # outer_project
    (
        "op-x_tilde-rows",
        outer_project,
        op_args(x_tilde=torch.randn(T - 1, Q)),
        "expected x_tilde.shape[0] == 97 (delta.shape[0]), got 96",
    ),
    (
        "op-L-cols",
        outer_project,
        op_args(L=torch.randn(P, O + 2)),
        "expected L.shape[1] == 40 (delta.shape[1]), got 42",
    ),
    ("op-p0", outer_project, op_args(L=torch.randn(0, O)), "expected L.shape[0] >= 1, got 0"),
    ("op-q0", outer_project, op_args(x_tilde=torch.randn(T, 0)), "expected x_tilde.shape[1] >= 1, got 0"),
    (
        "op-alpha-size",
        outer_project,
        op_args(row_scale=torch.rand(O - 1)),
        "expected row_scale.shape[0] == 40 (delta.shape[1]), got 39",
    ),
    (
        "op-alpha-2d",
        outer_project,
        op_args(row_scale=torch.rand(1, O)),
        "expected row_scale to have 1 dimension(s), got shape (1, 40)",
    ),
    ("op-delta-float64", outer_project, op_args(delta=torch.randn(T, O, dtype=torch.float64)), "delta is float64"),
    (
        "op-cu-float",
        outer_project,
        op_args(cu_seqlens=torch.tensor([0.0, 97.0])),
        "expected cu_seqlens to be int32 or int64, got torch.float32",
    ),
    (
        "op-cu-2d",
        outer_project,
        op_args(cu_seqlens=torch.tensor([[0, 97]])),
        "expected cu_seqlens to have 1 dimension(s), got shape (1, 2)",
    ),
    (
        "op-cu-empty",
        outer_project,
        op_args(cu_seqlens=torch.zeros(0, dtype=torch.int64)),
        "expected cu_seqlens to have at least 1 element",
    ),
    ("op-cu-start", outer_project, op_args(cu_seqlens=torch.tensor([1, 50])), "expected cu_seqlens[0] == 0, got 1"),
    (
        "op-cu-decreasing",
        outer_project,
        op_args(cu_seqlens=torch.tensor([0, 50, 40])),
        "expected cu_seqlens to be non-decreasing, got [0, 50, 40]",
    ),
    (
        "op-cu-past-end",
        outer_project,
        op_args(cu_seqlens=torch.tensor([0, 50, 98])),
        "expected cu_seqlens[-1] <= 97 (delta.shape[0]), got 98",
    ),
    (
        "op-device",
        outer_project,
        op_args(cu_seqlens=torch.tensor([0, T], device=META)),
        "expected cu_seqlens on cpu (the device of delta), got meta",
    ),
    # adam_project
    ("ad-x-rows", adam_project, ad_args(x=torch.randn(T + 1, I)), "expected x.shape[0] == 97 (delta.shape[0]), got 98"),
    ("ad-R-cols", adam_project, ad_args(R=torch.randn(Q, I + 1)), "expected R.shape[1] == 30 (x.shape[1]), got 31"),
    ("ad-v-shape", adam_project, ad_args(v=torch.rand(I, O)), "expected v.shape[0] == 40 (delta.shape[1]), got 30"),
    ("ad-v-1d", adam_project, ad_args(v=torch.rand(O * I)), "expected v to have 2 dimension(s), got shape (1200,)"),
    ("ad-L-p0", adam_project, ad_args(L=torch.randn(0, O)), "expected L.shape[0] >= 1, got 0"),
    ("ad-R-q0", adam_project, ad_args(R=torch.randn(0, I)), "expected R.shape[0] >= 1, got 0"),
    ("ad-v-float64", adam_project, ad_args(v=torch.rand(O, I, dtype=torch.float64)), "v is float64"),
    ("ad-eps", adam_project, ad_args(eps=-1.0), "expected eps to be a float >= 0, got -1.0"),
    ("ad-splits", adam_project, ad_args(splits=0), "expected splits to be None or an int in [1, 65535], got 0"),
    (
        "ad-device",
        adam_project,
        ad_args(v=torch.rand(O, I, device=META)),
        "expected v on cpu (the device of delta), got meta",
    ),
]


@pytest.mark.parametrize("fn,kwargs,message", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_rejects(fn, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(**kwargs)


def test_all_problems_of_a_round_are_reported_together():
    with pytest.raises(ValueError, match=r"x_tilde.shape\[0\] == 97.*; expected L.shape\[1\] == 40"):
        outer_project(**op_args(x_tilde=torch.randn(T - 1, Q), L=torch.randn(P, O + 2)))


def test_cu_seqlens_values_unchecked_off_cpu_unless_debug(monkeypatch):
    """On a GPU the value check would cost a host sync; it runs there only in debug mode."""
    from bergson_kernels._validate import ArgChecker

    bad = torch.tensor([1, 0], device=META)
    monkeypatch.setenv("BERGSON_KERNELS_DEBUG_FILL", "0")
    check = ArgChecker("f")
    check.cu_seqlens_values(bad, 5, "T")
    assert check.problems == []
