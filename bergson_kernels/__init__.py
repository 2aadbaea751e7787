"""bergson_kernels: per-example gradient projection kernels (imports only torch and triton).

``reference`` holds the pure-PyTorch ground truth of every kernel; ``projection`` is the one
source of the seeded projection matrices.  The Triton kernels — :func:`project_scale`,
:func:`outer_project`, :func:`adam_project` — are imported here when Triton is importable;
otherwise they are stubs that raise ``RuntimeError`` with :func:`triton_status`'s reason, so
``import bergson_kernels`` never fails.  To run them on CPU tensors (Triton's interpreter,
for tests) set ``TRITON_INTERPRET=1`` before importing this package.
"""

from . import reference
from .projection import PROJECTION_TYPES, projection_matrix, stable_seed
from .triton_support import triton_status

try:
    from .adam_tile import adam_project
    from .outer_project import outer_project
    from .project_scale import project_scale

    HAS_TRITON = True
except ImportError as _exc:
    if not (_exc.name or "").startswith("triton"):
        raise
    HAS_TRITON = False

    def _unavailable(name: str):
        def stub(*args, **kwargs):
            raise RuntimeError(f"bergson_kernels.{name} is unavailable: {triton_status(None)}")

        stub.__name__ = stub.__qualname__ = name
        return stub

    adam_project = _unavailable("adam_project")
    outer_project = _unavailable("outer_project")
    project_scale = _unavailable("project_scale")

__all__ = [
    "HAS_TRITON",
    "PROJECTION_TYPES",
    "adam_project",
    "outer_project",
    "project_scale",
    "projection_matrix",
    "reference",
    "stable_seed",
    "triton_status",
]
