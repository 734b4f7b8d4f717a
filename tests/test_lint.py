"""ruff, with pyproject.toml's [tool.ruff] rules, finds nothing in the code or the notebooks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINTED = ("shortlab", "tests", "bench", "scripts", "notebooks")


def test_ruff_check_is_clean():
    # --no-cache: several people run the tests in one checkout; nothing is written into it.
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *LINTED],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"ruff check {' '.join(LINTED)}:\n{result.stdout}{result.stderr}"
