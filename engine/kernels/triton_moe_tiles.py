"""Expert-tiled MoE kernels for decode batches past the GEMV range (CUDA only; imported where Triton is).

Why: from about 8 rows on, the per-(token, slot) GEMVs read an expert's weights once per token that chose it,
and torch's grouped GEMM needs a sort, gathers, a separate silu pass and a scatter around it (~20 kernels per
layer at batch 64). Here each program owns one expert (or one shared-expert slice) and one tile of output
columns, reads that weight tile once and multiplies it by every row routed to the expert (``tl.dot`` on up to
``BLOCK_M`` rows at a time): three launches per layer (order, gate/up, down), weights read once per step.

The layout in and out is the GEMV kernels' (``engine.kernels.decode.moe_gate_up`` / ``moe_down``): hidden
(T, k+ns, I) in the activations' dtype, per-slot outputs (T, k+ns, D) fp32 summed by the next add+RMSNorm; so the
two backends are interchangeable and share their PyTorch references. FP8 weights convert in registers and their
per-row scales multiply the fp32 sums, as in the GEMVs; the engine does not route fp8 experts here yet (at 64 rows
the fp8 grouped GEMM's replay was 2.5 % faster on the H100: ``engine.model.decoder.MOE_GEMV_MAX_ROWS``), the GPU
tests keep this path correct for when a faster fp8 tile (an fp8 ``tl.dot`` on quantised activations) lands.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton_decode import _configs, _pow2, _shared_slots, down_operands, gate_up_operands
from engine.kernels.triton_pdl import launch_options
from engine.kernels.triton_pdl import wait_and_release as pdl_wait_and_release

_ORDER_ROWS = 16  # pairs ranked per program of the order kernel


@triton.jit
def _expert_order_kernel(ids_ptr, order_ptr, starts_ptr, n_pairs, n_experts,
                         BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr):
    """order[rank(p)] = p with pairs ranked by (expert, p); starts[e] = pairs with an expert below e. Ranking by
    counting (every program sees all pairs) instead of sorting: one launch, no host sync, graph-capturable."""
    pid = tl.program_id(0)
    offs_j = tl.arange(0, BLOCK_P)
    pdl_wait_and_release(PDL)
    e_j = tl.load(ids_ptr + offs_j, mask=offs_j < n_pairs, other=1 << 30).to(tl.int32)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = offs_i < n_pairs
    e_i = tl.load(ids_ptr + offs_i, mask=mi, other=0).to(tl.int32)
    before = (e_j[None, :] < e_i[:, None]) | ((e_j[None, :] == e_i[:, None]) & (offs_j[None, :] < offs_i[:, None]))
    rank = tl.sum(before.to(tl.int32), axis=1)
    tl.store(order_ptr + rank, offs_i, mask=mi)
    if pid == 0:
        for e0 in range(0, n_experts + 1, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            below = tl.sum((e_j[None, :] < offs_e[:, None]).to(tl.int32), axis=1)
            tl.store(starts_ptr + offs_e, below, mask=offs_e <= n_experts)


def expert_order(ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (T, k) -> (order (T·k,) int32: flat (token, slot) pairs grouped by expert, starts (E+1,) int32)."""
    flat = ids.reshape(-1)
    if flat.stride(0) != 1:
        flat = flat.contiguous()
    n_pairs = flat.numel()
    order = torch.empty(n_pairs, dtype=torch.int32, device=ids.device)
    starts = torch.empty(n_experts + 1, dtype=torch.int32, device=ids.device)
    _expert_order_kernel[(triton.cdiv(n_pairs, _ORDER_ROWS),)](
        flat, order, starts, n_pairs, n_experts,
        BLOCK_P=_pow2(n_pairs, 16), BLOCK_I=_ORDER_ROWS, BLOCK_E=16, num_warps=4, **launch_options(flat),
    )
    return order, starts


