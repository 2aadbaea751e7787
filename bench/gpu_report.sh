#!/usr/bin/env bash
# The one prepared GPU check, for a session that is lent a CUDA machine (the device tool): run it
# once, from the repository root, with the machine's own python3 (it needs torch, triton and
# transformers; not `datasets`), then commit $OUT's reports under bench/results/:
#
#   BERGSON_COMMIT=$(git rev-parse --short HEAD) OUT=$OUT bash bench/gpu_report.sh
#
# 1. versions and GPU name;
# 2. collection on the GPU: triton vs torch backend on the same bf16 Llama and batch (relative
#    error of the features, Adafactor and Adam), so the timings below are of correct kernels;
# 3. bench/bench_kernels.py: every kernel vs its reference and the naive path on real layer shapes,
#    with its own correctness check;
# 4. bench/collect.py: train step, floor, torch, triton and naive collection side by side, bf16,
#    Llama 17M / 100M / 1B built from config, batch 8×1024 tokens, with MFU at 4 FLOPs/param/token.
# Each step has its own timeout so one slow part cannot eat the whole lease (about 8 minutes in all).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_report}
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-17m,100m,1b}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
  echo "commit ${BERGSON_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

echo "== collection: triton vs torch backend"
timeout 120 $PY - "$DEVICE" > "$OUT/collect_equivalence.txt" 2>&1 <<'EOF'
import sys
import torch
import bench.collect as b
from bergson import GradientCollector
from bergson.data import per_example_loss

device = sys.argv[1]
model, ids = b.setup("17m", 4, 256, torch.bfloat16, device)
for kind in ("adafactor", "adam"):
    norms = b.normalizers_for(model, kind)
    feats = {}
    for backend in ("torch", "triton") if device == "cuda" else ("torch",):
        col = GradientCollector(model, projection_dim=16, normalizers=norms, backend=backend)
        with col:
            per_example_loss(model(input_ids=ids).logits, ids).sum().backward()
        feats[backend] = col.flat_gradients().double()
    if "triton" in feats:
        err = ((feats["triton"] - feats["torch"]).norm() / feats["torch"].norm()).item()
        print(f"{kind}: relative error triton vs torch {err:.2e} ({'ok' if err < 2e-2 else 'FAILED'})")
    else:
        print(f"{kind}: no CUDA device, torch backend only ({feats['torch'].shape})")
EOF
echo "rc=$?" >> "$OUT/collect_equivalence.txt"
cat "$OUT/collect_equivalence.txt"

if [ "$DEVICE" = cuda ]; then
  echo "== kernels"
  timeout 150 $PY bench/bench_kernels.py --out "$OUT" > "$OUT/bench_kernels.log" 2>&1
  echo "rc=$?" >> "$OUT/bench_kernels.log"
  tail -5 "$OUT/bench_kernels.log"
fi

echo "== collection vs training step"
timeout 330 $PY bench/collect.py --device "$DEVICE" --dtype bfloat16 --sizes "$SIZES" --normalizers adafactor \
  --p 16 --batch 8 --seq 1024 --rounds 7 --warmup 2 --out "$OUT" > "$OUT/collect.log" 2>&1
echo "rc=$?" >> "$OUT/collect.log"
tail -3 "$OUT/collect.log"
