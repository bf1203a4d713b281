"""The documentation site builds with warnings as errors (`make docs`), API reference included."""

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reference = (tmp_path / "site" / "api" / "trainers" / "index.html").read_text()
    assert "GenericDistillationTrainer" in reference and "compute_loss" in reference
    assert (tmp_path / "site" / "method" / "index.html").exists()
