"""Smoke test of the side-by-side benchmark script (``bench/collect.py``): every method runs on
the same model and batch, the report and CSV are written, and the paired ratios are consistent.
No timing is asserted (CI machines are shared); the figures live in ``bench/results/``."""

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_collect", ROOT / "bench" / "collect.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_collect_bench_writes_paired_report(bench, tmp_path):
    pytest.importorskip("transformers")
    bench.main(["--sizes", "tiny", "--normalizers", "adafactor,none", "--p", "4,8", "--rounds", "3",
                "--warmup", "1", "--threads", "1", "--no-memory", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "collect_cpu.csv")))
    combos = {(r["normalizer"], r["p"]) for r in rows}
    assert combos == {("adafactor", "4"), ("adafactor", "8"), ("none", "4"), ("none", "8")}
    assert {r["method"] for r in rows} == {"train", "floor", "torch", "naive"}
    assert len(rows) == 16
    for r in rows:
        assert float(r["tokens_per_s"]) > 0 and float(r["median_s"]) > 0
        lo, hi = map(float, r["train_over_method_q25_q75"].split("-"))
        assert lo <= float(r["train_over_method"]) <= hi
        if r["method"] == "train":  # a step's ratio to itself, round by round
            assert float(r["train_over_method"]) == 1.0 and r["train_over_method_q25_q75"] == "1.000-1.000"
        if r["method"] == "floor":
            assert float(r["method_over_floor"]) == 1.0 and float(r["method_over_floor_min"]) == 1.0
        assert float(r["min_s"]) <= float(r["median_s"])
        assert float(r["train_over_method_min"]) == pytest.approx(
            float(next(t["min_s"] for t in rows if t["method"] == "train" and t["normalizer"] == r["normalizer"]
                       and t["p"] == r["p"])) / float(r["min_s"]), abs=2e-3)
    md = (tmp_path / "collect_cpu.md").read_text()
    assert "| tiny |" in md and "train/method (q25–q75)" in md and "--p 4,8" in md


def test_pipeline_bench_writes_its_report(tmp_path):
    """bench/pipeline.py: collect_gradients end to end vs bare collector steps, alternated."""
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "bench" / "pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    median = mod.main(["--size", "tiny", "--docs", "8", "--batch", "4", "--seq", "16", "--p", "4",
                       "--rounds", "3", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)])
    md = (tmp_path / "pipeline_cpu.md").read_text()
    ratios = [float(line.split("|")[4]) for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(ratios) == 3 and all(r > 0 for r in ratios)
    assert median == pytest.approx(sorted(ratios)[1], abs=1e-3)  # the median of three rounds
    assert "8 documents × 16 tokens" in md and f"**{median:.3f}**" in md
