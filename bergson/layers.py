"""Which layers bergson collects, keyed by module type (a registry, not per-architecture code).

Every supported layer is described by a :class:`LayerSpec` giving its weight in
``(out, in)`` orientation, whatever the storage: ``torch.nn.Linear`` stores ``[out, in]``,
Hugging Face's ``Conv1D`` (GPT-2) stores ``[in, out]``.  Both see inputs ``[..., in]`` and
produce outputs ``[..., out]``, so the hooks treat them alike.
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    name: str
    out_features: int
    in_features: int
    has_bias: bool
    transposed: bool  # True when the stored weight is [in, out] (Conv1D)


# module type -> function(module) -> (out, in, has_bias, transposed)
_REGISTRY: dict[type, Callable[[nn.Module], tuple[int, int, bool, bool]]] = {}


def register_layer(cls: type, describe: Callable[[nn.Module], tuple[int, int, bool, bool]]) -> None:
    """Teach bergson a new layer type: ``describe(module) -> (out, in, has_bias, transposed)``.

    The layer must compute ``y = x Wᵀ (+ b)`` on the last axis of its first input.
    """
    _REGISTRY[cls] = describe


register_layer(nn.Linear, lambda m: (m.out_features, m.in_features, m.bias is not None, False))


def _conv1d_type() -> type | None:
    # Only look for transformers' Conv1D when transformers is already imported: a model
    # containing one cannot exist otherwise, and importing transformers costs seconds.
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def _describe(module: nn.Module) -> tuple[int, int, bool, bool] | None:
    conv1d = _conv1d_type()
    if conv1d is not None and conv1d not in _REGISTRY:
        register_layer(conv1d, lambda m: (m.weight.shape[1], m.weight.shape[0], m.bias is not None, True))
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls](module)
    return None


def find_layers(model: nn.Module, target_modules: Iterable[str] | str | None = None) -> dict[str, LayerSpec]:
    """Supported layers of ``model`` in ``named_modules()`` order, filtered by name globs.

    Raises ``ValueError`` when nothing matches (naming what exists).
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    patterns = list(target_modules) if target_modules is not None else None
    found: dict[str, LayerSpec] = {}
    all_supported: list[str] = []
    for name, module in model.named_modules():
        desc = _describe(module)
        if desc is None:
            continue
        all_supported.append(name)
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        found[name] = LayerSpec(name, *desc)
    if not all_supported:
        raise ValueError(
            f"{type(model).__name__} has no torch.nn.Linear or transformers Conv1D layers: nothing to collect"
        )
    if not found:
        shown = ", ".join(all_supported[:8]) + (", ..." if len(all_supported) > 8 else "")
        raise ValueError(f"target_modules {patterns} match none of the model's layers ({shown})")
    return found


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight
