"""bergson: trace what a neural network learned back to its training data.

Pipeline (in file order): ``layers`` (which modules) → ``hooks.GradientCollector`` (per-example
gradients, normalized and projected during backward) → ``normalizers`` (Adam/Adafactor second
moments) → ``data`` (tokenize, batch, per-example loss) → ``collect`` (``collect_gradients``,
``fit_normalizers``) → ``storage`` (the on-disk index) → ``__main__`` (the CLI).

Names are imported lazily (PEP 562) so ``import bergson`` and ``bergson --help`` do not pay for
torch, transformers or datasets until something is used.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

_EXPORTS = {
    "GradientCollector": "hooks",
    "collect_gradients": "collect",
    "fit_normalizers": "collect",
    "per_example_loss": "data",
    "find_layers": "layers",
    "register_layer": "layers",
    "AdafactorNormalizer": "normalizers",
    "AdamNormalizer": "normalizers",
    "load_normalizers": "normalizers",
    "save_normalizers": "normalizers",
    "normalizers_from_optimizer": "normalizers",
    "normalizers_from_state_dict": "normalizers",
    "GradientIndex": "storage",
    "Attributor": "query",
    "load_index": "storage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # submodules: bergson.default, ...
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'bergson' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
