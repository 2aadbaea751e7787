"""The fact-tracing evaluation: its metric on a hand-made case, and a smoke run on the default."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "eval" / "fact_tracing.py"


@pytest.fixture(scope="module")
def ft():
    spec = importlib.util.spec_from_file_location("fact_tracing", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ranking_metrics_by_hand(ft):
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.0, 0.2, 0.4, 0.8]])
    gold = [[2, 3], [0]]  # query 0: gold at ranks 2 and 3; query 1: gold at rank 4
    m = ft.ranking_metrics(scores, gold, k=2)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert m["recall@2"] == pytest.approx((1 / 2 + 0) / 2)


def test_fact_tracing_smoke(ft, tmp_path):
    pytest.importorskip("bm25s")
    res = ft.main(["--queries", "40", "--index", str(tmp_path / "idx"), "--projection_dim", "8"])
    # measured: trackstar 0.17, inner 0.08, trackstar (sum_log) 0.97, bm25 0.95, random 0.03
    assert res["trackstar"]["mrr"] > 3 * res["random"]["mrr"]
    assert res["trackstar"]["mrr"] > res["inner"]["mrr"]
    assert res["bm25"]["mrr"] > 3 * res["random"]["mrr"]
    # weighing each document token by 1/loss is what lets gradients find the fact's documents
    assert res["trackstar (sum_log)"]["mrr"] > 3 * res["trackstar"]["mrr"]
    assert res["trackstar (sum_log)"]["mrr"] > 0.9
    assert res["trackstar (sum_log)"]["mrr"] > res["bm25"]["mrr"] - 0.03


def test_recall_curve_by_hand(ft):
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    assert ft.recall_curve(scores, [[2, 1]], [1, 2, 4]) == pytest.approx([0.0, 0.5, 1.0])


def test_digits_mislabel_detection_smoke():
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("mislabel_digits", SCRIPT.with_name("mislabel_digits.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--epochs", "150", "--projection_dim", "16"])
    for name, r in res.items():
        assert r["auroc"] > 0.9, (name, r)  # random ranking: 0.5
    assert res["trackstar (adam) ‖R^-1/2 g‖²"]["found@20%"] > 0.8
