"""bergson: trace what a neural network learned back to its training data.

Pipeline (in file order): ``layers`` (which modules) → ``hooks.GradientCollector`` (per-example
gradients, normalized and projected during backward) → ``normalizers`` (Adam/Adafactor second
moments) → ``data`` (tokenize, batch, per-example loss) → ``collect`` (``collect_gradients``,
``fit_normalizers``).  Heavy dependencies (transformers, datasets) are imported lazily.
"""

from .collect import collect_gradients, fit_normalizers
from .data import per_example_loss
from .hooks import GradientCollector
from .layers import find_layers, register_layer
from .normalizers import (
    AdafactorNormalizer,
    AdamNormalizer,
    load_normalizers,
    normalizers_from_optimizer,
    save_normalizers,
)

__version__ = "0.1.0"

__all__ = [
    "AdafactorNormalizer",
    "AdamNormalizer",
    "GradientCollector",
    "collect_gradients",
    "find_layers",
    "fit_normalizers",
    "load_normalizers",
    "normalizers_from_optimizer",
    "per_example_loss",
    "register_layer",
    "save_normalizers",
]
