"""Kernel benchmark: Triton kernels vs the PyTorch reference vs the naive path, on real layer shapes.

For each layer shape ``[O, I]``, tokens per example ``T``, projection size ``p`` and method:

* ``factored`` (Adafactor / no normalization): ``outer_project(δ, project_scale(x, R, β), L, cu, α)``;
* ``adam``: ``adam_project(δ, x, L, R, v, cu)``;

three implementations run on the same inputs (one setup function feeds all of them):
``torch`` (``bergson_kernels.reference``), ``triton`` (the kernels) and ``naive`` (materialize
the per-example gradients with ``reference.per_example_grads``, normalize, then ``L G Rᵀ``).
Every row is first checked against the reference; a row whose check fails gets no timings.
Times come from ``triton.testing.do_bench`` (median and 20/80% quantiles); GB/s counts the
bytes of ``x`` and ``δ`` (and ``v`` for Adam) read once, TFLOP/s counts the fused method's
FLOPs (the same count for every implementation, so it is proportional to speed).

    python bench/bench_kernels.py                      # GPU: full table
    python bench/bench_kernels.py --smoke --out /tmp/b # CPU: tiny shapes through the interpreter

Results go to ``<out>/kernels_<device>.md`` and ``.csv`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS = {  # name: (O, I) of the weight
    "pythia-1b.attn.qkv": (6144, 2048),
    "pythia-1b.mlp.up": (8192, 2048),
    "pythia-1b.mlp.down": (2048, 8192),
    "llama-3-8b.attn.q_proj": (4096, 4096),
    "llama-3-8b.mlp.up": (14336, 4096),
    "llama-3-8b.mlp.down": (4096, 14336),
}
SMOKE_LAYERS = {"tiny.a": (40, 24), "tiny.b": (24, 56)}
METHODS = ("factored", "adam")
IMPLS = ("torch", "triton", "naive")
DTYPES = ("bf16", "fp16", "fp32")
# max relative Frobenius error of triton vs the fp32 reference, per input dtype
CHECK_TOL = {"bf16": 3e-2, "fp16": 5e-3, "fp32": 1e-4}
EPS = 1e-8

CSV_FIELDS = [
    "device", "torch", "triton", "commit", "layer", "O", "I", "N", "T_per_example", "p", "dtype", "method",
    "impl", "ms_p50", "ms_p20", "ms_p80", "GB_s", "TFLOP_s", "speedup_vs_torch", "peak_extra_MB",
    "rel_err_vs_torch", "status",
]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through TRITON_INTERPRET=1 (no speed)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="output folder")
    ap.add_argument("--layers", nargs="+", choices=sorted(LAYERS), metavar="NAME", help=f"subset of {sorted(LAYERS)}")
    ap.add_argument("--tokens", nargs="+", type=int, default=[512, 2048], help="tokens per example")
    ap.add_argument("--examples", type=int, default=8, help="examples per call (N)")
    ap.add_argument("--p", nargs="+", type=int, default=[16, 64], help="projection sizes (p = q)")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of x, δ and the projections")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.tokens, args.examples, args.p = list(SMOKE_LAYERS), [8], 2, [16]
    elif args.layers is None:
        args.layers = list(LAYERS)
    return args


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:  # Triton reads it when the kernel modules are imported, below
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(REPO))

    import torch
    import triton

    from bergson_kernels import adam_project, outer_project, project_scale, projection_matrix, reference

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --smoke for the CPU interpreter run", file=sys.stderr)
        return 2
    device_name = "cpu-interpreter" if args.smoke else torch.cuda.get_device_name(device)
    layers = SMOKE_LAYERS if args.smoke else LAYERS
    meta = dict(device=device_name, torch=torch.__version__, triton=triton.__version__, commit=git_commit())

    def setup(O: int, I: int, T: int, N: int, p: int) -> dict:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        rand = lambda *shape: torch.rand(*shape, generator=gen, device=device)  # noqa: E731
        randn = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
        L = projection_matrix(p, O, seed=args.seed, name="bench", side="left", device=device)
        R = projection_matrix(p, I, seed=args.seed, name="bench", side="right", device=device)
        return dict(
            delta=(randn(N * T, O) * 1e-2).to(torch_dtype),
            x=randn(N * T, I).to(torch_dtype),
            L=L.to(torch_dtype),
            R=R.to(torch_dtype),
            alpha=rand(O) + 0.5,
            beta=rand(I) + 0.5,
            v=rand(O, I) * 1e-4 + 1e-6,
            cu=torch.arange(0, (N + 1) * T, T, dtype=torch.int32, device=device),
        )

    def naive_factored(d):
        G = reference.per_example_grads(d["delta"], d["x"], d["cu"])  # [N, O, I] materialized
        G = d["alpha"][:, None] * G * d["beta"]
        return d["L"].float() @ G @ d["R"].float().T

    def naive_adam(d):
        G = reference.per_example_grads(d["delta"], d["x"], d["cu"])
        G = G / (d["v"].sqrt() + EPS)
        return d["L"].float() @ G @ d["R"].float().T

    impls = {
        "factored": {
            "torch": lambda d: reference.outer_project(
                d["delta"], reference.project_scale(d["x"], d["R"], d["beta"]), d["L"], d["cu"], d["alpha"]
            ),
            "triton": lambda d: outer_project(
                d["delta"], project_scale(d["x"], d["R"], d["beta"]), d["L"], d["cu"], d["alpha"]
            ),
            "naive": naive_factored,
        },
        "adam": {
            "torch": lambda d: reference.adam_project(d["delta"], d["x"], d["L"], d["R"], d["v"], d["cu"], EPS),
            "triton": lambda d: adam_project(d["delta"], d["x"], d["L"], d["R"], d["v"], d["cu"], EPS),
            "naive": naive_adam,
        },
    }

    def work(method: str, O: int, I: int, T: int, N: int, p: int) -> tuple[float, float]:
        """(bytes read once, FLOPs of the fused method)."""
        tokens, esize = N * T, torch.finfo(torch_dtype).bits // 8
        if method == "factored":
            return tokens * (O + I) * esize, 2.0 * tokens * p * (I + O + p)
        tiles = 2.0 * N * (O * I * p + p * O * p)  # per example: (G R^T) then L (.)
        return tokens * (O + I) * esize + O * I * 4, 2.0 * tokens * O * I + tiles

    def timed(fn) -> tuple[float, float, float]:
        if device.type == "cuda":
            p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            return p50, p20, p80
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        q = statistics.quantiles(times, n=5, method="inclusive")
        return statistics.median(times), q[0], q[3]

    def peak_extra_mb(fn) -> float | None:
        if device.type != "cuda":
            return None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def rel_err(a, b) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    def bench_row(name: str, O: int, I: int, T: int, p: int, method: str) -> list[dict]:
        d = setup(O, I, T, args.examples, p)
        calls = {impl: (lambda f=impls[method][impl]: f(d)) for impl in IMPLS}
        base = dict(meta, layer=name, O=O, I=I, N=args.examples, T_per_example=T, p=p, dtype=args.dtype)
        base["method"] = method
        ref = calls["torch"]()
        errs = {impl: rel_err(calls[impl](), ref) for impl in ("triton", "naive")}
        del ref
        tol = CHECK_TOL[args.dtype]
        if not all(e <= tol for e in errs.values()):
            status = "FAILED check: " + ", ".join(f"{k} err {v:.2e} > {tol:.0e}" for k, v in errs.items())
            print(f"{name} T={T} p={p} {method}: {status}", file=sys.stderr)
            return [dict(base, impl=impl, status=status) for impl in IMPLS]
        nbytes, flops = work(method, O, I, T, args.examples, p)
        times = {impl: timed(call) for impl, call in calls.items()}
        print(
            f"{name:24s} T={T:5d} p={p:3d} {method:8s} "
            + "  ".join(f"{impl} {times[impl][0]:8.3f} ms" for impl in IMPLS),
            flush=True,
        )
        rows = []
        for impl, (p50, p20, p80) in times.items():
            peak = peak_extra_mb(calls[impl])
            rows.append(
                dict(
                    base,
                    impl=impl,
                    ms_p50=f"{p50:.4f}",
                    ms_p20=f"{p20:.4f}",
                    ms_p80=f"{p80:.4f}",
                    GB_s=f"{nbytes / p50 / 1e6:.1f}",
                    TFLOP_s=f"{flops / p50 / 1e9:.2f}",
                    speedup_vs_torch=f"{times['torch'][0] / p50:.2f}",
                    peak_extra_MB="" if peak is None else f"{peak:.0f}",
                    rel_err_vs_torch="0" if impl == "torch" else f"{errs[impl]:.2e}",
                    status="ok (interpreter, not kernel speed)" if args.smoke else "ok",
                )
            )
        return rows

    rows: list[dict] = []
    for name in args.layers:
        O, I = layers[name]
        for T in args.tokens:
            for p in args.p:
                for method in args.methods:
                    rows += bench_row(name, O, I, T, p, method)

    write_results(args, meta, rows)
    return 1 if any(r["status"].startswith("FAILED") for r in rows) else 0


def write_results(args: argparse.Namespace, meta: dict, rows: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-").lower()
    csv_path, md_path = args.out / f"kernels_{slug}.csv", args.out / f"kernels_{slug}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in CSV_FIELDS} for r in rows)

    cols = ["layer", "O", "I", "T_per_example", "p", "method", "impl", "ms_p50", "ms_p20", "ms_p80", "GB_s"]
    cols += ["TFLOP_s", "speedup_vs_torch", "peak_extra_MB", "rel_err_vs_torch", "status"]
    lines = [
        f"# Kernel benchmark — {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, python {platform.python_version()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; N = {args.examples} examples, "
        f"dtype {args.dtype}, p = q.",
        "",
        "GB/s: bytes of x and δ (and v for adam) read once. TFLOP/s: FLOPs of the fused method, the same count "
        "for every implementation. peak_extra_MB: peak CUDA memory above the inputs during one call.",
        "",
    ]
    if args.smoke:
        lines += ["**Smoke run on CPU through the Triton interpreter: timings are interpreter, not kernel speed.**", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    sys.exit(main())
