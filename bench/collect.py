"""Collection vs a training step, side by side in one process, on the same model and batch.

Methods (each one forward + one backward on the same batch of ``N × S`` tokens):

* ``train``  — a plain training step: all parameters require grad, full backward
* ``floor``  — parameters frozen, embedding output requires grad: input-gradient-only backward
  (the floor of any hook-based collector)
* ``torch``  — ``GradientCollector(backend="torch")``
* ``triton`` — ``GradientCollector(backend="triton")`` (CUDA only)
* ``naive``  — materialize each per-example gradient (``projection_dim=0``), then project ``L G Rᵀ``

Methods are interleaved round by round and the median time per method is reported together
with its ratio to ``train`` (ratios are robust on shared machines, absolute times are not).
Peak memory is measured per method in a fresh subprocess on CPU (max RSS) and with
``torch.cuda.max_memory_allocated`` on CUDA.

    python bench/collect.py                         # CPU defaults: tiny, 17m; p=16; none/adafactor/adam
    python bench/collect.py --sizes 17m --normalizers adafactor --rounds 9
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # Llama architecture, built from config
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=1024),
    "17m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6, vocab_size=8192),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 vocab_size=16384),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=16,
               num_key_value_heads=4, vocab_size=32000),
}


def setup(size: str, batch: int, seq: int, dtype: torch.dtype, device: str, seed: int = 0):
    """The one setup every measurement uses: model, batch, labels."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=max(seq, 128), tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    return model, ids


def normalizers_for(model, kind: str):
    from bergson import AdafactorNormalizer, AdamNormalizer, find_layers

    if kind == "none":
        return None
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, s in find_layers(model).items():
        if kind == "adafactor":
            out[name] = AdafactorNormalizer(torch.rand(s.out_features, generator=g) + 0.5,
                                            torch.rand(s.in_features, generator=g) + 0.5)
        else:
            out[name] = AdamNormalizer(torch.rand(s.out_features, s.in_features, generator=g) + 0.5)
    return out


def make_step(method: str, model, ids, p: int, norms):
    """A zero-argument callable running one step of ``method``."""
    from bergson import GradientCollector
    from bergson.data import per_example_loss
    from bergson_kernels import projection_matrix

    def loss_of(m):
        return per_example_loss(m(input_ids=ids).logits, ids).sum()

    if method == "train":
        def step():
            for q in model.parameters():
                q.requires_grad_(True)
            model.zero_grad(set_to_none=True)
            loss_of(model).backward()
        return step
    if method == "floor":
        def step():
            for q in model.parameters():
                q.requires_grad_(False)
            h = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
            try:
                loss_of(model).backward()
            finally:
                h.remove()
        return step
    if method in ("torch", "triton"):
        col = GradientCollector(model, lambda n, g: None, projection_dim=p, normalizers=norms, backend=method)

        def step():
            with col:
                loss_of(model).backward()
        return step
    if method == "naive":
        dims = {}

        def project(name, g):  # g: [N, O*I], the materialized per-example gradients
            o, i = dims[name]
            G = g.view(-1, o, i)
            if norms is not None and name in norms:
                nrm = norms[name]
                if hasattr(nrm, "avg_sq"):
                    G = G / (nrm.avg_sq.to(G).sqrt() + nrm.eps)
                else:
                    a, b = nrm.scales(G.dtype, G.device)
                    G = G * a[:, None] * b[None, :]
            L = projection_matrix(p, o, name=name, side="left", device=G.device)
            R = projection_matrix(p, i, name=name, side="right", device=G.device)
            (L @ G @ R.T).flatten(1)

        col = GradientCollector(model, project, projection_dim=0, backend="torch")
        dims.update({n: (s.out_features, s.in_features) for n, s in col.layers.items()})

        def step():
            with col:
                loss_of(model).backward()
        return step
    raise ValueError(method)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_subprocess(args, size, method, norm, p) -> float:
    """Peak RSS (MB) of one step of one method, in a fresh process (CPU).

    One warm-up step first (allocator caches, lazily built projections), then the kernel's
    high-water mark is reset (``/proc/self/clear_refs``) so model construction does not count.
    """
    code = (
        "import sys; sys.argv=['x']; sys.path.insert(0, %r)\n"
        "import bench.collect as b, torch\n"
        "torch.set_num_threads(%d)\n"
        "m, ids = b.setup(%r, %d, %d, torch.float32, 'cpu')\n"
        "step = b.make_step(%r, m, ids, %d, b.normalizers_for(m, %r))\n"
        "step(); m.zero_grad(set_to_none=True)\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "step()\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(int(hwm.split()[1]) / 1024)\n"
    ) % (str(ROOT), args.threads, size, args.batch, args.seq, method, p, norm)
    # Large blocks straight from mmap and returned on free: RSS then tracks live tensors instead
    # of whatever glibc's arenas happen to keep.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(r.stdout.strip().splitlines()[-1])


