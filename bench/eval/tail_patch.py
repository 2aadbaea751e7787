"""Tail-patch evaluation on the embedded default (the TrackStar paper's influence metric).

For each query (a held-out-template fact prompt with its expected completion) every method
proposes its top-``k`` training documents ("proponents").  For each proponent *separately* the
model takes one optimizer step on that document's training loss (the summed next-token loss
over the document), and we measure how much the log-probability of the query's completion given
its prompt went up.

The step (``--step``): ``adafactor`` (default; the paper steps with the training optimizer and
its state) preconditions the document gradient by the index's own second moments,
``ΔW = −lr·G ⊘ sqrt(v)`` with ``v = r cᵀ / mean(r)`` (the normalizers of the ``sum`` index), on
the weights of the layers the index collects; the parameters without a moment (the input
embedding, the RMSNorm weights) are not updated, and the lm_head, tied to the embedding in the
default model, is untied for the step.  To first order the increase is then ``lr`` times the
inner product of the index's (unprojected) normalized features of query and document.  ``sgd``:
``θ ← θ − lr·g`` on every parameter.  Reported per method: the mean increase over the top-``k`` proponents,
averaged over queries, with its standard error over queries, plus paired differences against
BM25 and the ratio to random documents.

Methods: ``trackstar``, ``cosine``, ``inner``, ``one_sided`` ranked from the bergson indexes
``fact_tracing.py`` builds (and reuses: ``runs/eval_p16_adafactor_{sum,sum_log}``), once per
document loss of the index (``sum`` as in TrackStar, ``sum_log``), ``bm25`` (query = prompt +
completion) and ``random``; ``gold`` (the training documents that state the query's fact) is
shown as a reference.

The step size ``--lr`` (default 1e-5 for adafactor, 1e-4 for sgd: the largest of a 1-3-10 grid
whose linearity deviation is under 0.05) keeps the update in the linear regime: the report
checks it by repeating the step at ``2·lr`` for a few queries (a linear response doubles).

    python bench/eval/tail_patch.py                         # 100 queries, k=10, p=16, adafactor step
    python bench/eval/tail_patch.py --step sgd              # plain SGD step
    python bench/eval/tail_patch.py --out bench/results/tail_patch.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_common import write_report  # noqa: E402

from fact_tracing import bm25_scores  # noqa: E402

GRADIENT_METHODS = ("trackstar", "cosine", "inner", "one_sided")
METHODS = GRADIENT_METHODS + ("bm25", "random")
DEFAULT_LR = {"adafactor": 1e-5, "sgd": 1e-4}  # chosen by the linearity check (bench/results/tail_patch.md)


class TailPatcher:
    """One (optionally preconditioned) step per training document, evaluated on the targets that
    list the document.

    ``prompts``/``completions`` are the targets; :meth:`run` takes ``{method: [Q, k]}`` document
    indices and returns ``{method: [Q, k]}`` increases of the target's summed completion
    log-prob (tokenized exactly as bergson tokenizes a query) after one step of
    ``θ ← θ − lr·∇_θ L_doc(θ)``, ``L_doc`` the summed next-token loss of the document, or with
    ``precond`` ``θ_n ← θ_n − lr·P_n ⊙ ∇_n L_doc`` on the parameters ``n`` it names only.

    The model's own weights are never touched: per-document gradients of a batch of
    (length-sorted, right-padded) documents come from ``torch.func.vmap(grad(...))`` and the
    patched weights ``θ − lr·g_d`` are evaluated as a batch with ``vmap(functional_call(...))``,
    one (document, target) pair per row — the state ``θ`` is the saved, detached parameters.
    Right padding needs no attention mask under causal attention (the padded positions only
    come after the real ones and are out of the loss); attention runs in the ``eager``
    implementation while patching (SDPA has no batching rule) and is restored afterwards.
    """

    def __init__(self, model, tokenizer, prompts, completions, lr: float, *, doc_batch: int = 32,
                 pair_batch: int = 64, dtype: torch.dtype = torch.float32,
                 precond: dict[str, torch.Tensor] | None = None):
        import datasets

        from bergson.data import pad_batch, tokenize

        self.model, self.tokenizer, self.lr = model, tokenizer, lr
        # None: plain SGD on every parameter; else θ_n ← θ_n − lr·P_n ⊙ g_n for the parameters in
        # ``precond`` only (see :func:`adafactor_preconditioner`), the others are left as they are
        self.precond = None if precond is None else {n: t.to(dtype) for n, t in precond.items()}
        self.doc_batch, self.pair_batch, self.dtype = doc_batch, pair_batch, dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        q = tokenize(datasets.Dataset.from_dict({"prompt": list(prompts), "completion": list(completions)}),
                     tokenizer, prompt_column="prompt", completion_column="completion")
        # every target padded to the same width, so base and patched log-probs share one code path
        self.q_ids, _, self.q_labels = pad_batch(q.input_ids, q.labels, self.pad_id)
        self.params = {n: p.detach().to(dtype) for n, p in model.named_parameters()}  # the saved state θ
        # A preconditioned layer whose weight is tied under another name (lm_head = embed_tokens) is
        # patched on its own: the functional model is untied, the layer takes the gradient of its own
        # use only and the other use (the input embedding) keeps θ.
        self.untied = [n for n in (self.precond or {}) if n not in self.params]
        for n in self.untied:
            self.params[n] = model.get_parameter(n).detach().to(dtype)
        self.steps = 0  # documents stepped on
        with self._eager():
            self.base = torch.cat([self._logprob(self.params, None, rows, 0.0)
                                   for rows in torch.arange(len(self.q_ids)).split(pair_batch)])

    # -- functional pieces ---------------------------------------------------------------------
    def _eager(self):
        from contextlib import contextmanager

        def use(impl):
            if hasattr(self.model, "set_attn_implementation"):
                self.model.set_attn_implementation(impl)
            else:  # older transformers
                self.model.config._attn_implementation = impl

        @contextmanager
        def ctx():
            prev = getattr(self.model.config, "_attn_implementation", None)
            use("eager")
            try:
                yield
            finally:
                if prev is not None and prev != "eager":
                    use(prev)
        return ctx()

    def _seq_loss(self, params, ids, labels):
        from torch.func import functional_call

        from bergson.data import per_example_loss

        logits = functional_call(self.model, params, (ids[None],), tie_weights=not self.untied).logits
        return per_example_loss(logits, labels[None])[0]

    def _doc_grads(self, docs: list[list[int]]) -> dict[str, torch.Tensor]:
        from torch.func import grad, vmap

        from bergson.data import pad_batch

        ids, _, labels = pad_batch(docs, docs, self.pad_id)
        return vmap(grad(self._seq_loss), in_dims=(None, 0, 0))(self.params, ids, labels)

    @torch.no_grad()
    def _logprob(self, params, grads, rows, lr, slots=None) -> torch.Tensor:
        """Log-prob of targets ``rows`` under ``θ − lr·grads[slots]`` (one pair per row)."""
        from torch.func import vmap

        if grads is None:
            patched = {n: p.expand(len(rows), *p.shape) for n, p in params.items()}
        elif self.precond is None:
            patched = {n: p - lr * grads[n][slots] for n, p in params.items()}
        else:
            patched = {n: (p - lr * grads[n][slots] * self.precond[n]) if n in self.precond
                       else p.expand(len(rows), *p.shape) for n, p in params.items()}
        return -vmap(self._seq_loss)(patched, self.q_ids[rows], self.q_labels[rows])

    # -- API ---------------------------------------------------------------------------------
    def run(self, docs, proponents: dict[str, torch.Tensor], lr: float | None = None) -> dict[str, torch.Tensor]:
        """``docs[d]``: token ids of document ``d``; ``proponents[method]``: ``[Q, k]`` document
        indices per target.  Each distinct document's gradient is computed once and evaluated
        on all the targets that list it."""
        lr = self.lr if lr is None else lr
        need: dict[int, set[int]] = {}
        for props in proponents.values():
            for q, row in enumerate(props.tolist()):
                for d in row:
                    need.setdefault(int(d), set()).add(q)
        toks = {d: docs[d] for d in need}
        order = sorted(need, key=lambda d: (len(toks[d]), d))  # similar lengths share a batch
        delta: dict[tuple[int, int], float] = {}
        with self._eager():
            for start in range(0, len(order), self.doc_batch):
                chunk = order[start : start + self.doc_batch]
                grads = self._doc_grads([toks[d] for d in chunk])
                pairs = [(slot, q) for slot, d in enumerate(chunk) for q in sorted(need[d])]
                for p0 in range(0, len(pairs), self.pair_batch):
                    sub = pairs[p0 : p0 + self.pair_batch]
                    slots = torch.tensor([s for s, _ in sub])
                    rows = torch.tensor([q for _, q in sub])
                    vals = (self._logprob(self.params, grads, rows, lr, slots) - self.base[rows]).tolist()
                    for (s, q), v in zip(sub, vals):
                        delta[(chunk[s], q)] = v
                self.steps += len(chunk)
        return {m: torch.tensor([[delta[(int(d), q)] for d in row] for q, row in enumerate(p.tolist())])
                for m, p in proponents.items()}


def adafactor_preconditioner(model, normalizers) -> dict[str, torch.Tensor]:
    """``{parameter name: P}`` with ``P = 1 / sqrt(v)`` for the weight (and bias, when the index
    has its moment) of every layer that has a normalizer, in the parameter's own orientation.

    Adafactor: ``v = r cᵀ / mean(r)`` (``r``, ``c`` floored at the normalizer's ``eps``, 1e-30), so
    ``P = diag(α) 1 1ᵀ diag(β)`` with the index's own ``scales()``; Adam: ``1 / (sqrt(v) + eps)``.
    This is the preconditioning the index applies to every gradient, so one step
    ``θ ← θ − lr·P ⊙ g_doc`` changes a target's log-prob by ``lr·Σ g_qᵀ (g_doc ⊘ v)`` to first order:
    the (unprojected) inner product of the index's normalized features.  Keys are the layers' own
    parameter names (``lm_head.weight`` even when it is tied to ``model.embed_tokens.weight``:
    :class:`TailPatcher` then updates the lm_head use only — the embedding has no moment, and the
    lm_head's row moments of never-predicted tokens are ~1e-13, which would blow up the embedding
    rows of frequent input tokens such as BOS).
    """
    from bergson.layers import find_layers
    from bergson.normalizers import AdafactorNormalizer

    specs = find_layers(model, list(normalizers))
    out: dict[str, torch.Tensor] = {}
    for layer, norm in normalizers.items():
        module, spec = model.get_submodule(layer), specs[layer]
        if isinstance(norm, AdafactorNormalizer):
            alpha, beta = norm.scales(torch.float64)
            p = torch.outer(alpha, beta)
        else:
            p = (norm.avg_sq.double().sqrt() + norm.eps).reciprocal()
        if spec.transposed:
            p = p.T
        if tuple(p.shape) != tuple(module.weight.shape):
            raise ValueError(f"{layer}: second moment {tuple(p.shape)} vs weight {tuple(module.weight.shape)}")
        out[f"{layer}.weight"] = p.float()  # the layer's own name, also when the weight is tied
        b = norm.bias_scale(torch.float32)
        if b is not None and getattr(module, "bias", None) is not None:
            out[f"{layer}.bias"] = b
    return out


def summarize(per_query: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error over queries of ``per_query [Q]``."""
    n = per_query.numel()
    se = per_query.std(unbiased=True).item() / n**0.5 if n > 1 else float("nan")
    return per_query.mean().item(), se


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=100, help="use the first N queries")
    ap.add_argument("--k", type=int, default=10, help="proponents per method and query")
    ap.add_argument("--step", default="adafactor", choices=["adafactor", "sgd"],
                    help="adafactor: θ ← θ − lr·g ⊘ sqrt(v) on the collected layers' weights, v the second "
                         "moments of the step index (--step_index); sgd: θ ← θ − lr·g on every parameter")
    ap.add_argument("--lr", type=float, default=None,
                    help=f"step size on the summed document loss (default: {DEFAULT_LR})")
    ap.add_argument("--step_index", default=None,
                    help="index whose normalizers precondition the adafactor step (default: the `sum` index, "
                         "{prefix}_sum, built when missing)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--no_gold", action="store_true", help="skip the gold-document reference row")
    ap.add_argument("--linearity_queries", type=int, default=10,
                    help="repeat the step at 2·lr for the proponents of this many queries (0: skip)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="precision of the patched models (the index and ranking stay float32)")
    ap.add_argument("--projection_dim", type=int, default=16)
    ap.add_argument("--normalizer", default="adafactor", choices=["adafactor", "adam", "none"])
    ap.add_argument("--loss_reductions", default="sum,sum_log",
                    help="comma-separated document losses of the indexes ranked from (sum, mean, sum_log); "
                         "the tail-patch step itself always uses the summed loss")
    ap.add_argument("--index", default=None,
                    help="index directory prefix (default: runs/eval_p{P}_{normalizer}); one index per loss")
    ap.add_argument("--model", default=None,
                    help="a model directory trained on the default corpus (e.g. an earlier, less saturated "
                         "checkpoint from `scripts/train_default.py --epochs 10 --out runs/default_e10`); "
                         "default: the embedded default model")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random proponents")
    ap.add_argument("--out", default=None, help="markdown report (default: print only)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {METHODS}")
    reductions = [r.strip() for r in args.loss_reductions.split(",") if r.strip()]
    lr = DEFAULT_LR[args.step] if args.lr is None else args.lr
    torch.set_num_threads(args.threads)

    import transformers

    import bergson
    from bergson import default

    t0 = time.perf_counter()
    if args.model:
        from bergson.data_sources import load_model

        model, tok = load_model(args.model, dtype="float32", device="cpu")[:2]
    else:
        model, tok = default.load_model()
    model.eval()
    docs = default.dataset()
    qs = default.query_dataset().select(range(min(args.queries, len(default.queries()))))
    prompts, completions = list(qs["prompt"][:]), list(qs["completion"][:])
    gold = [list(g) for g in qs["gold_doc_ids"][:]]
    texts = list(docs["text"][:])
    n_q, n_docs, k = len(prompts), len(texts), args.k

    tag = f"{Path(args.model).name}_" if args.model else ""
    prefix = args.index or str(ROOT / "runs" / f"eval_{tag}p{args.projection_dim}_{args.normalizer}")

    def index(red: str) -> Path:
        index_path = Path(f"{prefix}_{red}")  # the same indexes fact_tracing.py builds and reuses
        if not (index_path / "manifest.json").exists():
            bergson.collect_gradients(
                model, docs, tokenizer=tok, projection_dim=args.projection_dim, normalizer=args.normalizer,
                loss_reduction=red, output_path=str(index_path), progress=False,
            )
        return index_path

    proponents: dict[str, torch.Tensor] = {}
    if any(m in GRADIENT_METHODS for m in methods):
        for red in reductions:
            index_path = index(red)
            feats = None
            for score in (m for m in GRADIENT_METHODS if m in methods):
                att = bergson.Attributor(index_path, model, tok, score=score, dataset=docs)
                feats = att.features(prompts, completions) if feats is None else feats
                if score in ("trackstar", "one_sided"):
                    att.fit_query_stats(features=feats)
                name = score if red == "sum" else f"{score} ({red})"
                proponents[name] = att.scores_all(feats).topk(k, dim=1).indices
    if "bm25" in methods:
        proponents["bm25"] = bm25_scores(texts, [p + c for p, c in zip(prompts, completions)]).topk(k, dim=1).indices
    if "random" in methods:
        g = torch.Generator().manual_seed(args.seed)
        proponents["random"] = torch.stack([torch.randperm(n_docs, generator=g)[:k] for _ in range(n_q)])
    t_rank = time.perf_counter() - t0

    precond, step_desc = None, f"one SGD step (lr={lr:g}) on every parameter"
    if args.step == "adafactor":
        step_path = Path(args.step_index) if args.step_index else index("sum")
        norms = bergson.load_index(step_path).normalizers()
        if not norms:
            ap.error(f"--step adafactor needs an index with normalizers; {step_path} has none")
        precond = adafactor_preconditioner(model, norms)
        n_upd = sum(model.get_parameter(n).numel() for n in precond)
        n_all = sum(p.numel() for p in model.parameters())
        rest = sorted({".".join(n.split(".")[-2:]) for n, _ in model.named_parameters() if n not in precond})
        tied = [n for n in precond if n not in dict(model.named_parameters())]  # tied to a parameter of another name
        step_desc = (f"one Adafactor-preconditioned step (lr={lr:g}; ΔW = −lr·G ⊘ sqrt(v), v = r cᵀ / mean(r) "
                     f"the second moments of the `{step_path.name}` index) on the weights of the {len(norms)} "
                     f"collected layers ({n_upd:,} of {n_all:,} parameters"
                     + (f"; {', '.join(tied)} is untied for the step: only its own use is updated, with its "
                        "own gradient" if tied else "")
                     + (f"; not updated: {', '.join(rest)}" if rest else "") + ")")
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    patcher = TailPatcher(model, tok, prompts, completions, lr, dtype=dtype, precond=precond)
    doc_ids = tok(texts, add_special_tokens=True)["input_ids"]  # as bergson tokenizes a document
    order = list(proponents)  # gradient methods per index loss, then bm25, random
    deltas = patcher.run(doc_ids, {m: proponents[m] for m in order})
    if not args.no_gold:
        width = max(len(g) for g in gold)  # equal in the default corpus; pad defensively by repeating
        deltas["gold"] = patcher.run(doc_ids, {"gold": torch.tensor([g + g[: width - len(g)] for g in gold])})["gold"]
    steps = patcher.steps
    t_patch = time.perf_counter() - t0 - t_rank

    lin = None
    if args.linearity_queries > 0 and order:
        # ‖Δ(2·lr) − 2·Δ(lr)‖ / ‖2·Δ(lr)‖ over every (proponent, query) pair of the first queries
        nl = min(args.linearity_queries, n_q)
        sub = {m: proponents[m][:nl] for m in order}
        d1 = torch.cat([deltas[m][:nl].flatten() for m in order])
        d2 = torch.cat([v.flatten() for v in patcher.run(doc_ids, sub, lr=2 * lr).values()])
        lin = ((d2 - 2 * d1).norm() / (2 * d1).norm()).item()

    wall = time.perf_counter() - t0
    per_query = {m: d.mean(1) for m, d in deltas.items()}  # top-k average per query
    nll = -patcher.base.double().clamp_max(-1e-12).float()
    rel_query = {m: (d / nll[:, None]).mean(1) for m, d in deltas.items()}
    results = {}
    for m in per_query:
        mu, se = summarize(per_query[m])
        rmu, rse = summarize(rel_query[m])
        results[m] = {"mean": mu, "se": se, "rel_mean": rmu, "rel_se": rse}
        if "bm25" in per_query and m not in ("bm25", "gold"):
            results[m]["minus_bm25"] = summarize(per_query[m] - per_query["bm25"])
            results[m]["rel_minus_bm25"] = summarize(rel_query[m] - rel_query["bm25"])
        if "random" in per_query and m != "random":
            results[m]["beats_random"] = (per_query[m] > per_query["random"]).float().mean().item()
    if "random" in results:
        rnd = results["random"]
        for m in results:
            # a ratio only means something when random's own mean is clearly positive
            for key, mk, sk in (("x_random", "mean", "se"), ("rel_x_random", "rel_mean", "rel_se")):
                results[m][key] = results[m][mk] / rnd[mk] if rnd[mk] > 2 * rnd[sk] else None
                # random's effect indistinguishable from 0: the ratio to its upper 2-s.e. bound is a
                # conservative lower bound of the ratio ("≥ x" in the report)
                hi = rnd[mk] + 2 * rnd[sk]
                results[m][key + "_lb"] = (results[m][mk] / hi if results[m][key] is None and hi > 0
                                           and m != "random" else None)

    def fmt(m):
        r = results[m]
        name = f"gold ({deltas['gold'].shape[1]} docs stating the fact; reference)" if m == "gold" else m

        def cells(prefix):
            d, xr, lb = r.get(prefix + "minus_bm25"), r.get(prefix + "x_random"), r.get(prefix + "x_random_lb")
            ratio = (f"{xr:.1f}" if xr is not None else f"≥ {lb:.1f}" if lb is not None
                     else ("n/a" if m != "random" and "random" in results else ""))
            return [f"{r[prefix + 'mean']:+.2e} ± {r[prefix + 'se']:.1e}",
                    f"{d[0]:+.2e} ± {d[1]:.1e}" if d else "", ratio]

        br = r.get("beats_random")
        return "| " + " | ".join([name] + cells("") + cells("rel_") + [f"{br:.2f}" if br is not None else ""]) + " |"

    lines = [
        f"Tail-patch on {'the model in `' + args.model + '`' if args.model else 'the embedded default'} "
        f"(median completion loss before the step {nll.median().item():.3g} nats, "
        f"{(nll > 0.1).float().mean().item():.0%} of queries above 0.1): {n_q} queries, top-{k} proponents per method, {step_desc} "
        f"on each proponent's summed next-token loss, increase of the completion's "
        f"log-prob (nats) given the prompt; index p={args.projection_dim}, normalizer={args.normalizer}, "
        f"document loss of the index `sum` (TrackStar) or as named; {steps} document steps; "
        f"{wall:.0f} s wall ({t_rank:.0f} s ranking, {t_patch:.0f} s patching; {args.threads} threads); "
        f"torch {torch.__version__}, transformers {transformers.__version__}",
        "",
        "| method | Δ log p (mean ± s.e.) | minus bm25 (paired) | × random "
        "| Δ log p / NLL (mean ± s.e.) | minus bm25 (paired) | × random | queries above random |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [fmt(m) for m in order + (["gold"] if "gold" in deltas else [])]
    rnd = results.get("random")
    lines += ["", "Δ log p: increase of the completion's summed log-prob after the step, averaged over the "
                  f"top-{k} proponents of a query, then over queries (s.e. over queries; \"minus bm25\" is the "
                  "per-query paired difference). Δ log p / NLL divides each increase by the query's completion "
                  "loss before the step (for a confident target, its log-odds increase), so that the few targets "
                  "the model gets wrong do not dominate the average. × random is the ratio of means where random's "
                  "mean is more than 2 s.e. above zero; where it is not, \"≥ x\" divides by random's mean + 2 s.e. "
                  "(a conservative lower bound of the ratio; n/a when that bound is not positive)"
                  + (f" (random: {rnd['mean']:+.2e} ± {rnd['se']:.1e} and {rnd['rel_mean']:+.2e} ± {rnd['rel_se']:.1e})."
                     if rnd else ".")
                  + f" Queries above random: share of queries whose top-{k} mean Δ log p beats random's."]
    if lin is not None:
        lines += ["", f"Linearity check (first {min(args.linearity_queries, n_q)} queries, all methods' proponents): "
                      f"‖Δ(2·lr) − 2·Δ(lr)‖ / ‖2·Δ(lr)‖ = {lin:.3f} (0 in the linear regime)."]
    report = "\n".join(lines)
    print(report)
    results["_meta"] = {"wall_s": wall, "steps": steps, "linearity": lin, "queries": n_q, "k": k,
                        "step": args.step, "lr": lr,
                        "deltas": deltas, "base": patcher.base}
    write_report(args.out, "Tail-patch", __file__, argv, report)
    return results


if __name__ == "__main__":
    main()
