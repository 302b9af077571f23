"""Triton kernels behind ``engine.kernels.prefill_layout`` (CUDA only; no ``tl.dot``, so the interpreter checks
them in bf16 too)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton_decode import _pow2, write_latent_row


@triton.jit
def _prologue_kernel(
    q_ptr, kv_ptr, cos_ptr, sin_ptr, nw_ptr, cache_ptr, slot_ptr, query_ptr,
    T, stride_q, stride_kv, stride_cs, stride_cache, eps,
    H: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, RANK: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Row t: the kv RMSNorm (fp32) and the key's RoPE into the cache slot, the query's nope part copied and its
    rope part rotated into query[h, t, :] of an (H, T, NOPE+ROPE) tensor. Each value is rounded once."""
    t = tl.program_id(0).to(tl.int64)
    cos, sin, offs_j, mj = write_latent_row(t, kv_ptr, cos_ptr, sin_ptr, nw_ptr, cache_ptr, slot_ptr, stride_kv,
                                            stride_cs, stride_cache, eps, ROPE, RANK, BLOCK_R, BLOCK_J)
    # the query, head-major
    DIM: tl.constexpr = NOPE + ROPE
    offs_h = tl.arange(0, BLOCK_H)
    mh = offs_h < H
    src = q_ptr + t * stride_q + offs_h[:, None] * DIM
    dst = query_ptr + offs_h[:, None].to(tl.int64) * T * DIM + t * DIM
    offs_n = tl.arange(0, BLOCK_N)
    mn = mh[:, None] & (offs_n < NOPE)[None, :]
    tl.store(dst + offs_n[None, :], tl.load(src + offs_n[None, :], mask=mn, other=0.0), mask=mn)
    m2 = mh[:, None] & mj[None, :]
    q_even = tl.load(src + NOPE + 2 * offs_j[None, :], mask=m2, other=0.0).to(tl.float32)
    q_odd = tl.load(src + NOPE + 2 * offs_j[None, :] + 1, mask=m2, other=0.0).to(tl.float32)
    out_ty = query_ptr.dtype.element_ty
    tl.store(dst + NOPE + 2 * offs_j[None, :], (q_even * cos[None, :] - q_odd * sin[None, :]).to(out_ty), mask=m2)
    tl.store(dst + NOPE + 2 * offs_j[None, :] + 1, (q_even * sin[None, :] + q_odd * cos[None, :]).to(out_ty),
             mask=m2)


def prologue(q, kv, heads, nope, rope, rank, norm_weight, eps, cos, sin, cache, slot_mapping) -> torch.Tensor:
    n = q.shape[0]
    assert q.stride(-1) == 1 and kv.stride(-1) == 1 and cache.stride(-1) == 1 and rope % 2 == 0
    assert q.shape[1] == heads * (nope + rope) and kv.shape[1] >= rank + rope and slot_mapping.numel() == n
    cos, sin, slot_mapping = cos.contiguous(), sin.contiguous(), slot_mapping.contiguous()
    query = torch.empty(heads, n, nope + rope, device=q.device, dtype=q.dtype)
    _prologue_kernel[(n,)](
        q, kv, cos, sin, norm_weight, cache, slot_mapping, query,
        n, q.stride(0), kv.stride(0), cos.stride(0), cache.stride(0), eps,
        H=heads, NOPE=nope, ROPE=rope, RANK=rank, BLOCK_H=_pow2(heads), BLOCK_N=_pow2(nope), BLOCK_R=_pow2(rank),
        BLOCK_J=_pow2(rope // 2), num_warps=4,
    )
    return query.transpose(0, 1)


@triton.jit
def _expand_kv_kernel(
    kv_ptr, kr_ptr, k_ptr, v_ptr, L, stride_kv, stride_kr,
    NOPE: tl.constexpr, ROPE: tl.constexpr, V_DIM: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Keys [l0, l0+BLOCK_L) of head h: K[h, l] = [kv[l, h, :NOPE] | k_rope[l]], V[h, l] = kv[l, h, NOPE:]."""
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    h = tl.program_id(1).to(tl.int64)
    ml = offs_l < L
    rows = offs_l.to(tl.int64)
    src = kv_ptr + rows[:, None] * stride_kv + h * (NOPE + V_DIM)
    K_DIM: tl.constexpr = NOPE + ROPE
    k_dst = k_ptr + (h * L + rows[:, None]) * K_DIM
    offs_n = tl.arange(0, BLOCK_N)
    mn = ml[:, None] & (offs_n < NOPE)[None, :]
    tl.store(k_dst + offs_n[None, :], tl.load(src + offs_n[None, :], mask=mn, other=0.0), mask=mn)
    offs_p = tl.arange(0, BLOCK_P)
    mp = ml[:, None] & (offs_p < ROPE)[None, :]
    k_rope = tl.load(kr_ptr + rows[:, None] * stride_kr + offs_p[None, :], mask=mp, other=0.0)
    tl.store(k_dst + NOPE + offs_p[None, :], k_rope.to(k_ptr.dtype.element_ty), mask=mp)
    offs_v = tl.arange(0, BLOCK_V)
    mv = ml[:, None] & (offs_v < V_DIM)[None, :]
    v = tl.load(src + NOPE + offs_v[None, :], mask=mv, other=0.0)
    tl.store(v_ptr + (h * L + rows[:, None]) * V_DIM + offs_v[None, :], v, mask=mv)


EXPAND_BLOCK_L = 32


def expand_kv(kv, k_rope, heads, nope, v_dim) -> tuple[torch.Tensor, torch.Tensor]:
    n, rope = kv.shape[0], k_rope.shape[-1]
    assert kv.stride(-1) == 1 and k_rope.stride(-1) == 1 and kv.shape[1] == heads * (nope + v_dim)
    k = torch.empty(heads, n, nope + rope, device=kv.device, dtype=kv.dtype)
    v = torch.empty(heads, n, v_dim, device=kv.device, dtype=kv.dtype)
    _expand_kv_kernel[(triton.cdiv(n, EXPAND_BLOCK_L), heads)](
        kv, k_rope, k, v, n, kv.stride(0), k_rope.stride(0),
        NOPE=nope, ROPE=rope, V_DIM=v_dim, BLOCK_L=EXPAND_BLOCK_L, BLOCK_N=_pow2(nope), BLOCK_P=_pow2(rope),
        BLOCK_V=_pow2(v_dim), num_warps=4,
    )
    return k, v
