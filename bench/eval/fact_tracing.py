"""Fact tracing on the embedded default: which training documents state the fact a query asks about?

Each query is a held-out-template fact prompt with the expected completion; its gold set is the
training documents stating that fact (known exactly, ``bergson.default.queries()``).  Reported
per method: MRR (reciprocal rank of the first gold document) and recall@10 (share of the gold
documents in the top 10), over all queries.

Methods: ``trackstar``, ``cosine``, ``inner``, ``one_sided`` (bergson index + query features),
each with the documents' loss summed over tokens as in TrackStar (``sum``) and with the sum of
log token losses (``sum_log``, which weighs each token by 1/loss), ``bm25`` (the ``bm25s``
package over the same documents, query = prompt + completion) and ``random``.

    python bench/eval/fact_tracing.py                    # p=16, Adafactor fitted from data
    python bench/eval/fact_tracing.py --projection_dim 32 --queries 200
    python bench/eval/fact_tracing.py --out bench/results/eval.md --plot bench/results/recall_at_k.png
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


def ranking_metrics(scores: torch.Tensor, gold: list[list[int]], k: int = 10) -> dict[str, float]:
    """MRR and recall@k of ``scores [Q, N]`` (higher = more relevant) against gold row sets."""
    ranks = gold_ranks(scores, gold)
    rr = [1.0 / r.min().item() for r in ranks]
    rec = [(r <= k).float().mean().item() for r in ranks]
    return {"mrr": sum(rr) / len(rr), f"recall@{k}": sum(rec) / len(rec)}


def gold_ranks(scores: torch.Tensor, gold: list[list[int]]) -> list[torch.Tensor]:
    """1-based rank of every gold row of every query."""
    order = torch.argsort(-scores, dim=1, stable=True)
    out = []
    for q, g in enumerate(gold):
        pos = torch.empty_like(order[q])
        pos[order[q]] = torch.arange(order.shape[1])
        out.append(pos[torch.tensor(g)] + 1)
    return out


def recall_curve(scores: torch.Tensor, gold: list[list[int]], ks) -> list[float]:
    """Mean recall@k (share of each query's gold rows in its top k) for every k of ``ks``."""
    ranks = gold_ranks(scores, gold)
    return [sum((r <= k).float().mean().item() for r in ranks) / len(ranks) for k in ks]


def plot_recall(curves: dict[str, list[float]], ks, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, ys in curves.items():
        ax.plot(ks, ys, label=name, linestyle="--" if "sum_log" not in name and name not in ("bm25", "random") else "-")
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (share of gold documents in the top k)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def fact_token_dataset(tok):
    """The default documents pre-tokenized with only the tokens of the facts' values in the loss
    (fillers keep all their tokens): an oracle that knows what each document teaches."""
    import datasets

    from bergson.default import corpus

    facts = corpus.facts()
    ids, labels = [], []
    for d in corpus.documents():
        enc = tok(d["text"], add_special_tokens=True, return_offsets_mapping=True)
        spans = []
        for f in d["facts"]:
            at = d["text"].find(" " + facts[f]["value"])
            spans.append((at, at + len(facts[f]["value"]) + 1))
        lab = [t if not spans or any(a < e and b > s0 and b > a for s0, e in spans) else -100
               for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
        ids.append(enc["input_ids"])
        labels.append([-100] + lab[1:])
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})


def bm25_scores(docs: list[str], queries: list[str]) -> torch.Tensor:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(docs, show_progress=False), show_progress=False)
    out = torch.zeros(len(queries), len(docs))
    for q, text in enumerate(queries):
        toks = bm25s.tokenize([text], show_progress=False, return_ids=False)[0]
        out[q] = torch.as_tensor(retriever.get_scores(toks), dtype=torch.float32)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--projection_dim", type=int, default=16)
    ap.add_argument("--normalizer", default="adafactor", choices=["adafactor", "adam", "none"])
    ap.add_argument("--loss_reductions", default="sum,sum_log",
                    help="comma-separated document losses to compare (sum, mean, sum_log)")
    ap.add_argument("--queries", type=int, default=600, help="use the first N queries")
    ap.add_argument("--index", default=None,
                    help="index directory prefix (default: runs/eval_p{P}_{normalizer}); one index per loss")
    ap.add_argument("--out", default=None, help="markdown report (default: print only)")
    ap.add_argument("--plot", default=None, help="PNG of recall@k per method (needs matplotlib)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log_eps", type=float, default=None, help="floor of sum_log's log(loss + eps) (default 1e-6)")
    ap.add_argument("--oracle", action="store_true",
                    help="diagnostic: also index the documents with only their fact tokens in the loss")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reductions = [r.strip() for r in args.loss_reductions.split(",") if r.strip()]

    import bergson
    import bergson.data
    from bergson import default

    if args.log_eps is not None:
        bergson.data.LOG_LOSS_EPS = args.log_eps

    t0 = time.perf_counter()
    model, tok = default.load_model()
    docs = default.dataset()
    qs = default.query_dataset().select(range(min(args.queries, len(default.queries()))))
    prefix = args.index or str(ROOT / "runs" / f"eval_p{args.projection_dim}_{args.normalizer}")
    if args.log_eps is not None:
        prefix += f"_eps{args.log_eps:g}"
    prompts, completions = list(qs["prompt"][:]), list(qs["completion"][:])
    gold = [list(g) for g in qs["gold_doc_ids"][:]]
    all_scores: dict[str, torch.Tensor] = {}
    for red in reductions + (["oracle"] if args.oracle else []):
        index_path = Path(f"{prefix}_{red}")
        if not (index_path / "manifest.json").exists():
            data, kw = (fact_token_dataset(tok), {}) if red == "oracle" else (docs, {"tokenizer": tok, "loss_reduction": red})
            norms = None
            if red == "oracle":  # second moments of the real documents' gradients, as for "sum"
                norms = bergson.fit_normalizers(model, docs, tokenizer=tok, kind=args.normalizer, progress=False) \
                    if args.normalizer != "none" else {}
            bergson.collect_gradients(
                model, data, projection_dim=args.projection_dim, normalizer=args.normalizer, normalizers=norms,
                output_path=str(index_path), progress=False, **kw,
            )
        feats = None
        for score in ("trackstar", "cosine", "inner", "one_sided"):
            att = bergson.Attributor(index_path, model, tok, score=score, dataset=docs)
            feats = att.features(prompts, completions) if feats is None else feats
            if score in ("trackstar", "one_sided"):
                att.fit_query_stats(features=feats)
            name = score if red == "sum" else f"{score} ({red})"
            all_scores[name] = att.scores_all(feats)
    texts = list(docs["text"][:])
    all_scores["bm25"] = bm25_scores(texts, [p + c for p, c in zip(prompts, completions)])
    all_scores["random"] = torch.rand(len(prompts), len(texts), generator=torch.Generator().manual_seed(0))
    results = {m: ranking_metrics(s, gold) for m, s in all_scores.items()}
    wall = time.perf_counter() - t0
    lines = [
        f"Fact tracing on the embedded default ({len(prompts)} queries, {len(texts)} documents, 4 gold each); "
        f"index p={args.projection_dim}, normalizer={args.normalizer}; document loss `sum` (TrackStar) or "
        f"`sum_log` (sum of log token losses); {wall:.0f} s wall on {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}, bergson {bergson.__version__}",
        "",
        "| method | MRR | recall@10 |",
        "|---|---|---|",
    ]
    lines += [f"| {m} | {r['mrr']:.3f} | {r['recall@10']:.3f} |" for m, r in results.items()]
    report = "\n".join(lines)
    print(report)
    if args.plot:
        ks = [1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 70, 100]
        curves = {m: recall_curve(s, gold, ks) for m, s in all_scores.items() if m != "inner (sum_log)"}
        plot_recall(curves, ks, args.plot, f"fact tracing, embedded default: {len(prompts)} queries, p={args.projection_dim}")
    write_report(args.out, "Fact tracing", __file__, argv, report)
    return results


if __name__ == "__main__":
    main()
