"""Triton few-row GEMMs behind ``engine.kernels.fp8.linear`` and ``engine.kernels.decode.linear`` (imported only
with Triton).

out (M, N) = (x (M, K) · w (N, K)ᵀ): for an fp8 weight (weight-only quantisation) the per-row scale is applied
once in the epilogue and the fp8 tile converted to the activation dtype in registers; a 16-bit weight is used as
is. Either way the tensor cores accumulate in fp32. At decode sizes (M ≤ 64) the kernel is bandwidth-bound on
the weight, which it reads once per M block (fp8: half the bytes of the bf16 GEMM).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engine.kernels.triton_pdl import launch_options
from engine.kernels.triton_pdl import wait_and_release as pdl_wait_and_release

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


_CONFIGS = [
    _config(16, 256, 4, 4),
    _config(32, 256, 4, 4),
    _config(64, 128, 4, 4),
    _config(16, 512, 4, 3),
    _config(32, 128, 4, 5),
    _config(64, 256, 8, 3),
    _config(128, 128, 8, 3),
]


@triton.jit
def _scaled_tile(x_ptr, w_ptr, s_ptr, offs_m, mm, offs_n, mn, k_end, K, stride_xm, stride_wn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of x[offs_m] @ w[offs_n].T, times the weight rows' scales (HAS_SCALE): fp8
    weights are upcast to x's dtype per K block (weight-only quantisation). The K loop stops at ``k_end`` (0
    skips it)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mm[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=mn[:, None] & mk[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + offs_n, mask=mn, other=0.0)[None, :]
    return acc


@triton.autotune(configs=_CONFIGS[:1] if _INTERPRET else _CONFIGS, key=["N", "K", "BLOCK_M"])
@triton.jit
def _skinny_linear_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = offs_m < M
    mn = offs_n < N
    pdl_wait_and_release(PDL)
    acc = _scaled_tile(x_ptr, w_ptr, s_ptr, offs_m, mm, offs_n, mn, K, K, stride_xm, stride_wn,
                       BLOCK_M, BLOCK_N, BLOCK_K, HAS_SCALE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


def block_m(rows: int) -> int:
    """16 (the smallest tensor-core tile) up to 64: one M block covers every decode batch the path takes."""
    return min(64, max(16, triton.next_power_of_2(rows)))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) · weight (N, K)ᵀ (+ bias) in x's dtype; ``scale`` (N,) fp32 for an fp8 weight, None for a 16-bit
    one."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(-1) == 1
    assert scale is None or scale.dtype == torch.float32
    if x.stride(-1) != 1:
        x = x.contiguous()
    if scale is not None:
        scale = scale.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    bm = block_m(m)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, bm))

    dummy = scale if scale is not None else out
    _skinny_linear_kernel[grid](
        x, weight, dummy, bias if bias is not None else dummy, out,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, BLOCK_M=bm, **launch_options(x),
    )
    return out


# --------------------------------------------------------------------------------------------- grouped experts
_GROUPED_CONFIGS = [
    _config(64, 128, 4, 4),
    _config(128, 128, 4, 3),
    _config(32, 256, 4, 4),
    _config(64, 256, 8, 3),
    _config(128, 64, 4, 4),
]


@triton.autotune(configs=_GROUPED_CONFIGS[:1] if _INTERPRET else _GROUPED_CONFIGS, key=["N", "K", "BLOCK_M"])
@triton.jit
def _fp8_grouped_kernel(
    x_ptr, w_ptr, s_ptr, ends_ptr, out_ptr,
    M, N, K, stride_xm, stride_we, stride_wn, stride_om,
    E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (b, n): the b-th BLOCK_M-row block of the expert-sorted rows, where each expert's rows start a
    new block (so a block never mixes experts). The block -> expert map is computed here from the group ends
    (E of them: a few registers), so the call needs no host-side planning and no sync."""
    b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_e = tl.arange(0, E_PAD)
    me = offs_e < E
    ends = tl.load(ends_ptr + offs_e, mask=me, other=0).to(tl.int32)
    starts = tl.load(ends_ptr + offs_e - 1, mask=me & (offs_e > 0), other=0).to(tl.int32)
    counts = tl.where(me, ends - starts, 0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, 0)
    e = tl.sum((block_end <= b).to(tl.int32), axis=0)  # experts whose blocks all come before b
    mine = offs_e == e
    first_block = tl.sum(tl.where(mine, block_end - blocks, 0), axis=0)
    row_start = tl.sum(tl.where(mine, starts, 0), axis=0) + (b - first_block) * BLOCK_M
    row_end = tl.sum(tl.where(mine, ends, 0), axis=0)  # 0 past the last expert: the block is empty
    e = tl.minimum(e, E - 1).to(tl.int64)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    mm = offs_m < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    k_end = tl.where(row_start < row_end, K, 0)  # empty blocks skip the loop
    acc = _scaled_tile(x_ptr, w_ptr + e * stride_we, s_ptr + e * N, offs_m, mm, offs_n, mn, k_end, K, stride_xm,
                       stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, True)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


def grouped_block_m(rows: int, experts: int) -> int:
    """Rows per block from the average rows per expert (shapes only, so one CUDA graph serves every routing)."""
    return min(64, max(16, triton.next_power_of_2(max(1, rows // max(1, experts)))))


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x (M, K) rows sorted by expert, group ends ``ends`` (E,); weight (E, N, K) fp8, scale (E, N) fp32."""
    m, k = x.shape
    experts, n, _ = weight.shape
    assert weight.shape[2] == k and weight.is_contiguous() and ends.shape == (experts,)
    if x.stride(-1) != 1:
        x = x.contiguous()
    scale = scale.float().contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    bm = grouped_block_m(m, experts)
    max_blocks = triton.cdiv(m, bm) + experts

    def grid(meta):
        return (max_blocks, triton.cdiv(n, meta["BLOCK_N"]))

    _fp8_grouped_kernel[grid](
        x, weight, scale, ends.contiguous(), out,
        m, n, k, x.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        E=experts, E_PAD=triton.next_power_of_2(experts), BLOCK_M=bm,
    )
    return out


# --------------------------------------------------------------------------------------------- activations
@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    m = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8_MAX, MIN_SCALE)
    q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + row, scale)


def quantize_activation_rows(x: torch.Tensor, fp8_max: float, min_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass per row (amax, scale, cast) instead of ~5 PyTorch kernels over the activation."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    if m:
        block = triton.next_power_of_2(k)
        _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), FP8_MAX=fp8_max, MIN_SCALE=min_scale,
                                    BLOCK_K=block, num_warps=4 if block <= 4096 else 8)
    return q, s
