"""bench/bench_kernels.py --smoke runs end to end on CPU through the interpreter."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke_writes_results(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_kernels.py"), "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    csv_path = tmp_path / "kernels_cpu-interpreter.csv"
    assert csv_path.exists() and (tmp_path / "kernels_cpu-interpreter.md").exists()
    rows = list(csv.DictReader(csv_path.open()))
    assert {r["impl"] for r in rows} == {"torch", "triton", "naive"}
    assert {r["method"] for r in rows} == {"factored", "adam"}
    assert all(r["status"] == "ok (interpreter, not kernel speed)" for r in rows)
    assert all(float(r["ms_p50"]) > 0 for r in rows)
    for r in rows:  # the script's own check: bf16 inputs, fp32 accumulation, vs the reference
        err = float(r["rel_err_vs_torch"])
        assert err == 0 if r["impl"] == "torch" else 0 <= err < 2e-2, r
    assert "interpreter, not kernel speed" in (tmp_path / "kernels_cpu-interpreter.md").read_text()
