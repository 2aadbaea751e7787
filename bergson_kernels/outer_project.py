"""Varlen fused left projection + per-example outer-product sum.

``out[n] = Σ_{t ∈ [s_n, s_{n+1})} (L (α ⊙ δ_t)) x̃_tᵀ``, one program per example (and per
p/q block when ``p`` or ``q`` exceeds 64: extra p blocks re-read ``δ``, extra q blocks recompute
``L δ``).  The program walks its segment in ``BT``-token blocks; for each block it forms
``(L ⊙ α) δ_blkᵀ: [BP, BT]`` over ``O`` in ``BO`` chunks in registers — ``L δ`` never reaches
global memory — then accumulates ``[BP, BT] @ x̃_blk`` into a ``[BP, BQ]`` fp32 accumulator.
``α`` is folded into the ``L`` block in fp32.  Tokens past ``cu_seqlens[N]`` are never read;
empty segments give zeros.  Inputs are read through their strides (no copies).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import ArgChecker, new_output
from .triton_support import TL_DTYPES, dot_dtypes, is_interpreted, require_triton, to_dot

# Larger p/q blocks spill registers on sm_90; bigger p or q is split over programs instead.
MAX_BP = 64
MAX_BQ = 64

# The interpreter uses DEFAULT_CONFIG; on GPU the autotuner picks among CONFIGS.  The list was
# pruned by compiling for sm_90 and keeping configs without register spills at BP = BQ = 64
# (plus (32, 32, 4 warps) for small p); it has not been timed on a GPU yet.
DEFAULT_CONFIG = dict(BT=64, BO=64)
CONFIGS = [
    triton.Config(dict(BT=bt, BO=bo), num_warps=w, num_stages=s)
    for bt, bo, w, s in [(64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 8, 3), (32, 32, 4, 2)]
]


@triton.jit
def _outer_project_kernel(
    delta,
    x_tilde,
    L,
    alpha,
    cu_seqlens,
    out,
    O,
    P,
    Q,
    s_cu,
    s_dt,
    s_do,
    s_xt,
    s_xq,
    s_lp,
    s_lo,
    s_a,
    HAS_ROW_SCALE: tl.constexpr,
    DT: tl.constexpr,
    DT2: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BP: tl.constexpr,
    BQ: tl.constexpr,
    BT: tl.constexpr,
    BO: tl.constexpr,
):
    i_n, i_p, i_q = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n * s_cu).to(tl.int64)
    eos = tl.load(cu_seqlens + (i_n + 1) * s_cu).to(tl.int64)
    o_p = i_p * BP + tl.arange(0, BP)
    o_q = i_q * BQ + tl.arange(0, BQ)
    m_p, m_q = o_p < P, o_q < Q

    b_acc = tl.zeros([BP, BQ], dtype=tl.float32)
    for t0 in range(bos, eos, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < eos
        b_ld = tl.zeros([BP, BT], dtype=tl.float32)
        for o0 in range(0, O, BO):
            o_o = o0 + tl.arange(0, BO)
            m_o = o_o < O
            p_l = L + o_p[:, None] * s_lp + o_o[None, :] * s_lo
            b_l = tl.load(p_l, mask=m_p[:, None] & m_o[None, :], other=0.0)  # [BP, BO]
            if HAS_ROW_SCALE:
                b_a = tl.load(alpha + o_o * s_a, mask=m_o, other=0.0).to(tl.float32)  # [BO]
                b_l = b_l.to(tl.float32) * b_a[None, :]
            p_d = delta + o_o[:, None] * s_do + o_t[None, :] * s_dt
            b_d = tl.load(p_d, mask=m_o[:, None] & m_t[None, :], other=0.0)  # [BO, BT]
            b_ld = tl.dot(to_dot(b_l, DT, EMULATE_BF16), to_dot(b_d, DT, EMULATE_BF16), b_ld, input_precision="ieee")
        p_x = x_tilde + o_t[:, None] * s_xt + o_q[None, :] * s_xq
        b_x = tl.load(p_x, mask=m_t[:, None] & m_q[None, :], other=0.0)  # [BT, BQ]
        b_acc = tl.dot(to_dot(b_ld, DT2, EMULATE_BF16), to_dot(b_x, DT2, EMULATE_BF16), b_acc, input_precision="ieee")

    p_o = out + i_n * P * Q + o_p[:, None] * Q + o_q[None, :]
    tl.store(p_o, b_acc, mask=m_p[:, None] & m_q[None, :])


_outer_project_tuned = triton.autotune(CONFIGS, key=["O", "P", "Q"])(_outer_project_kernel)


def _outer_project_fwd(
    delta: torch.Tensor,
    x_tilde: torch.Tensor,
    L: torch.Tensor,
    cu_seqlens: torch.Tensor,
    row_scale: torch.Tensor | None,
) -> torch.Tensor:
    check = ArgChecker("outer_project")
    check.tensor("delta", delta, 2)
    check.tensor("x_tilde", x_tilde, 2)
    check.tensor("L", L, 2)
    check.tensor("cu_seqlens", cu_seqlens, 1)
    check.tensor("row_scale", row_scale, 1, optional=True)
    check.done()
    T, O = delta.shape
    check.size("x_tilde", x_tilde, 0, T, "delta.shape[0]")
    check.size("L", L, 1, O, "delta.shape[1]")
    check.size("row_scale", row_scale, 0, O, "delta.shape[1]")
    check.at_least("delta", delta, 1)
    check.at_least("L", L, 0)
    check.at_least("x_tilde", x_tilde, 1)
    for name, t in (("delta", delta), ("x_tilde", x_tilde), ("L", L), ("row_scale", row_scale)):
        check.floating(name, t)
    check.cu_seqlens(cu_seqlens)
    check.same_device({"delta": delta, "x_tilde": x_tilde, "L": L, "cu_seqlens": cu_seqlens, "row_scale": row_scale})
    check.done()
    check.cu_seqlens_values(cu_seqlens, T, "delta.shape[0]")
    check.done()
    require_triton(delta.device, _outer_project_kernel)

    N, P, Q = cu_seqlens.numel() - 1, L.shape[0], x_tilde.shape[1]
    out = new_output((N, P, Q), delta.device)
    if N == 0:
        return out
    dt, dt2 = dot_dtypes(delta.dtype)
    BP = min(MAX_BP, max(16, triton.next_power_of_2(P)))
    BQ = min(MAX_BQ, max(16, triton.next_power_of_2(Q)))
    alpha = row_scale if row_scale is not None else delta  # dummy pointer, never read
    args = (delta, x_tilde, L, alpha, cu_seqlens, out, O, P, Q)
    args += (cu_seqlens.stride(0), delta.stride(0), delta.stride(1), x_tilde.stride(0), x_tilde.stride(1))
    args += (L.stride(0), L.stride(1), alpha.stride(0))
    flags = dict(HAS_ROW_SCALE=row_scale is not None, DT=TL_DTYPES[dt], DT2=TL_DTYPES[dt2], BP=BP, BQ=BQ)
    grid = (N, triton.cdiv(P, BP), triton.cdiv(Q, BQ))
    if is_interpreted(_outer_project_kernel):
        _outer_project_kernel[grid](*args, **flags, EMULATE_BF16=True, **DEFAULT_CONFIG)
    else:
        _outer_project_tuned[grid](*args, **flags, EMULATE_BF16=False)
    return out


def outer_project(
    delta: torch.Tensor,
    x_tilde: torch.Tensor,
    L: torch.Tensor,
    cu_seqlens: torch.Tensor,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example left-projected outer-product sums ``Σ_t (L (α ⊙ δ_t)) x̃_tᵀ``.

    Args:
        delta: ``[T, O]`` output gradients (float32, bfloat16 or float16; any strides).
        x_tilde: ``[T, q]`` projected inputs (e.g. :func:`project_scale`'s output), ``q >= 1``.
        L: ``[p, O]`` left projection (any of those float dtypes), ``p >= 1``.
        cu_seqlens: ``[N+1]`` int32/int64 segment offsets: non-decreasing, ``cu_seqlens[0] == 0``,
            ``cu_seqlens[N] <= T``; empty segments allowed, tokens past ``cu_seqlens[N]`` ignored.
            Values are checked when it lives on the CPU (on GPU only with
            ``BERGSON_KERNELS_DEBUG_FILL=1``, as the check costs a host sync).
        row_scale: ``α: [O]`` or ``None`` (Adafactor row scale).

    Returns:
        ``[N, p, q]`` float32, accumulated in fp32.  ``L δ`` is formed with operands in
        ``delta``'s dtype (``L ⊙ α`` rounded to it); the outer-product dot rounds ``L δ`` and
        ``x_tilde`` to bf16 for bf16 ``delta`` and keeps fp32 otherwise (IEEE, no TF32).
        float64 inputs raise ``ValueError``.  Twin: :func:`bergson_kernels.reference.outer_project`.
    """
    return _outer_project_fwd(delta, x_tilde, L, cu_seqlens, row_scale)
