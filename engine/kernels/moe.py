"""MoE glue for the grouped-GEMM (prefill and large-batch) path, fused where PyTorch would take several passes.

``silu_mul_scale(gate, up, weights)`` is ``silu(gate) * up * weights[:, None]``: three elementwise kernels and two
intermediate tensors in PyTorch (~7 passes over a (tokens * k, I) activation, 8 ms of an 8K-token prefill on the
H100), one pass in the Triton kernel; with ``weights`` None it is the shared experts' ``silu(gate) * up``.
``combine(outputs, inverse, top_k, shared)`` sums each token's k expert rows (and adds the shared experts' output):
in PyTorch a gather copy of every row, an fp32 sum, a cast and an add (~600 MB of traffic a layer for an 8K
prefill), one pass in the Triton kernel. ``dispatch(ids, weights, E, dtype)`` groups the (token, slot) pairs by
expert for the grouped GEMMs (each pair's token and routing weight in expert order, the experts' cumulative
ends, and the inverse permutation ``combine`` takes): in PyTorch ~20 launches a layer around a stable radix argsort
(73 µs a layer alone for an 8K prefill on the H100, plus the launch gaps), a two-launch counting sort in Triton. The
``*_torch`` functions are the references, which CPU tests and non-CUDA tensors run; ``KIMIRAY_TRITON=0`` forces
them everywhere.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from engine import kernels
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


def dispatch_torch(ids: torch.Tensor, weights: torch.Tensor, n_experts: int, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    top_k = ids.shape[1]
    flat = ids.flatten().long()  # int32 ids too (scatter_add_ counts in int64); a no-op for int64
    order = flat.argsort(stable=True)
    # scatter_add, not bincount: bincount's output size depends on the data (a host sync, no CUDA-graph capture)
    counts = torch.zeros(n_experts, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=ids.device)
    return order // top_k, weights.flatten()[order].to(dtype)[:, None], counts.cumsum(0).to(torch.int32), inverse


def dispatch(ids: torch.Tensor, weights: torch.Tensor, n_experts: int, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (T, k) expert ids in [0, E) (int32 or int64), weights (T, k) the routing weights -> the pairs grouped
    by expert: tokens (T·k,) int64, the token of each pair in expert order (a stable order: one expert's pairs in
    flat order t·k + j); row_weights (T·k, 1) in ``dtype``, that pair's weight; offsets (E,) int32, each expert's
    cumulative end (``F.grouped_mm``'s ``offs``); inverse (T·k,) int64, the row of pair (t, j) at t·k + j (what
    :func:`combine` takes). Exact (integers and a gather), so the Triton kernel gives :func:`dispatch_torch`'s
    bits; it runs where the other MoE kernels do (16-bit activations on a Triton device). No host sync: sizes
    come from the input's shape alone."""
    if dtype in (torch.bfloat16, torch.float16) and kernels.triton_device(weights) and ids.numel() > 0:
        from engine.kernels import triton_moe

        return first_working(_broken, [("moe_dispatch", triton_moe.dispatch)], dispatch_torch, ids, weights,
                             n_experts, dtype)
    return dispatch_torch(ids, weights, n_experts, dtype)
