"""Triton kernels behind ``engine.kernels.decode`` (imported only where Triton is available).

Batch-1 decode reads every weight once per step; these kernels exist to cut the number of launches per layer
(from ~90 to ~12), not to change the arithmetic: every reduction accumulates in fp32 and outputs are rounded
where the unfused ops rounded them. GEMV-shaped kernels (the MoE experts, one-row projections) are autotuned once
per shape, before any CUDA-graph capture (the runner's graph warm-up runs the step eagerly first).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engine.kernels.triton_pdl import launch_options
from engine.kernels.triton_pdl import wait_and_release as pdl_wait_and_release

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(configs: list[triton.Config]) -> list[triton.Config]:
    # one config means no benchmarking: the interpreter (CPU debugging) has no CUDA timer
    return configs[:1] if _INTERPRET else configs


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(n))


# --------------------------------------------------------------------------------------------- add + RMSNorm
@triton.jit
def _add_rms_norm_kernel(
    parts_ptr, res_ptr, w_ptr, h_ptr, n_ptr, f_ptr,
    D, stride_pt, stride_ps, stride_r, eps,
    S: tl.constexpr, HAS_RES: tl.constexpr, WANT_F32: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    m = offs < D
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    pdl_wait_and_release(PDL)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(S):
        acc += tl.load(parts_ptr + t * stride_pt + s * stride_ps + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        acc += tl.load(res_ptr + t * stride_r + offs, mask=m, other=0.0).to(tl.float32)
    h = acc.to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + t * D + offs, h, mask=m)
    hf = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / D + eps)
    y = (hf * rstd * w).to(n_ptr.dtype.element_ty)
    tl.store(n_ptr + t * D + offs, y, mask=m)
    if WANT_F32:
        tl.store(f_ptr + t * D + offs, y.to(tl.float32), mask=m)


def add_rms_norm(parts, residual, weight, eps, want_fp32):
    n, d = parts.shape[0], parts.shape[-1]
    if parts.dim() == 2:
        parts3 = parts[:, None]
    else:
        parts3 = parts
    if parts3.stride(-1) != 1:
        parts3 = parts3.contiguous()
    dtype = residual.dtype if residual is not None else parts.dtype
    h = torch.empty(n, d, device=parts.device, dtype=dtype)
    normed = torch.empty_like(h)
    f32 = torch.empty(n, d, device=parts.device, dtype=torch.float32) if want_fp32 else normed
    res = residual if residual is not None else h
    if res.stride(-1) != 1:
        res = res.contiguous()
    block = _pow2(d, 16)
    _add_rms_norm_kernel[(n,)](
        parts3, res, weight, h, normed, f32,
        d, parts3.stride(0), parts3.stride(1), res.stride(0), eps,
        S=parts3.shape[1], HAS_RES=residual is not None, WANT_F32=want_fp32, BLOCK_D=block,
        num_warps=4 if block <= 4096 else 8, **launch_options(parts),
    )
    return h, normed, (f32 if want_fp32 else None)


# --------------------------------------------------------------------------------------------- MLA prologue
@triton.jit
def write_latent_row(t, kv_ptr, cos_ptr, sin_ptr, nw_ptr, cache_ptr, slot_ptr, stride_kv, stride_cs, stride_cache,
                     eps, ROPE: tl.constexpr, RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """Row t's latent into its cache slot: RMSNorm (fp32) of the compressed kv, interleaved RoPE (pairs (2j, 2j+1))
    of the shared key, each rounded once. Returns the row's (cos, sin) in fp32 with the pair offsets and mask, for
    the query's rope part (shared by the decode and prefill prologues)."""
    slot = tl.load(slot_ptr + t).to(tl.int64)
    row = cache_ptr + slot * stride_cache
    cache_ty = cache_ptr.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    mr = offs_r < RANK
    c = tl.load(kv_ptr + t * stride_kv + offs_r, mask=mr, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(c * c, axis=0) / RANK + eps)
    nw = tl.load(nw_ptr + offs_r, mask=mr, other=0.0).to(tl.float32)
    tl.store(row + offs_r, (c * rstd * nw).to(cache_ty), mask=mr)
    offs_j = tl.arange(0, BLOCK_J)
    mj = offs_j < ROPE // 2
    cos = tl.load(cos_ptr + t * stride_cs + offs_j, mask=mj, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_cs + offs_j, mask=mj, other=0.0).to(tl.float32)
    k_even = tl.load(kv_ptr + t * stride_kv + RANK + 2 * offs_j, mask=mj, other=0.0).to(tl.float32)
    k_odd = tl.load(kv_ptr + t * stride_kv + RANK + 2 * offs_j + 1, mask=mj, other=0.0).to(tl.float32)
    tl.store(row + RANK + 2 * offs_j, (k_even * cos - k_odd * sin).to(cache_ty), mask=mj)
    tl.store(row + RANK + 2 * offs_j + 1, (k_even * sin + k_odd * cos).to(cache_ty), mask=mj)
    return cos, sin, offs_j, mj


