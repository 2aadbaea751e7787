"""High-level collection: tokenize, batch by token budget, run forward + backward under the hooks.

* :func:`collect_gradients` — one feature row per example (``gradients``), plus ``loss`` and
  ``num_tokens``, as a ``datasets.Dataset`` joined to the input columns.
* :func:`fit_normalizers` — Adafactor or Adam second moments fitted from data: the mean over
  documents of each per-example gradient's squares (row/column means for Adafactor, found from
  ``S×S`` Gram matrices when that is cheaper than forming ``G``).
"""

from __future__ import annotations

import time
import warnings
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


def plan_batches(lengths: Sequence[int], token_batch_size: int) -> list[list[int]]:
    """The run's batches, identical in every process: documents shorter than two tokens (no
    loss) form a first batch that is not run; the others are grouped by :func:`token_batches`."""
    runnable = [i for i, n in enumerate(lengths) if n >= 2]
    batches = [[runnable[j] for j in b] for b in token_batches([lengths[i] for i in runnable], token_batch_size)]
    empty = [i for i, n in enumerate(lengths) if n < 2]
    if empty:
        batches.insert(0, empty)
    return batches


def run_batches(
    model: nn.Module,
    tok: Tokenized,
    *,
    loss_reduction: str,
    token_batch_size: int,
    pad_id: int = 0,
    on_batch: Callable[[list[int], Tensor], None] | None = None,
    before_batch: Callable[[list[int], int], None] | None = None,
    before_backward: Callable[[Tensor], None] | None = None,
    progress: bool = True,
    desc: str = "collecting",
    skip: int = 0,
    select: Sequence[int] | None = None,
    fillers: int = 0,
) -> int:
    """Forward + backward batches of :func:`plan_batches` (eval mode, restored after).

    ``select`` names the batches to run (default: all from the ``skip``-th on).  For each:
    ``before_batch(indices, batch number)``, forward, ``before_backward(finite [B] bool)``,
    backward of the sum of the *finite* per-example losses (a NaN/inf loss stays out of the
    backward), ``on_batch(indices, losses)``.  The batch of documents shorter than two tokens is
    not run (``on_batch`` gets zero losses; their gradient is zero).  ``fillers`` more passes
    over the last batch follow, with every example masked out and no ``on_batch``: ranks of an
    FSDP model must all run the same number of passes.  Returns the number of tokens run.
    """
    from tqdm.auto import tqdm

    device = _model_device(model)
    batches = plan_batches(tok.lengths, token_batch_size)
    todo = list(range(skip, len(batches))) if select is None else list(select)
    steps = [(b, True) for b in todo]
    if fillers and batches and tok.lengths[batches[-1][0]] >= 2:
        steps += [(len(batches) - 1, False)] * fillers
    total_tokens = sum(tok.lengths[i] for b in todo for i in batches[b])
    was_training = model.training
    model.eval()
    bar = tqdm(total=total_tokens, desc=desc, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True)
    try:
        docs = 0
        for b, real in steps:
            idx = batches[b]
            if before_batch is not None:
                before_batch(idx, b)
            if tok.lengths[idx[0]] < 2:
                losses = torch.zeros(len(idx))
            else:
                ids, mask, labels = pad_batch(
                    [tok.input_ids[i] for i in idx], [tok.labels[i] for i in idx], pad_id, device
                )
                logits = _logits(model(input_ids=ids, attention_mask=mask))
                losses = per_example_loss(logits, labels, loss_reduction)
                finite = torch.isfinite(losses.detach()) & real
                if before_backward is not None:
                    before_backward(finite)
                torch.where(finite, losses, 0.0).sum().backward()
                losses = losses.detach()
            if not real:
                continue
            if on_batch is not None:
                on_batch(idx, losses)
            docs += len(idx)
            bar.update(sum(tok.lengths[i] for i in idx))
            bar.set_postfix(docs=docs, refresh=False)
    finally:
        bar.close()
        model.train(was_training)
    return total_tokens


