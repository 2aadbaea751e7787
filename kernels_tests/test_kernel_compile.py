"""Compile every kernel for an sm_90 GPU without a GPU (Triton AOT: TTIR → PTX → cubin via the
bundled ptxas).  The interpreter runs the kernels as Python, so this is the only CPU check of the
compiled path: constexpr branches, dtype rules of ``tl.dot``, int64 offsets, shared memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import bergson_kernels
from bergson_kernels.triton_support import is_interpreted

mods = {m: sys.modules["bergson_kernels." + m] for m in ("project_scale", "outer_project", "adam_tile")}
dt_name = sys.argv[1]
DT = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dt_name]
DT2 = tl.bfloat16 if dt_name == "bf16" else tl.float32
kernels = [
    (mods["project_scale"]._project_scale_kernel, mods["project_scale"].CONFIGS[0],
     dict(x=dt_name, R="fp32", beta="fp32", out="fp32"), dict(HAS_COL_SCALE=True, DT=DT, BQ=64)),
    (mods["outer_project"]._outer_project_kernel, mods["outer_project"].CONFIGS[0],
     dict(delta=dt_name, x_tilde="fp32", L="fp32", alpha="fp32", cu_seqlens="i32", out="fp32"),
     dict(HAS_ROW_SCALE=True, DT=DT, DT2=DT2, BP=32, BQ=16)),
    (mods["adam_tile"]._adam_project_kernel, mods["adam_tile"].CONFIGS[0],
     dict(delta=dt_name, x=dt_name, v="fp32", L="fp32", R=dt_name, cu_seqlens="i64", out="fp32"),
     dict(DT=DT, DT2=DT2, BP=64, BQ=16)),
]
target = GPUTarget("cuda", 90, 32)
for fn, cfg, ptrs, consts in kernels:
    assert not is_interpreted(fn)
    consts = dict(consts, EMULATE_BF16=False, **cfg.kwargs)
    sig = {}
    for name in fn.arg_names:
        kind = "constexpr" if name in consts else "fp32" if name == "eps" else "i32"
        sig[name] = "*" + ptrs[name] if name in ptrs else kind
    k = triton.compile(ASTSource(fn, sig, consts), target=target,
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    assert k.asm["cubin"], fn.__name__
    print(fn.__name__, "ok", k.metadata.shared)
"""


def _ptxas_available() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas is missing")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_sm90(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, dtype], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" ok ") == 3, proc.stdout
