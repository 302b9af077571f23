"""MoE glue for the grouped-GEMM (prefill and large-batch) path, fused where PyTorch would take several passes.

``silu_mul_scale(gate, up, weights)`` is ``silu(gate) * up * weights[:, None]``: three elementwise kernels and two
intermediate tensors in PyTorch (~7 passes over a (tokens * k, I) activation, 8 ms of an 8K-token prefill on the
H100), one pass in the Triton kernel. ``silu_mul_scale_torch`` is the reference, which CPU tests and non-CUDA
tensors run; ``KIMIRAY_TRITON=0`` forces it everywhere.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from engine.kernels import first_working, use_triton

_broken: set[str] = set()  # the kernel failed to build or launch here once: the reference from then on


def silu_mul_scale_torch(gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up * weights


def silu_mul_scale(gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """gate, up: (N, I); weights: (N, 1) in the activations' dtype. Returns (N, I) in that dtype."""
    if use_triton(gate) and gate.shape[0] > 0:
        from engine.kernels import triton_moe

        return first_working(_broken, [("silu_mul_scale", triton_moe.silu_mul_scale)], silu_mul_scale_torch,
                             gate, up, weights)
    return silu_mul_scale_torch(gate, up, weights)