def check_documents(model: nn.Module, tok: Tokenized) -> None:
    """Clear errors, before any forward pass, for documents the model cannot run: token ids
    outside its vocabulary, documents longer than its position table (instead of an index error
    deep inside an embedding, or a silent extrapolation past the trained context), and a
    dataset where no document has the two tokens a loss needs."""
    if not tok.lengths:
        return
    if max(tok.lengths) < 2:
        raise ValueError(
            f"no document has two tokens or more ({len(tok)} documents, the longest has {max(tok.lengths)}): "
            "a next-token loss needs at least two, so there is no gradient to collect"
        )
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    if isinstance(vocab, int):
        for i, ids in enumerate(tok.input_ids):
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                bad = min(ids) if min(ids) < 0 else max(ids)
                raise ValueError(
                    f"document {i} has token id {bad}, outside the model's vocabulary (0..{vocab - 1}): "
                    "was it tokenized for another model?"
                )
    config = getattr(model, "config", None)
    limit, attr = None, None
    for attr in ("max_position_embeddings", "n_positions"):
        limit = getattr(config, attr, None)
        if isinstance(limit, int) and limit > 0:
            break
        limit = None
    if limit is None:
        return
    longest = max(range(len(tok.lengths)), key=tok.lengths.__getitem__)
    if tok.lengths[longest] > limit:
        raise ValueError(
            f"document {longest} has {tok.lengths[longest]} tokens, more than the model's {limit} positions "
            f"(config.{attr}); pass max_length={limit} (--max_length {limit}) to truncate long documents"
        )


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
        self.keep: Tensor | None = None  # [N] bool: examples of this batch that count (finite loss)

    def _forward(self, spec, x):
        return x

    def _backward(self, spec, x, g):
        return g, x

    def _complete(self, spec: LayerSpec, partials: list) -> None:
        g = torch.cat([p[0] for p in partials], dim=1)  # several calls of one layer: one longer sequence
        x = torch.cat([p[1] for p in partials], dim=1)
        dt = reference.compute_dtype(g, x)
        g, x = g.to(dt), x.to(dt)
        if self.keep is not None and not bool(self.keep.all()):
            keep = self.keep.to(g.device)[:, None, None]
            g, x = torch.where(keep, g, 0.0), torch.where(keep, x, 0.0)  # NaN activations too
        n, s, o = g.shape
        i = x.shape[-1]
        acc = self.sums.setdefault(spec.name, {})

        def add(key, value):  # float64 sums: the result hardly depends on the order (ranks, batches)
            value = value.double()
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

    def all_reduce(self, group) -> None:
        """Sum the moments over the ranks of ``group`` (a layer no rank saw stays absent)."""
        if not group.active:
            return
        device = _model_device(self.model)
        for name, spec in self.layers.items():
            acc = self.sums.get(name, {})
            seen = group.all_reduce_sum(torch.tensor([len(acc)]), "summing normalizer moments")
            if not int(seen):
                continue
            o, i = spec.out_features, spec.in_features
            shapes = {"avg_sq": (o, i)} if self.kind == "adam" else {"row": (o,), "col": (i,)}
            if self.include_bias and spec.has_bias:
                shapes["bias"] = (o,)
            self.sums[name] = {
                k: group.all_reduce_sum(acc[k] if k in acc else torch.zeros(shape, dtype=torch.float64, device=device),
                                        "summing normalizer moments")
                for k, shape in shapes.items()
            }

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
    distributed: bool | None = None,
) -> dict[str, Normalizer]:
    """Fit second moments from data: ``E_n[G_n ⊙ G_n]`` (``kind="adam"``) or its row and column
    means (``kind="adafactor"``), over the first ``max_examples`` examples (all when ``None``).

    ``dataset`` is raw text (with ``tokenizer``) or already tokenized, exactly as for
    :func:`collect_gradients`.  Examples whose loss is not finite are left out of the mean.
    Inside an initialized ``torch.distributed`` process group (unless ``distributed=False``)
    every rank must call this: each runs a share of the batches and the sums are all-reduced.
    Returns ``{layer name: normalizer}``.
    """
    from . import distributed as dist_

    group = dist_.current(distributed)
    if kind not in ("adafactor", "adam"):
        raise ValueError(f"kind must be 'adafactor' or 'adam', got {kind!r}")
    _check_common(loss_reduction, token_batch_size)
    tok = _tokenized(dataset, tokenizer, prompt_column, completion_column, max_length)
    if max_examples is not None:
        if max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        tok = tok.select(range(min(max_examples, len(tok))))
    check_documents(model, tok)
    hooks = _MomentHooks(model, kind=kind, target_modules=target_modules, include_bias=include_bias)
    select, fillers = _share(group, model, tok, token_batch_size, range(len(plan_batches(tok.lengths, token_batch_size))))
    dropped = [0]

    def before_backward(finite):
        hooks.keep = finite

    def on_batch(idx, losses):
        dropped[0] += int((~torch.isfinite(losses)).sum())

    with hooks:
        run_batches(
            model,
            tok,
            loss_reduction=loss_reduction,
            token_batch_size=token_batch_size,
            pad_id=_pad_id(tokenizer),
            before_backward=before_backward,
            on_batch=on_batch,
            progress=progress and group.is_main,
            desc=f"fitting {kind} moments",
            select=select,
            fillers=fillers,
        )
    dropped = int(group.all_reduce_sum(torch.tensor([dropped[0]]), "counting fitted examples"))
    hooks.all_reduce(group)
    if dropped and group.is_main:
        warnings.warn(f"{dropped} examples with a non-finite loss (NaN/inf) were left out of the fitted moments",
                      stacklevel=2)
    return hooks.result(max(1, len(tok) - dropped))


