"""Fused column scale + skinny GEMM: ``x̃ = (x ⊙ β) Rᵀ``.

Each program owns a ``[BT, BQ]`` block of the output and streams its rows of ``x`` once over
``I`` in ``BI`` chunks (for ``q <= 128`` there is one q block, so ``x`` is read exactly once;
larger ``q`` re-reads ``x`` once per 128 columns).  ``β`` is folded into the ``R`` block in
fp32 rather than into ``x``, so the raw activations are never rounded a second time and
cannot overflow fp16 by scaling.  Inputs are read through their strides (no copies).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import ArgChecker, new_output
from .triton_support import TL_DTYPES, dot_dtypes, is_interpreted, require_triton, to_dot

MAX_BQ = 128

# The interpreter uses DEFAULT_CONFIG; on GPU the autotuner picks among CONFIGS.  The list was
# pruned by compiling for sm_90 and keeping configs without register spills at BQ = 64; it has
# not been timed on a GPU yet (bench/bench_kernels.py does that).
DEFAULT_CONFIG = dict(BT=64, BI=64)
CONFIGS = [
    triton.Config(dict(BT=bt, BI=bi), num_warps=w, num_stages=s)
    for bt, bi, w, s in [(64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3), (128, 128, 8, 2)]
]


@triton.jit(do_not_specialize=["T"])
def _project_scale_kernel(
    x,
    R,
    beta,
    out,
    T,
    I,
    Q,
    s_xt,
    s_xi,
    s_rq,
    s_ri,
    s_b,
    HAS_COL_SCALE: tl.constexpr,
    DT: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BQ: tl.constexpr,
    BT: tl.constexpr,
    BI: tl.constexpr,
):
    i_t, i_q = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_q = i_q * BQ + tl.arange(0, BQ)
    m_t, m_q = o_t < T, o_q < Q

    b_acc = tl.zeros([BT, BQ], dtype=tl.float32)
    for i0 in range(0, I, BI):
        o_i = i0 + tl.arange(0, BI)
        m_i = o_i < I
        p_x = x + o_t[:, None] * s_xt + o_i[None, :] * s_xi
        b_x = tl.load(p_x, mask=m_t[:, None] & m_i[None, :], other=0.0)  # [BT, BI]
        p_r = R + o_i[:, None] * s_ri + o_q[None, :] * s_rq
        b_r = tl.load(p_r, mask=m_i[:, None] & m_q[None, :], other=0.0).to(tl.float32)  # [BI, BQ]
        if HAS_COL_SCALE:
            b_b = tl.load(beta + o_i * s_b, mask=m_i, other=0.0).to(tl.float32)  # [BI]
            b_r = b_r * b_b[:, None]
        b_acc = tl.dot(to_dot(b_x, DT, EMULATE_BF16), to_dot(b_r, DT, EMULATE_BF16), b_acc, input_precision="ieee")

    p_o = out + o_t[:, None] * Q + o_q[None, :]
    tl.store(p_o, b_acc, mask=m_t[:, None] & m_q[None, :])


_project_scale_tuned = triton.autotune(CONFIGS, key=["I", "Q"])(_project_scale_kernel)


def _project_scale_fwd(x: torch.Tensor, R: torch.Tensor, col_scale: torch.Tensor | None) -> torch.Tensor:
    check = ArgChecker("project_scale")
    check.tensor("x", x, 2)
    check.tensor("R", R, 2)
    check.tensor("col_scale", col_scale, 1, optional=True)
    check.done()
    T, I = x.shape
    check.size("R", R, 1, I, "x.shape[1]")
    check.size("col_scale", col_scale, 0, I, "x.shape[1]")
    check.at_least("x", x, 1)
    check.at_least("R", R, 0)
    for name, t in (("x", x), ("R", R), ("col_scale", col_scale)):
        check.floating(name, t)
    check.same_device({"x": x, "R": R, "col_scale": col_scale})
    check.done()
    require_triton(x.device, _project_scale_kernel)

    Q = R.shape[0]
    out = new_output((T, Q), x.device)
    if T == 0:
        return out
    dt, _ = dot_dtypes(x.dtype)
    BQ = min(MAX_BQ, max(16, triton.next_power_of_2(Q)))
    beta = col_scale if col_scale is not None else x  # dummy pointer, never read
    args = (x, R, beta, out, T, I, Q, x.stride(0), x.stride(1), R.stride(0), R.stride(1), beta.stride(0))
    flags = dict(HAS_COL_SCALE=col_scale is not None, DT=TL_DTYPES[dt], BQ=BQ)
    if is_interpreted(_project_scale_kernel):
        grid = (triton.cdiv(T, DEFAULT_CONFIG["BT"]), triton.cdiv(Q, BQ))
        _project_scale_kernel[grid](*args, **flags, EMULATE_BF16=True, **DEFAULT_CONFIG)
    else:
        grid = lambda meta: (triton.cdiv(T, meta["BT"]), triton.cdiv(Q, BQ))  # noqa: E731
        _project_scale_tuned[grid](*args, **flags, EMULATE_BF16=False)
    return out


def project_scale(x: torch.Tensor, R: torch.Tensor, col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Scale the columns of ``x`` and project them: ``x̃ = (x ⊙ β) Rᵀ``.

    Args:
        x: ``[T, I]`` module inputs (float32, bfloat16 or float16; any strides).
        R: ``[q, I]`` right projection (any of those float dtypes), ``q >= 1``.
        col_scale: ``β: [I]`` or ``None`` (Adafactor column scale).

    Returns:
        ``[T, q]`` float32, accumulated in fp32.  The dot operands are ``x``'s dtype
        (``R ⊙ β`` is rounded to it); float32 inputs use IEEE fp32 dots (no TF32).
        float64 inputs raise ``ValueError``.  Twin: :func:`bergson_kernels.reference.project_scale`.
    """
    return _project_scale_fwd(x, R, col_scale)
