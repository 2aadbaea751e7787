#!/usr/bin/env bash
# Set everything up and run the main job on the embedded default model and corpus (CPU, offline):
# build the gradient index of every training document into runs/default, then trace one of the
# corpus's facts back to the training documents that taught it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# sum_log: each document token weighed by 1/loss, so the facts a document teaches dominate its gradient
.venv/bin/bergson build runs/default --overwrite --loss_reduction sum_log "$@"
# Query 0 of the default corpus; its gold documents (the ones stating this fact) are rows 218, 1235, 1391, 1625,
# which come out at ranks 1-4.
.venv/bin/bergson query runs/default --prompt "Ello Fismalter lives in" --completion " Tamsford" --top_k 10
