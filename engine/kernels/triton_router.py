"""Triton kernel behind ``engine.kernels.decode.router_logits`` for many rows (CUDA only).

The router's logits are an fp32 product (the official code upcasts x and the weight). For prompt rows of a 16-bit
model that cost a (T, D) fp32 copy of x and an fp32 SIMT GEMM: ~110 µs a layer at 8K tokens on an H100. When the
weight's values are exactly representable in x's 16-bit dtype (a checkpoint stored in bf16 always is), each product
of a 16-bit x and a 16-bit weight is exact in fp32, so a tensor-core dot with fp32 accumulation computes the same
sum up to the order of additions, reading x once in its own dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _router_logits_kernel(x_ptr, w_ptr, out_ptr, n_rows, K, E, stride_x, stride_w, stride_o,
                          BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    mm, me = offs_m < n_rows, offs_e < E
    rows = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        a = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        b = tl.load(w_ptr + offs_e[None, :] * stride_w + offs_k[:, None], mask=me[None, :] & mk[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + rows[:, None] * stride_o + offs_e[None, :], acc, mask=mm[:, None] & me[None, :])


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (T, D) 16-bit, weight (E, D) in x's dtype (exact values of the fp32 router weight) -> logits (T, E) fp32."""
    n, k = x.shape
    experts = weight.shape[0]
    assert weight.dtype == x.dtype and weight.shape[1] == k and x.stride(-1) == 1 and weight.stride(-1) == 1
    out = torch.empty(n, experts, device=x.device, dtype=torch.float32)
    block_m = 64
    _router_logits_kernel[(triton.cdiv(n, block_m),)](
        x, weight, out, n, k, experts, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_E=max(16, triton.next_power_of_2(experts)), BLOCK_K=64, num_warps=4, num_stages=3,
    )
    return out
