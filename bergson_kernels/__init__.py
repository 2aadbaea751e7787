"""bergson_kernels: per-example gradient projection kernels (imports only torch and triton).

``reference`` holds the pure-PyTorch ground truth of every kernel; ``projection`` is the one
source of the seeded projection matrices.
"""

from . import reference
from .projection import PROJECTION_TYPES, projection_matrix, stable_seed

__all__ = ["PROJECTION_TYPES", "projection_matrix", "reference", "stable_seed"]
