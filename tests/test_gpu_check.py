"""benchmarks/gpu_check.sh on a machine without a GPU: one line, exit 3, nothing run or written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_gpu(), reason="this machine has a CUDA GPU: the script would run its checks")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_3(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.count("\n") == 1 and "no CUDA GPU" in done.stdout and not done.stderr
    assert not out.exists()


def test_without_an_output_folder_it_shows_its_usage():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr
