"""What the indexing pipeline adds over the bare collector: ``collect_gradients`` end to end
(batching, padding, the collector, writing safetensors shards) vs the same number of bare
``GradientCollector`` steps (``bench/collect.py``'s ``torch`` method) on the same model and batch
shape, alternated round by round in one process.

    python bench/pipeline.py                     # Llama 17M, 64 documents × 128 tokens, 5 rounds
    python bench/pipeline.py --size 100m --docs 32

Normalizers are given (random Adafactor moments, as in ``bench/collect.py``), so no fitting pass
runs; writes ``pipeline_{cpu|GPU name}.md`` with machine, versions and commit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.collect import git_commit, machine, make_step, normalizers_for, setup, sync  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="17m")
    ap.add_argument("--docs", type=int, default=64, help="documents per end-to-end run (a multiple of --batch)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.docs % args.batch:
        ap.error("--docs must be a multiple of --batch")
    import datasets

    import bergson

    torch.set_num_threads(args.threads)
    model, ids = setup(args.size, args.batch, args.seq, torch.float32, args.device)
    norms = normalizers_for(model, "adafactor")
    g = torch.Generator().manual_seed(1)
    docs = torch.randint(0, model.config.vocab_size, (args.docs, args.seq), generator=g)
    ds = datasets.Dataset.from_dict({"input_ids": docs.tolist()})
    step = make_step("torch", model, ids, args.p, norms)
    n_batches = args.docs // args.batch

    def bare():
        for _ in range(n_batches):
            step()

    def pipeline(tmp):
        out = bergson.collect_gradients(
            model, ds, normalizers=norms, projection_dim=args.p, token_batch_size=args.batch * args.seq,
            progress=False, output_path=str(Path(tmp) / "index"), overwrite=True, backend="torch",
        )
        assert len(out) == args.docs
        return out

    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        bare(), pipeline(tmp)  # warm-up: allocator, projections, file layout
        for _ in range(args.rounds):
            row = {}
            for name, fn in (("bare", bare), ("pipeline", lambda: pipeline(tmp))):
                sync(args.device)
                t0 = time.perf_counter()
                fn()
                sync(args.device)
                row[name] = time.perf_counter() - t0
            rounds.append(row)
            print(f"bare {row['bare']:.3f} s, pipeline {row['pipeline']:.3f} s, "
                  f"ratio {row['pipeline'] / row['bare']:.3f}", flush=True)
    ratios = sorted(r["pipeline"] / r["bare"] for r in rounds)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    tokens = args.docs * args.seq
    med_pipe = statistics.median(r["pipeline"] for r in rounds)
    dev = machine(args.device)
    tag = "cpu" if not args.device.startswith("cuda") else dev.replace(" ", "_")
    import transformers

    lines = [
        f"# Indexing pipeline vs bare collector steps ({tag})", "",
        f"machine: {dev}; torch {torch.__version__}; transformers {transformers.__version__}; "
        f"commit {git_commit()}; Llama {args.size}; {args.docs} documents × {args.seq} tokens in batches of "
        f"{args.batch}; p={args.p}; Adafactor normalizers given; {args.rounds} alternating rounds", "",
        "`pipeline` = `bergson.collect_gradients(..., output_path=...)` over all documents (batching, padding, "
        "collector, safetensors shards); `bare` = the same number of bare collector steps on one batch.", "",
        "| round | bare (s) | pipeline (s) | pipeline / bare |", "|---|---|---|---|",
    ]
    lines += [f"| {i + 1} | {r['bare']:.3f} | {r['pipeline']:.3f} | {r['pipeline'] / r['bare']:.3f} |"
              for i, r in enumerate(rounds)]
    lines += ["", f"Median pipeline / bare: **{q[1]:.3f}** (q25–q75 {q[0]:.3f}–{q[2]:.3f}); "
              f"end-to-end {tokens / med_pipe:,.0f} tokens/s.", "",
              f"Regenerate: `python bench/pipeline.py --size {args.size} --docs {args.docs} --rounds {args.rounds} "
              f"--threads {args.threads}`", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pipeline_{tag}.md").write_text("\n".join(lines))
    print(f"wrote {out / f'pipeline_{tag}.md'}")
    return q[1]


if __name__ == "__main__":
    main()
