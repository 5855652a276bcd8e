"""Imports only run downward: import-linter's contracts in pyproject.toml (README, Design: the layer chain over
every top-level package; product code never imports the tests or the benchmarks)."""
import subprocess
import sys
from pathlib import Path

from tests.support.harness import REPO


def test_import_layers_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
