"""MoE glue for the grouped-GEMM (prefill and large-batch) path, fused where PyTorch would take several passes.

``silu_mul_scale(gate, up, weights)`` is ``silu(gate) * up * weights[:, None]``: three elementwise kernels and two
intermediate tensors in PyTorch (~7 passes over a (tokens * k, I) activation, 8 ms of an 8K-token prefill on the
H100), one pass in the Triton kernel; with ``weights`` None it is the shared experts' ``silu(gate) * up``.
``combine(outputs, inverse, top_k, shared)`` sums each token's k expert rows (and adds the shared experts' output):
in PyTorch a gather copy of every row, an fp32 sum, a cast and an add (~600 MB of traffic a layer for an 8K
prefill), one pass in the Triton kernel. The ``*_torch`` functions are the
references, which CPU tests and non-CUDA tensors run; ``KIMIRAY_TRITON=0`` forces them everywhere.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from engine.kernels import first_working, use_triton

_broken: set[str] = set()  # the kernel failed to build or launch here once: the reference from then on


def silu_mul_scale_torch(gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    hidden = F.silu(gate) * up
    return hidden if weights is None else hidden * weights


def silu_mul_scale(gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """gate, up: (N, I) (row-strided views are fine); weights: (N, 1) in the activations' dtype, or None (a dense
    SwiGLU: the shared experts). Returns (N, I) in that dtype."""
    if use_triton(gate) and gate.shape[0] > 0:
        from engine.kernels import triton_moe

        return first_working(_broken, [("silu_mul_scale", triton_moe.silu_mul_scale)], silu_mul_scale_torch,
                             gate, up, weights)
    return silu_mul_scale_torch(gate, up, weights)


def combine_torch(outputs: torch.Tensor, inverse: torch.Tensor, top_k: int,
                  shared: torch.Tensor | None = None) -> torch.Tensor:
    routed = outputs[inverse].view(inverse.numel() // top_k, top_k, -1).sum(dim=1, dtype=torch.float32)
    routed = routed.to(outputs.dtype)
    return routed if shared is None else routed + shared


def combine(outputs: torch.Tensor, inverse: torch.Tensor, top_k: int,
            shared: torch.Tensor | None = None) -> torch.Tensor:
    """outputs (T·k, D): the expert rows in expert order; inverse (T·k,): where (token t, slot j)'s row is, at
    t·k + j; shared (T, D) or None. Returns (T, D) in outputs' dtype: Σ_j outputs[inverse[t·k + j]] in fp32, rounded
    once, then + shared rounded as the unfused add rounds it (the same numbers as :func:`combine_torch`)."""
    if use_triton(outputs) and outputs.shape[0] > 0:
        from engine.kernels import triton_moe

        return first_working(_broken, [("moe_combine", triton_moe.combine)], combine_torch, outputs, inverse, top_k,
                             shared)
    return combine_torch(outputs, inverse, top_k, shared)