@triton.jit
def _mla_prologue_kernel(
    q_ptr, kv_ptr, cos_ptr, sin_ptr, nw_ptr, cache_ptr, slot_ptr, qpe_ptr, wuk_ptr, ql_ptr,
    T, stride_q, stride_kv, stride_cs, stride_cache, stride_wh, stride_wn, eps,
    H: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, RANK: tl.constexpr, R_TILES: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_RO: tl.constexpr, PDL: tl.constexpr,
):
    """Programs [0, H*R_TILES): the absorbed query q_latent[t, h, tile] = q_nope[t, h] · W_UK[h][:, tile] for
    every row (the head's W_UK tile read once, rows in blocks of BLOCK_T through the tensor cores); programs
    H*R_TILES + t: row t's kv RMSNorm, RoPE of its key and query rope parts, and its cache write."""
    pid = tl.program_id(0)
    if pid < H * R_TILES:
        h = pid // R_TILES
        offs_o = (pid % R_TILES) * BLOCK_RO + tl.arange(0, BLOCK_RO)
        mo = offs_o < RANK
        offs_n = tl.arange(0, NOPE)
        w = tl.load(wuk_ptr + h * stride_wh + offs_n[:, None] * stride_wn + offs_o[None, :], mask=mo[None, :],
                    other=0.0)
        pdl_wait_and_release(PDL)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mt = offs_t < T
            x = tl.load(q_ptr + offs_t[:, None].to(tl.int64) * stride_q + h * (NOPE + ROPE) + offs_n[None, :],
                        mask=mt[:, None], other=0.0)
            acc = tl.dot(x, w)
            tl.store(ql_ptr + (offs_t[:, None].to(tl.int64) * H + h) * RANK + offs_o[None, :],
                     acc.to(ql_ptr.dtype.element_ty), mask=mt[:, None] & mo[None, :])
    else:
        pdl_wait_and_release(PDL)
        t = pid - H * R_TILES
        cos, sin, offs_j, mj = write_latent_row(t, kv_ptr, cos_ptr, sin_ptr, nw_ptr, cache_ptr, slot_ptr, stride_kv,
                                                stride_cs, stride_cache, eps, ROPE, RANK, BLOCK_R, BLOCK_J)
        offs_h = tl.arange(0, BLOCK_H)
        m2 = (offs_h < H)[:, None] & mj[None, :]
        src = q_ptr + t * stride_q + offs_h[:, None] * (NOPE + ROPE) + NOPE + 2 * offs_j[None, :]
        q_even = tl.load(src, mask=m2, other=0.0).to(tl.float32)
        q_odd = tl.load(src + 1, mask=m2, other=0.0).to(tl.float32)
        dst = qpe_ptr + t * H * ROPE + offs_h[:, None] * ROPE + 2 * offs_j[None, :]
        out_ty = qpe_ptr.dtype.element_ty
        tl.store(dst, (q_even * cos[None, :] - q_odd * sin[None, :]).to(out_ty), mask=m2)
        tl.store(dst + 1, (q_even * sin[None, :] + q_odd * cos[None, :]).to(out_ty), mask=m2)


PROLOGUE_BLOCK_RO = 64


