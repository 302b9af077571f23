"""Triton kernels behind ``engine.kernels.moe`` (CUDA only)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_scale_kernel(g_ptr, u_ptr, w_ptr, out_ptr, n_cols, stride_g, stride_u, stride_o,
                           HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    h = g / (1.0 + tl.exp(-g)) * u
    if HAS_W:
        h = h * tl.load(w_ptr + row).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, h.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_scale(gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    rows, cols = gate.shape
    assert up.shape == gate.shape and gate.stride(-1) == 1 and up.stride(-1) == 1
    w = weights.reshape(rows) if weights is not None else None
    if w is not None and w.stride(0) != 1:
        w = w.contiguous()
    out = torch.empty(rows, cols, device=gate.device, dtype=gate.dtype)
    block = min(1024, triton.next_power_of_2(cols))
    _silu_mul_scale_kernel[(rows, triton.cdiv(cols, block))](
        gate, up, w if w is not None else out, out, cols, gate.stride(0), up.stride(0), out.stride(0),
        HAS_W=w is not None, BLOCK=block, num_warps=4,
    )
    return out


@triton.jit
def _combine_kernel(out_ptr, inv_ptr, shared_ptr, dst_ptr, n_cols, stride_o, stride_s, stride_d,
                    TOP_K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(inv_ptr + t * TOP_K + j).to(tl.int64)
        acc += tl.load(out_ptr + row * stride_o + offs, mask=mask, other=0.0).to(tl.float32)
    y = acc.to(dst_ptr.dtype.element_ty)
    if HAS_SHARED:  # rounded twice, as routed.to(dtype) + shared
        s = tl.load(shared_ptr + t * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + s).to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + t * stride_d + offs, y, mask=mask)


def combine(outputs: torch.Tensor, inverse: torch.Tensor, top_k: int, shared: torch.Tensor | None) -> torch.Tensor:
    rows, cols = outputs.shape
    tokens = inverse.numel() // top_k
    assert outputs.stride(-1) == 1 and inverse.numel() == rows
    assert shared is None or (shared.shape == (tokens, cols) and shared.dtype == outputs.dtype)
    inverse = inverse.contiguous()
    if shared is not None and shared.stride(-1) != 1:
        shared = shared.contiguous()
    out = torch.empty(tokens, cols, device=outputs.device, dtype=outputs.dtype)
    block = min(1024, triton.next_power_of_2(cols))
    _combine_kernel[(tokens, triton.cdiv(cols, block))](
        outputs, inverse, shared if shared is not None else out, out, cols, outputs.stride(0),
        shared.stride(0) if shared is not None else 0, out.stride(0),
        TOP_K=top_k, HAS_SHARED=shared is not None, BLOCK=block, num_warps=4,
    )
    return out
