"""Fact tracing on the embedded default: which training documents state the fact a query asks about?

Each query is a held-out-template fact prompt with the expected completion; its gold set is the
training documents stating that fact (known exactly, ``bergson.default.queries()``).  Reported
per method: MRR (reciprocal rank of the first gold document) and recall@10 (share of the gold
documents in the top 10), over all queries.

Methods: ``trackstar``, ``cosine``, ``inner``, ``one_sided`` (bergson index + query features),
``bm25`` (the ``bm25s`` package over the same documents, query = prompt + completion) and
``random``.

    python bench/eval/fact_tracing.py                    # p=16, Adafactor fitted from data
    python bench/eval/fact_tracing.py --projection_dim 32 --queries 200
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def ranking_metrics(scores: torch.Tensor, gold: list[list[int]], k: int = 10) -> dict[str, float]:
    """MRR and recall@k of ``scores [Q, N]`` (higher = more relevant) against gold row sets."""
    order = torch.argsort(-scores, dim=1, stable=True)
    rr, rec = [], []
    for q, g in enumerate(gold):
        pos = torch.empty_like(order[q])
        pos[order[q]] = torch.arange(order.shape[1])
        ranks = pos[torch.tensor(g)] + 1
        rr.append(1.0 / ranks.min().item())
        rec.append((ranks <= k).float().mean().item())
    return {"mrr": sum(rr) / len(rr), f"recall@{k}": sum(rec) / len(rec)}


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
    ap.add_argument("--loss_reduction", default="sum", choices=["sum", "mean"])
    ap.add_argument("--queries", type=int, default=600, help="use the first N queries")
    ap.add_argument("--index", default=None, help="index directory (default: runs/eval_p{P}_{normalizer})")
    ap.add_argument("--out", default=None, help="markdown report (default: print only)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import bergson
    from bergson import default

    t0 = time.perf_counter()
    model, tok = default.load_model()
    docs = default.dataset()
    qs = default.query_dataset().select(range(min(args.queries, len(default.queries()))))
    index_path = Path(args.index or ROOT / "runs" / f"eval_p{args.projection_dim}_{args.normalizer}_{args.loss_reduction}")
    if not (index_path / "manifest.json").exists():
        bergson.collect_gradients(
            model, docs, tokenizer=tok, projection_dim=args.projection_dim, normalizer=args.normalizer,
            loss_reduction=args.loss_reduction, output_path=str(index_path), progress=False,
        )
    prompts, completions = list(qs["prompt"][:]), list(qs["completion"][:])
    gold = [list(g) for g in qs["gold_doc_ids"][:]]
    results: dict[str, dict[str, float]] = {}
    feats = None
    for score in ("trackstar", "cosine", "inner", "one_sided"):
        att = bergson.Attributor(index_path, model, tok, score=score, dataset=docs)
        feats = att.features(prompts, completions) if feats is None else feats
        if score in ("trackstar", "one_sided"):
            att.fit_query_stats(features=feats)
        results[score] = ranking_metrics(att.scores_all(feats), gold)
    texts = list(docs["text"][:])
    results["bm25"] = ranking_metrics(bm25_scores(texts, [p + c for p, c in zip(prompts, completions)]), gold)
    results["random"] = ranking_metrics(torch.rand(len(prompts), len(texts), generator=torch.Generator().manual_seed(0)),
                                        gold)
    wall = time.perf_counter() - t0
    lines = [
        f"Fact tracing on the embedded default ({len(prompts)} queries, {len(texts)} documents, 4 gold each); "
        f"index p={args.projection_dim}, normalizer={args.normalizer}, loss={args.loss_reduction}; "
        f"{wall:.0f} s wall; torch {torch.__version__}",
        "",
        "| method | MRR | recall@10 |",
        "|---|---|---|",
    ]
    lines += [f"| {m} | {r['mrr']:.3f} | {r['recall@10']:.3f} |" for m, r in results.items()]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        cmd = "python bench/eval/fact_tracing.py " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(args.out).write_text(f"# Fact tracing\n\nRegenerate: `{cmd}`\n\n{report}\n")
    return results


if __name__ == "__main__":
    main()
