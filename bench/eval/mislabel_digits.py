"""Mislabel detection on real handwritten digits (scikit-learn's bundled ``load_digits``, offline).

A small MLP is trained on the training split with 10% of its labels flipped; training examples
are then ranked by **self-influence**: the squared norm of the example's preconditioned gradient
feature *before* unit normalization (unit-normalized self-scores are all 1).  Reported: AUROC of
that ranking for finding the flipped labels, and the share of flipped labels in the top 10% and
20%, for several features (raw gradient, Adam-normalized from the optimizer's state, and
TrackStar's ``R^{-1/2}``), with the per-example loss as a baseline.

    python bench/eval/mislabel_digits.py [--projection_dim 32] [--epochs 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_common import write_report  # noqa: E402


def split_and_flip(y: torch.Tensor, n_classes: int, flip: float, seed: int):
    """Seeded 80/20 split; ``flip`` of the training labels moved to a different class."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_train = int(0.8 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    y_noisy = y[tr].clone()
    flipped = torch.zeros(n_train, dtype=torch.bool)
    idx = torch.randperm(n_train, generator=g)[: int(flip * n_train)]
    y_noisy[idx] = (y_noisy[idx] + torch.randint(1, n_classes, (len(idx),), generator=g)) % n_classes
    flipped[idx] = True
    return tr, te, y_noisy, flipped


def data(seed: int, flip: float):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    tr, te, y_noisy, flipped = split_and_flip(y, 10, flip, seed)
    return x[tr], y_noisy, flipped, x[te], y[te]


def train(x, y, epochs: int, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def detection(scores: torch.Tensor, flipped: torch.Tensor) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    order = torch.argsort(scores, descending=True)
    n = len(scores)
    out = {"auroc": float(roc_auc_score(flipped.numpy(), scores.numpy()))}
    for frac in (0.1, 0.2):
        top = order[: int(frac * n)]
        out[f"found@{int(frac * 100)}%"] = flipped[top].sum().item() / flipped.sum().item()
    return out


def self_influence(features, losses, flipped, adam_normalizers) -> dict[str, dict[str, float]]:
    """Detection by the loss and by self-influence ``‖feature‖²`` of raw, Adam-normalized and
    TrackStar-preconditioned (``R^-1/2``) features; ``features(normalizers) -> (feats, layout)``."""
    from bergson.score import Autocorrelation, build_preconditioner

    results = {"loss": detection(losses, flipped)}
    raw, layout = features(None)
    results["raw ‖g‖²"] = detection(raw.pow(2).sum(1), flipped)
    adam, _ = features(adam_normalizers)
    results["adam ‖g‖²"] = detection(adam.pow(2).sum(1), flipped)
    for name, feats in (("trackstar (raw)", raw), ("trackstar (adam)", adam)):
        acc = Autocorrelation(layout)
        acc.update(feats)
        pre = build_preconditioner(layout, acc.result(), damping=1e-3).apply(feats)
        results[f"{name} ‖R^-1/2 g‖²"] = detection(pre.pow(2).sum(1), flipped)
    return results


def detection_report(header: str, results: dict) -> str:
    """``header`` and a markdown table of the detection results."""
    rows = [f"| {k} | {v['auroc']:.3f} | {v['found@10%']:.3f} | {v['found@20%']:.3f} |" for k, v in results.items()]
    return "\n".join([header, "", "| self-influence | AUROC | flipped found in top 10% | in top 20% |", "|---|---|---|---|", *rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--projection_dim", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--flip", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.perf_counter()

    import bergson

    x, y, flipped, xt, yt = data(args.seed, args.flip)
    model, opt = train(x, y, args.epochs, args.seed)
    model.eval()
    with torch.no_grad():
        test_acc = (model(xt).argmax(1) == yt).float().mean().item()
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")

    def features(normalizers):
        with bergson.GradientCollector(model, projection_dim=args.projection_dim, normalizers=normalizers) as col:
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        return col.flat_gradients(), col.layout

    results = self_influence(features, losses, flipped, bergson.normalizers_from_optimizer(model, opt))
    wall = time.perf_counter() - t0
    lines = [
        f"Digits mislabel detection: {len(y)} training images, {int(flipped.sum())} flipped labels "
        f"({args.flip:.0%}); MLP 64-128-10 trained {args.epochs} epochs (test accuracy {test_acc:.3f}); "
        f"p={args.projection_dim}; {wall:.1f} s wall; torch {torch.__version__}",
    ]
    report = detection_report(lines[0], results)
    print(report)
    write_report(args.out, "Mislabel detection (digits)", __file__, argv, report)
    return results


if __name__ == "__main__":
    main()
