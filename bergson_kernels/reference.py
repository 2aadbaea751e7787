"""Pure-PyTorch reference for every kernel: the ground truth of tests and benchmarks,
and the ``backend="torch"`` implementation of the collector.

Notation (one ``Linear`` with weight ``W: [O, I]``, a packed token axis of ``T`` tokens):

* ``x: [T, I]`` module inputs, ``delta: [T, O]`` gradients of the loss w.r.t. its outputs;
* ``cu_seqlens: [N+1]`` int, non-decreasing, ``cu_seqlens[0] == 0``, ``cu_seqlens[N] <= T``:
  example ``n`` owns tokens ``[cu_seqlens[n], cu_seqlens[n+1])`` (empty segments allowed);
* per-example gradient ``G_n = Σ_t δ_t x_tᵀ: [O, I]``;
* Adafactor scales ``α: [O]`` (row) and ``β: [I]`` (column): ``diag(α) G diag(β)``;
* Adam second moment ``v: [O, I]``: ``G / (sqrt(v) + eps)``;
* projections ``L: [p, O]``, ``R: [q, I]`` (``None`` means identity, i.e. no projection).

Every function also has a *padded* twin taking ``[N, S, ·]`` tensors (one example per
row, padding rows of ``delta`` are zero); the ragged versions scatter into that layout.
All arithmetic runs in float32 (float64 when any input is float64); results are in that
dtype.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

# Upper bound on the per-example gradients the Adam reference materializes at once (32 MB: at
# 256 MB a 17M Llama's lm_head materialized the whole batch, 1.22× the Adafactor peak RSS).
ADAM_CHUNK_BYTES = 32 * 2**20


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, float32 otherwise."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def pad_segments(t: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Scatter a packed ``[T, D]`` tensor into ``[N, S_max, D]`` (zeros in the padding)."""
    cu = cu_seqlens.to(device=t.device, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    n = lens.numel()
    s_max = int(lens.max()) if n else 0
    out = t.new_zeros(n, max(s_max, 1), t.shape[-1])
    if n == 0 or s_max == 0:
        return out
    pos = torch.arange(s_max, device=t.device)
    mask = pos[None, :] < lens[:, None]  # [N, S_max]
    src = (cu[:-1, None] + pos[None, :])[mask]
    out[mask] = t[src]
    return out


# ---------------------------------------------------------------------------------------
# scale + project:  x̃ = (x ⊙ β) Rᵀ
# ---------------------------------------------------------------------------------------
def project_scale(x: Tensor, R: Tensor | None = None, col_scale: Tensor | None = None) -> Tensor:
    """``x: [..., I]``, ``R: [q, I]`` or None, ``col_scale (β): [I]`` or None -> ``[..., q]`` (or ``[..., I]``)."""
    dt = compute_dtype(x, R, col_scale)
    x = x.to(dt)
    if col_scale is not None:
        x = x * col_scale.to(dt)
    return x if R is None else x @ R.to(dt).T


# ---------------------------------------------------------------------------------------
# outer product summed over each example, left-projected:  Σ_t (L (α ⊙ δ_t)) x̃_tᵀ
# ---------------------------------------------------------------------------------------
def outer_project_padded(
    delta: Tensor, x_tilde: Tensor, L: Tensor | None = None, row_scale: Tensor | None = None
) -> Tensor:
    """``delta: [N, S, O]``, ``x_tilde: [N, S, q]`` -> ``[N, p, q]`` (``p = O`` when ``L`` is None)."""
    dt = compute_dtype(delta, x_tilde, L, row_scale)
    d = delta.to(dt)
    if row_scale is not None:
        d = d * row_scale.to(dt)
    if L is not None:
        d = d @ L.to(dt).T  # [N, S, p]
    return torch.bmm(d.transpose(1, 2), x_tilde.to(dt))


def outer_project(
    delta: Tensor,
    x_tilde: Tensor,
    L: Tensor | None,
    cu_seqlens: Tensor,
    row_scale: Tensor | None = None,
) -> Tensor:
    """Ragged twin of :func:`outer_project_padded`: ``delta: [T, O]``, ``x_tilde: [T, q]`` -> ``[N, p, q]``."""
    dt = compute_dtype(delta, x_tilde, L, row_scale)
    return outer_project_padded(
        pad_segments(delta.to(dt), cu_seqlens), pad_segments(x_tilde.to(dt), cu_seqlens), L, row_scale
    )


# ---------------------------------------------------------------------------------------
# Adam: per-example G / (sqrt(v) + eps), then L G Rᵀ (materializes G, in bounded chunks)
# ---------------------------------------------------------------------------------------
def adam_project_padded(
    delta: Tensor,
    x: Tensor,
    L: Tensor | None,
    R: Tensor | None,
    v: Tensor,
    eps: float = 1e-8,
    *,
    chunk_bytes: int = ADAM_CHUNK_BYTES,
) -> Tensor:
    """``delta: [N, S, O]``, ``x: [N, S, I]``, ``v: [O, I]`` -> ``[N, p, q]`` (``p=O``/``q=I`` without L/R)."""
    dt = compute_dtype(delta, x, L, R, v)
    n, _, o = delta.shape
    i = x.shape[-1]
    denom = v.to(dt).sqrt().add_(eps)
    L, R = _cast(L, dt), _cast(R, dt)
    p = o if L is None else L.shape[0]
    q = i if R is None else R.shape[0]
    out = delta.new_empty(n, p, q, dtype=dt)
    step = max(1, chunk_bytes // max(1, o * i * torch.finfo(dt).bits // 8))
    for s in range(0, n, step):
        g = torch.bmm(delta[s : s + step].to(dt).transpose(1, 2), x[s : s + step].to(dt))  # [c, O, I]
        g.div_(denom)
        if L is not None:
            g = L @ g
        if R is not None:
            g = g @ R.T
        out[s : s + step] = g
    return out


def adam_project(
    delta: Tensor,
    x: Tensor,
    L: Tensor | None,
    R: Tensor | None,
    v: Tensor,
    cu_seqlens: Tensor,
    eps: float = 1e-8,
) -> Tensor:
    """Ragged twin of :func:`adam_project_padded`: ``delta: [T, O]``, ``x: [T, I]`` -> ``[N, p, q]``."""
    return adam_project_padded(pad_segments(delta, cu_seqlens), pad_segments(x, cu_seqlens), L, R, v, eps)


# ---------------------------------------------------------------------------------------
# naive path and second-moment statistics
# ---------------------------------------------------------------------------------------
def per_example_grads(delta: Tensor, x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Materialized per-example gradients ``[N, O, I]`` (the path peers take; for tests and bench)."""
    dt = compute_dtype(delta, x)
    return torch.bmm(
        pad_segments(delta.to(dt), cu_seqlens).transpose(1, 2), pad_segments(x.to(dt), cu_seqlens)
    )


def grad_sq_row_col_padded(delta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column sums of ``G_n ⊙ G_n`` for every example, without forming ``G_n``.

    ``delta: [N, S, O]``, ``x: [N, S, I]`` -> ``([N, O], [N, I])``, using the Gram matrices
    ``K_x = X Xᵀ`` and ``K_δ = Δ Δᵀ`` (``[N, S, S]``): ``rowsum_o = Σ_{t,t'} δ_to δ_t'o K_x[t,t']``
    and symmetrically for columns.  Costs ``O(S²(O+I))`` per example instead of ``O(S·O·I)``.
    """
    dt = compute_dtype(delta, x)
    d, xx = delta.to(dt), x.to(dt)
    kx = torch.bmm(xx, xx.transpose(1, 2))
    kd = torch.bmm(d, d.transpose(1, 2))
    rows = (torch.bmm(kx, d) * d).sum(1)
    cols = (torch.bmm(kd, xx) * xx).sum(1)
    return rows, cols