def git_commit() -> str:
    if os.environ.get("BERGSON_COMMIT"):  # a copied tree without .git (e.g. on a lent GPU machine)
        return os.environ["BERGSON_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,17m")
    ap.add_argument("--normalizers", default="none,adafactor,adam")
    ap.add_argument("--p", default="16", help="projection size(s), comma-separated")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    methods = ["train", "floor", "torch", "naive"] + (["triton"] if args.device.startswith("cuda") else [])
    rows = []
    for size in args.sizes.split(","):
        model, ids = setup(size, args.batch, args.seq, dtype, args.device)
        n_params = sum(q.numel() for q in model.parameters())
        for norm, p in [(nm, int(q)) for nm in args.normalizers.split(",") for q in str(args.p).split(",")]:
            norms = normalizers_for(model, norm)
            steps = {m: make_step(m, model, ids, p, norms) for m in methods}
            times = {m: [] for m in methods}
            for r in range(args.warmup + args.rounds):
                for m in methods:  # interleaved: every round runs every method once
                    sync(args.device)
                    t0 = time.perf_counter()
                    steps[m]()
                    sync(args.device)
                    if r >= args.warmup:
                        times[m].append(time.perf_counter() - t0)
            med = {m: statistics.median(v) for m, v in times.items()}

            def paired(num, den):
                """Median and quartiles of the per-round ratio: both steps ran back to back in the
                same round, so slow phases of a shared machine hit numerator and denominator alike."""
                r = sorted(a / b for a, b in zip(times[num], times[den]))
                q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
                return round(q[1], 3), round(q[0], 3), round(q[2], 3)

            for m in methods:
                mem = float("nan")
                if args.memory and not args.device.startswith("cuda"):
                    mem = peak_memory_subprocess(args, size, m, norm, p)
                elif args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                    steps[m]()
                    sync(args.device)
                    mem = torch.cuda.max_memory_allocated() / 2**20
                tokens = ids.numel()
                rows.append({
                    "size": size, "params_m": round(n_params / 1e6, 2), "normalizer": norm, "method": m,
                    "p": p, "tokens": tokens, "median_s": round(med[m], 5),
                    "tokens_per_s": round(tokens / med[m], 1),
                    "train_over_method": paired("train", m)[0],
                    "train_over_method_q25_q75": "%.3f-%.3f" % paired("train", m)[1:],
                    "method_over_floor": paired(m, "floor")[0],
                    "method_over_floor_q25_q75": "%.3f-%.3f" % paired(m, "floor")[1:],
                    "min_s": round(min(times[m]), 5),
                    # ratio of the fastest rounds: on a noisy machine the least disturbed run of each
                    "train_over_method_min": round(min(times["train"]) / min(times[m]), 3),
                    "method_over_floor_min": round(min(times[m]) / min(times["floor"]), 3),
                    "peak_mem_mb": round(mem, 1),
                    "mfu_4flops": round(4 * n_params * tokens / med[m] / 1e12, 4) if m != "train" else None,
                })
                print(json.dumps(rows[-1]), flush=True)
            model.zero_grad(set_to_none=True)
    write_report(args, rows, methods)


def write_report(args, rows, methods):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = machine(args.device)
    tag = "cpu" if not args.device.startswith("cuda") else dev.replace(" ", "_")
    import transformers

    header = (f"machine: {dev}; torch {torch.__version__}; transformers {transformers.__version__}; "
              f"commit {git_commit()}; batch {args.batch}×{args.seq} tokens; p={args.p}; dtype {args.dtype}; "
              f"median of {args.rounds} interleaved rounds; "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY') or 'unset (libgomp default)'}")
    with open(out / f"collect_{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Collection vs training step ({tag})", "", header, "",
             "`train/method` > 1 means the method is cheaper than a training step; `method/floor` is the "
             "overhead over forward + input-gradient-only backward.", "",
             "Ratios are medians of per-round ratios (each round runs every method once, back to back), with "
             "their quartiles, and the ratios of each method's fastest round; tokens/s is from each method's "
             "median time.", "",
             "| size | params (M) | normalizer | p | method | tokens/s | train/method (q25–q75) | method/floor (q25–q75) "
             "| train/method, method/floor of the fastest rounds | peak mem (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['params_m']} | {r['normalizer']} | {r['p']} | {r['method']} | "
                     f"{r['tokens_per_s']:,.0f} | "
                     f"{r['train_over_method']:.3f} ({r['train_over_method_q25_q75']}) | "
                     f"{r['method_over_floor']:.3f} ({r['method_over_floor_q25_q75']}) | "
                     f"{r['train_over_method_min']:.3f}, {r['method_over_floor_min']:.3f} | {r['peak_mem_mb']} |")
    lines += ["", f"Regenerate: `python bench/collect.py --sizes {args.sizes} --normalizers {args.normalizers} "
              f"--p {args.p} --rounds {args.rounds} --threads {args.threads}`", ""]
    (out / f"collect_{tag}.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        p0 = int(str(args.p).split(",")[0])
        sub = [r for r in rows if r["normalizer"] == args.normalizers.split(",")[0] and r["p"] == p0]
        for m in methods:
            pts = [(r["params_m"], r["tokens_per_s"]) for r in sub if r["method"] == m]
            ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("parameters (M)"), ax.set_ylabel("tokens/s")
        ax.set_title(f"{dev}\nnormalizer={args.normalizers.split(',')[0]}, p={p0}", fontsize=8)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"collect_{tag}.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot written", file=sys.stderr)
    print(f"wrote {out / f'collect_{tag}.md'}")


if __name__ == "__main__":
    main()
