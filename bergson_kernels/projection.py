"""Seeded random projection matrices: the one source every backend uses.

A module with weight ``W: [O, I]`` gets two matrices ``L: [p, O]`` (the *left*,
output side) and ``R: [p, I]`` (the *right*, input side).  The stored feature of
a per-example gradient ``G`` is ``L G Rᵀ`` (``p×p``).  Entries are Rademacher
(``±1``, default) or standard Gaussian, scaled by ``1/sqrt(p)`` so that
``E[LᵀL] = I`` and therefore ``E[<L G Rᵀ, L H Rᵀ>] = <G, H>``.

The generator state is derived from a stable hash (BLAKE2b, not Python's salted
``hash``) of ``(seed, module name, side)`` and the matrix is always drawn on the
CPU with ``torch.Generator``, then moved: the same module gets the same matrix
on any device, process, rank or run.
"""

from __future__ import annotations

import hashlib

import torch

PROJECTION_TYPES = ("rademacher", "gaussian")
SIDES = ("left", "right")


def stable_seed(seed: int, name: str, side: str) -> int:
    """A 63-bit generator seed from ``(seed, name, side)``, identical in every process."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}\x00{side}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def projection_matrix(
    p: int,
    dim: int,
    *,
    seed: int = 0,
    name: str = "",
    side: str = "right",
    kind: str = "rademacher",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Return the ``[p, dim]`` projection matrix for ``(seed, name, side)``.

    Args:
        p: projection size (rows), ``p >= 1``.
        dim: size of the projected axis (``O`` for ``side="left"``, ``I`` for ``"right"``).
        kind: ``"rademacher"`` (entries ``±1/sqrt(p)``) or ``"gaussian"`` (``N(0, 1/p)``).
    """
    if p < 1:
        raise ValueError(f"expected p >= 1, got {p}")
    if dim < 1:
        raise ValueError(f"expected dim >= 1, got {dim}")
    if kind not in PROJECTION_TYPES:
        raise ValueError(f"projection kind must be one of {PROJECTION_TYPES}, got {kind!r}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(stable_seed(seed, name, side))
    if kind == "rademacher":
        m = torch.randint(0, 2, (p, dim), generator=gen, dtype=torch.int8).to(torch.float64)
        m = m.mul_(2).sub_(1)
    else:
        m = torch.randn((p, dim), generator=gen, dtype=torch.float64)
    m = m.mul_(p**-0.5)
    return m.to(dtype=dtype, device=device)
