"""Where the Triton kernels can run, and the errors where they cannot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bergson_kernels
from bergson_kernels import adam_project, outer_project, project_scale, triton_status
from bergson_kernels._validate import new_output
from bergson_kernels.triton_support import INTERPRET_HINT

REPO = Path(__file__).resolve().parents[1]


def test_interpreter_on_cpu_is_available():
    assert bergson_kernels.HAS_TRITON
    assert triton_status("cpu") is None
    kernel = sys.modules["bergson_kernels.project_scale"]._project_scale_kernel
    assert triton_status(torch.device("cpu"), kernel=kernel) is None


@pytest.mark.parametrize("value", ["0", None], ids=["TRITON_INTERPRET=0", "TRITON_INTERPRET-unset"])
@pytest.mark.parametrize(
    "call",
    [
        lambda: project_scale(torch.randn(4, 8), torch.randn(2, 8)),
        lambda: outer_project(torch.randn(4, 8), torch.randn(4, 2), torch.randn(3, 8), torch.tensor([0, 4])),
        lambda: adam_project(
            torch.randn(4, 8),
            torch.randn(4, 5),
            torch.randn(3, 8),
            torch.randn(2, 5),
            torch.rand(8, 5),
            torch.tensor([0, 4]),
        ),
    ],
    ids=["project_scale", "outer_project", "adam_project"],
)
def test_cpu_without_interpreter_is_a_clear_error(call, value, monkeypatch):
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_status("cpu") == INTERPRET_HINT
    with pytest.raises(
        RuntimeError, match="set TRITON_INTERPRET=1 to run Triton kernels on CPU through the interpreter"
    ):
        call()


def test_other_accelerators_are_reported():
    reason = triton_status("mps")
    assert reason is not None and "'mps'" in reason


def test_interpreter_flag_set_after_import_is_reported():
    import triton

    def kernel_fn(x):  # a compiled (not interpreted) kernel, as if imported without TRITON_INTERPRET
        pass

    compiled = triton.runtime.jit.JITFunction(kernel_fn)
    assert "set it before the first import" in triton_status("cpu", kernel=compiled)


def test_import_without_triton_gives_stubs():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, bergson_kernels as bk\n"
        "assert not bk.HAS_TRITON\n"
        "assert 'Triton is not importable' in bk.triton_status('cuda')\n"
        "try:\n"
        "    bk.outer_project(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([0, 1]))\n"
        "except RuntimeError as e:\n"
        "    assert 'Triton is not importable' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "bk.reference.project_scale(torch.ones(2, 3), torch.ones(4, 3))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_debug_fill_allocates_nan(monkeypatch):
    monkeypatch.setenv("BERGSON_KERNELS_DEBUG_FILL", "1")
    assert torch.isnan(new_output((2, 3), torch.device("cpu"))).all()
