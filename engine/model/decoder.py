"""DeepSeek-V3 decoder as used by Kimi-VL (Moonlight): MLA attention, sigmoid-routed MoE, RMSNorm.

Module and parameter names follow the official checkpoint (``language_model.model.layers.N.self_attn.q_proj``
and so on) so the loader maps keys one to one. The one exception is the routed experts: the checkpoint
stores one ``gate_proj/up_proj/down_proj`` per expert, while we keep them stacked in three 3-D tensors so
that expert compute is a batched kernel, not a Python loop; ``ExpertBank.checkpoint_slices`` tells the
loader which official key lands in which slice.

Numerics follow the official remote code (spec §2.8): fp32 RMSNorm, interleaved ("GPT-J") RoPE on the 64 rope
dims, softmax scale 1/sqrt(qk_head_dim) times YaRN's mscale² when YaRN is on, router in fp32 with the
correction bias used only for selection, group-limited top-k with masked groups filled with 0.0 (official;
only differs from -inf when biased scores can be negative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TextConfig
from engine.kernels import decode as fused_ops
from engine.kernels import fp8, prefill_layout, use_triton
from engine.kernels.moe import combine as moe_combine
from engine.kernels.moe import dispatch as moe_dispatch
from engine.kernels.moe import silu_mul_scale
from engine.model.rope import apply_interleaved_rope

__all__ = ["apply_interleaved_rope"]  # re-exported: callers import it from here

# A fused-backend step runs the MoE as per-(token, slot) expert GEMVs up to MOE_GEMV_MAX_ROWS rows (they beat sort +
# grouped GEMM there; their PyTorch reference runs anywhere), and where Triton runs, as expert-tiled kernels past
# the GEMV limit up to MOE_TILED_MAX_ROWS (every decode CUDA-graph bucket): each chosen expert's weights read once
# for all its rows (engine.kernels.triton_moe_tiles). Measured on an H100 (bench/RESULTS.md, "Expert tiles"):
# with 16-bit weights the tiles win from 2 rows on (decode b2 +1.2 %, b4 +4.0 %, b8 +8.7 %, b64 +26 %); with fp8
# weights (converted in registers) the GEMVs stay ahead up to 8 rows, the tiles beat the grouped path (sort + fp8
# grouped GEMM) at 16 and 32 rows (graph replay 7.20 vs 9.52 ms, 9.20 vs 11.36 ms) and tie at 64 (13.22 vs
# 13.16 ms), so fp8 experts take GEMVs, then tiles up to MOE_TILED_MAX_ROWS_FP8, then the grouped path.
MOE_GEMV_MAX_ROWS = 8
MOE_GEMV_MAX_ROWS_16BIT = 1
MOE_TILED_MAX_ROWS = 128
MOE_TILED_MAX_ROWS_FP8 = 32


def merge_rows(tensors: list[torch.Tensor], dim: int) -> tuple[torch.Tensor, list[nn.Parameter]]:
    """One tensor holding ``tensors`` side by side along ``dim`` and each of them as a parameter viewing its part
    (values kept): layers whose projections read the same input then run one GEMM over the merged matrix while
    every weight keeps its checkpoint name and loads straight into its view. Made outside inference mode, so the
    parameters stay usable outside it."""
    with torch.inference_mode(False), torch.no_grad():
        merged = torch.cat([t.detach() for t in tensors], dim=dim)
    views, start = [], 0
    for t in tensors:
        views.append(nn.Parameter(merged.narrow(dim, start, t.shape[dim]), requires_grad=t.requires_grad))
        start += t.shape[dim]
    return merged, views


def still_merged(merged: torch.Tensor, parts: list[torch.Tensor], dim: int) -> torch.Tensor | None:
    """``merged`` if ``parts`` are still its views in order (else None: e.g. ``module.to()`` gave each weight its
    own storage, or a loader replaced one), so callers fall back to one GEMM per part."""
    start = 0
    for part in parts:
        if (part.dtype != merged.dtype or part.device != merged.device
                or part.data_ptr() != merged.narrow(dim, start, part.shape[dim]).data_ptr()):
            return None
        start += part.shape[dim]
    return merged if start == merged.shape[dim] else None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel; it normalises in fp32 internally like the official code
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)

    def add_forward(
        self, parts: torch.Tensor, residual: torch.Tensor | None, fused: bool, want_fp32: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """h = residual + parts and its norm: (h, norm(h), norm(h) in fp32 when ``want_fp32``).

        ``fused``: one kernel (``engine.kernels.decode.add_rms_norm``) that also sums per-slot MoE partial
        outputs (T, S, D); token rows (T, D) where Triton runs (a prompt chunk) take the same kernel; otherwise the
        plain add (rounded once, as the kernel) and this module."""
        if fused or (parts.dim() == 2 and use_triton(parts)):
            return fused_ops.add_rms_norm(parts, residual, self.weight, self.eps, want_fp32)
        h = parts if residual is None else residual + parts
        normed = self(h)
        return h, normed, (normed.float() if want_fp32 else None)


# --------------------------------------------------------------------------------------------- RoPE / YaRN
def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


class RotaryEmbedding(nn.Module):
    """Interleaved rotary embedding over the ``qk_rope_head_dim`` dims, with DeepSeek YaRN when configured."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
        exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        inv_freq = 1.0 / (base**exponents)
        self.cos_sin_scale = 1.0
        self.softmax_scale = cfg.qk_head_dim**-0.5
        yarn = cfg.yarn
        if yarn is not None:
            low = math.floor(_yarn_correction_dim(yarn.beta_fast, dim, base, yarn.original_max_position_embeddings))
            high = math.ceil(_yarn_correction_dim(yarn.beta_slow, dim, base, yarn.original_max_position_embeddings))
            low, high = max(low, 0), min(high, dim - 1)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
            extrapolate = 1.0 - ramp
            inv_freq = inv_freq / yarn.factor * (1 - extrapolate) + inv_freq * extrapolate
            self.cos_sin_scale = _yarn_mscale(yarn.factor, yarn.mscale) / _yarn_mscale(yarn.factor, yarn.mscale_all_dim)
            if yarn.mscale_all_dim:
                self.softmax_scale *= _yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., L) -> cos, sin (..., L, dim/2), computed in fp32 and cast to ``dtype`` once per
        forward (the official code also applies them in the activation dtype)."""
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)
        cos, sin = angles.cos() * self.cos_sin_scale, angles.sin() * self.cos_sin_scale
        return cos.to(dtype), sin.to(dtype)


# --------------------------------------------------------------------------------------------- attention
@dataclass
class LatentCache:
    """Contiguous per-layer cache of the MLA latent (normed c_kv and rotated k_pe) for the reference generate.

    The serving runtime keeps the same two tensors in a paged pool; this one simply concatenates.
    """

    compressed_kv: list[torch.Tensor | None] = field(default_factory=list)
    k_pe: list[torch.Tensor | None] = field(default_factory=list)

    def length(self) -> int:
        return 0 if not self.compressed_kv or self.compressed_kv[0] is None else self.compressed_kv[0].shape[1]

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.compressed_kv) <= layer:
            self.compressed_kv.append(None)
            self.k_pe.append(None)
        if self.compressed_kv[layer] is not None:
            c_kv = torch.cat([self.compressed_kv[layer], c_kv], dim=1)
            k_pe = torch.cat([self.k_pe[layer], k_pe], dim=1)
        self.compressed_kv[layer], self.k_pe[layer] = c_kv, k_pe
        return c_kv, k_pe


class AttentionContext(Protocol):
    """What the decoder's modules need from a step: where keys live and which kernels attend (nano-vllm's
    "context"). ``fused``: the fused decode backend runs (one prologue kernel, residual add fused with each norm,
    expert GEMVs); ``attend`` gets the fused projection's q and kv (not yet normed or rotated: the kv norm,
    RoPE and cache write are the context's, so a paged context does them in one kernel) and returns the attention
    output before ``o_proj``; ``attend_fused`` does the same from the normed hidden rows (fused contexts only)."""

    fused: bool

    def attend(self, attn: DeepseekV3Attention, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor: ...

    def attend_fused(self, attn: DeepseekV3Attention, x: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor: ...


class DenseAttention:
    """Attention context of the reference path (``engine.generate``, parity tests): (B, L) queries, an additive
    mask (left padding) or None, and an optional contiguous :class:`LatentCache`. K/V are expanded from the
    latent through ``kv_b_proj`` for every call. The serving runtime passes a paged context instead
    (``engine.model.paged_attention.PagedAttention``); both expose ``fused`` and ``attend``."""

    fused = False  # the fused decode kernels are a paged-cache backend

    def attend_fused(self, attn, x, cos, sin):  # pragma: no cover - never fused
        raise NotImplementedError("the reference context has no fused backend")

    def __init__(self, mask: torch.Tensor | None, softmax_scale: float, cache: LatentCache | None = None) -> None:
        self.mask, self.softmax_scale, self.cache = mask, softmax_scale, cache

    def attend(self, attn: DeepseekV3Attention, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        """q (B, L, H*(nope+rope)), kv (B, L, R+P) from the projection, cos/sin (B, L, P/2) -> (B, L, H*v)."""
        query, latent = attn.query_and_latent(q, kv, cos, sin)
        c_kv, k_pe = latent.split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
        if self.cache is not None:
            c_kv, k_pe = self.cache.update(attn.layer_idx, c_kv, k_pe)
        bsz, q_len, heads = query.shape[:3]
        kv_len = c_kv.shape[1]
        kv = attn.kv_b_proj(c_kv).view(bsz, kv_len, heads, attn.qk_nope_head_dim + attn.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([attn.qk_nope_head_dim, attn.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(-1, heads, -1, -1)], dim=-1)
        query = query.transpose(1, 2)
        causal = self.mask is None and q_len > 1  # only produced when the queries start at position 0
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=self.mask, is_causal=causal,
                                             scale=self.softmax_scale)
        return out.transpose(1, 2).reshape(bsz, q_len, heads * attn.v_head_dim)


class DeepseekV3Attention(nn.Module):
    """Multi-head latent attention. The projections, norm and RoPE are this module's; where the keys live and
    which kernels attend is the context's (:class:`DenseAttention` or the runtime's paged one)."""

    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_head_dim, self.kv_lora_rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.q_head_dim = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.q_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)  # official code builds it without eps
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.num_heads * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=1e-6)  # official code builds it without eps
        self.kv_b_proj = nn.Linear(
            cfg.kv_lora_rank, self.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * cfg.v_head_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def fuse_qkv_(self) -> None:
        """Lay ``q_proj`` and ``kv_a_proj_with_mqa`` out as one ``(H*(nope+rope) + R + P, D)`` matrix, both weights
        becoming row views of it (values kept, no extra memory), so a decode step projects q and the compressed kv
        with one GEMV (:attr:`fused_qkv_weight`).  The loader calls it before reading the checkpoint, so the
        weights load straight into the views and keep their checkpoint names.  No-op with ``q_lora_rank`` or
        biases."""
        if not hasattr(self, "q_proj") or self.q_proj.bias is not None or self.kv_a_proj_with_mqa.bias is not None:
            return
        wq, wkv = self.q_proj.weight, self.kv_a_proj_with_mqa.weight
        if wq.dtype != wkv.dtype or wq.device != wkv.device or self.fused_qkv_weight is not None:
            return
        self._qkv_weight, (self.q_proj.weight, self.kv_a_proj_with_mqa.weight) = merge_rows([wq, wkv], dim=0)

    @property
    def fused_qkv_weight(self) -> torch.Tensor | None:
        """The ``[q_proj; kv_a_proj_with_mqa]`` matrix of :meth:`fuse_qkv_`, or ``None`` if the layout was never
        made or no longer holds (e.g. ``module.to()`` gave each weight its own storage): callers then project
        separately."""
        merged = getattr(self, "_qkv_weight", None)
        if merged is None:
            return None
        return still_merged(merged, [self.q_proj.weight, self.kv_a_proj_with_mqa.weight], dim=0)

    @property
    def fused_qkv_scale(self) -> torch.Tensor | None:
        """Per-row fp32 scales of :attr:`fused_qkv_weight` once the loader quantised it to fp8 (else None):
        project with ``engine.kernels.fp8.linear(x, fused_qkv_weight, fused_qkv_scale)``."""
        return getattr(self, "_qkv_scale", None) if self.fused_qkv_weight is not None else None

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def project_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (normed compressed kv, un-rotated shared rope key)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), k_pe

    def project_qkv(self, x: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., D) -> (q (..., H*(nope+rope)), kv (..., R+P) un-normed and un-rotated): one GEMV over the
        :meth:`fuse_qkv_` matrix when that layout holds, else the two projections. ``fused`` (a decode step's
        rows (T, D)): the few-row kernels of ``engine.kernels.decode.linear``."""
        merged = self.fused_qkv_weight
        if merged is None:
            return self.project_q(x), self.kv_a_proj_with_mqa(x)
        project = fused_ops.linear if fused else fp8.linear
        q_rows = merged.shape[0] - self.kv_a_proj_with_mqa.weight.shape[0]
        q, kv = project(x, merged, self.fused_qkv_scale).split(
            [q_rows, self.kv_lora_rank + self.qk_rope_head_dim], dim=-1)
        return q, kv

    def project_out(self, values: torch.Tensor, fused: bool) -> torch.Tensor:
        """``o_proj``; a decode step's rows (``fused``) on the few-row kernels."""
        if not fused:
            return self.o_proj(values)
        return fused_ops.linear(values, self.o_proj.weight, fp8.weight_scale(self.o_proj), self.o_proj.bias)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK (H, nope, R), W_UV (H, v, R)): views of ``kv_b_proj``'s weight for attention in latent space
        (an fp8 ``kv_b_proj`` gives views of one dequantised copy, 4 MB per A3B layer, made once per weight)."""
        weight = self.kv_b_proj.weight
        cached = getattr(self, "_absorbed", None)
        if cached is None or cached[0] is not weight:
            dense = fp8.dense_weight(self.kv_b_proj, self.kv_a_layernorm.weight.dtype if fp8.is_fp8(weight) else weight.dtype)
            w = dense.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
            cached = (weight, w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :])
            self._absorbed = cached
        return cached[1], cached[2]

    def query_and_latent(self, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projections q (..., H*(nope+rope)) and kv (..., R+P) -> (query (..., H, nope+rope) with its rope
        part rotated, latent (..., R+P) = [kv_a_layernorm(c_kv) | rope(k_pe)]): the reference; a paged context
        does it in one kernel with the cache write (``engine.kernels.prefill_layout.prologue``)."""
        norm = self.kv_a_layernorm
        return prefill_layout.query_and_latent_torch(q, kv, self.num_heads, self.qk_nope_head_dim,
                                                     self.qk_rope_head_dim, self.kv_lora_rank, norm.weight,
                                                     norm.eps, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """x (..., D) -> (..., D); cos/sin (..., P/2) for x's positions; ``ctx`` the step's attention context.
        A fused context (pure decode on the paged cache) runs its one-kernel prologue from x; otherwise the
        projections happen here and the context norms, rotates and attends (:meth:`query_and_latent`)."""
        if ctx.fused:
            return self.project_out(ctx.attend_fused(self, x, cos, sin), fused=True)
        q, kv = self.project_qkv(x)
        return self.o_proj(ctx.attend(self, q, kv, cos, sin))


# --------------------------------------------------------------------------------------------- FFN / MoE
class DeepseekV3MLP(nn.Module):
    """SwiGLU without biases (dense layers and the fused shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def fuse_gate_up_(self) -> None:
        """Lay ``gate_proj`` and ``up_proj`` out as one (2I, D) matrix, both weights becoming row views of it (no
        extra memory): prompt rows then project both with one GEMM (:attr:`gate_up_weight`). The loader calls it
        before reading the checkpoint, as :meth:`DeepseekV3Attention.fuse_qkv_`."""
        wg, wu = self.gate_proj.weight, self.up_proj.weight
        if wg.dtype != wu.dtype or wg.device != wu.device or self.gate_up_weight is not None:
            return
        self._gate_up, (self.gate_proj.weight, self.up_proj.weight) = merge_rows([wg, wu], dim=0)

    @property
    def gate_up_weight(self) -> torch.Tensor | None:
        """The ``[gate_proj; up_proj]`` matrix of :meth:`fuse_gate_up_` while that layout holds, else None."""
        merged = getattr(self, "_gate_up", None)
        return None if merged is None else still_merged(merged, [self.gate_proj.weight, self.up_proj.weight], dim=0)

    @property
    def gate_up_scale(self) -> torch.Tensor | None:
        """Per-row fp32 scales of :attr:`gate_up_weight` once the loader quantised it to fp8 (else None)."""
        return getattr(self, "_gate_up_scale", None) if self.gate_up_weight is not None else None

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """``fused`` (a decode step's rows): the three projections on the few-row kernels."""
        if fused:
            gate, up = (fused_ops.linear(x, m.weight, fp8.weight_scale(m)) for m in (self.gate_proj, self.up_proj))
            return fused_ops.linear(F.silu(gate) * up, self.down_proj.weight, fp8.weight_scale(self.down_proj))
        merged = self.gate_up_weight
        if merged is None:
            gate, up = self.gate_proj(x).flatten(0, -2), self.up_proj(x).flatten(0, -2)
        else:  # one GEMM for both
            gate, up = fp8.linear(x, merged, self.gate_up_scale).flatten(0, -2).chunk(2, dim=-1)
        # silu(gate) * up in one pass where the kernel runs (engine.kernels.moe)
        return self.down_proj(silu_mul_scale(gate, up, None).view(*x.shape[:-1], -1))


class MoEGate(nn.Module):
    """Router: scores, optional correction bias for selection, group-limited top-k, normalise and scale."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        assert cfg.n_routed_experts is not None and cfg.num_experts_per_tok is not None
        self.top_k = cfg.num_experts_per_tok
        self.n_experts = cfg.n_routed_experts
        self.n_group, self.topk_group = cfg.n_group or 1, cfg.topk_group or 1
        self.topk_method, self.scoring_func = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        if self.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(self.n_experts, dtype=torch.float32))

    def weight_exact_in(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The (fp32) weight in the 16-bit ``dtype`` if every value is exact there (a bf16 checkpoint's router
        always is), else None: prompt rows' logits then read x in its own dtype (``decode.router_logits``). Checked
        once per weight and dtype."""
        if dtype not in (torch.bfloat16, torch.float16) or self.weight.dtype == dtype:
            return None
        cached = getattr(self, "_weight_16bit", None)
        if cached is None or cached[0] is not self.weight or cached[1] != dtype:
            if self.weight.is_cuda and torch.cuda.is_current_stream_capturing():
                return None  # the check reads the device: never inside a CUDA-graph capture
            with torch.no_grad():
                low = self.weight.detach().to(dtype)
                exact = bool(torch.equal(low.to(self.weight.dtype), self.weight.detach()))
            cached = (self.weight, dtype, low if exact else None)
            self._weight_16bit = cached
        return cached[2]

    def selection_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, D) -> (scores (T, E) fp32, the values experts are chosen by (T, E): scores plus the correction
        bias, outside the kept groups zeroed). Split from forward so checks can read how close a choice was."""
        logits = F.linear(x.float(), self.weight.float())  # no-op cast when loaded (the loader keeps it fp32)
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        if self.topk_method == "greedy":
            return scores, scores
        choice = scores + self.e_score_correction_bias.float() if self.topk_method == "noaux_tc" else scores
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.max(dim=-1).values
            keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0).bool()
            choice = grouped.masked_fill(~group_mask[..., None], 0.0).flatten(1)
        return scores, choice

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, D) -> (expert ids (T, k) long, weights (T, k) fp32)."""
        scores, choice = self.selection_scores(x)
        ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.routed_scaling_factor


def grouped_mm_available(x: torch.Tensor) -> bool:
    """torch's grouped GEMM runs on CPU (any float dtype) and on CUDA for bf16 on SM80+."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8


class ExpertBank(nn.Module):
    """All routed experts' SwiGLU weights stacked: gate/up (E, I, D), down (E, D, I).

    Tokens are sorted by expert and each projection is one grouped GEMM over all experts (``backend``
    "grouped"), with no host sync; "loop" runs one matmul per expert that has tokens, the plain reference
    that also serves torch builds or devices without grouped GEMM.

    After :meth:`quantize_fp8_` (the loader's ``quantization: fp8``) the three tensors are float8_e4m3fn with
    per-output-row fp32 scales ``gate_scale``/``up_scale`` (E, I) and ``down_scale`` (E, D); the decode GEMVs
    read them as is (``engine.kernels.decode``), the grouped path through ``engine.kernels.fp8.grouped_linear``.
    """

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        self.register_buffer("gate_scale", None, persistent=False)
        self.register_buffer("up_scale", None, persistent=False)
        self.register_buffer("down_scale", None, persistent=False)
        self.backend: Literal["auto", "grouped", "loop"] = "auto"

    @property
    def is_fp8(self) -> bool:
        return self.down_scale is not None

    def fuse_gate_up_(self) -> None:
        """Lay ``gate_proj`` and ``up_proj`` out as one (E, 2I, D) tensor, both parameters becoming views of it (no
        extra memory; each expert's rows stay contiguous, gate and up one stride apart): prompt rows then run one
        grouped GEMM for both (:attr:`gate_up_weight`; 8K tokens on an H100: 2 ms less over 26 layers). The
        loader calls it before reading the checkpoint."""
        if self.gate_proj.dtype != self.up_proj.dtype or self.gate_up_weight is not None:
            return
        self._gate_up, (self.gate_proj, self.up_proj) = merge_rows([self.gate_proj, self.up_proj], dim=1)

    @property
    def gate_up_weight(self) -> torch.Tensor | None:
        """The (E, 2I, D) tensor of :meth:`fuse_gate_up_` while that layout holds, else None."""
        merged = getattr(self, "_gate_up", None)
        return None if merged is None else still_merged(merged, [self.gate_proj, self.up_proj], dim=1)

    @torch.no_grad()
    def quantize_fp8_(self) -> None:
        """Replace the loaded weights by fp8 + per-row scales, one tensor at a time (the bf16 copy is freed
        before the next is made). A merged gate/up layout is quantised as one tensor and kept (per-row scales make
        that identical to quantising each part); the parts' scales are contiguous copies (what the decode kernels
        index), the merged scales stay for the grouped GEMM."""
        if self.is_fp8:
            return
        merged = self.gate_up_weight
        names = [("down_proj", "down_scale")]
        if merged is None:
            self._gate_up = None
            names = [("gate_proj", "gate_scale"), ("up_proj", "up_scale"), *names]
        else:
            inter = self.gate_proj.shape[1]
            q, s = fp8.quantize_rows(merged)
            self.gate_proj = nn.Parameter(q[:, :inter], requires_grad=False)
            self.up_proj = nn.Parameter(q[:, inter:], requires_grad=False)
            self.gate_scale, self.up_scale = s[:, :inter].contiguous(), s[:, inter:].contiguous()
            self._gate_up, self._gate_up_scale = q, s
        for name, scale_name in names:
            q, s = fp8.quantize_rows(getattr(self, name).detach())
            setattr(self, name, nn.Parameter(q, requires_grad=False))
            setattr(self, scale_name, s)

    def _dense(self, name: str, expert: int, dtype: torch.dtype) -> torch.Tensor:
        w = getattr(self, name)[expert]
        if not self.is_fp8:
            return w
        return fp8.dequantize_rows(w, getattr(self, name.replace("_proj", "_scale"))[expert], dtype)

    def checkpoint_slices(self) -> dict[str, tuple[str, int]]:
        """Official per-expert key (relative to this module) -> (stacked parameter name, expert index)."""
        out = {}
        for e in range(self.gate_proj.shape[0]):
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[f"{e}.{name}.weight"] = (name, e)
        return out

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                shared: torch.Tensor | None = None) -> torch.Tensor:
        """x (T, D), the router's ids / weights (T, k) -> Σ_k weight · expert(x) (T, D) in x's dtype, plus
        ``shared`` (T, D) (the shared experts' output) when given: added in the same pass as the slots' sum."""
        top_k = ids.shape[1]
        # the (token, slot) pairs grouped by expert: one counting-sort kernel on CUDA (engine.kernels.moe)
        tokens, row_weights, offsets, inverse = moe_dispatch(ids, weights, self.gate_proj.shape[0], x.dtype)
        gathered = x[tokens]
        # the routing weight scales the expert's hidden activation (the down projection is linear, so this
        # equals weighting its output) and the k slots of a token are then summed with fp32 accumulation:
        # one gather and one reduction instead of float atomics
        use_grouped = self.backend == "grouped" or (self.backend == "auto" and grouped_mm_available(x))
        if use_grouped:
            outputs = self._grouped(gathered, offsets, row_weights)
        else:
            outputs = self._loop(gathered, offsets, row_weights)
        return moe_combine(outputs, inverse, top_k, shared)  # fp32 sum of the k slots, one pass (engine.kernels.moe)

    def _grouped(self, sorted_x: torch.Tensor, offsets: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
        merged = self.gate_up_weight
        if merged is not None:  # gate and up in one grouped GEMM
            gate, up = self._project(sorted_x, merged, getattr(self, "_gate_up_scale", None), offsets).chunk(2, -1)
        else:
            gate = self._project(sorted_x, self.gate_proj, self.gate_scale, offsets)
            up = self._project(sorted_x, self.up_proj, self.up_scale, offsets)
        hidden = silu_mul_scale(gate, up, row_weights)  # one fused pass on CUDA (engine.kernels.moe)
        return self._project(hidden, self.down_proj, self.down_scale, offsets)

    def _project(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                 offsets: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert times their expert's weight (E, N, K): (M, N)."""
        if self.is_fp8:
            return fp8.grouped_linear(x, weight, scale, offsets)
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)

    def _loop(self, sorted_x: torch.Tensor, offsets: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
        outputs = torch.empty_like(sorted_x)
        start = 0
        for expert, end in enumerate(offsets.tolist()):
            count = end - start
            if count == 0:
                continue
            rows = slice(start, start + count)
            chunk = sorted_x[rows]
            w_gate, w_up, w_down = (self._dense(n, expert, chunk.dtype) for n in ("gate_proj", "up_proj", "down_proj"))
            hidden = F.silu(chunk @ w_gate.T) * (chunk @ w_up.T) * row_weights[rows]
            outputs[rows] = hidden @ w_down.T
            start += count
        return outputs


class DeepseekV3MoE(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        assert cfg.n_routed_experts is not None
        self.gate = MoEGate(cfg)
        self.experts = ExpertBank(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        if cfg.n_shared_experts:
            self.shared_experts = DeepseekV3MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def parts_applicable(self, x: torch.Tensor) -> bool:
        """:meth:`forward_parts` covers these rows: shared experts that cut into slots of the routed experts'
        width, and either few rows (expert GEMVs, with a PyTorch reference anywhere) or, where the Triton kernels
        run, up to MOE_TILED_MAX_ROWS (16-bit weights) or MOE_TILED_MAX_ROWS_FP8 rows (expert tiles)."""
        shared = getattr(self, "shared_experts", None)
        if shared is not None and shared.gate_proj.weight.shape[0] % self.experts.gate_proj.shape[1] != 0:
            return False
        return x.shape[0] <= MOE_GEMV_MAX_ROWS or self._tiles(x)

    def _tiles(self, x: torch.Tensor) -> bool:
        """The expert-tiled kernels take these rows (see MOE_GEMV_MAX_ROWS_16BIT and the fp8 limits above)."""
        rows = x.shape[0]
        if self.experts.is_fp8:
            return MOE_GEMV_MAX_ROWS < rows <= MOE_TILED_MAX_ROWS_FP8 and use_triton(x)
        return MOE_GEMV_MAX_ROWS_16BIT < rows <= MOE_TILED_MAX_ROWS and use_triton(x)

    @property
    def fused_router(self) -> bool:
        """The router's tail is one kernel when no group restriction applies (it then wants fp32 input)."""
        return self.gate.n_group == 1 or self.gate.topk_group >= self.gate.n_group

    def route(self, x: torch.Tensor, x_fp32: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, D) -> (expert ids (T, k), weights (T, k) fp32), as :class:`MoEGate` computes them (its reference
        is the same ops); where no group restriction applies the tail after the logits is one kernel
        (``engine.kernels.decode.route_topk``) instead of ~8. ``x_fp32``: x upcast, when the caller has it."""
        gate = self.gate
        if not self.fused_router:
            return gate(x)
        low = gate.weight_exact_in(x.dtype) if x.shape[0] >= fused_ops.ROUTER_16BIT_MIN_ROWS else None
        logits = fused_ops.router_logits(x, x_fp32, gate.weight, weight_16bit=low)
        bias = gate.e_score_correction_bias.float() if gate.topk_method == "noaux_tc" else None
        return fused_ops.route_topk(logits, bias, gate.top_k, gate.scoring_func, gate.norm_topk_prob,
                                    gate.routed_scaling_factor)

    def forward_parts(self, x: torch.Tensor, x_fp32: torch.Tensor | None) -> torch.Tensor:
        """The fused backend: per-slot partial outputs (T, k+ns, D) fp32 (routed slots already weighted, shared
        experts as extra slots), summed with the residual by the next :meth:`RMSNorm.add_forward`. Within the GEMV
        limit the experts' weights are read by id (GEMVs: no sort, no dispatch); past it the pairs are grouped by
        expert first and each expert's weights read once (expert tiles)."""
        experts = self.experts
        ids, weights = self.route(x, x_fp32)
        shared = getattr(self, "shared_experts", None)
        sg = su = sd = sgs = sus = sds = None
        if shared is not None:
            sg, su, sd = shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight
            sgs, sus, sds = (fp8.weight_scale(m) for m in (shared.gate_proj, shared.up_proj, shared.down_proj))
        order = fused_ops.moe_expert_order(ids, experts.gate_proj.shape[0]) if self._tiles(x) else None
        hidden = fused_ops.moe_gate_up(x, ids, weights, experts.gate_proj, experts.up_proj, sg, su,
                                       gate_scale=experts.gate_scale, up_scale=experts.up_scale,
                                       shared_gate_scale=sgs, shared_up_scale=sus, order=order)
        return fused_ops.moe_down(hidden, ids, experts.down_proj, sd, down_scale=experts.down_scale,
                                  shared_down_scale=sds, order=order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, weights = self.route(flat)
        shared = self.shared_experts(flat) if hasattr(self, "shared_experts") else None
        return self.experts(flat, ids, weights, shared).view(shape)


# --------------------------------------------------------------------------------------------- layers / model
class DeepseekV3DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DeepseekV3Attention(cfg, layer_idx)
        self.mlp: nn.Module = (
            DeepseekV3MoE(cfg) if cfg.is_moe_layer(layer_idx) else DeepseekV3MLP(cfg.hidden_size, cfg.intermediate_size)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(
        self, h: torch.Tensor, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext,
        next_norm: RMSNorm,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream h, input_layernorm(h)) -> (h', next_norm(h')). Each residual add is fused with the
        norm after it (one kernel on the fused backend, where the MoE's per-slot outputs are summed there too)."""
        attn_out = self.self_attn(normed, cos, sin, ctx)
        mlp = self.mlp
        gemv = ctx.fused and isinstance(mlp, DeepseekV3MoE) and mlp.parts_applicable(normed)
        h, normed, normed_fp32 = self.post_attention_layernorm.add_forward(
            attn_out, h, ctx.fused, want_fp32=gemv and mlp.fused_router
        )
        if gemv:
            parts = mlp.forward_parts(normed, normed_fp32)
        elif isinstance(mlp, DeepseekV3MLP):
            parts = mlp(normed, fused=ctx.fused)
        else:
            parts = mlp(normed)
        h, normed, _ = next_norm.add_forward(parts, h, ctx.fused)
        return h, normed


class DeepseekV3Model(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        """inputs_embeds (B, L, D); position_ids (B, L); attention_mask (B, past+L) with 1 = real token."""
        bsz, q_len, _ = inputs_embeds.shape
        past = cache.length() if cache is not None else 0
        mask = build_causal_mask(bsz, q_len, past, attention_mask, inputs_embeds.dtype, inputs_embeds.device)
        cos, sin = self.rotary_emb.cos_sin(position_ids, inputs_embeds.dtype)
        return self.run_layers(inputs_embeds, cos, sin, DenseAttention(mask, self.rotary_emb.softmax_scale, cache))

    def run_layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The decoder stack over embeddings h (..., D) -> final-normed hidden states: the one forward every path
        (reference, paged eager, fused decode, CUDA graphs) runs, with ``ctx`` choosing cache and kernels."""
        layers = self.layers
        h, normed, _ = layers[0].input_layernorm.add_forward(h, None, ctx.fused)
        for idx, layer in enumerate(layers):
            next_norm = layers[idx + 1].input_layernorm if idx + 1 < len(layers) else self.norm
            h, normed = layer(h, normed, cos, sin, ctx, next_norm)
        return normed


def build_causal_mask(
    bsz: int, q_len: int, past: int, attention_mask: torch.Tensor | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """Additive (B, 1, q, past+q) mask: causal, and padded keys hidden. Finite minimum keeps pad rows NaN-free.

    None when no padding and either a fresh prompt (SDPA's own causal flag, which allows flash kernels) or a
    single decode step (it may see every cached key).
    """
    if attention_mask is None and (past == 0 or q_len == 1):
        return None
    kv_len = past + q_len
    q_pos = torch.arange(past, kv_len, device=device)[:, None]
    allowed = torch.arange(kv_len, device=device)[None, :] <= q_pos
    allowed = allowed[None, None].expand(bsz, 1, q_len, kv_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :kv_len].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


class DeepseekV3ForCausalLM(nn.Module):
    """``language_model.*`` of the checkpoint: ``model`` (decoder stack) and an untied ``lm_head``."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DeepseekV3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, inputs_embeds, position_ids, attention_mask=None, cache=None) -> torch.Tensor:
        return self.logits(self.model(inputs_embeds, position_ids, attention_mask, cache))

    def logits(self, normed: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """fp32 logits of final-normed hidden rows; ``fused`` (a decode step's rows): on the few-row kernels."""
        if not fused:
            return self.lm_head(normed).float()
        return fused_ops.linear(normed, self.lm_head.weight, fp8.weight_scale(self.lm_head)).float()