def mla_decode_prologue(q, kv, w_uk, heads, nope, rope, rank, norm_weight, eps, cos, sin, cache, slot_mapping):
    n = q.shape[0]
    assert q.stride(-1) == 1 and kv.stride(-1) == 1 and cache.stride(-1) == 1 and w_uk.stride(-1) == 1
    assert nope >= 16 and nope == triton.next_power_of_2(nope), "tl.dot over the nope dims"
    cos, sin = cos.contiguous(), sin.contiguous()
    q_pe = torch.empty(n, heads, rope, device=q.device, dtype=q.dtype)
    q_latent = torch.empty(n, heads, rank, device=q.device, dtype=q.dtype)
    block_ro = min(PROLOGUE_BLOCK_RO, _pow2(rank, 16))
    r_tiles = triton.cdiv(rank, block_ro)
    _mla_prologue_kernel[(heads * r_tiles + n,)](
        q, kv, cos, sin, norm_weight, cache, slot_mapping, q_pe, w_uk, q_latent,
        n, q.stride(0), kv.stride(0), cos.stride(0), cache.stride(0), w_uk.stride(0), w_uk.stride(1), eps,
        H=heads, NOPE=nope, ROPE=rope, RANK=rank, R_TILES=r_tiles,
        BLOCK_H=_pow2(heads), BLOCK_R=_pow2(rank, 16), BLOCK_J=_pow2(rope // 2), BLOCK_T=16, BLOCK_RO=block_ro,
        num_warps=4, **launch_options(q),
    )
    return q_latent, q_pe


# --------------------------------------------------------------------------------------------- MLA attention
@triton.jit
def _mla_attn_kernel(
    ql_ptr, qp_ptr, cache_ptr, slots_ptr, lens_ptr, acc_ptr, ml_ptr,
    stride_ql_h, stride_ql_t, stride_qp_t, stride_qp_h, stride_cache, stride_slots, scale_log2,
    H: tl.constexpr, RANK: tl.constexpr, ROPE: tl.constexpr, SPLITS: tl.constexpr, SPLIT_KEYS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, PDL: tl.constexpr,
):
    """One (row, split): online softmax over the split's share of the row's keys, all heads at once (the latent
    is shared by every head, so each key tile is read once for all of them). A split takes SPLIT_KEYS keys (in
    tiles of BLOCK_L), or an even share of the row's keys when SPLITS * SPLIT_KEYS is short of its length (the share is cut from the row's
    length, not the slot table's width: a long row in a wide graph bucket still spreads over every split).
    Writes the unnormalised partial (acc, max, sum) for the epilogue."""
    t = tl.program_id(0)
    sp = tl.program_id(1)
    pdl_wait_and_release(PDL)
    length = tl.load(lens_ptr + t)
    per_split = tl.cdiv(tl.cdiv(length, SPLITS), SPLIT_KEYS) * SPLIT_KEYS
    start = sp * per_split
    end = tl.minimum(start + per_split, length)
    offs_h = tl.arange(0, BLOCK_H)
    mh = offs_h < H
    offs_r = tl.arange(0, BLOCK_R)
    mr = offs_r < RANK
    offs_p = tl.arange(0, BLOCK_P)
    mp = offs_p < ROPE
    ql = tl.load(ql_ptr + offs_h[:, None] * stride_ql_h + t * stride_ql_t + offs_r[None, :],
                 mask=mh[:, None] & mr[None, :], other=0.0)
    qp = tl.load(qp_ptr + t * stride_qp_t + offs_h[:, None] * stride_qp_h + offs_p[None, :],
                 mask=mh[:, None] & mp[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for k0 in range(start, end, BLOCK_L):
        offs_l = k0 + tl.arange(0, BLOCK_L)
        ml = offs_l < end
        slot = tl.load(slots_ptr + t * stride_slots + offs_l, mask=ml, other=0).to(tl.int64)
        rows = cache_ptr + slot[:, None] * stride_cache
        c = tl.load(rows + offs_r[None, :], mask=ml[:, None] & mr[None, :], other=0.0)
        kp = tl.load(rows + RANK + offs_p[None, :], mask=ml[:, None] & mp[None, :], other=0.0)
        s = tl.dot(ql, tl.trans(c)) + tl.dot(qp, tl.trans(kp))
        s = tl.where(ml[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
        m_i = m_new
    base = (t * SPLITS + sp) * H
    stored = offs_r < tl.where(start < end, RANK, 0)  # an empty split's acc is never read
    tl.store(acc_ptr + (base + offs_h[:, None]) * RANK + offs_r[None, :], acc, mask=mh[:, None] & stored[None, :])
    tl.store(ml_ptr + (base + offs_h) * 2, m_i, mask=mh)
    tl.store(ml_ptr + (base + offs_h) * 2 + 1, l_i, mask=mh)


@triton.jit
def _merge_weights(ml_ptr, offs_t, mt, offs_s, h, H: tl.constexpr, SPLITS: tl.constexpr):
    """(BLOCK_T, BLOCK_S) weights that merge each row's split partials: exp2(max_s - row max) / row sum; 0 for
    empty splits (their max is -inf) and masked rows, so those partials are never read."""
    ms = offs_s < SPLITS
    idx = (offs_t[:, None] * SPLITS + offs_s[None, :]) * H + h
    m2 = mt[:, None] & ms[None, :]
    m = tl.load(ml_ptr + idx * 2, mask=m2, other=float("-inf"))
    l = tl.load(ml_ptr + idx * 2 + 1, mask=m2, other=0.0)
    live = m2 & (l > 0)
    top = tl.max(tl.where(live, m, -1e30), axis=1)
    w = tl.where(live, tl.exp2(m - top[:, None]), 0.0)
    return w / tl.maximum(tl.sum(w * l, axis=1), 1e-30)[:, None]


@triton.jit
def _mla_epilogue_row_kernel(
    acc_ptr, ml_ptr, wuv_ptr, out_ptr, stride_wh, stride_wv,
    H: tl.constexpr, RANK: tl.constexpr, V: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
):
    """Few rows (many splits each), program (row, head, v tile): z = the row's splits merged (all splits of an R
    chunk in one load), rounded to the activation dtype as the unfused z was, then values[t, h, tile] =
    W_UV[h][tile] · z on the CUDA cores, written in o_proj's (T, H, v) layout."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    mv = offs_v < V
    offs_s = tl.arange(0, BLOCK_S)
    pdl_wait_and_release(PDL)
    w = tl.sum(_merge_weights(ml_ptr, t + tl.arange(0, 1), tl.full([1], True, tl.int1), offs_s, h, H, SPLITS),
               axis=0)  # (BLOCK_S,)
    rows = ((t * SPLITS + offs_s) * H + h) * RANK
    out = tl.zeros([BLOCK_V], dtype=tl.float32)
    for r0 in tl.static_range(0, RANK, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mr = offs_r < RANK
        part = tl.load(acc_ptr + rows[:, None] + offs_r[None, :], mask=(w > 0)[:, None] & mr[None, :], other=0.0)
        z = tl.sum(part * w[:, None], axis=0).to(out_ptr.dtype.element_ty).to(tl.float32)
        wt = tl.load(wuv_ptr + h * stride_wh + offs_v[:, None] * stride_wv + offs_r[None, :],
                     mask=mv[:, None] & mr[None, :], other=0.0)
        out += tl.sum(wt.to(tl.float32) * z[None, :], axis=1)
    tl.store(out_ptr + (t * H + h) * V + offs_v, out.to(out_ptr.dtype.element_ty), mask=mv)


@triton.jit
def _mla_epilogue_block_kernel(
    acc_ptr, ml_ptr, wuv_ptr, out_ptr, T, stride_wh, stride_wv,
    H: tl.constexpr, RANK: tl.constexpr, V: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
):
    """Many rows (few splits each), program (head, v tile, row block): as the row kernel, the rows' merged z
    (BLOCK_T, R chunk) then through the tensor cores with the head's W_UV tile, read once for the block."""
    h = tl.program_id(0)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mv = offs_v < V
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = offs_t < T
    offs_s = tl.arange(0, BLOCK_S)
    pdl_wait_and_release(PDL)
    w = _merge_weights(ml_ptr, offs_t, mt, offs_s, h, H, SPLITS)  # (BLOCK_T, BLOCK_S)
    rows = ((offs_t[:, None] * SPLITS + offs_s[None, :]) * H + h) * RANK
    out = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for r0 in tl.static_range(0, RANK, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mr = offs_r < RANK
        part = tl.load(acc_ptr + rows[:, :, None] + offs_r[None, None, :],
                       mask=(w > 0)[:, :, None] & mr[None, None, :], other=0.0)
        z = tl.sum(part * w[:, :, None], axis=1)  # (BLOCK_T, BLOCK_R)
        wt = tl.load(wuv_ptr + h * stride_wh + offs_v[:, None] * stride_wv + offs_r[None, :],
                     mask=mv[:, None] & mr[None, :], other=0.0)
        out += tl.dot(z.to(wt.dtype), tl.trans(wt))
    tl.store(out_ptr + (offs_t[:, None].to(tl.int64) * H + h) * V + offs_v[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])


ATTN_BLOCK_L = 32  # keys per tile of the attention loop
ATTN_SPLIT_KEYS = 32  # keys per split (a multiple of ATTN_BLOCK_L) unless the program cap below binds
# up to this many rows (at least 16 splits each) the epilogue runs per row on the CUDA cores; beyond, per block of
# 16 rows through the tensor cores (a per-row W_UV read would cost 128 KB of L2 traffic per row and head)
EPILOGUE_ROW_MAX_ROWS = 8


def epilogue_row_block_v(n_rows: int, v_dim: int) -> int:
    """Values per program of the row epilogue (each program merges its head's splits itself): 16 at one row
    (256 programs for A3B), 32 beyond (16 cost batch 8 7 %: bench/RESULTS.md "Fifth H100 run")."""
    return min(16 if n_rows == 1 else 32, _pow2(v_dim, 16))


def attention_splits(n_rows: int, width: int) -> int:
    """Splits per row for ``n_rows`` rows over ``width`` key slots: about 128 programs, one per ATTN_SPLIT_KEYS
    slots at most. Shapes only, so one CUDA graph serves every length under its width. The kernel gives each split
    ATTN_SPLIT_KEYS of the row's keys, or an even share of them where the 128-program cap binds (long rows): so an
    eager step and a graph replay of a wider bucket cut a row's keys the same way (same sums, same tokens)."""
    return max(1, min(triton.cdiv(128, max(n_rows, 1)), triton.cdiv(width, ATTN_SPLIT_KEYS)))


def mla_decode_attention(q_latent, q_pe, cache, slots, lengths, scale, w_uv):
    heads, n, rank = q_latent.shape
    rope = q_pe.shape[-1]
    v_dim = w_uv.shape[1]
    assert q_latent.stride(-1) == 1 and q_pe.stride(-1) == 1 and cache.stride(-1) == 1 and w_uv.stride(-1) == 1
    if slots.stride(-1) != 1:
        slots = slots.contiguous()
    splits = attention_splits(n, slots.shape[1])
    acc = torch.empty(n, splits, heads, rank, device=q_latent.device, dtype=torch.float32)
    ml = torch.empty(n, splits, heads, 2, device=q_latent.device, dtype=torch.float32)
    block_r = _pow2(rank, 16)
    _mla_attn_kernel[(n, splits)](
        q_latent, q_pe, cache, slots, lengths, acc, ml,
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1), cache.stride(0), slots.stride(0),
        scale * 1.4426950408889634,
        H=heads, RANK=rank, ROPE=rope, SPLITS=splits, SPLIT_KEYS=ATTN_SPLIT_KEYS,
        BLOCK_H=_pow2(heads, 16), BLOCK_R=block_r, BLOCK_P=_pow2(rope, 16), BLOCK_L=ATTN_BLOCK_L,
        num_warps=8 if block_r >= 256 else 4, num_stages=2, **launch_options(q_latent),
    )
    values = torch.empty(n, heads, v_dim, device=q_latent.device, dtype=q_latent.dtype)
    block_s = _pow2(splits)
    if n <= EPILOGUE_ROW_MAX_ROWS:
        block_v = epilogue_row_block_v(n, v_dim)
        _mla_epilogue_row_kernel[(n, heads, triton.cdiv(v_dim, block_v))](
            acc, ml, w_uv, values, w_uv.stride(0), w_uv.stride(1),
            H=heads, RANK=rank, V=v_dim, SPLITS=splits, BLOCK_S=block_s, BLOCK_V=block_v,
            BLOCK_R=max(16, min(128, 4096 // block_s, block_r)), num_warps=4, **launch_options(acc),
        )
    else:
        block_t, block_v = 16, min(64, _pow2(v_dim, 16))
        _mla_epilogue_block_kernel[(heads, triton.cdiv(v_dim, block_v), triton.cdiv(n, block_t))](
            acc, ml, w_uv, values, n, w_uv.stride(0), w_uv.stride(1),
            H=heads, RANK=rank, V=v_dim, SPLITS=splits, BLOCK_S=block_s, BLOCK_T=block_t, BLOCK_V=block_v,
            BLOCK_R=max(16, min(32, 8192 // (block_t * block_s), block_r)), num_warps=4, **launch_options(acc),
        )
    return values


# --------------------------------------------------------------------------------------------- router
@triton.jit
def _route_topk_kernel(
    logits_ptr, bias_ptr, ids_ptr, w_ptr, E, stride_l, scale,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr,
):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    me = offs < E
    pdl_wait_and_release(PDL)
    x = tl.load(logits_ptr + t * stride_l + offs, mask=me, other=float("-inf")).to(tl.float32)
    if SOFTMAX:
        ex = tl.exp(x - tl.max(x, axis=0))
        ex = tl.where(me, ex, 0.0)
        scores = ex / tl.sum(ex, axis=0)
    else:
        scores = tl.sigmoid(x)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + offs, mask=me, other=0.0).to(tl.float32)
    # NaN scores (a diverged row) rank last, and the index is clamped: a NaN never compares equal to the
    # maximum, which would leave idx = BLOCK_E and send the expert GEMVs past the end of the weights
    choice = tl.where(me & (choice == choice), choice, float("-inf"))
    offs_k = tl.arange(0, K_PAD)
    ids = tl.zeros([K_PAD], dtype=tl.int32)
    ws = tl.zeros([K_PAD], dtype=tl.float32)
    for i in tl.static_range(TOP_K):
        best = tl.max(choice, axis=0)
        idx = tl.minimum(tl.min(tl.where(choice == best, offs, BLOCK_E), axis=0), E - 1)
        wv = tl.sum(tl.where(offs == idx, scores, 0.0), axis=0)
        ids = tl.where(offs_k == i, idx, ids)
        ws = tl.where(offs_k == i, wv, ws)
        choice = tl.where(offs == idx, float("-inf"), choice)
    if NORM:
        ws = ws / (tl.sum(ws, axis=0) + 1e-20)
    ws = ws * scale
    mk = offs_k < TOP_K
    tl.store(ids_ptr + t * TOP_K + offs_k, ids.to(tl.int64), mask=mk)
    tl.store(w_ptr + t * TOP_K + offs_k, ws, mask=mk)


def route_topk(logits, bias, top_k, scoring, norm_topk_prob, scale):
    n, experts = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(-1) == 1
    ids = torch.empty(n, top_k, device=logits.device, dtype=torch.int64)
    weights = torch.empty(n, top_k, device=logits.device, dtype=torch.float32)
    _route_topk_kernel[(n,)](
        logits, bias if bias is not None else logits, ids, weights, experts, logits.stride(0), float(scale),
        TOP_K=top_k, K_PAD=_pow2(top_k), BLOCK_E=_pow2(experts, 16), SOFTMAX=scoring == "softmax",
        HAS_BIAS=bias is not None, NORM=norm_topk_prob and top_k > 1, num_warps=1 if experts <= 128 else 4,
        **launch_options(logits),
    )
    return ids, weights


# --------------------------------------------------------------------------------------------- MoE GEMVs
def _gemv_config(block_n: int, block_k: int, warps: int, reduce_each: bool) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "REDUCE_EACH": reduce_each}, num_warps=warps)


# REDUCE_EACH: reduce each (BLOCK_N, BLOCK_K) tile at once (fewer registers, more CTAs per SM) instead of
# accumulating the tile and reducing at the end
_GEMV_CONFIGS = [
    _gemv_config(16, 256, 4, False),
    _gemv_config(8, 512, 4, False),
    _gemv_config(32, 128, 4, False),
    _gemv_config(16, 512, 8, False),
    _gemv_config(4, 512, 2, False),
    _gemv_config(32, 256, 4, True),
    _gemv_config(64, 128, 4, True),
    _gemv_config(16, 1024, 8, True),
    # fp8 weights: a row of K bytes, not 2K -- wider K tiles keep each load as large as with bf16
    _gemv_config(8, 1024, 4, False),
    _gemv_config(32, 512, 8, True),
    # whole-K tiles (the expert intermediate 1408 fits one 2048 tile): one load per program, most bytes in flight
    _gemv_config(4, 2048, 4, True),
    _gemv_config(8, 2048, 8, True),
]


@triton.jit
def _gemv_tile(x_row, w_base, offs_n, mn, K, stride_w,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, REDUCE_EACH: tl.constexpr):
    """Σ_k w[n, k] x[k] for the tile's rows n, fp32 (w_base[n * stride_w + k])."""
    if REDUCE_EACH:
        out = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        xv = tl.load(x_row + offs_k, mask=mk, other=0.0).to(tl.float32)
        w = tl.load(w_base + offs_n[:, None] * stride_w + offs_k[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        if REDUCE_EACH:
            out += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
        else:
            acc += w.to(tl.float32) * xv[None, :]
    if REDUCE_EACH:
        result = out
    else:
        result = tl.sum(acc, axis=1)
    return result


@triton.jit
def _first_tile(w_base, offs_n, mn, K, stride_w, BLOCK_K: tl.constexpr):
    """The tile's first BLOCK_K weight columns (as stored): what a kernel may load before its PDL wait."""
    offs_k = tl.arange(0, BLOCK_K)
    return tl.load(w_base + offs_n[:, None] * stride_w + offs_k[None, :], mask=mn[:, None] & (offs_k < K)[None, :],
                   other=0.0)


@triton.jit
def _first_tile_dot(w, x_row, K, BLOCK_K: tl.constexpr):
    """Σ_k w[n, k] x[k] over a :func:`_first_tile` (fp32)."""
    offs_k = tl.arange(0, BLOCK_K)
    xv = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    return tl.sum(w.to(tl.float32) * xv[None, :], axis=1)


@triton.jit
def _gate_up_sums(x_row, g_base, u_base, offs_n, mn, K, stride_w,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, REDUCE_EACH: tl.constexpr):
    """(x·W_gateᵀ, x·W_upᵀ) in fp32 for the tile's rows over k < K (rows ``stride_w`` apart)."""
    if REDUCE_EACH:
        g = tl.zeros([BLOCK_N], dtype=tl.float32)
        u = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        xv = tl.load(x_row + offs_k, mask=mk, other=0.0).to(tl.float32)[None, :]
        m2 = mn[:, None] & mk[None, :]
        off = offs_n[:, None] * stride_w + offs_k[None, :]
        wg = tl.load(g_base + off, mask=m2, other=0.0).to(tl.float32)
        wu = tl.load(u_base + off, mask=m2, other=0.0).to(tl.float32)
        if REDUCE_EACH:
            g += tl.sum(wg * xv, axis=1)
            u += tl.sum(wu * xv, axis=1)
        else:
            acc_g += wg * xv
            acc_u += wu * xv
    if REDUCE_EACH:
        gate = g
        up = u
    else:
        gate = tl.sum(acc_g, axis=1)
        up = tl.sum(acc_u, axis=1)
    return gate, up


@triton.jit
def _swiglu(gate, up, gs_row, us_row, offs_n, mn, HAS_SCALE: tl.constexpr):
    """silu(gate) · up; fp8 weights (HAS_SCALE): their per-row scales multiply the fp32 sums first."""
    if HAS_SCALE:
        gate = gate * tl.load(gs_row + offs_n, mask=mn, other=0.0)
        up = up * tl.load(us_row + offs_n, mask=mn, other=0.0)
    return gate / (1.0 + tl.exp(-gate)) * up


@triton.autotune(configs=_configs(_GEMV_CONFIGS), key=["D", "I", "n_rows"])
@triton.jit
def _moe_gate_up_kernel(
    x_ptr, ids_ptr, rw_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, out_ptr,
    gs_ptr, us_ptr, sgs_ptr, sus_ptr,
    D, I, stride_x, stride_we, n_rows,
    TOP_K: tl.constexpr, N_SHARED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    REDUCE_EACH: tl.constexpr, HAS_SCALE: tl.constexpr, PDL: tl.constexpr,
):
    """Program (token · slot, column tile): a routed slot reads its expert's rows by id once the router has run;
    a shared slot's weights are known up front, so it loads their first tile before the PDL wait (it streams
    while the router finishes). fp8 weights convert in registers."""
    pid = tl.program_id(0)  # token * (TOP_K + N_SHARED) + slot
    nb = tl.program_id(1)
    t = pid // (TOP_K + N_SHARED)
    s = pid % (TOP_K + N_SHARED)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < I
    x_row = x_ptr + t * stride_x
    if s < TOP_K:
        pdl_wait_and_release(PDL)
        e = tl.load(ids_ptr + t * TOP_K + s).to(tl.int64)
        rw = tl.load(rw_ptr + t * TOP_K + s).to(tl.float32)
        gate, up = _gate_up_sums(x_row, wg_ptr + e * stride_we, wu_ptr + e * stride_we, offs_n, mn, D, D,
                                 BLOCK_N, BLOCK_K, REDUCE_EACH)
        h = _swiglu(gate, up, gs_ptr + e * I, us_ptr + e * I, offs_n, mn, HAS_SCALE) * rw
    else:
        j = (s - TOP_K).to(tl.int64)
        g_base = sg_ptr + j * I * D
        u_base = su_ptr + j * I * D
        wg = _first_tile(g_base, offs_n, mn, D, D, BLOCK_K)
        wu = _first_tile(u_base, offs_n, mn, D, D, BLOCK_K)
        pdl_wait_and_release(PDL)
        gate, up = _gate_up_sums(x_row + BLOCK_K, g_base + BLOCK_K, u_base + BLOCK_K, offs_n, mn, D - BLOCK_K, D,
                                 BLOCK_N, BLOCK_K, REDUCE_EACH)  # the rest of D (nothing for whole-D tiles)
        gate += _first_tile_dot(wg, x_row, D, BLOCK_K)
        up += _first_tile_dot(wu, x_row, D, BLOCK_K)
        h = _swiglu(gate, up, sgs_ptr + j * I, sus_ptr + j * I, offs_n, mn, HAS_SCALE)
    tl.store(out_ptr + pid.to(tl.int64) * I + offs_n, h.to(out_ptr.dtype.element_ty), mask=mn)


@triton.autotune(configs=_configs(_GEMV_CONFIGS), key=["D", "I", "n_rows"])
@triton.jit
def _moe_down_kernel(
    h_ptr, ids_ptr, wd_ptr, sd_ptr, out_ptr, ds_ptr, sds_ptr,
    D, I, stride_we, shared_row, n_rows,
    TOP_K: tl.constexpr, N_SHARED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    REDUCE_EACH: tl.constexpr, HAS_SCALE: tl.constexpr, PDL: tl.constexpr,
):
    """As the gate/up kernel: routed slots by id after the PDL wait, shared slots' first tile before it."""
    pid = tl.program_id(0)  # token * (TOP_K + N_SHARED) + slot
    nb = tl.program_id(1)
    t = pid // (TOP_K + N_SHARED)
    s = pid % (TOP_K + N_SHARED)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < D
    h_row = h_ptr + pid.to(tl.int64) * I
    if s < TOP_K:
        pdl_wait_and_release(PDL)
        e = tl.load(ids_ptr + t * TOP_K + s).to(tl.int64)
        y = _gemv_tile(h_row, wd_ptr + e * stride_we, offs_n, mn, I, I, BLOCK_N, BLOCK_K, REDUCE_EACH)
        if HAS_SCALE:  # fp8 weights: the output channel's scale, once per sum
            y = y * tl.load(ds_ptr + e * D + offs_n, mask=mn, other=0.0)
    else:
        w_base = sd_ptr + (s - TOP_K).to(tl.int64) * I
        w = _first_tile(w_base, offs_n, mn, I, shared_row, BLOCK_K)
        pdl_wait_and_release(PDL)
        y = _first_tile_dot(w, h_row, I, BLOCK_K)
        y += _gemv_tile(h_row + BLOCK_K, w_base + BLOCK_K, offs_n, mn, I - BLOCK_K, shared_row, BLOCK_N, BLOCK_K,
                        REDUCE_EACH)
        if HAS_SCALE:
            y = y * tl.load(sds_ptr + offs_n, mask=mn, other=0.0)
    tl.store(out_ptr + pid.to(tl.int64) * D + offs_n, y, mask=mn)


def _shared_slots(shared: torch.Tensor | None, inter: int, dim: int) -> int:
    if shared is None:
        return 0
    size = shared.shape[dim]
    assert size % inter == 0, "shared-expert intermediate must be a multiple of the routed one"
    return size // inter


def _scales(*scales: torch.Tensor | None) -> tuple[bool, list[torch.Tensor | None]]:
    """(HAS_SCALE, contiguous fp32 scales): all given (fp8 weights) or none (bf16)."""
    given = [s for s in scales if s is not None]
    if not given:
        return False, list(scales)
    return True, [None if s is None else s.float().contiguous() for s in scales]


def gate_up_operands(w_gate, w_up, shared_gate, shared_up, scales, dummy):
    """The weight operands every gate/up kernel (expert GEMVs, expert tiles) takes: (HAS_SCALE, shared_gate,
    shared_up, the four scales as fp32 contiguous tensors). ``scales``: (gate, up, shared_gate, shared_up) scales,
    all given (fp8 weights) or none; without scales each is ``dummy`` (never read), without shared experts the
    routed weights stand in for them (never read: N_SHARED = 0)."""
    # each expert's (I, D) rows contiguous; gate and up may be views of one merged (E, 2I, D) tensor (the
    # ExpertBank's prefill layout): the kernels step both by w_gate's expert stride
    assert w_gate.shape == w_up.shape and w_gate.stride(0) == w_up.stride(0)
    assert w_gate[0].is_contiguous() and w_up[0].is_contiguous()
    has_scale, (gate_scale, up_scale, shared_gate_scale, shared_up_scale) = _scales(*scales)
    if has_scale:
        assert gate_scale is not None and up_scale is not None
    if shared_gate is None:
        shared_gate, shared_up = w_gate, w_up
        shared_gate_scale, shared_up_scale = gate_scale, up_scale
    else:
        assert shared_gate.is_contiguous() and shared_up.is_contiguous()
        assert not has_scale or (shared_gate_scale is not None and shared_up_scale is not None)
    if not has_scale:
        return False, shared_gate, shared_up, (dummy, dummy, dummy, dummy)
    return True, shared_gate, shared_up, (gate_scale, up_scale, shared_gate_scale, shared_up_scale)


def down_operands(w_down, shared_down, down_scale, shared_down_scale, dummy):
    """The weight operands every down kernel takes: (HAS_SCALE, shared_down, (down scale, shared down scale)),
    as :func:`gate_up_operands`."""
    assert w_down.is_contiguous()
    has_scale, (down_scale, shared_down_scale) = _scales(down_scale, shared_down_scale)
    if has_scale:
        assert down_scale is not None
    if shared_down is None:
        shared_down, shared_down_scale = w_down, down_scale
    else:
        assert shared_down.is_contiguous()
        assert not has_scale or shared_down_scale is not None
    if not has_scale:
        return False, shared_down, (dummy, dummy)
    return True, shared_down, (down_scale, shared_down_scale)


def moe_gate_up(x, ids, weights, w_gate, w_up, shared_gate, shared_up,
                gate_scale=None, up_scale=None, shared_gate_scale=None, shared_up_scale=None):
    n, top_k = ids.shape
    experts, inter, d = w_gate.shape
    ns = _shared_slots(shared_gate, inter, 0)
    assert x.stride(-1) == 1
    ids = ids.contiguous()
    weights = weights.contiguous()
    has_scale, shared_gate, shared_up, scales = gate_up_operands(
        w_gate, w_up, shared_gate, shared_up, (gate_scale, up_scale, shared_gate_scale, shared_up_scale), weights)
    rows = n * (top_k + ns)
    out = torch.empty(n, top_k + ns, inter, device=x.device, dtype=x.dtype)

    def grid(meta):
        return (rows, triton.cdiv(inter, meta["BLOCK_N"]))

    _moe_gate_up_kernel[grid](
        x, ids, weights, w_gate, w_up, shared_gate, shared_up, out, *scales,
        d, inter, x.stride(0), w_gate.stride(0), rows, TOP_K=top_k, N_SHARED=ns, HAS_SCALE=has_scale,
        **launch_options(x),
    )
    return out


def moe_down(hidden, ids, w_down, shared_down, down_scale=None, shared_down_scale=None):
    n, top_k = ids.shape
    experts, d, inter = w_down.shape
    ns = _shared_slots(shared_down, inter, 1)
    assert hidden.is_contiguous()
    ids = ids.contiguous()
    rows = n * (top_k + ns)
    out = torch.empty(n, top_k + ns, d, device=hidden.device, dtype=torch.float32)
    has_scale, shared_down, scales = down_operands(w_down, shared_down, down_scale, shared_down_scale, out)

    def grid(meta):
        return (rows, triton.cdiv(d, meta["BLOCK_N"]))

    _moe_down_kernel[grid](
        hidden, ids, w_down, shared_down, out, *scales,
        d, inter, w_down.stride(0), shared_down.stride(0), rows, TOP_K=top_k, N_SHARED=ns, HAS_SCALE=has_scale,
        **launch_options(hidden),
    )
    return out


# --------------------------------------------------------------------------------------------- one-row projections
# the dense projections' shapes (N 2-4K outputs, K 2K): narrow column tiles give every SM work; whole-K tiles
# (one load per program, no loop) keep the most bytes in flight
_GEMV_CONFIGS_ROW = [
    _gemv_config(2, 2048, 4, True),
    _gemv_config(4, 2048, 4, True),
    _gemv_config(8, 2048, 8, True),
    _gemv_config(4, 512, 2, False),
    _gemv_config(8, 512, 4, False),
    _gemv_config(8, 256, 2, False),
    _gemv_config(16, 256, 4, False),
    _gemv_config(16, 512, 8, False),
    _gemv_config(32, 256, 4, True),
    _gemv_config(8, 1024, 4, False),
    _gemv_config(16, 1024, 8, True),
]


@triton.autotune(configs=_configs(_GEMV_CONFIGS_ROW), key=["N", "K"])
@triton.jit
def _row_gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, N, K, stride_w,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    REDUCE_EACH: tl.constexpr, PDL: tl.constexpr,
):
    """out[n] = Σ_k w[n, k] x[k] for one row: CUDA-core GEMV, many small column tiles so every SM streams
    weight (cuBLAS took 6.8 µs, ~1.1 TB/s, for the 7.5 MB fused qkv weight on an H100). The first weight tile
    is loaded before the PDL wait: it streams while the kernel that writes x finishes."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    w_first = _first_tile(w_ptr, offs_n, mn, K, stride_w, BLOCK_K)
    pdl_wait_and_release(PDL)
    y = _first_tile_dot(w_first, x_ptr, K, BLOCK_K)
    y += _gemv_tile(x_ptr + BLOCK_K, w_ptr + BLOCK_K, offs_n, mn, K - BLOCK_K, stride_w, BLOCK_N, BLOCK_K,
                    REDUCE_EACH)  # the rest of K (nothing for whole-K tiles)
    if HAS_SCALE:
        y = y * tl.load(s_ptr + offs_n, mask=mn, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mn, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mn)


def row_gemv(x, weight, scale, bias, out_dtype=None):
    """x (1, K) · weight (N, K)ᵀ (+ bias) in ``out_dtype`` (x's dtype by default); ``scale`` (N,) fp32 for an fp8
    weight, else None."""
    m, k = x.shape
    n = weight.shape[0]
    assert m == 1 and weight.shape[1] == k and weight.stride(-1) == 1
    x = x.contiguous()
    out = torch.empty(1, n, device=x.device, dtype=out_dtype or x.dtype)
    dummy = scale.float().contiguous() if scale is not None else out

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    _row_gemv_kernel[grid](x, weight, dummy, bias if bias is not None else dummy, out, n, k, weight.stride(0),
                           HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, **launch_options(x))
    return out
