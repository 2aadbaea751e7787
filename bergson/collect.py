"""High-level collection: tokenize, batch by token budget, run forward + backward under the hooks.

* :func:`collect_gradients` — one feature row per example (``gradients``), plus ``loss`` and
  ``num_tokens``, as a ``datasets.Dataset`` joined to the input columns.
* :func:`fit_normalizers` — Adafactor or Adam second moments fitted from data: the mean over
  documents of each per-example gradient's squares (row/column means for Adafactor, found from
  ``S×S`` Gram matrices when that is cheaper than forming ``G``).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import nn

from bergson_kernels import reference

from .data import LOSS_REDUCTIONS, Tokenized, join_columns, pad_batch, per_example_loss, token_batches, tokenize
from .hooks import GradientCollector, _LayerHooks
from .layers import LayerSpec
from .normalizers import NORMALIZER_KINDS, AdafactorNormalizer, AdamNormalizer, Normalizer

Tensor = torch.Tensor
OUTPUT_COLUMNS = ("gradients", "loss", "num_tokens")


def _as_dataset(dataset):
    if hasattr(dataset, "column_names"):
        return dataset
    import datasets

    rows = list(dataset)
    if rows and isinstance(rows[0], str):
        return datasets.Dataset.from_dict({"text": rows})
    return datasets.Dataset.from_list(rows)


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError(f"{type(model).__name__} has no parameters") from None


def _pad_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def _logits(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if logits is None:
        raise ValueError(f"the model returned {type(out).__name__} without logits: is it a causal LM?")
    return logits


def run_batches(
    model: nn.Module,
    tok: Tokenized,
    *,
    loss_reduction: str,
    token_batch_size: int,
    pad_id: int = 0,
    on_batch: Callable[[list[int], Tensor], None] | None = None,
    before_batch: Callable[[list[int]], None] | None = None,
    progress: bool = True,
    desc: str = "collecting",
    skip: int = 0,
) -> int:
    """Forward + backward every batch (eval mode, restored after); ``on_batch(indices, losses)``.

    Documents shorter than two tokens have no loss: they form a first batch that is not run
    (``on_batch`` gets zero losses; their gradient is zero).  ``skip`` batches at the start are
    passed over (resuming).  Returns the number of tokens run.
    """
    from tqdm.auto import tqdm

    device = _model_device(model)
    runnable = [i for i, n in enumerate(tok.lengths) if n >= 2]
    batches = [[runnable[j] for j in b] for b in token_batches([tok.lengths[i] for i in runnable], token_batch_size)]
    empty = [i for i, n in enumerate(tok.lengths) if n < 2]
    if empty:
        batches.insert(0, empty)
    todo = batches[skip:]
    total_tokens = sum(tok.lengths[i] for b in todo for i in b)
    was_training = model.training
    model.eval()
    bar = tqdm(total=total_tokens, desc=desc, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True)
    try:
        docs = 0
        for idx in todo:
            if before_batch is not None:
                before_batch(idx)
            if tok.lengths[idx[0]] < 2:
                losses = torch.zeros(len(idx))
            else:
                ids, mask, labels = pad_batch(
                    [tok.input_ids[i] for i in idx], [tok.labels[i] for i in idx], pad_id, device
                )
                logits = _logits(model(input_ids=ids, attention_mask=mask))
                losses = per_example_loss(logits, labels, loss_reduction)
                losses.sum().backward()
                losses = losses.detach()
            if on_batch is not None:
                on_batch(idx, losses)
            docs += len(idx)
            bar.update(sum(tok.lengths[i] for i in idx))
            bar.set_postfix(docs=docs, refresh=False)
    finally:
        bar.close()
        model.train(was_training)
    return total_tokens


def _tokenized(dataset, tokenizer, prompt_column, completion_column, max_length) -> Tokenized:
    if isinstance(dataset, Tokenized):
        return dataset
    return tokenize(
        _as_dataset(dataset),
        tokenizer,
        prompt_column=prompt_column,
        completion_column=completion_column,
        max_length=max_length,
    )


def _check_common(loss_reduction: str, token_batch_size: int):
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
    if token_batch_size < 1:
        raise ValueError(f"token_batch_size must be >= 1, got {token_batch_size}")


# ---------------------------------------------------------------------------------------
# fitting second moments from data
# ---------------------------------------------------------------------------------------
class _MomentHooks(_LayerHooks):
    """Accumulate the mean over examples of ``G⊙G`` (Adam) or its row/column means (Adafactor)."""

    def __init__(self, model, *, kind: str, target_modules=None, include_bias=False):
        super().__init__(model, target_modules=target_modules)
        self.kind = kind
        self.include_bias = include_bias
        self.count = 0
        self.sums: dict[str, dict[str, Tensor]] = {}

    def _forward(self, spec, x):
        return x

    def _backward(self, spec, x, g):
        return g, x

    def _complete(self, spec: LayerSpec, partials: list) -> None:
        g = torch.cat([p[0] for p in partials], dim=1)  # several calls of one layer: one longer sequence
        x = torch.cat([p[1] for p in partials], dim=1)
        dt = reference.compute_dtype(g, x)
        g, x = g.to(dt), x.to(dt)
        n, s, o = g.shape
        i = x.shape[-1]
        acc = self.sums.setdefault(spec.name, {})

        def add(key, value):
            acc[key] = acc[key] + value if key in acc else value

        if self.kind == "adafactor" and s * (o + i) < o * i:
            rows, cols = reference.grad_sq_row_col_padded(g, x)
            add("row", rows.sum(0) / i)
            add("col", cols.sum(0) / o)
        else:
            step = max(1, reference.ADAM_CHUNK_BYTES // (o * i * 8))
            for k in range(0, n, step):
                sq = torch.bmm(g[k : k + step].transpose(1, 2), x[k : k + step]).square_()  # [c, O, I]
                if self.kind == "adam":
                    add("avg_sq", sq.sum(0))
                else:
                    add("row", sq.mean(2).sum(0))
                    add("col", sq.mean(1).sum(0))
        if self.include_bias and spec.has_bias:
            add("bias", g.sum(1).square().sum(0))

    def result(self, count: int) -> dict[str, Normalizer]:
        out: dict[str, Normalizer] = {}
        for name, acc in self.sums.items():
            m = {k: (v / count).float().cpu() for k, v in acc.items()}
            if self.kind == "adam":
                out[name] = AdamNormalizer(m["avg_sq"], bias=m.get("bias"))
            else:
                out[name] = AdafactorNormalizer(m["row"], m["col"], bias=m.get("bias"))
        return out


def fit_normalizers(
    model: nn.Module,
    dataset,
    *,
    kind: str = "adafactor",
    max_examples: int | None = 1000,
    tokenizer=None,
    prompt_column: str = "text",
    completion_column: str | None = None,
    loss_reduction: str = "sum",
    token_batch_size: int = 4096,
    max_length: int | None = None,
    target_modules=None,
    include_bias: bool = False,
    progress: bool = True,
) -> dict[str, Normalizer]:
    """Fit second moments from data: ``E_n[G_n ⊙ G_n]`` (``kind="adam"``) or its row and column
    means (``kind="adafactor"``), over the first ``max_examples`` examples (all when ``None``).

    ``dataset`` is raw text (with ``tokenizer``) or already tokenized, exactly as for
    :func:`collect_gradients`.  Returns ``{layer name: normalizer}``.
    """
    if kind not in ("adafactor", "adam"):
        raise ValueError(f"kind must be 'adafactor' or 'adam', got {kind!r}")
    _check_common(loss_reduction, token_batch_size)
    tok = _tokenized(dataset, tokenizer, prompt_column, completion_column, max_length)
    if max_examples is not None:
        if max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        tok = tok.select(range(min(max_examples, len(tok))))
    hooks = _MomentHooks(model, kind=kind, target_modules=target_modules, include_bias=include_bias)
    with hooks:
        run_batches(
            model,
            tok,
            loss_reduction=loss_reduction,
            token_batch_size=token_batch_size,
            pad_id=_pad_id(tokenizer),
            progress=progress,
            desc=f"fitting {kind} moments",
        )
    return hooks.result(len(tok))


# ---------------------------------------------------------------------------------------
# collection
# ---------------------------------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and per-tensor sums."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:".encode())
            if p.is_floating_point():
                h.update(f"{p.double().sum().item():.12e}:{p.double().abs().sum().item():.12e}".encode())
    return h.hexdigest()


def collect_gradients(
    model: nn.Module,
    dataset,
    *,
    tokenizer=None,
    prompt_column: str = "text",
    completion_column: str | None = None,
    projection_dim: int = 16,
    normalizer: str = "adafactor",
    normalizers: dict[str, Normalizer] | None = None,
    fit_examples: int | None = 1000,
    loss_reduction: str = "sum",
    token_batch_size: int = 4096,
    max_length: int | None = None,
    target_modules: Sequence[str] | str | None = None,
    include_bias: bool = False,
    backend: str = "auto",
    seed: int = 0,
    projection_type: str = "rademacher",
    progress: bool = True,
    output_path: str | None = None,
    store_dtype: str = "float32",
    shard_rows: int = 4096,
    resume: bool = False,
    overwrite: bool = False,
    model_info: dict | None = None,
    dataset_info: dict | None = None,
    tokenizer_info: dict | None = None,
):
    """Per-example projected, normalized gradients of every example of ``dataset``.

    Args:
        model: a causal LM (``model(input_ids=..., attention_mask=...)`` returning logits).
        dataset: a ``datasets.Dataset`` (or a list of strings / dicts) with raw text in
            ``prompt_column`` (and ``completion_column``), or already tokenized (``input_ids``,
            optional ``labels`` with ``-100`` for tokens outside the loss) when ``tokenizer`` is None.
        completion_column: if given, only the completion's tokens are in the loss.
        projection_dim: ``p`` (feature ``p*p`` per layer); ``0`` keeps the full gradient.
        normalizer: ``"adafactor"``, ``"adam"`` or ``"none"``; when ``normalizers`` is not given,
            second moments of that kind are fitted from the first ``fit_examples`` examples.
        normalizers: ``{layer: normalizer}`` to use as given (e.g. from
            :func:`bergson.normalizers_from_optimizer`); ``normalizer`` is then ignored.
        loss_reduction: ``"sum"`` of token losses per document (default) or ``"mean"``.
        token_batch_size: at most this many (padded) tokens per batch.
        max_length: truncate documents to this many tokens.
        target_modules, include_bias, backend, seed, projection_type: see
            :class:`bergson.GradientCollector`.
        output_path: write an on-disk index there (see :mod:`bergson.storage`) instead of
            returning the features in memory; ``store_dtype`` (``float32``/``bfloat16``/``float16``),
            ``shard_rows``, ``resume`` and ``overwrite`` control it, ``*_info`` dicts go into
            its manifest (identities of the model, dataset and tokenizer).

    Returns:
        Without ``output_path``: a ``datasets.Dataset`` with the input columns plus ``gradients``
        (float32, the layers' features concatenated in model order — the collector's
        ``layout``), ``loss`` and ``num_tokens`` (tokens of the document after truncation).
        Examples shorter than two tokens have no loss: their row is zero.
        With ``output_path``: the :class:`bergson.GradientIndex` written there.
    """
    if normalizer not in NORMALIZER_KINDS:
        raise ValueError(f"normalizer must be one of {NORMALIZER_KINDS}, got {normalizer!r}")
    _check_common(loss_reduction, token_batch_size)
    ds = _as_dataset(dataset)
    clash = [c for c in OUTPUT_COLUMNS if c in ds.column_names]
    if clash and output_path is None:
        raise ValueError(f"the dataset already has column(s) {clash}; rename them before collecting")
    tok = _tokenized(ds, tokenizer, prompt_column, completion_column, max_length)
    # The collector validates the model and options before any (costly) fitting pass.
    collector = GradientCollector(
        model,
        projection_dim=projection_dim,
        target_modules=target_modules,
        include_bias=include_bias,
        backend=backend,
        seed=seed,
        projection_type=projection_type,
    )
    settings = {
        "projection_dim": projection_dim,
        "projection_type": projection_type,
        "seed": seed,
        "normalizer": normalizer if normalizers is None else "given",
        "fit_examples": fit_examples if normalizers is None else None,
        "loss_reduction": loss_reduction,
        "prompt_column": prompt_column if tokenizer is not None else None,
        "completion_column": completion_column,
        "max_length": max_length,
        "include_bias": include_bias,
        "target_modules": list(collector.layers),
    }
    fit_kw = dict(
        kind=normalizer, max_examples=fit_examples, loss_reduction=loss_reduction, token_batch_size=token_batch_size,
        target_modules=list(collector.layers), include_bias=include_bias, progress=progress, tokenizer=tokenizer,
    )
    run_kw = dict(loss_reduction=loss_reduction, token_batch_size=token_batch_size, pad_id=_pad_id(tokenizer),
                  progress=progress)
    if output_path is None:
        if normalizers is None and normalizer != "none":
            normalizers = fit_normalizers(model, tok, **fit_kw)
        collector.set_normalizers(normalizers)
        out = torch.zeros(len(tok), collector.total_dim, dtype=torch.float32)
        losses = torch.zeros(len(tok), dtype=torch.float32)

        def sink(idx, feats, batch_losses):
            out[idx] = feats
            losses[idx] = batch_losses

        _collect(model, tok, collector, sink, **run_kw)
        return _join(ds, out, losses, tok.lengths)

    from .normalizers import load_normalizers, save_normalizers
    from .storage import NORMALIZERS, STORE_DTYPES, ShardWriter, load_index

    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    identity = {
        "model": model_info or {"id": getattr(getattr(model, "config", None), "_name_or_path", None),
                                "class": type(model).__name__, "fingerprint": model_fingerprint(model)},
        "tokenizer": tokenizer_info or ({"class": type(tokenizer).__name__, "vocab_size": len(tokenizer)}
                                        if tokenizer is not None else None),
        "dataset": dataset_info or {"id": None, "fingerprint": getattr(ds, "_fingerprint", None), "num_rows": len(ds)},
        "settings": settings,
        "modules": [
            {"name": n, "out": collector.layers[n].out_features, "in": collector.layers[n].in_features,
             "offset": off, "size": d}
            for n, off, d in collector.layout
        ],
        "feature_dim": collector.total_dim,
        "dtype": store_dtype,
        "shard_rows": shard_rows,
    }
    writer = ShardWriter(output_path, identity, resume=resume, overwrite=overwrite)
    norm_path = writer.path / NORMALIZERS
    if normalizers is None and normalizer != "none" and writer.batches_done and norm_path.exists():
        normalizers = load_normalizers(norm_path)  # resuming: the moments this run started with
    else:
        if normalizers is None and normalizer != "none":
            normalizers = fit_normalizers(model, tok, **fit_kw)
        if normalizers:
            save_normalizers(normalizers, norm_path)
    collector.set_normalizers(normalizers)

    def write(idx, feats, batch_losses):
        writer.add(idx, feats, batch_losses)

    t0 = time.perf_counter()
    tokens = _collect(model, tok, collector, write, skip=writer.batches_done, **run_kw)
    seconds = time.perf_counter() - t0
    writer.close(extra={"truncated": tok.truncated, "collect_seconds": round(seconds, 3), "tokens": tokens})
    return load_index(writer.path)


def _collect(model, tok: Tokenized, collector: GradientCollector, sink, *, skip: int = 0, **run_kw) -> int:
    """Run every batch under ``collector``; ``sink(row_ids, features [B, D], losses [B])``.

    Returns the number of tokens processed.
    """
    layout = {name: (off, d) for name, off, d in collector.layout}
    state: dict = {}

    def before_batch(idx):
        state["idx"] = torch.tensor(idx, dtype=torch.long)
        state["buf"] = torch.zeros(len(idx), collector.total_dim, dtype=torch.float32)

    def closure(name, feats):
        off, d = layout[name]
        state["buf"][:, off : off + d] = feats.to("cpu", torch.float32)

    def on_batch(idx, batch_losses):
        sink(state["idx"], state["buf"], batch_losses.to("cpu", torch.float32))

    collector.closure = closure
    with collector:
        return run_batches(model, tok, on_batch=on_batch, before_batch=before_batch, skip=skip, **run_kw)


def _join(ds, out: Tensor, losses: Tensor, lengths):
    return join_columns(ds, out, loss=(losses.numpy(), "float32"), num_tokens=(list(lengths), "int64"))
