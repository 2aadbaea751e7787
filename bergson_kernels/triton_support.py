"""Can the Triton kernels run here?  Also the one place the package reads environment flags.

* ``TRITON_INTERPRET=1`` — run the kernels on CPU tensors through Triton's interpreter (slow;
  for tests).  Triton reads it when a ``@triton.jit`` decorator runs, i.e. when the kernel
  modules are imported, so it must be set before ``import bergson_kernels``.
* ``BERGSON_KERNELS_DEBUG_FILL=1`` — outputs are allocated filled with NaN instead of
  ``torch.empty``, so an element a kernel forgot to write shows up in tests; ``cu_seqlens``
  values are also checked on the GPU (a host sync per call, so off by default; on the CPU
  they are always checked).

Both are read at call time, from ``os.environ``.
"""

from __future__ import annotations

import os

import torch

INTERPRET_HINT = "set TRITON_INTERPRET=1 to run Triton kernels on CPU through the interpreter (slow; for testing)"

_TRUE = ("1", "true", "on", "yes")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def interpret_enabled() -> bool:
    """``TRITON_INTERPRET`` is set (same truthy values as Triton's own parser)."""
    return _env_flag("TRITON_INTERPRET")


def debug_fill_enabled() -> bool:
    """``BERGSON_KERNELS_DEBUG_FILL`` is set: NaN-filled outputs and GPU-side ``cu_seqlens`` checks."""
    return _env_flag("BERGSON_KERNELS_DEBUG_FILL")


def is_interpreted(kernel: object) -> bool:
    """Whether a ``@triton.jit`` object was built for the interpreter (``TRITON_INTERPRET`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    while hasattr(kernel, "fn") and not isinstance(kernel, InterpretedFunction):
        kernel = kernel.fn  # unwrap Autotuner / Heuristics
    return isinstance(kernel, InterpretedFunction)


def triton_status(device: torch.device | str | None, *, kernel: object | None = None) -> str | None:
    """``None`` when the Triton kernels can run on ``device``, else a human-readable reason.

    ``kernel`` (optional, a ``@triton.jit`` object) lets the check notice that
    ``TRITON_INTERPRET=1`` was set only after the kernel modules were imported.
    """
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not importable ({exc}); install triton (Linux) or use the PyTorch reference"
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cpu":
        if not interpret_enabled():
            return INTERPRET_HINT
        if kernel is not None and not is_interpreted(kernel):
            return (
                "TRITON_INTERPRET=1 was set after bergson_kernels was imported; Triton reads it when the "
                "kernels are defined, so set it before the first import"
            )
        return None
    if dev.type == "cuda":  # also ROCm builds of torch, which Triton supports
        if not torch.cuda.is_available():
            return "torch reports no usable CUDA device (torch.cuda.is_available() is False)"
        return None
    return (
        f"Triton kernels run on CUDA/ROCm GPUs (or on CPU with TRITON_INTERPRET=1), not on device type "
        f"{dev.type!r}; use the PyTorch reference there"
    )


def require_triton(device: torch.device, kernel: object) -> None:
    """Raise ``RuntimeError`` with :func:`triton_status`'s reason when the kernel cannot run."""
    reason = triton_status(device, kernel=kernel)
    if reason is not None:
        raise RuntimeError(reason)


# ---------------------------------------------------------------------------------------
# Dot-operand precision policy, shared by the kernel files.
#
# The *primary* dot of each kernel multiplies a streamed input (x, delta) by a projection
# block: its operands are rounded to the input dtype (bf16/fp16 → tensor cores; fp32 → IEEE
# fp32, never TF32).  *Secondary* dots multiply fp32 intermediates (L·δ, the Adam-normalized
# tile): they are rounded to bf16 only for bf16 inputs — bf16 has fp32's range, whereas an
# fp16 rounding of rescaled values could overflow — and stay fp32 otherwise.  Accumulation
# is always fp32.
# ---------------------------------------------------------------------------------------
def dot_dtypes(*streamed: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(primary, secondary) dot operand dtypes for kernels streaming inputs of these dtypes."""
    primary = streamed[0] if len(set(streamed)) == 1 else torch.float32
    secondary = torch.bfloat16 if primary == torch.bfloat16 else torch.float32
    return primary, secondary


try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel modules are not importable then; bergson_kernels stubs them
    triton = None

if triton is not None:
    TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    @triton.jit
    def to_dot(b, DT: tl.constexpr, EMULATE_BF16: tl.constexpr):
        # Triton's interpreter (3.x) multiplies bf16 blocks as raw uint16 bits and truncates
        # fp32 -> bf16, so there a bf16 operand is rounded to nearest-even by hand and multiplied
        # in fp32: the same numbers the GPU's bf16 tensor cores see.
        if EMULATE_BF16:
            if DT == tl.bfloat16:
                bits = b.to(tl.float32).to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                b = bits.to(tl.float32, bitcast=True)
            else:
                b = b.to(DT)
        else:
            b = b.to(DT)
        return b
