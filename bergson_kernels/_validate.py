"""Argument checks shared by the kernel wrappers (imports only torch).

Every public kernel function checks its arguments in two rounds — types and ranks first, then
sizes, dtypes and devices — and raises one ``ValueError`` listing every problem of a round,
each naming expected vs actual ("expected x_tilde.shape[0] == 97 (delta.shape[0]), got 96").
"""

from __future__ import annotations

import torch

from .triton_support import debug_fill_enabled

Tensor = torch.Tensor

# float64 is rejected rather than silently computed in float32: the kernels accumulate in fp32,
# and a float64 caller presumably wants float64 results (bergson_kernels.reference gives them).
KERNEL_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


class ArgChecker:
    """Collects the problems of one call; :meth:`done` raises them together."""

    def __init__(self, fn_name: str):
        self.fn_name = fn_name
        self.problems: list[str] = []

    def fail(self, message: str) -> None:
        self.problems.append(message)

    def done(self) -> None:
        if self.problems:
            raise ValueError(f"{self.fn_name}: " + "; ".join(self.problems))

    def tensor(self, name: str, t: object, ndim: int, *, optional: bool = False) -> None:
        if t is None and optional:
            return
        if not isinstance(t, torch.Tensor):
            self.fail(f"expected {name} to be a torch.Tensor, got {type(t).__name__}")
        elif t.dim() != ndim:
            self.fail(f"expected {name} to have {ndim} dimension(s), got shape {tuple(t.shape)}")

    def floating(self, name: str, t: Tensor | None) -> None:
        if t is None:
            return
        if t.dtype == torch.float64:
            self.fail(
                f"{name} is float64; the Triton kernels take float32/bfloat16/float16 "
                "(use bergson_kernels.reference for float64)"
            )
        elif t.dtype not in KERNEL_FLOAT_DTYPES:
            self.fail(f"expected {name} to be float32, bfloat16 or float16, got {t.dtype}")

    def size(self, name: str, t: Tensor | None, dim: int, expected: int, source: str) -> None:
        if t is not None and t.shape[dim] != expected:
            self.fail(f"expected {name}.shape[{dim}] == {expected} ({source}), got {t.shape[dim]}")

    def at_least(self, name: str, t: Tensor, dim: int, minimum: int = 1) -> None:
        if t.shape[dim] < minimum:
            self.fail(f"expected {name}.shape[{dim}] >= {minimum}, got {t.shape[dim]}")

    def same_device(self, tensors: dict[str, Tensor | None]) -> None:
        present = {k: t for k, t in tensors.items() if t is not None}
        first_name, first = next(iter(present.items()))
        for name, t in present.items():
            if t.device != first.device:
                self.fail(f"expected {name} on {first.device} (the device of {first_name}), got {t.device}")

    def cu_seqlens(self, cu: Tensor) -> None:
        if cu.dtype not in INDEX_DTYPES:
            self.fail(f"expected cu_seqlens to be int32 or int64, got {cu.dtype}")
        if cu.numel() < 1:
            self.fail("expected cu_seqlens to have at least 1 element ([N+1] segment offsets), got 0")

    def cu_seqlens_values(self, cu: Tensor, total: int, total_name: str) -> None:
        """Value checks; free on CPU, a host sync on GPU (only under ``BERGSON_KERNELS_DEBUG_FILL``)."""
        if cu.device.type != "cpu" and not debug_fill_enabled():
            return
        vals = cu.tolist()
        if vals[0] != 0:
            self.fail(f"expected cu_seqlens[0] == 0, got {vals[0]}")
        if any(b < a for a, b in zip(vals, vals[1:], strict=False)):
            self.fail(f"expected cu_seqlens to be non-decreasing, got {vals if len(vals) <= 16 else '...'}")
        if vals[-1] > total:
            self.fail(f"expected cu_seqlens[-1] <= {total} ({total_name}), got {vals[-1]}")


def new_output(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """float32 output; NaN-filled under ``BERGSON_KERNELS_DEBUG_FILL=1`` so unwritten elements show."""
    if debug_fill_enabled():
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)
