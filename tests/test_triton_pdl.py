"""When the decode kernels launch with programmatic dependent launch (engine.kernels.triton_pdl): only on CUDA
devices that take it, never under the interpreter or with KIMIRAY_PDL=0, and the kernels' waits compile away
otherwise (the probe kernel runs with PDL off on CPU tensors under the interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


def test_cpu_tensors_launch_without_pdl(monkeypatch) -> None:
    from engine.kernels import triton_pdl

    monkeypatch.delenv("KIMIRAY_PDL", raising=False)
    assert not triton_pdl.enabled(torch.zeros(1))
    assert triton_pdl.launch_options(torch.zeros(1)) == {"PDL": False}


def test_switched_off_by_environment(monkeypatch) -> None:
    from engine.kernels import triton_pdl

    monkeypatch.setenv("KIMIRAY_PDL", "0")
    probe = torch.zeros(1, device="cuda") if torch.cuda.is_available() else torch.zeros(1)
    assert triton_pdl.launch_options(probe) == {"PDL": False}


def test_kernel_waits_compile_away_in_the_interpreter() -> None:
    code = ("import torch\nfrom engine.kernels import triton_pdl as p\nx = torch.zeros(1, dtype=torch.int32)\n"
            "assert p.launch_options(x) == {'PDL': False}\np._probe_kernel[(1,)](x, PDL=False)\nprint(int(x[0]))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hopper_launches_with_pdl() -> None:
    from engine.kernels import triton_pdl

    x = torch.zeros(1, device="cuda")
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert triton_pdl.enabled(x) == (hopper and os.environ.get("KIMIRAY_PDL", "1") != "0")
