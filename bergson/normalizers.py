"""Second-moment normalizers: precondition each per-example gradient like Adam or Adafactor.

All tensors are in the layer's ``(out, in)`` orientation (Conv1D states are transposed when
read from an optimizer).

* :class:`AdafactorNormalizer` holds row and column second moments ``r: [O]``, ``c: [I]``
  and approximates ``V = r cᵀ / mean(r)``.  ``G ⊘ sqrt(V) = diag(α) G diag(β)`` with
  ``α = sqrt(mean(r)) / sqrt(r)`` and ``β = 1 / sqrt(c)``: the scaling folds into the
  layer's output gradients and inputs, so it costs nothing.
* :class:`AdamNormalizer` holds ``v: [O, I]``: ``G / (sqrt(v) + eps)`` does not factor.

Sources: an optimizer's state (:func:`normalizers_from_optimizer`: torch ``Adam``/``AdamW``,
torch ``Adafactor``, transformers ``Adafactor``), data (:func:`bergson.fit_normalizers`),
or a conversion (:meth:`AdamNormalizer.to_adafactor`).  Save and load with
:func:`save_normalizers` / :func:`load_normalizers` (safetensors).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from .layers import find_layers

Tensor = torch.Tensor


@dataclass
class AdafactorNormalizer:
    """Factored second moment of one layer: ``row: [O]``, ``col: [I]``, optional ``bias: [O]``."""

    row: Tensor
    col: Tensor
    bias: Tensor | None = None
    eps: float = 1e-30  # floor for the second moments (zero rows/columns)

    kind = "adafactor"

    def __post_init__(self):
        if self.row.dim() != 1 or self.col.dim() != 1:
            raise ValueError(
                f"AdafactorNormalizer expects 1-D row [O] and col [I], got {tuple(self.row.shape)} "
                f"and {tuple(self.col.shape)}"
            )
        if self.bias is not None and self.bias.shape != self.row.shape:
            raise ValueError(f"expected bias shape {tuple(self.row.shape)}, got {tuple(self.bias.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.row.numel(), self.col.numel())

    def scales(self, dtype: torch.dtype = torch.float32, device=None) -> tuple[Tensor, Tensor]:
        """``(α: [O], β: [I])`` such that ``diag(α) G diag(β) = G ⊘ sqrt(r cᵀ / mean(r))``."""
        row = self.row.to(device=device, dtype=torch.float64).clamp_min(self.eps)
        col = self.col.to(device=device, dtype=torch.float64).clamp_min(self.eps)
        alpha = row.mean().sqrt() * row.rsqrt()
        beta = col.rsqrt()
        return alpha.to(dtype), beta.to(dtype)

    def bias_scale(self, dtype: torch.dtype = torch.float32, device=None) -> Tensor | None:
        if self.bias is None:
            return None
        return self.bias.to(device=device, dtype=torch.float64).clamp_min(self.eps).rsqrt().to(dtype)

    def full(self) -> Tensor:
        """The dense ``V = r cᵀ / mean(r)`` (``[O, I]``)."""
        row, col = self.row.double().clamp_min(self.eps), self.col.double().clamp_min(self.eps)
        return torch.outer(row, col) / row.mean()

    def to_adam(self, eps: float = 0.0) -> "AdamNormalizer":
        return AdamNormalizer(self.full().to(self.row.dtype), bias=self.bias, eps=eps)

    def tensors(self) -> dict[str, Tensor]:
        out = {"row": self.row, "col": self.col}
        if self.bias is not None:
            out["bias"] = self.bias
        return out


@dataclass
class AdamNormalizer:
    """Elementwise second moment of one layer: ``avg_sq: [O, I]``, optional ``bias: [O]``."""

    avg_sq: Tensor
    bias: Tensor | None = None
    eps: float = 1e-8

    kind = "adam"

    def __post_init__(self):
        if self.avg_sq.dim() != 2:
            raise ValueError(f"AdamNormalizer expects avg_sq [O, I], got shape {tuple(self.avg_sq.shape)}")
        if self.bias is not None and self.bias.shape != self.avg_sq.shape[:1]:
            raise ValueError(f"expected bias shape {tuple(self.avg_sq.shape[:1])}, got {tuple(self.bias.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.avg_sq.shape)

    def bias_scale(self, dtype: torch.dtype = torch.float32, device=None) -> Tensor | None:
        if self.bias is None:
            return None
        b = self.bias.to(device=device, dtype=torch.float64)
        return (b.sqrt() + self.eps).reciprocal().to(dtype)

    def to_adafactor(self) -> AdafactorNormalizer:
        """Adam → Adafactor: the row and column means of ``v``."""
        return AdafactorNormalizer(self.avg_sq.mean(1), self.avg_sq.mean(0), bias=self.bias)

    def tensors(self) -> dict[str, Tensor]:
        out = {"avg_sq": self.avg_sq}
        if self.bias is not None:
            out["bias"] = self.bias
        return out


Normalizer = Union[AdafactorNormalizer, AdamNormalizer]
NORMALIZER_KINDS = ("adafactor", "adam", "none")


def convert(norm: Normalizer, kind: str) -> Normalizer:
    """Return ``norm`` as ``kind`` (``"adafactor"`` or ``"adam"``)."""
    if kind == norm.kind:
        return norm
    if kind == "adafactor":
        return norm.to_adafactor()
    if kind == "adam":
        return norm.to_adam()
    raise ValueError(f"normalizer kind must be 'adafactor' or 'adam', got {kind!r}")


# ---------------------------------------------------------------------------------------
# from an optimizer
# ---------------------------------------------------------------------------------------
def _orient(t: Tensor, transposed: bool) -> Tensor:
    return t.T if transposed and t.dim() == 2 else t


def _bias_moment(state: dict, group: dict) -> Tensor | None:
    if "exp_avg_sq" in state:  # Adam/AdamW (with bias correction) or HF Adafactor's 1-D state
        v = state["exp_avg_sq"].detach().float()
        if "betas" in group and "step" in state:
            v = v / (1 - group["betas"][1] ** float(state["step"]))
        return v.clone()
    if state.get("variance") is not None:  # torch Adafactor, 1-D parameters
        return state["variance"].detach().float().clone()
    return None


def normalizers_from_optimizer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    kind: str | None = None,
    target_modules=None,
) -> dict[str, Normalizer]:
    """Read per-layer second moments from a trained optimizer's state.

    Supports torch ``Adam``/``AdamW`` (``exp_avg_sq``, bias-corrected with the parameter's
    group ``betas`` and step, ``eps`` from its group), torch ``Adafactor``
    (``row_var``/``col_var``) and transformers ``Adafactor``
    (``exp_avg_sq_row``/``exp_avg_sq_col``).  Conv1D states are transposed to ``(out, in)``.
    ``kind`` converts (``"adafactor"`` from an Adam state takes row/column means).
    Layers whose weight has no optimizer state are left out.
    """
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return _from_state(model, optimizer.state, group_of, kind=kind, target_modules=target_modules)


def normalizers_from_state_dict(
    model: nn.Module, state_dict: dict, *, kind: str | None = None, target_modules=None
) -> dict[str, Normalizer]:
    """Like :func:`normalizers_from_optimizer`, from a saved ``optimizer.state_dict()``.

    Parameters are matched by the ``param_names`` torch stores when the optimizer was built
    from ``model.named_parameters()``; otherwise the state's parameter indices are taken in
    ``model.parameters()`` order (as for ``Optimizer(model.parameters())``) and every shape
    is checked.
    """
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("expected an optimizer state_dict with 'state' and 'param_groups'")
    named = dict(model.named_parameters())
    params = list(model.parameters())
    by_index: dict[int, nn.Parameter] = {}
    for g in state_dict["param_groups"]:
        names = g.get("param_names")
        for k, idx in enumerate(g["params"]):
            if names is not None:
                if names[k] not in named:
                    raise ValueError(f"optimizer state names parameter {names[k]!r}, which the model does not have")
                by_index[idx] = named[names[k]]
            else:
                if idx >= len(params):
                    raise ValueError(f"optimizer state has parameter index {idx}; the model has {len(params)}")
                by_index[idx] = params[idx]
    state, group_of = {}, {}
    for g in state_dict["param_groups"]:
        for idx in g["params"]:
            group_of[id(by_index[idx])] = g
    for idx, st in state_dict["state"].items():
        p = by_index[int(idx)]
        v = st.get("exp_avg_sq")
        if v is not None and tuple(v.shape) != tuple(p.shape):
            raise ValueError(
                f"optimizer state exp_avg_sq of parameter {idx} has shape {tuple(v.shape)} but the parameter "
                f"it maps to has {tuple(p.shape)}: the state does not belong to this model"
            )
        state[p] = st
    return _from_state(model, state, group_of, kind=kind, target_modules=target_modules)


def _from_state(model, opt_state, group_of, *, kind, target_modules) -> dict[str, Normalizer]:
    layers = find_layers(model, target_modules)
    out: dict[str, Normalizer] = {}
    for name, spec in layers.items():
        module = model.get_submodule(name)
        w = module.weight
        state = opt_state.get(w)
        if not state:
            continue
        group = group_of[id(w)]
        bias = None
        if spec.has_bias and module.bias in opt_state:
            bias = _bias_moment(opt_state[module.bias], group_of[id(module.bias)])
        if "row_var" in state and "col_var" in state:  # torch.optim.Adafactor: [O,1] and [1,I]
            row, col = state["row_var"].detach().float().reshape(-1), state["col_var"].detach().float().reshape(-1)
            if spec.transposed:
                row, col = col, row
            norm: Normalizer = AdafactorNormalizer(row.clone(), col.clone(), bias=bias)
        elif "exp_avg_sq_row" in state:  # transformers Adafactor: [O] and [I]
            row, col = state["exp_avg_sq_row"].detach().float(), state["exp_avg_sq_col"].detach().float()
            if spec.transposed:
                row, col = col, row
            norm = AdafactorNormalizer(row.clone(), col.clone(), bias=bias)
        elif "exp_avg_sq" in state:  # Adam / AdamW
            v = state["exp_avg_sq"].detach().float()
            if "betas" in group and "step" in state:
                v = v / (1 - group["betas"][1] ** float(state["step"]))
            eps = group.get("eps", 1e-8)
            norm = AdamNormalizer(_orient(v, spec.transposed).clone(), bias=bias, eps=float(eps))
        else:
            raise ValueError(
                f"optimizer state of {name}.weight has no known second moment "
                f"(keys: {sorted(state)}); expected exp_avg_sq, row_var/col_var or exp_avg_sq_row/col"
            )
        if norm.shape != (spec.out_features, spec.in_features):
            raise ValueError(
                f"second moment of {name} has shape {norm.shape}, expected {(spec.out_features, spec.in_features)}"
            )
        out[name] = convert(norm, kind) if kind is not None else norm
    if not out:
        raise ValueError("the optimizer holds no state for any collected layer: run at least one step first")
    return out


# ---------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------
def save_normalizers(normalizers: dict[str, Normalizer], path: str | os.PathLike) -> None:
    """Write ``{layer name: normalizer}`` to one safetensors file (atomically)."""
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for name, norm in normalizers.items():
        meta[name] = {"kind": norm.kind, "eps": norm.eps}
        for key, t in norm.tensors().items():
            tensors[f"{name}/{key}"] = t.detach().to("cpu").contiguous()
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={"bergson_normalizers": json.dumps(meta)})
    os.replace(tmp, path)


def load_normalizers(path: str | os.PathLike, device=None) -> dict[str, Normalizer]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        meta_raw = (f.metadata() or {}).get("bergson_normalizers")
        if meta_raw is None:
            raise ValueError(f"{path} is not a bergson normalizer file (no 'bergson_normalizers' metadata)")
        meta = json.loads(meta_raw)
        keys = set(f.keys())

        def get(name, key):
            k = f"{name}/{key}"
            return f.get_tensor(k).to(device) if k in keys else None

        out: dict[str, Normalizer] = {}
        for name, m in meta.items():
            if m["kind"] == "adafactor":
                out[name] = AdafactorNormalizer(get(name, "row"), get(name, "col"), get(name, "bias"), eps=m["eps"])
            elif m["kind"] == "adam":
                out[name] = AdamNormalizer(get(name, "avg_sq"), get(name, "bias"), eps=m["eps"])
            else:
                raise ValueError(f"{path}: unknown normalizer kind {m['kind']!r} for {name}")
    return out
