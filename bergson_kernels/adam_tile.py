"""Tile-fused Adam path: ``out[n] = L (G_n ⊘ (√v + ε)) Rᵀ`` without materializing ``G_n``.

The weight ``[O, I]`` is cut into ``BO×BI`` tiles.  For example ``n`` and one tile the program
forms ``acc = Σ_t δ_t[BO] x_t[BI]ᵀ`` in fp32 registers, divides by ``√v[BO, BI] + ε``, and
accumulates ``L[:, BO] (acc R[:, BI]ᵀ)`` into a ``[BP, BQ]`` fp32 accumulator
(multiplying by ``R`` first is cheaper since ``BI >= q`` for the usual small ``q``).

Parallelism and reduction: the grid is ``(N, S, p-blocks × q-blocks)``; the ``S`` programs of
one example take contiguous runs of the row-major tile list.  With ``S == 1`` they write the
output directly; otherwise each writes its partial ``[p, q]`` into an fp32 workspace
``[N, S, p, q]`` that is summed afterwards — deterministic (no atomics), extra memory
``N·S·p·q·4`` bytes.  By default ``S`` is chosen so that ``N·S`` is about four programs per SM
(so the workspace stays about ``4·SMs·p·q·4`` bytes, e.g. 8.6 MB on an H100 at ``p = q = 64``)
and ``S = 1`` under the interpreter.  For ``p`` or ``q`` above 64 the extra p/q blocks recompute
the tile sums.  Inputs are read through their strides (no copies).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import ArgChecker, new_output
from .triton_support import TL_DTYPES, dot_dtypes, is_interpreted, require_triton, to_dot

MAX_BP = 64
MAX_BQ = 64
PROGRAMS_PER_SM = 4
# Tile shape used to size the default split; the autotuned BO/BI may differ, which only leaves
# some programs with fewer (or no) tiles.
NOMINAL_TILE = 64

# The interpreter uses DEFAULT_CONFIG; on GPU the autotuner picks among CONFIGS.  The list was
# pruned by compiling for sm_90 and keeping configs without register spills at BP = BQ = 64;
# it has not been timed on a GPU yet.
DEFAULT_CONFIG = dict(BT=32, BO=64, BI=64)
CONFIGS = [
    triton.Config(dict(BT=bt, BO=bo, BI=bi), num_warps=w, num_stages=s)
    for bt, bo, bi, w, s in [
        (32, 64, 64, 8, 3),
        (64, 64, 64, 8, 3),
        (32, 64, 128, 8, 3),
        (64, 32, 128, 8, 3),
        (32, 32, 32, 4, 2),
    ]
]


@triton.jit
def _adam_project_kernel(
    delta,
    x,
    v,
    L,
    R,
    cu_seqlens,
    out,
    O,
    I,
    P,
    Q,
    S,
    eps,
    s_cu,
    s_dt,
    s_do,
    s_xt,
    s_xi,
    s_vo,
    s_vi,
    s_lp,
    s_lo,
    s_rq,
    s_ri,
    DT: tl.constexpr,
    DT2: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BP: tl.constexpr,
    BQ: tl.constexpr,
    BT: tl.constexpr,
    BO: tl.constexpr,
    BI: tl.constexpr,
):
    i_n, i_s, i_pq = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    NQB = tl.cdiv(Q, BQ)
    i_p, i_q = i_pq // NQB, i_pq % NQB
    bos = tl.load(cu_seqlens + i_n * s_cu).to(tl.int64)
    eos = tl.load(cu_seqlens + (i_n + 1) * s_cu).to(tl.int64)
    o_p = i_p * BP + tl.arange(0, BP)
    o_q = i_q * BQ + tl.arange(0, BQ)
    m_p, m_q = o_p < P, o_q < Q

    NIB = tl.cdiv(I, BI)
    n_tiles = tl.cdiv(O, BO) * NIB
    per_prog = tl.cdiv(n_tiles, S)
    k_lo = i_s * per_prog
    k_hi = tl.minimum(k_lo + per_prog, n_tiles)
    k_hi = tl.where(eos > bos, k_hi, k_lo)  # an empty example skips its tiles (and writes zeros)

    b_out = tl.zeros([BP, BQ], dtype=tl.float32)
    for k in range(k_lo, k_hi):
        o_o = (k // NIB) * BO + tl.arange(0, BO)
        o_i = (k % NIB) * BI + tl.arange(0, BI)
        m_o, m_i = o_o < O, o_i < I

        b_g = tl.zeros([BO, BI], dtype=tl.float32)
        for t0 in range(bos, eos, BT):
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < eos
            p_d = delta + o_o[:, None] * s_do + o_t[None, :] * s_dt
            b_d = tl.load(p_d, mask=m_o[:, None] & m_t[None, :], other=0.0)  # [BO, BT]
            p_x = x + o_t[:, None] * s_xt + o_i[None, :] * s_xi
            b_x = tl.load(p_x, mask=m_t[:, None] & m_i[None, :], other=0.0)  # [BT, BI]
            b_g = tl.dot(to_dot(b_d, DT, EMULATE_BF16), to_dot(b_x, DT, EMULATE_BF16), b_g, input_precision="ieee")

        p_v = v + o_o[:, None] * s_vo + o_i[None, :] * s_vi
        # other=1 keeps padded entries at 0 / (1 + eps) = 0 even when eps == 0
        b_v = tl.load(p_v, mask=m_o[:, None] & m_i[None, :], other=1.0).to(tl.float32)  # [BO, BI]
        b_g = b_g / (tl.sqrt(b_v) + eps)

        p_r = R + o_i[:, None] * s_ri + o_q[None, :] * s_rq
        b_r = tl.load(p_r, mask=m_i[:, None] & m_q[None, :], other=0.0)  # [BI, BQ]
        b_gr = tl.dot(
            to_dot(b_g, DT2, EMULATE_BF16), to_dot(b_r, DT2, EMULATE_BF16), input_precision="ieee"
        )  # [BO, BQ]
        p_l = L + o_p[:, None] * s_lp + o_o[None, :] * s_lo
        b_l = tl.load(p_l, mask=m_p[:, None] & m_o[None, :], other=0.0)  # [BP, BO]
        b_out = tl.dot(to_dot(b_l, DT2, EMULATE_BF16), to_dot(b_gr, DT2, EMULATE_BF16), b_out, input_precision="ieee")

    p_o = out + (i_n * S + i_s) * P * Q + o_p[:, None] * Q + o_q[None, :]
    tl.store(p_o, b_out, mask=m_p[:, None] & m_q[None, :])


_adam_project_tuned = triton.autotune(CONFIGS, key=["O", "I", "P", "Q"])(_adam_project_kernel)


def _default_splits(n: int, O: int, I: int, device: torch.device, interpreted: bool) -> int:
    if interpreted or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n_tiles = triton.cdiv(O, NOMINAL_TILE) * triton.cdiv(I, NOMINAL_TILE)
    return max(1, min(n_tiles, triton.cdiv(PROGRAMS_PER_SM * sms, n), 65535))


def _adam_project_fwd(
    delta: torch.Tensor,
    x: torch.Tensor,
    L: torch.Tensor,
    R: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    eps: float,
    splits: int | None,
) -> torch.Tensor:
    check = ArgChecker("adam_project")
    check.tensor("delta", delta, 2)
    check.tensor("x", x, 2)
    check.tensor("L", L, 2)
    check.tensor("R", R, 2)
    check.tensor("v", v, 2)
    check.tensor("cu_seqlens", cu_seqlens, 1)
    if not isinstance(eps, (int, float)) or eps < 0:
        check.fail(f"expected eps to be a float >= 0, got {eps!r}")
    if splits is not None and (not isinstance(splits, int) or not 1 <= splits <= 65535):
        check.fail(f"expected splits to be None or an int in [1, 65535], got {splits!r}")
    check.done()
    T, O = delta.shape
    I = x.shape[1]
    check.size("x", x, 0, T, "delta.shape[0]")
    check.size("L", L, 1, O, "delta.shape[1]")
    check.size("R", R, 1, I, "x.shape[1]")
    check.size("v", v, 0, O, "delta.shape[1]")
    check.size("v", v, 1, I, "x.shape[1]")
    check.at_least("delta", delta, 1)
    check.at_least("x", x, 1)
    check.at_least("L", L, 0)
    check.at_least("R", R, 0)
    for name, t in (("delta", delta), ("x", x), ("L", L), ("R", R), ("v", v)):
        check.floating(name, t)
    check.cu_seqlens(cu_seqlens)
    check.same_device({"delta": delta, "x": x, "L": L, "R": R, "v": v, "cu_seqlens": cu_seqlens})
    check.done()
    check.cu_seqlens_values(cu_seqlens, T, "delta.shape[0]")
    check.done()
    require_triton(delta.device, _adam_project_kernel)

    interpreted = is_interpreted(_adam_project_kernel)
    N, P, Q = cu_seqlens.numel() - 1, L.shape[0], R.shape[0]
    out = new_output((N, P, Q), delta.device)
    if N == 0:
        return out
    S = splits if splits is not None else _default_splits(N, O, I, delta.device, interpreted)
    work = out if S == 1 else new_output((N, S, P, Q), delta.device)
    dt, dt2 = dot_dtypes(delta.dtype, x.dtype)
    BP = min(MAX_BP, max(16, triton.next_power_of_2(P)))
    BQ = min(MAX_BQ, max(16, triton.next_power_of_2(Q)))
    args = (delta, x, v, L, R, cu_seqlens, work, O, I, P, Q, S, float(eps))
    args += (cu_seqlens.stride(0), delta.stride(0), delta.stride(1), x.stride(0), x.stride(1), v.stride(0), v.stride(1))
    args += (L.stride(0), L.stride(1), R.stride(0), R.stride(1))
    flags = dict(DT=TL_DTYPES[dt], DT2=TL_DTYPES[dt2], BP=BP, BQ=BQ)
    grid = (N, S, triton.cdiv(P, BP) * triton.cdiv(Q, BQ))
    if interpreted:
        _adam_project_kernel[grid](*args, **flags, EMULATE_BF16=True, **DEFAULT_CONFIG)
    else:
        _adam_project_tuned[grid](*args, **flags, EMULATE_BF16=False)
    if S > 1:
        torch.sum(work, dim=1, out=out)
    return out


def adam_project(
    delta: torch.Tensor,
    x: torch.Tensor,
    L: torch.Tensor,
    R: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    eps: float = 1e-8,
    *,
    splits: int | None = None,
) -> torch.Tensor:
    """Adam-normalized projected per-example gradients ``L (G_n ⊘ (√v + ε)) Rᵀ``, ``G_n = Σ_t δ_t x_tᵀ``.

    Args:
        delta: ``[T, O]`` output gradients (float32, bfloat16 or float16; any strides).
        x: ``[T, I]`` module inputs (same dtype choices).
        L: ``[p, O]`` and R: ``[q, I]`` projections (any of those float dtypes), ``p, q >= 1``.
        v: ``[O, I]`` Adam second moment (``exp_avg_sq``), any of those float dtypes.
        cu_seqlens: ``[N+1]`` int32/int64 segment offsets (see :func:`outer_project`).
        eps: added to ``√v``.
        splits: programs per example over the weight tiles (default: about four programs per
            SM in total; 1 under the interpreter).  Partial results are summed in a fp32
            workspace, deterministically.

    Returns:
        ``[N, p, q]`` float32.  ``Σ_t δ_t x_tᵀ`` uses operands in the inputs' dtype (fp32 if
        ``delta`` and ``x`` differ) with fp32 accumulation; the normalized tile and the
        projections are rounded to bf16 for bf16 inputs and stay fp32 (IEEE, no TF32)
        otherwise.  float64 inputs raise ``ValueError``.
        Twin: :func:`bergson_kernels.reference.adam_project`.
    """
    return _adam_project_fwd(delta, x, L, R, v, cu_seqlens, eps, splits)
