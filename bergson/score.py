"""Scoring: TrackStar preconditioning and streaming top-k over an index.

Score kinds, for index features ``g(z)`` and query features ``g(q)``:

* ``inner``      ``g(z)·g(q)``
* ``cosine``     both unit-normalized, then the inner product
* ``trackstar``  ``R^{-1/2}`` applied to both sides (per layer), then cosine (Chang et al. 2024)
* ``one_sided``  ``g(z)ᵀ R^{-1} g(q)``

``R`` is the per-layer autocorrelation ``E[g gᵀ]`` (``p²×p²`` per layer).  TrackStar mixes the
training and query autocorrelations as ``R = λ R_query + (1-λ) R_train`` with ``λ`` chosen so the
sorted eigenvalue curves ``λ·e_query`` and ``(1-λ)·e_train`` cross at component ``k`` (appendix
A.1.3: ``k ≈ 1000`` of ``~65k`` components; here ``k`` defaults to the same fraction of the
feature size).  The inverse square root is damped: ``(R + δ·mean(eig(R))·I)^{-1/2}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

Tensor = torch.Tensor
SCORES = ("trackstar", "cosine", "inner", "one_sided")
# TrackStar crosses the eigenvalue curves at component 1000 of 65536 (A.1.3).
DEFAULT_K_FRACTION = 1000 / 65536


def unit_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows scaled to unit norm; all-zero rows stay zero (no NaN)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


class Autocorrelation:
    """Streaming per-layer ``E[g gᵀ]`` over feature rows split into layer blocks."""

    def __init__(self, blocks: list[tuple[str, int, int]], dtype=torch.float64):
        self.blocks = blocks  # (name, offset, size)
        self.sums = {name: torch.zeros(size, size, dtype=dtype) for name, _, size in blocks}
        self.count = 0

    def update(self, feats: Tensor) -> None:
        f = feats.to(next(iter(self.sums.values())).dtype)
        for name, off, size in self.blocks:
            x = f[:, off : off + size]
            self.sums[name] += x.T @ x
        self.count += feats.shape[0]

    def all_reduce(self, group) -> None:
        """Sum the statistics over the ranks of a :class:`bergson.distributed.Group`."""
        if group.active:
            self.sums = {n: group.all_reduce_sum(t, "summing the autocorrelation") for n, t in self.sums.items()}
            self.count = int(group.all_reduce_sum(torch.tensor([self.count]), "counting rows"))

    def result(self) -> dict[str, Tensor]:
        if self.count == 0:
            raise ValueError("no rows: cannot estimate an autocorrelation")
        return {n: s / self.count for n, s in self.sums.items()}


def crossing_lambda(r_query: dict[str, Tensor], r_train: dict[str, Tensor], k: int) -> float:
    """``λ`` with ``λ·e_q[k] = (1-λ)·e_t[k]`` for the eigenvalues of all layers, sorted descending."""
    eq = torch.cat([torch.linalg.eigvalsh(m) for m in r_query.values()]).clamp_min(0).sort(descending=True).values
    et = torch.cat([torch.linalg.eigvalsh(m) for m in r_train.values()]).clamp_min(0).sort(descending=True).values
    k = min(max(int(k), 0), len(eq) - 1)
    a, b = float(eq[k]), float(et[k])
    if a + b == 0:
        return 0.5
    return b / (a + b)


def default_k(feature_dim: int) -> int:
    return max(1, round(feature_dim * DEFAULT_K_FRACTION))


def inverse_root(r: Tensor, damping: float, power: float) -> Tensor:
    """``(R + damping·mean(eig)·I)^{-power}`` by symmetric eigendecomposition."""
    evals, evecs = torch.linalg.eigh(r)
    evals = evals.clamp_min(0)
    shift = damping * evals.mean().clamp_min(torch.finfo(r.dtype).tiny)
    return (evecs * (evals + shift).pow(-power)) @ evecs.T


@dataclass
class Preconditioner:
    """Per-layer matrices applied to feature blocks (``R^{-1/2}`` or ``R^{-1}``)."""

    blocks: list[tuple[str, int, int]]
    mats: dict[str, Tensor]
    lam: float | None = None

    def apply(self, feats: Tensor) -> Tensor:
        out = torch.empty_like(feats, dtype=torch.float32)
        f = feats.float()
        for name, off, size in self.blocks:
            out[:, off : off + size] = f[:, off : off + size] @ self.mats[name].float()  # symmetric
        return out


def build_preconditioner(
    blocks, r_train: dict[str, Tensor], r_query: dict[str, Tensor] | None = None, *,
    k: int | None = None, damping: float = 1e-3, power: float = 0.5,
) -> Preconditioner:
    lam = None
    if r_query is not None:
        total = sum(size for _, _, size in blocks)
        lam = crossing_lambda(r_query, r_train, default_k(total) if k is None else k)
        mixed = {n: lam * r_query[n] + (1 - lam) * r_train[n] for n in r_train}
    else:
        mixed = r_train
    return Preconditioner(blocks, {n: inverse_root(m, damping, power) for n, m in mixed.items()}, lam)


class TopK:
    """Running top-k per query over streamed chunks; ties broken by the smaller row id."""

    def __init__(self, n_queries: int, k: int):
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {k}")
        self.k = k
        self.scores = torch.empty(n_queries, 0)
        self.ids = torch.empty(n_queries, 0, dtype=torch.int64)

    def update(self, row_ids: Tensor, scores: Tensor) -> None:
        """``row_ids [c]``, ``scores [n_queries, c]``."""
        s = torch.cat([self.scores, scores.float()], dim=1)
        ids = torch.cat([self.ids, row_ids[None, :].expand(s.shape[0], -1).to(torch.int64)], dim=1)
        order = torch.argsort(ids, dim=1, stable=True)  # row id ascending...
        s, ids = s.gather(1, order), ids.gather(1, order)
        order = torch.argsort(-s, dim=1, stable=True)[:, : self.k]  # ...then score descending
        self.scores, self.ids = s.gather(1, order), ids.gather(1, order)

    def result(self) -> tuple[Tensor, Tensor]:
        return self.scores, self.ids


def stream_topk(
    chunks: Iterable[tuple[Tensor, Tensor]], queries: Tensor, k: int, transform=None
) -> tuple[Tensor, Tensor]:
    """Top-``k`` ``(scores [Q, k'], row_ids [Q, k'])`` of ``transform(chunk) @ queriesᵀ`` with
    ``k' = min(k, rows)``; memory is bounded by one chunk whatever the index size."""
    top = TopK(queries.shape[0], k)
    q = queries.float()
    for ids, feats in chunks:
        f = transform(feats) if transform is not None else feats.float()
        if f.shape[1] != q.shape[1]:
            raise ValueError(f"query features have {q.shape[1]} values per row, the index rows {f.shape[1]}")
        top.update(ids, q @ f.T)
    return top.result()
