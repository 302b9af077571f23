"""Triton kernel behind ``engine.kernels.moe.silu_mul_scale`` (CUDA only)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_scale_kernel(g_ptr, u_ptr, w_ptr, out_ptr, n_cols, stride_g, stride_u, stride_o,
                           BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + row).to(tl.float32)
    h = g / (1.0 + tl.exp(-g)) * u * w
    tl.store(out_ptr + row * stride_o + offs, h.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_scale(gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    rows, cols = gate.shape
    assert up.shape == gate.shape and gate.stride(-1) == 1 and up.stride(-1) == 1
    w = weights.reshape(rows)
    if w.stride(0) != 1:
        w = w.contiguous()
    out = torch.empty_like(gate)
    block = min(1024, triton.next_power_of_2(cols))
    _silu_mul_scale_kernel[(rows, triton.cdiv(cols, block))](
        gate, up, w, out, cols, gate.stride(0), up.stride(0), out.stride(0), BLOCK=block, num_warps=4,
    )
    return out
