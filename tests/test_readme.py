"""The README's Python examples run as written (against the embedded default model)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("\n## ")[0]
    assert "bash scripts/demo.sh" in head and "bash scripts/test.sh" in head


@pytest.mark.parametrize("k", range(len(python_blocks())))
def test_readme_python_example_runs(k, tmp_path, monkeypatch):
    code = python_blocks()[k]
    if "runs/default" in code:  # the index the first README command builds: build a small one here
        from bergson.__main__ import main

        out = tmp_path / "default"
        assert main([str(out), "--max_examples", "40", "--no-progress", "--projection_dim", "4"]) == 0
        code = code.replace("runs/default", str(out))
    code = code.replace("/tmp/normalizers.safetensors", str(tmp_path / "n.safetensors"))
    exec(compile(code, f"README block {k}", "exec"), {"__name__": "readme"})
