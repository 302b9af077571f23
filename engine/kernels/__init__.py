"""Fused kernels for the small-batch decode step, each with a plain PyTorch path.

``engine.kernels.decode`` holds the operations (fused residual add + RMSNorm, MLA decode prologue and latent
attention, router top-k, the small-batch MoE expert GEMVs). Each dispatches to a Triton kernel
(``engine.kernels.triton_decode``) for CUDA tensors when Triton is importable, and otherwise runs the PyTorch
reference next to it, which is what CPU tests run. ``KIMIRAY_TRITON=0`` forces the PyTorch paths everywhere.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)


@functools.cache
def triton_available() -> bool:
    if os.environ.get("KIMIRAY_TRITON", "1") == "0" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_device(x: torch.Tensor) -> bool:
    """Triton kernels may run on ``x``'s device: a CUDA tensor with Triton importable. The one device gate of
    every "auto" dispatch (tests/triton_interpret_engine_checks.py replaces it to run the kernels on CPU
    tensors under ``TRITON_INTERPRET=1``)."""
    return x.is_cuda and triton_available()


def use_triton(x: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors of 16-bit float models (fp32 models keep the PyTorch paths)."""
    return x.dtype in (torch.bfloat16, torch.float16) and triton_device(x)


def first_working(broken: set[str], candidates: Iterable[tuple[str, Callable[..., Any]]],
                  reference: Callable[..., Any], *args: Any) -> Any:
    """``candidates`` are ``(name, kernel)`` pairs in order of preference: the first whose name is not in
    ``broken`` runs; one that raises (a build or launch failure, before anything is written) is logged once,
    added to ``broken`` and the next tried; the PyTorch ``reference`` answers when none is left. Every family of
    kernels (decode, MoE glue, FP8, prefill attention) falls back through this, each with its own ``broken``."""
    for name, kernel in candidates:
        if name in broken:
            continue
        try:
            return kernel(*args)
        except Exception:  # noqa: BLE001 - any build/launch failure falls back
            log.exception("kernel %s failed here; not using it from now on", name)
            broken.add(name)
    return reference(*args)
