"""``bergson query``, ``bergson score`` and ``bergson trackstar``."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from .config import BuildConfig, QueryConfig, ScoreConfig, TrackstarConfig


def _table(hits, width: int) -> str:
    rows = ["rank  score     row  text"]
    for h in hits:
        text = (h.text or "").replace("\n", " ")
        if len(text) > width:
            text = text[: width - 1] + "…"
        rows.append(f"{h.rank:>4}  {h.score:+.4f}  {h.row_id:>5}  {text}")
    return "\n".join(rows)


def query(cfg: QueryConfig) -> None:
    from .query import Attributor

    att = Attributor(cfg.index, score=cfg.score, lambda_k=cfg.lambda_k, damping=cfg.damping, backend=cfg.backend)
    hits = att.query([cfg.prompt], None if cfg.completion is None else [cfg.completion], k=cfg.top_k)[0]
    shown = repr(cfg.prompt) + ("" if cfg.completion is None else f" -> {cfg.completion!r}")
    print(f"query: {shown}   score: {cfg.score}")
    print(_table(hits, max(20, min(cfg.width, shutil.get_terminal_size((120, 20)).columns - 26))))


def _read_queries(path: str, prompt_column: str, completion_column: str | None):
    from .data import check_column
    from .data_sources import load_dataset

    ds, _ = load_dataset(path)
    check_column(ds, prompt_column, "prompt column")
    prompts = list(ds[prompt_column][:])
    completions = None
    if completion_column:
        check_column(ds, completion_column, "completion column")
        completions = list(ds[completion_column][:])
    if not prompts:
        raise ValueError(f"{path} holds no queries")
    return prompts, completions


def _is_main() -> bool:
    from .distributed import current

    return current().is_main


def _score_to_file(att, prompts, completions, output, *, top_k, all_pairs, query_stats, meta):
    from .query import write_scores

    feats = att.features(prompts, completions)
    lam = None
    if query_stats and att.score in ("trackstar", "one_sided") and len(prompts) > 1:
        lam = att.fit_query_stats(features=feats)
    meta = {**meta, "score": att.score, "lambda": lam, "num_queries": len(prompts)}
    if all_pairs:
        scores = att.scores_all(feats)  # under torchrun: every rank scores a share of the shards
        if _is_main():
            write_scores(output, scores, None, {**meta, "layout": "all_pairs"})
        return None, None, lam
    scores, ids = att.scores_topk(feats, top_k)
    if _is_main():
        write_scores(output, scores, ids, {**meta, "layout": "top_k", "top_k": top_k})
    return scores, ids, lam


def score(cfg: ScoreConfig) -> None:
    from .query import Attributor

    prompts, completions = _read_queries(cfg.queries, cfg.prompt_column, cfg.completion_column or None)
    att = Attributor(cfg.index, score=cfg.score, lambda_k=cfg.lambda_k, damping=cfg.damping, backend=cfg.backend)
    _, _, lam = _score_to_file(
        att, prompts, completions, cfg.output, top_k=cfg.top_k, all_pairs=cfg.all_pairs,
        query_stats=cfg.query_stats, meta={"index": str(Path(cfg.index).resolve()), "queries": cfg.queries},
    )
    extra = f", lambda={lam:.4f}" if lam is not None else ""
    if _is_main():
        print(f"bergson: scored {len(prompts)} queries against {len(att.index)} rows ({cfg.score}{extra}) -> {cfg.output}")


def trackstar(cfg: TrackstarConfig) -> None:
    from .build import build
    from .query import Attributor
    from .storage import MANIFEST, load_index

    out = Path(cfg.output)
    prompts, completions = _read_queries(cfg.queries, cfg.query_prompt_column, cfg.query_completion_column or None)
    build_fields = {f.name for f in dataclasses.fields(BuildConfig)}
    bcfg = BuildConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in build_fields})
    if not cfg.overwrite and (out / MANIFEST).exists() and load_index(out, verify=False).complete:
        if _is_main():
            print(f"bergson: reusing the complete index in {out}")
    else:
        if (out / MANIFEST).exists() and not cfg.overwrite:
            bcfg = dataclasses.replace(bcfg, resume=True)
        _, summary = build(bcfg)
        if _is_main():
            print(summary)
    att = Attributor(out, score=cfg.score, lambda_k=cfg.lambda_k, damping=cfg.damping, backend=cfg.backend)
    scores, ids, lam = _score_to_file(
        att, prompts, completions, out / "scores.safetensors", top_k=cfg.top_k, all_pairs=False,
        query_stats=True, meta={"index": str(out.resolve()), "queries": cfg.queries},
    )
    if not _is_main():
        return
    texts = att.texts()
    print(f"bergson: scored {len(prompts)} queries (lambda={lam if lam is None else round(lam, 4)}) "
          f"-> {out / 'scores.safetensors'}")
    for q in range(min(3, len(prompts))):
        top = int(ids[q, 0])
        shown = texts[top] if texts else ""
        print(f"  {prompts[q]!r}: top row {top} ({float(scores[q, 0]):+.3f}) {shown[:80]!r}")
