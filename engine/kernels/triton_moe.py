"""Triton kernels behind ``engine.kernels.moe`` (CUDA only)."""

from __future__ import annotations

import math

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


# ------------------------------------------------------------------------------------------------ dispatch
# A counting sort in two launches. The pairs are cut into chunks of `chunk` flat pairs, each chunk walked in
# sub-blocks of SUB pairs held as a (SUB, E_PAD) one-hot tile (4,096 ints: registers, no shared-memory sort):
#   1. count: program c writes its chunk's per-expert counts, hist[c, :];
#   2. place: program c sums hist's columns (all rows: each expert's total, hence its start, and offsets; rows
#      before c: where this chunk's pairs of each expert begin), then ranks its pairs in flat order, a cumsum
#      down the one-hot tile, and writes inverse / tokens / row_weights.
# Stable by construction (chunks, sub-blocks and rows within one are all walked in flat order) and exact. A grid
# over experts (each program scanning all pairs) would be one launch but a serial pass of N / BLOCK steps per
# program on half the SMs, and triton_moe_tiles.expert_order (every pair ranked against every other, one launch)
# is O(N^2): right for a decode batch, not for 49K pairs. Here the work is spread over ~sqrt(N) programs, each
# walking ~sqrt(N) / SUB sub-blocks and ~sqrt(N) * E_PAD / 4,096 tiles of hist (A3B at 8K tokens: 192 programs,
# 4 + 3 steps), with sizes only from the input's shape (no host sync, fine under CUDA-graph capture).
_TILE = 4096  # ints in one (rows, E_PAD) tile


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16, round to nearest even, by its bits: what torch's cast does, on the GPU and also under
    Triton's interpreter (whose own cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _dispatch_count_kernel(ids_ptr, hist_ptr, n_pairs, chunk, E_PAD: tl.constexpr, SUB: tl.constexpr):
    c = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for s in range(0, chunk, SUB):
        i = c * chunk + s + tl.arange(0, SUB)
        e = tl.load(ids_ptr + i, mask=i < n_pairs, other=-1).to(tl.int32)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + c * E_PAD + experts, counts)


@triton.jit
def _dispatch_place_kernel(ids_ptr, w_ptr, hist_ptr, tokens_ptr, rows_ptr, offsets_ptr, inverse_ptr,
                           n_pairs, n_chunks, chunk, n_experts,
                           TOP_K: tl.constexpr, E_PAD: tl.constexpr, SUB: tl.constexpr, ROWS: tl.constexpr,
                           ROUND_BF16: tl.constexpr):
    c = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    before = tl.zeros([E_PAD], dtype=tl.int32)
    for r0 in range(0, n_chunks, ROWS):
        r = r0 + tl.arange(0, ROWS)
        tile = tl.load(hist_ptr + r[:, None] * E_PAD + experts[None, :], mask=(r < n_chunks)[:, None], other=0)
        total += tl.sum(tile, axis=0)
        before += tl.sum(tl.where((r < c)[:, None], tile, 0), axis=0)
    ends = tl.cumsum(total, axis=0)
    if c == 0:
        tl.store(offsets_ptr + experts, ends, mask=experts < n_experts)
    nxt = ends - total + before  # the row of this chunk's next pair of each expert
    for s in range(0, chunk, SUB):
        i = c * chunk + s + tl.arange(0, SUB)
        valid = i < n_pairs
        e = tl.load(ids_ptr + i, mask=valid, other=-1).to(tl.int32)
        hit = (e[:, None] == experts[None, :]).to(tl.int32)
        pos = tl.sum(hit * (tl.cumsum(hit, axis=0) + nxt[None, :] - 1), axis=1)
        nxt += tl.sum(hit, axis=0)
        tl.store(inverse_ptr + i, pos.to(tl.int64), mask=valid)
        tl.store(tokens_ptr + pos, (i // TOP_K).to(tl.int64), mask=valid)
        w = tl.load(w_ptr + i, mask=valid, other=0.0).to(tl.float32)  # exact for fp32 / bf16 / fp16 weights
        if ROUND_BF16:
            tl.store(rows_ptr + pos, _round_to_bf16(w), mask=valid)
        else:
            tl.store(rows_ptr + pos, w.to(rows_ptr.dtype.element_ty), mask=valid)


def dispatch(ids: torch.Tensor, weights: torch.Tensor, n_experts: int, dtype: torch.dtype,
             chunk: int | None = None, sub: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``engine.kernels.moe.dispatch_torch``'s outputs, bit for bit, in two launches. ``chunk`` / ``sub`` (pairs
    per program / per one-hot tile; chunk a multiple of sub) default to the sizes above; tests pass small ones
    to cover many chunks with few pairs. ids must lie in [0, n_experts) (the reference's scatter_add checks that;
    here an id outside claims no row)."""
    top_k = ids.shape[1]
    n_pairs = ids.numel()
    assert weights.shape == ids.shape and n_pairs > 0 and not ids.dtype.is_floating_point
    assert weights.dtype in (torch.float32, torch.bfloat16, torch.float16)
    e_pad = max(16, triton.next_power_of_2(n_experts))
    sub = sub or max(16, min(512, _TILE // e_pad))
    chunk = chunk or sub * triton.cdiv(math.isqrt(n_pairs), sub)
    assert chunk % sub == 0 and n_pairs + chunk < 2**31, (chunk, sub, n_pairs)
    n_chunks = triton.cdiv(n_pairs, chunk)
    device = ids.device
    flat_ids, flat_w = ids.contiguous().view(-1), weights.contiguous().view(-1)
    hist = torch.empty(n_chunks, e_pad, device=device, dtype=torch.int32)
    tokens = torch.empty(n_pairs, device=device, dtype=torch.int64)
    row_weights = torch.empty(n_pairs, 1, device=device, dtype=dtype)
    offsets = torch.empty(n_experts, device=device, dtype=torch.int32)
    inverse = torch.empty(n_pairs, device=device, dtype=torch.int64)
    _dispatch_count_kernel[(n_chunks,)](flat_ids, hist, n_pairs, chunk, E_PAD=e_pad, SUB=sub, num_warps=4)
    _dispatch_place_kernel[(n_chunks,)](
        flat_ids, flat_w, hist, tokens, row_weights, offsets, inverse, n_pairs, n_chunks, chunk, n_experts,
        TOP_K=top_k, E_PAD=e_pad, SUB=sub, ROWS=max(1, _TILE // e_pad), ROUND_BF16=dtype == torch.bfloat16,
        num_warps=4,
    )
    return tokens, row_weights, offsets, inverse
