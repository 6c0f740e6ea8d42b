"""The examples a user copies actually run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_own_model_example_trains_exports_validates_and_runs(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "own_model.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation passed" in result.stdout
    assert (tmp_path / "my_model.onnx").is_file()
