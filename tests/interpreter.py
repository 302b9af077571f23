"""Running a check script under Triton's interpreter (CPU tensors), for the kernels' tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_interpret_checks(script: str, *args: str, timeout: int = 300) -> str:
    """Run ``tests/<script>`` with TRITON_INTERPRET=1 in a subprocess (it must be set before triton is first
    imported) and return its stdout; the test fails with the script's output if it exits non-zero, and is skipped
    where Triton is not installed."""
    pytest.importorskip("triton")
    path = Path(__file__).with_name(script)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(path.parent.parent)}
    done = subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