def _share(group, model, tok: Tokenized, token_batch_size: int, todo) -> tuple[list[int], int]:
    """This rank's round-robin share of the batch numbers ``todo``, and how many filler passes
    it must add so that every rank of an FSDP-sharded model runs as many forward passes."""
    mine = group.split(list(todo))
    if not group.active:
        return mine, 0
    from .distributed import is_fsdp

    if not is_fsdp(model):
        return mine, 0
    batches = plan_batches(tok.lengths, token_batch_size)
    passes = sum(1 for b in mine if tok.lengths[batches[b][0]] >= 2)
    most = int(group.all_reduce_max(passes, "agreeing on the number of passes"))
    return mine, most - passes


# ---------------------------------------------------------------------------------------
# collection
# ---------------------------------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and per-tensor sums."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if hasattr(p, "full_tensor"):  # an FSDP2 (DTensor) shard: every rank gathers the same
                p = p.full_tensor()
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
    distributed: bool | None = None,
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
        distributed: inside an initialized ``torch.distributed`` process group (default:
            whenever one is initialized; ``False`` to stay local) every rank must call this with
            the same arguments: each runs a disjoint share of the batches (and of the normalizer
            fitting, all-reduced); with ``output_path`` each rank writes its own shards and rank 0
            writes the manifest once all are done, without it every rank gets all rows.
            An FSDP2-sharded model (:func:`bergson.distributed.shard_model`) works too.

    A document whose loss is NaN or inf gets a zero row and a warning, and is listed in the
    index manifest's ``skipped_rows``; a document longer than the model's position table is
    an error (pass ``max_length``).

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
    from . import distributed as dist_

    group = dist_.current(distributed)
    ds = _as_dataset(dataset)
    clash = [c for c in OUTPUT_COLUMNS if c in ds.column_names]
    if clash and output_path is None:
        raise ValueError(f"the dataset already has column(s) {clash}; rename them before collecting")
    tok = _tokenized(ds, tokenizer, prompt_column, completion_column, max_length)
    check_documents(model, tok)
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
        distributed=group.active,
    )
    run_kw = dict(loss_reduction=loss_reduction, token_batch_size=token_batch_size, pad_id=_pad_id(tokenizer),
                  progress=progress and group.is_main)
    num_batches = len(plan_batches(tok.lengths, token_batch_size))
    skipped: list[int] = []
    if output_path is None:
        if normalizers is None and normalizer != "none":
            normalizers = fit_normalizers(model, tok, **fit_kw)
        collector.set_normalizers(normalizers)
        out = torch.zeros(len(tok), collector.total_dim, dtype=torch.float32)
        losses = torch.zeros(len(tok), dtype=torch.float32)

        def sink(idx, feats, batch_losses, batch, bad):
            out[idx] = feats
            losses[idx] = batch_losses
            skipped.extend(bad)

        select, fillers = _share(group, model, tok, token_batch_size, range(num_batches))
        _collect(model, tok, collector, sink, select=select, fillers=fillers, **run_kw)
        if group.active:  # disjoint rows: the sum is every rank's rows, exactly
            out = group.all_reduce_sum(out, "gathering the features")
            losses = group.all_reduce_sum(losses, "gathering the losses")
        _warn_skipped(group, skipped)
        return _join(ds, out, losses, tok.lengths)

    from .normalizers import load_normalizers, save_normalizers
    from .storage import NORMALIZERS, STORE_DTYPES, load_index

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
        "token_batch_size": token_batch_size,
    }
    writer = _open_writer(group, output_path, identity, resume=resume, overwrite=overwrite)
    try:
        norm_path = writer.path / NORMALIZERS
        if normalizers is None and normalizer != "none" and writer.batches_done and norm_path.exists():
            normalizers = load_normalizers(norm_path)  # resuming: the moments this run started with
        else:
            if normalizers is None and normalizer != "none":
                normalizers = fit_normalizers(model, tok, **fit_kw)
            if normalizers and group.is_main:
                save_normalizers(normalizers, norm_path)
        collector.set_normalizers(normalizers)

        def write(idx, feats, batch_losses, batch, bad):
            writer.add(idx, feats, batch_losses, batch=batch, skipped=bad)
            skipped.extend(bad)

        todo = [b for b in range(num_batches) if b not in writer.done_batches]
        select, fillers = _share(group, model, tok, token_batch_size, todo)
        t0 = time.perf_counter()
        tokens = _collect(model, tok, collector, write, select=select, fillers=fillers, **run_kw)
        writer.flush()
        seconds = group.all_reduce_max(time.perf_counter() - t0, "waiting for every rank to finish its shards")
        tokens = int(group.all_reduce_sum(torch.tensor([tokens]), "counting tokens"))
        extra = {"truncated": tok.truncated, "collect_seconds": round(seconds, 3), "tokens": tokens}
        if group.active:
            extra["world_size"] = group.world
        group.on_main(lambda: writer.finalize(extra=extra), "writing the manifest")
    except BaseException:
        writer.release()
        raise
    _warn_skipped(group, skipped)
    return load_index(writer.path)


def _open_writer(group, path, identity: dict, *, resume: bool, overwrite: bool):
    """Rank 0 locks and prepares ``path`` (its errors reach every rank); then the others open it."""
    from .storage import ShardWriter

    if not group.active:
        return ShardWriter(path, identity, resume=resume, overwrite=overwrite)
    writer = group.on_main(
        lambda: ShardWriter(path, identity, resume=resume, overwrite=overwrite, rank=0, world_size=group.world),
        f"preparing {path}",
    )
    if not group.is_main:
        writer = ShardWriter(path, identity, rank=group.rank, world_size=group.world)
    return writer


def _warn_skipped(group, skipped: list[int]) -> None:
    n = int(group.all_reduce_sum(torch.tensor([len(skipped)]), "counting skipped rows")) if group.active else len(skipped)
    if n and group.is_main:
        shown = sorted(skipped)[:10] if not group.active else "listed in the manifest's skipped_rows"
        warnings.warn(
            f"{n} documents had a non-finite loss or gradient (NaN/inf): their rows are zeros ({shown})",
            stacklevel=3,
        )


def _collect(model, tok: Tokenized, collector: GradientCollector, sink, **run_kw) -> int:
    """Run batches under ``collector`` (``run_kw``: see :func:`run_batches`);
    ``sink(row_ids, features [B, D], losses [B], batch number, skipped row ids)``.

    A row whose loss or features are not finite is zeroed and reported as skipped.  Returns the
    number of tokens processed.
    """
    layout = {name: (off, d) for name, off, d in collector.layout}
    state: dict = {}

    def before_batch(idx, batch):
        state["idx"] = torch.tensor(idx, dtype=torch.long)
        state["batch"] = batch
        state["buf"] = torch.zeros(len(idx), collector.total_dim, dtype=torch.float32)

    def closure(name, feats):
        off, d = layout[name]
        state["buf"][:, off : off + d] = feats.to("cpu", torch.float32)

    def on_batch(idx, batch_losses):
        buf, losses = state["buf"], batch_losses.to("cpu", torch.float32)
        bad = ~torch.isfinite(losses) | ~torch.isfinite(buf).all(1)
        if bool(bad.any()):
            buf[bad] = 0.0
        sink(state["idx"], buf, losses, state["batch"], state["idx"][bad].tolist())

    collector.closure = closure
    with collector:
        return run_batches(model, tok, on_batch=on_batch, before_batch=before_batch, **run_kw)


def _join(ds, out: Tensor, losses: Tensor, lengths):
    return join_columns(ds, out, loss=(losses.numpy(), "float32"), num_tokens=(list(lengths), "int64"))