def _tile_config(m: int, n: int, k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


# the autotuner's picks on an H100 (bench/moe_kernel_bench.py + engine_bench, bf16 and fp8, 2-128 rows): small
# tiles for few rows, 64x64 tiles once the shared experts' 33+ rows dominate; fp8 picked the same shapes
_TILE_CONFIGS = [
    _tile_config(64, 64, 128, 4, 3),
    _tile_config(32, 64, 128, 4, 4),
    _tile_config(16, 32, 256, 4, 3),
    _tile_config(16, 32, 128, 2, 4),
    _tile_config(16, 64, 128, 4, 4),
    _tile_config(16, 128, 128, 4, 3),
    _tile_config(32, 64, 256, 8, 3),
]


def row_class(rows: int) -> int:
    """The autotuner's key for a row count: 1-16, 17-32, 33+. Keyed by exact rows, every new CUDA-graph bucket
    re-ran the benchmark of every config in the middle of serving (measured: the first 128-row batch took 94 ms a
    step instead of 15)."""
    return 0 if rows <= 16 else 1 if rows <= 32 else 2


@triton.jit
def _rows(order_ptr, start, count, m0, j, TOP_K: tl.constexpr, N_SHARED: tl.constexpr, BLOCK_M: tl.constexpr,
          SHARED: tl.constexpr):
    """The chunk's row offsets: (token, flat (token, slot) index into the (T, k+ns, ·) layouts, valid mask)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mm = offs_m < count
    if SHARED:
        token = offs_m
        slot = TOP_K + j
        pair = offs_m  # unused
    else:
        pair = tl.load(order_ptr + start + offs_m, mask=mm, other=0)
        token = pair // TOP_K
        slot = pair % TOP_K
    return token.to(tl.int64), (token * (TOP_K + N_SHARED) + slot).to(tl.int64), pair, mm


@triton.jit
def _gate_up_chunk(x_ptr, rw_ptr, g_base, u_base, gs_row, us_row, out_ptr, order_ptr, start, count, m0, j,
                   offs_n, mn, D, I, stride_x,
                   TOP_K: tl.constexpr, N_SHARED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, SHARED: tl.constexpr, HAS_SCALE: tl.constexpr):
    token, row, pair, mm = _rows(order_ptr, start, count, m0, j, TOP_K, N_SHARED, BLOCK_M, SHARED)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < D
        xk = tl.load(x_ptr + token[:, None] * stride_x + offs_k[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        m2 = mk[:, None] & mn[None, :]
        off = offs_n[None, :] * D + offs_k[:, None]  # (BLOCK_K, BLOCK_N) view of the row-major (I, D) weight
        wg = tl.load(g_base + off, mask=m2, other=0.0).to(xk.dtype)
        wu = tl.load(u_base + off, mask=m2, other=0.0).to(xk.dtype)
        acc_g = tl.dot(xk, wg, acc_g)
        acc_u = tl.dot(xk, wu, acc_u)
    if HAS_SCALE:
        acc_g = acc_g * tl.load(gs_row + offs_n, mask=mn, other=0.0)[None, :]
        acc_u = acc_u * tl.load(us_row + offs_n, mask=mn, other=0.0)[None, :]
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    if not SHARED:
        h = h * tl.load(rw_ptr + pair, mask=mm, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + row[:, None] * I + offs_n[None, :], h.to(out_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


@triton.autotune(configs=_configs(_TILE_CONFIGS), key=["D", "I", "rows_key"])
@triton.jit(do_not_specialize=["n_rows", "rows_key"])
def _tiled_gate_up_kernel(
    x_ptr, order_ptr, starts_ptr, rw_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, out_ptr,
    gs_ptr, us_ptr, sgs_ptr, sus_ptr,
    D, I, stride_x, stride_we, n_rows, rows_key, n_experts,
    TOP_K: tl.constexpr, N_SHARED: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait_and_release(PDL)
    e = tl.program_id(0)  # routed expert, or n_experts + shared slice
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < I
    if e < n_experts:
        start = tl.load(starts_ptr + e)
        count = tl.load(starts_ptr + e + 1) - start
        e64 = e.to(tl.int64)
        for m0 in range(0, count, BLOCK_M):
            _gate_up_chunk(x_ptr, rw_ptr, wg_ptr + e64 * stride_we, wu_ptr + e64 * stride_we, gs_ptr + e64 * I,
                           us_ptr + e64 * I, out_ptr, order_ptr, start, count, m0, 0, offs_n, mn, D, I, stride_x,
                           TOP_K, N_SHARED, BLOCK_M, BLOCK_N, BLOCK_K, False, HAS_SCALE)
    else:
        j = (e - n_experts).to(tl.int64)
        for m0 in range(0, n_rows, BLOCK_M):
            _gate_up_chunk(x_ptr, rw_ptr, sg_ptr + j * I * D, su_ptr + j * I * D, sgs_ptr + j * I, sus_ptr + j * I,
                           out_ptr, order_ptr, 0, n_rows, m0, j, offs_n, mn, D, I, stride_x,
                           TOP_K, N_SHARED, BLOCK_M, BLOCK_N, BLOCK_K, True, HAS_SCALE)


@triton.jit
def _down_chunk(h_ptr, w_base, w_row, scale_row, out_ptr, order_ptr, start, count, m0, j, offs_n, mn, D, I,
                TOP_K: tl.constexpr, N_SHARED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SHARED: tl.constexpr, HAS_SCALE: tl.constexpr):
    token, row, pair, mm = _rows(order_ptr, start, count, m0, j, TOP_K, N_SHARED, BLOCK_M, SHARED)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < I
        hk = tl.load(h_ptr + row[:, None] * I + offs_k[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_base + offs_n[None, :] * w_row + offs_k[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
        acc = tl.dot(hk, w.to(hk.dtype), acc)
    if HAS_SCALE:
        acc = acc * tl.load(scale_row + offs_n, mask=mn, other=0.0)[None, :]
    tl.store(out_ptr + row[:, None] * D + offs_n[None, :], acc, mask=mm[:, None] & mn[None, :])


@triton.autotune(configs=_configs(_TILE_CONFIGS), key=["D", "I", "rows_key"])
@triton.jit(do_not_specialize=["n_rows", "rows_key"])
def _tiled_down_kernel(
    h_ptr, order_ptr, starts_ptr, wd_ptr, sd_ptr, out_ptr, ds_ptr, sds_ptr,
    D, I, stride_we, shared_row, n_rows, rows_key, n_experts,
    TOP_K: tl.constexpr, N_SHARED: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait_and_release(PDL)
    e = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < D
    if e < n_experts:
        start = tl.load(starts_ptr + e)
        count = tl.load(starts_ptr + e + 1) - start
        e64 = e.to(tl.int64)
        for m0 in range(0, count, BLOCK_M):
            _down_chunk(h_ptr, wd_ptr + e64 * stride_we, I, ds_ptr + e64 * D, out_ptr, order_ptr, start, count, m0,
                        0, offs_n, mn, D, I, TOP_K, N_SHARED, BLOCK_M, BLOCK_N, BLOCK_K, False, HAS_SCALE)
    else:
        j = (e - n_experts).to(tl.int64)
        for m0 in range(0, n_rows, BLOCK_M):
            _down_chunk(h_ptr, sd_ptr + j * I, shared_row, sds_ptr, out_ptr, order_ptr, 0, n_rows, m0, j, offs_n,
                        mn, D, I, TOP_K, N_SHARED, BLOCK_M, BLOCK_N, BLOCK_K, True, HAS_SCALE)


def tiled_gate_up(x, order, starts, weights, w_gate, w_up, shared_gate, shared_up,
                  gate_scale=None, up_scale=None, shared_gate_scale=None, shared_up_scale=None):
    """``engine.kernels.decode.moe_gate_up`` for many rows, given :func:`expert_order`'s (order, starts)."""
    n, top_k = weights.shape
    experts, inter, d = w_gate.shape
    ns = _shared_slots(shared_gate, inter, 0)
    assert x.stride(-1) == 1
    weights = weights.contiguous()
    has_scale, shared_gate, shared_up, scales = gate_up_operands(
        w_gate, w_up, shared_gate, shared_up, (gate_scale, up_scale, shared_gate_scale, shared_up_scale), weights)
    out = torch.empty(n, top_k + ns, inter, device=x.device, dtype=x.dtype)

    def grid(meta):
        return (experts + ns, triton.cdiv(inter, meta["BLOCK_N"]))

    _tiled_gate_up_kernel[grid](
        x, order, starts, weights, w_gate, w_up, shared_gate, shared_up, out, *scales,
        d, inter, x.stride(0), w_gate.stride(0), n, row_class(n), experts, TOP_K=top_k, N_SHARED=ns,
        HAS_SCALE=has_scale, **launch_options(x),
    )
    return out


def tiled_down(hidden, order, starts, w_down, shared_down, down_scale=None, shared_down_scale=None):
    """``engine.kernels.decode.moe_down`` for many rows, given :func:`expert_order`'s (order, starts)."""
    n, slots, inter = hidden.shape
    experts, d, _ = w_down.shape
    ns = _shared_slots(shared_down, inter, 1)
    top_k = slots - ns
    assert hidden.is_contiguous()
    out = torch.empty(n, slots, d, device=hidden.device, dtype=torch.float32)
    has_scale, shared_down, scales = down_operands(w_down, shared_down, down_scale, shared_down_scale, out)

    def grid(meta):
        return (experts + ns, triton.cdiv(d, meta["BLOCK_N"]))

    _tiled_down_kernel[grid](
        hidden, order, starts, w_down, shared_down, out, *scales,
        d, inter, w_down.stride(0), shared_down.stride(0), n, row_class(n), experts, TOP_K=top_k, N_SHARED=ns,
        HAS_SCALE=has_scale, **launch_options(hidden),
    )
    return out
