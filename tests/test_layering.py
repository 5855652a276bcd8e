"""Imports only run downward: import-linter's contracts in pyproject.toml (start-up wiring -> HTTP edge
-> engine -> shared settings/metrics -> router -> adapters; the engine never reads the server settings)."""
import subprocess
import sys
from pathlib import Path

from loadtests.harness import REPO


def test_import_layers_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
