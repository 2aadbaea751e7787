"""What the evaluation scripts share: writing a markdown report with the command that regenerates it."""

from __future__ import annotations

import sys
from pathlib import Path


def write_report(out: str | None, title: str, script: str, argv: list[str] | None, body: str) -> None:
    """Write ``# title``, the command that regenerates the report and ``body`` to ``out`` (if given)."""
    if not out:
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    cmd = f"python bench/eval/{Path(script).name} " + " ".join(sys.argv[1:] if argv is None else argv)
    Path(out).write_text(f"# {title}\n\nRegenerate: `{cmd}`\n\n{body}\n")
