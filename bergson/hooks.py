"""Module hooks that turn one forward + backward into per-example (projected, normalized) gradients.

For a layer with weight ``W: [O, I]`` and an example whose tokens give inputs ``X: [S, I]`` and
output gradients ``Δ: [S, O]``, the per-example gradient is ``G = Δᵀ X`` and the stored feature
is ``L (diag(α) G diag(β)) Rᵀ = Σ_t (L (α ⊙ δ_t)) ((β ⊙ x_t) Rᵀ)ᵀ`` — ``G`` is never formed.
The forward hook keeps only ``X̃ = (X ⊙ β) Rᵀ`` (``[S, p]``); the output's gradient hook
finishes the feature.  Adam normalization (``G / (sqrt(v)+eps)``) does not factor: the hook
keeps ``X`` and the backend forms ``G`` tile by tile (Triton) or in bounded chunks (torch).

Each row of the batch is one example (``x: [N, ..., I]``; a 2-D ``[N, I]`` input is one token
per example).  Padding tokens must not contribute to the loss; their output gradients are then
exactly zero and so is their contribution.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from bergson_kernels import projection_matrix, reference
from bergson_kernels.projection import PROJECTION_TYPES

from .layers import LayerSpec, find_layers
from .normalizers import AdafactorNormalizer, AdamNormalizer, Normalizer

Tensor = torch.Tensor
BACKENDS = ("auto", "torch", "triton")


def _triton_status(device: torch.device) -> str | None:
    """None if the Triton backend can run on ``device``, else the reason it cannot."""
    try:
        from bergson_kernels.triton_support import triton_status
    except ImportError as e:  # triton itself missing
        return f"the Triton backend is unavailable: {e}"
    return triton_status(device)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"triton"`` on CUDA when Triton works there, else ``"torch"``.

    Raises ``RuntimeError`` when ``"triton"`` is asked for where it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    reason = _triton_status(device)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run on {device}: {reason}")
        return "triton"
    return "triton" if device.type == "cuda" and reason is None else "torch"


class _Ops:
    """Backend kernels on padded ``[N, S, ·]`` tensors (one example per row)."""

    def __init__(self, backend: str):
        self.backend = backend
        if backend == "triton":
            from bergson_kernels import adam_project, outer_project, project_scale

            self._ps, self._op, self._at = project_scale, outer_project, adam_project

    @staticmethod
    def _cu(n: int, s: int, device) -> Tensor:
        return torch.arange(0, (n + 1) * s, s, device=device, dtype=torch.int32)

    def project_scale(self, x: Tensor, R: Tensor | None, beta: Tensor | None) -> Tensor:
        if self.backend == "triton" and R is not None and x.dtype != torch.float64:
            return self._ps(x.reshape(-1, x.shape[-1]), R, beta).view(*x.shape[:-1], R.shape[0])
        return reference.project_scale(x, R, beta)

    def outer_project(self, delta: Tensor, xt: Tensor, L: Tensor | None, alpha: Tensor | None) -> Tensor:
        if self.backend == "triton" and L is not None and delta.dtype != torch.float64:
            n, s, _ = delta.shape
            return self._op(
                delta.reshape(n * s, -1), xt.reshape(n * s, -1), L, self._cu(n, s, delta.device), alpha
            )
        return reference.outer_project_padded(delta, xt, L, alpha)

    def adam_project(self, delta: Tensor, x: Tensor, L, R, v: Tensor, eps: float) -> Tensor:
        if self.backend == "triton" and L is not None and R is not None and delta.dtype != torch.float64:
            n, s, _ = delta.shape
            return self._at(
                delta.reshape(n * s, -1), x.reshape(n * s, -1), L, R, v, self._cu(n, s, delta.device), eps
            )
        return reference.adam_project_padded(delta, x, L, R, v, eps)


@dataclass
class _Plan:
    L: Tensor | None  # [p, O], Adafactor row scale folded in
    R: Tensor | None  # [p, I], Adafactor column scale folded in
    alpha: Tensor | None = None  # elementwise scales, only without a projection
    beta: Tensor | None = None
    adam: Tensor | None = None  # [O, I] second moment
    eps: float = 0.0
    bias_scale: Tensor | None = None


class _LayerHooks:
    """Shared machinery: find layers, freeze parameters, make the outputs of the first collected
    layers require grad, hook every layer's forward and output gradient, restore everything on
    exit.

    Subclasses implement ``_forward(spec, x) -> state`` (what the forward keeps),
    ``_backward(spec, state, grad) -> partial`` and ``_complete(spec, partials)`` (called once
    every call of the layer in this forward has received its gradient).
    """

    def __init__(self, model: nn.Module, *, target_modules=None, freeze: bool = True):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.layers: dict[str, LayerSpec] = find_layers(model, target_modules)
        self.freeze = freeze
        self._handles: list = []
        self._saved_requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._pending: dict[str, int] = defaultdict(int)
        self._partials: dict[str, list] = defaultdict(list)
        self._active = False

    # -- context manager -------------------------------------------------------------------
    def __enter__(self):
        if self._active:
            raise RuntimeError(f"{type(self).__name__} is already active")
        try:
            self._install()
        except BaseException:
            self._uninstall()
            raise
        self._active = True
        return self

    def __exit__(self, *exc):
        self._uninstall()
        return False

    def _install(self):
        model = self.model
        if self.freeze:
            self._saved_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
            for p, _ in self._saved_requires_grad:
                p.requires_grad_(False)
        self._handles.append(model.register_forward_pre_hook(self._on_model_forward))
        for name, spec in self.layers.items():
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._make_forward_hook(spec)))

    def _uninstall(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        self._saved_requires_grad = []
        self._pending.clear()
        self._partials.clear()
        self._active = False

    # -- hooks -----------------------------------------------------------------------------
    def _on_model_forward(self, module, args):
        # One forward, then one backward per batch: a new forward starts a new batch.
        self._pending.clear()
        self._partials.clear()

    def _make_forward_hook(self, spec: LayerSpec):
        def hook(module, inputs, output):
            if not isinstance(output, Tensor) or not torch.is_grad_enabled():
                return None  # e.g. under torch.no_grad(): nothing will flow back
            replaced = None
            if not output.requires_grad:
                # Nothing before this layer requires grad (it is the first collected layer on its
                # path): make its output a leaf, so backward stops here instead of running on
                # into layers and embeddings whose input gradients nobody needs.
                replaced = output = output.requires_grad_(True)
            x = inputs[0].detach()
            x = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, S, I]
            state = self._forward(spec, x)
            self._pending[spec.name] += 1
            output.register_hook(lambda g: self._on_grad(spec, state, g))
            return replaced

        return hook

    def _on_grad(self, spec: LayerSpec, state, grad: Tensor):
        g = grad.detach()
        g = g.reshape(g.shape[0], -1, g.shape[-1])  # [N, S, O]
        self._partials[spec.name].append(self._backward(spec, state, g))
        self._pending[spec.name] -= 1
        if self._pending[spec.name] == 0:
            partials = self._partials.pop(spec.name)
            del self._pending[spec.name]
            self._complete(spec, partials)
        return None

    # -- to implement ----------------------------------------------------------------------
    def _forward(self, spec: LayerSpec, x: Tensor):
        raise NotImplementedError

    def _backward(self, spec: LayerSpec, state, grad: Tensor):
        raise NotImplementedError

    def _complete(self, spec: LayerSpec, partials: list) -> None:
        raise NotImplementedError


class GradientCollector(_LayerHooks):
    """Collect per-example projected, normalized gradients of every ``Linear``/``Conv1D`` layer.

    Use as a context manager; inside it run a forward pass and ``backward()`` on a loss that is
    a **sum of per-example losses** (so each example's gradient does not depend on the others)::

        with GradientCollector(model, projection_dim=16) as collector:
            logits = model(input_ids, attention_mask=mask).logits
            per_example_loss(logits, labels).sum().backward()
        collector.gradients  # {layer name: [N, 16*16]}

    While active, every parameter is frozen (``requires_grad=False``); the output of a collected
    layer whose input does not require grad (the first ones on each path) is made a leaf that
    does.  Backward then computes input gradients only, from the loss down to those layers and
    no further (no embedding gradients), and no ``.grad`` is populated; everything is restored
    on exit, also after an exception.

    Args:
        model: any ``nn.Module`` with ``nn.Linear`` or transformers ``Conv1D`` layers.
        closure: optional ``closure(name, grads)`` called during backward with ``grads: [N, D]``
            (float32, float64 for a float64 model); without it ``collector.gradients`` holds the
            last batch's features.
        projection_dim: ``p``; each layer's feature is ``L G Rᵀ`` flattened (``p*p``).
            ``0`` stores the full ``G`` flattened in ``(out, in)`` order (``O*I``).
        normalizers: ``{layer name: AdafactorNormalizer | AdamNormalizer}``; layers not in the
            dict are not normalized.
        target_modules: name globs (``fnmatch``) selecting layers; default all.
        include_bias: append the bias gradient ``Σ_t δ_t`` (``L``-projected: ``p`` more values,
            or ``O`` when ``p == 0``), normalized by the normalizer's ``bias`` moment if it has one.
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (triton on CUDA when it runs there).
        seed: global projection seed (matrices depend only on seed, layer name and side).
        projection_type: ``"rademacher"`` or ``"gaussian"``.
    """

    def __init__(
        self,
        model: nn.Module,
        closure: Callable[[str, Tensor], None] | None = None,
        *,
        projection_dim: int = 16,
        normalizers: dict[str, Normalizer] | None = None,
        target_modules: Iterable[str] | str | None = None,
        include_bias: bool = False,
        backend: str = "auto",
        seed: int = 0,
        projection_type: str = "rademacher",
    ):
        if not isinstance(projection_dim, int) or isinstance(projection_dim, bool) or projection_dim < 0:
            raise ValueError(f"projection_dim must be an int >= 0, got {projection_dim!r}")
        if projection_type not in PROJECTION_TYPES:
            raise ValueError(f"projection_type must be one of {PROJECTION_TYPES}, got {projection_type!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if closure is not None and not callable(closure):
            raise ValueError("closure must be callable as closure(name, grads)")
        super().__init__(model, target_modules=target_modules)
        self.closure = closure
        self.projection_dim = projection_dim
        self.projection_type = projection_type
        self.include_bias = include_bias
        self.seed = seed
        self.backend = backend
        self.gradients: dict[str, Tensor] = {}
        self._ops: _Ops | None = None
        self._cache: dict = {}
        self.set_normalizers(normalizers)

    def set_normalizers(self, normalizers: dict[str, Normalizer] | None) -> None:
        """Replace the normalizers (validated against the collected layers' shapes).

        Entries for supported layers that ``target_modules`` leaves out are ignored (a dict
        fitted on the whole model serves any subset); names that are no layer of the model raise.
        """
        if self._active:
            raise RuntimeError("cannot change normalizers while the collector is active")
        normalizers = dict(normalizers or {})
        unknown = sorted(set(normalizers) - set(self.layers))
        if unknown:
            not_layers = sorted(set(unknown) - set(find_layers(self.model)))
            if not_layers:
                raise ValueError(f"normalizers given for names that are not layers of the model: {not_layers[:5]}")
            normalizers = {k: v for k, v in normalizers.items() if k in self.layers}
        for name, norm in normalizers.items():
            spec = self.layers[name]
            if not isinstance(norm, (AdafactorNormalizer, AdamNormalizer)):
                raise ValueError(f"normalizers[{name!r}] must be an Adafactor/AdamNormalizer, got {type(norm)}")
            if tuple(norm.shape) != (spec.out_features, spec.in_features):
                raise ValueError(
                    f"normalizer of {name} has shape {tuple(norm.shape)}, "
                    f"expected (out, in) = {(spec.out_features, spec.in_features)}"
                )
        self.normalizers = normalizers
        self._cache = {k: v for k, v in self._cache.items() if k[0] != "plan"}

    # -- layout ----------------------------------------------------------------------------
    def feature_dim(self, name: str) -> int:
        """Length of layer ``name``'s feature vector."""
        spec, p = self.layers[name], self.projection_dim
        d = p * p if p else spec.out_features * spec.in_features
        if self.include_bias and spec.has_bias:
            d += p if p else spec.out_features
        return d

    @property
    def layout(self) -> list[tuple[str, int, int]]:
        """``(name, offset, size)`` of each layer inside a concatenated row, in model order."""
        out, off = [], 0
        for name in self.layers:
            d = self.feature_dim(name)
            out.append((name, off, d))
            off += d
        return out

    @property
    def total_dim(self) -> int:
        return sum(self.feature_dim(n) for n in self.layers)

    def projection(self, name: str, *, dtype=torch.float32, device=None) -> tuple[Tensor | None, Tensor | None]:
        """The ``(L: [p, O], R: [p, I])`` used for layer ``name`` (``(None, None)`` when ``p == 0``)."""
        if name not in self.layers:
            raise KeyError(f"{name!r} is not a collected layer")
        if self.projection_dim == 0:
            return None, None
        key = ("proj", name, dtype, str(device))
        if key not in self._cache:
            spec, p = self.layers[name], self.projection_dim
            kw = dict(seed=self.seed, name=name, kind=self.projection_type, dtype=dtype, device=device)
            self._cache[key] = (
                projection_matrix(p, spec.out_features, side="left", **kw),
                projection_matrix(p, spec.in_features, side="right", **kw),
            )
        return self._cache[key]

    def _plan(self, name: str, dtype, device) -> "_Plan":
        """What the hooks of layer ``name`` need on ``device``, built once and cached.

        Adafactor scales are folded into the projections (``L diag(α)``, ``R diag(β)``) so the
        hooks never rescale activations; without a projection they are applied elementwise.
        """
        key = ("plan", name, dtype, str(device))
        if key not in self._cache:
            L, R = self.projection(name, dtype=dtype, device=device)
            norm = self.normalizers.get(name)
            plan = _Plan(L=L, R=R)
            if isinstance(norm, AdafactorNormalizer):
                alpha, beta = norm.scales(dtype, device)
                plan.bias_scale = norm.bias_scale(dtype, device)
                if plan.bias_scale is None:
                    plan.bias_scale = alpha  # no bias moment: the row scale, as for the weight
                if L is None:
                    plan.alpha, plan.beta = alpha, beta
                else:
                    plan.L, plan.R = L * alpha, R * beta
            elif isinstance(norm, AdamNormalizer):
                plan.adam = norm.avg_sq.to(device=device, dtype=dtype)
                plan.eps = norm.eps
                plan.bias_scale = norm.bias_scale(dtype, device)
            if plan.L is not None and plan.adam is None and self._ops is not None and self._ops.backend == "torch":
                # The torch path multiplies by Lᵀ and Rᵀ: keep those contiguous ([O, p], [I, p]);
                # BLAS is ~15% faster on the skinny x @ Rᵀ than through a transposed view.
                plan.L, plan.R = plan.L.T.contiguous().T, plan.R.T.contiguous().T
            self._cache[key] = plan
        return self._cache[key]

    # -- hooks -----------------------------------------------------------------------------
    def _install(self):
        device = next(self.model.parameters()).device
        self._ops = _Ops(resolve_backend(self.backend, device))
        self.gradients = {}
        super()._install()

    def _work_dtype(self, t: Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def _forward(self, spec: LayerSpec, x: Tensor):
        plan = self._plan(spec.name, self._work_dtype(x), x.device)
        if plan.adam is not None:
            return x  # Adam does not factor: keep the raw inputs
        return self._ops.project_scale(x, plan.R, plan.beta)  # [N, S, p] (or [N, S, I] when p == 0)

    def _backward(self, spec: LayerSpec, state: Tensor, g: Tensor) -> Tensor:
        plan = self._plan(spec.name, self._work_dtype(g), g.device)
        n = g.shape[0]
        if plan.adam is not None:
            feat = self._ops.adam_project(g, state, plan.L, plan.R, plan.adam, plan.eps)
        else:
            feat = self._ops.outer_project(g, state, plan.L, plan.alpha)
        feat = feat.reshape(n, -1)
        if self.include_bias and spec.has_bias:
            L = self.projection(spec.name, dtype=feat.dtype, device=g.device)[0]
            ones = g.new_ones(n, g.shape[1], 1)
            fb = reference.outer_project_padded(g, ones, L, plan.bias_scale).reshape(n, -1)
            feat = torch.cat([feat, fb.to(feat.dtype)], dim=1)
        return feat

    def _complete(self, spec: LayerSpec, partials: list) -> None:
        feat = partials[0] if len(partials) == 1 else torch.stack(partials).sum(0)
        if self.closure is not None:
            self.closure(spec.name, feat)
        else:
            self.gradients[spec.name] = feat

    def _on_model_forward(self, module, args):
        super()._on_model_forward(module, args)
        if self.closure is None:
            self.gradients = {}

    def flat_gradients(self) -> Tensor:
        """The last batch's features concatenated in :attr:`layout` order: ``[N, total_dim]``."""
        missing = [n for n in self.layers if n not in self.gradients]
        if missing:
            raise RuntimeError(f"no gradients for {missing[:3]}: run forward and backward inside the collector")
        return torch.cat([self.gradients[n] for n in self.layers], dim=1)

