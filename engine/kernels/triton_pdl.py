"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

A decode step at small batch is a chain of ~12 small kernels a layer, each paying a few µs of launch and
ramp-up before its first useful load. Launched with PDL, a kernel may start while the previous one in the
stream is still finishing: its programs do what reads only weights (the one-row GEMVs load their first weight
tile), then call :func:`wait_and_release`: it blocks until the previous kernel has finished and its writes are
visible, then lets the next kernel's programs be scheduled. Every program calls it before it reads anything an
earlier kernel wrote and before it writes anything (a buffer it writes may still be read by the kernel before
it), so the stream's order holds for the data. What a kernel reads before it must not have been written by the
kernel right before (weights loaded with the model are; a cast or copy made just before in the same step would
not be). Kernels of other libraries (cuBLAS) in between simply run in stream order.

``KIMIRAY_PDL=0`` turns it off (launches as before; the kernels' waits compile away).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: PDL stays off and the calls below are never compiled
    gdc_launch_dependents = gdc_wait = None

log = logging.getLogger(__name__)


@functools.cache
def _triton_launches_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return gdc_wait is not None and "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}


@functools.cache
def _device_supports(index: int) -> bool:
    """Hopper or later, and a PDL launch goes through here (the driver takes the launch attribute): probed once
    per device with a one-program kernel; if it fails, the decode kernels launch as before."""
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        _probe_kernel[(1,)](torch.zeros(1, dtype=torch.int32, device=f"cuda:{index}"), PDL=True, launch_pdl=True)
    except Exception:  # noqa: BLE001 - any launch failure means: no PDL here
        log.exception("programmatic dependent launch failed on cuda:%d; decode kernels launch without it", index)
        return False
    return True


def enabled(x: torch.Tensor) -> bool:
    """PDL for kernels on ``x``'s device: a Hopper-or-later CUDA device, a Triton that launches with it, not the
    interpreter, not turned off."""
    if not x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1" or os.environ.get("KIMIRAY_PDL", "1") == "0":
        return False
    return _triton_launches_pdl() and _device_supports(x.device.index if x.device.index is not None
                                                       else torch.cuda.current_device())


def launch_options(x: torch.Tensor) -> dict:
    """Keyword arguments of a kernel launch on ``x``'s device: ``PDL`` (the kernel's constexpr) and, where it is
    on, ``launch_pdl``."""
    return {"PDL": True, "launch_pdl": True} if enabled(x) else {"PDL": False}


@triton.jit
def wait_and_release(PDL: tl.constexpr):
    """Block until the previous kernel in the stream has finished and its writes are visible, then let the next
    kernel's programs start (they run until their own wait); no-op without PDL. Every program of a kernel
    launched with PDL calls it once, before it reads anything an earlier kernel wrote or writes anything."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _probe_kernel(x_ptr, PDL: tl.constexpr):
    wait_and_release(PDL)
    tl.store(x_ptr + tl.arange(0, 1), tl.full([1], 1, tl.int32))
