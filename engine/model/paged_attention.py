"""Attention context of one serving step over the paged MLA latent cache: the kernel backend of the decoder's
attention modules (``DeepseekV3Attention.forward`` calls ``attend`` / ``attend_fused``; nothing else runs the
model).

The cache holds, per layer and token slot, the normed compressed KV and the rotated shared rope key
(``kv_lora_rank + qk_rope_head_dim`` values, never expanded K/V). A step is a flat batch of tokens from many
sequences:

- decode rows (one new token each) attend in latent space with the absorbed weights, batched over sequences:
  q̃ = W_UKᵀ q_nope, scores = q̃·c + q_pe·k_pe, z = Σ p·c, out = W_UV z, reading each row's first ``length``
  key slots (key counts, never a key mask: ``engine.kernels.decode.mla_decode_attention``, W_UV in its epilogue);
- prompt chunks expand the keys they attend to (cached prefix + the chunk) through ``kv_b_proj`` in one GEMM
  and attend with :func:`engine.kernels.prefill.chunk_attention`: prefix without a mask + chunk causal, merged
  by log-sum-exp. Re-expanding the prefix for every chunk costs 2·R·H·(nope+v) = 4.2 MFLOP per prefix key and
  layer on A3B; a chunk of C queries spends 2·H·(192+128)·C = 10 KFLOP·C attending to that key, so the
  expansion is 410/C of the prefix attention (5 % at C = 8K, 1.3 % at 32K) plus ~14 KB of expanded K/V written per key
  (1.8 GB for a 128K prefix, one layer at a time). Larger chunks (fewer re-expansions) are the
  lever; attention in latent space for prefill would cost 3.4x the attention FLOPs (R+P = 576 per key). The kv
  norm, RoPE and cache write of every row are one kernel that also lays the query out head-major, and the expanded
  keys and values are laid out for attention in one more (``engine.kernels.prefill_layout``).

``fused`` (pure-decode steps of the fused backend) projects with few-row kernels, replaces the projections' glue
with one prologue kernel (kv RMSNorm, RoPE of q and k, the cache write, q_nope through W_UK), applies W_UV in the
attention's epilogue and, in the layers, fuses each residual add with the next norm and runs the MoE as expert
GEMVs or expert tiles. ``kernels``: "auto" (Triton where it runs) or "torch" (the references).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.kernels import decode as fused_ops
from engine.kernels import prefill_layout
from engine.kernels.prefill import chunk_attention

if TYPE_CHECKING:
    from engine.model.decoder import DeepseekV3Attention
    from engine.runtime.step import StepMetadata


class PagedAttention:
    def __init__(self, kv_cache: torch.Tensor, meta: StepMetadata, softmax_scale: float, fused: bool = False,
                 kernels: str = "auto") -> None:
        self.kv_cache = kv_cache  # (layers, slots, R + P)
        self.meta = meta
        self.softmax_scale = softmax_scale
        self.fused = fused
        self.kernels = kernels
        lengths = meta.decode_lengths
        if meta.decode_rows.numel() and (lengths is None or lengths.numel() != meta.decode_rows.numel()):
            lengths = meta.decode_mask.sum(dim=1, dtype=torch.int32)  # padded graph metadata carries the mask only
        self.decode_lengths = lengths
        # every row a decode row, in order: no gather / scatter of rows
        self.pure_decode = not meta.prefills and meta.decode_rows.numel() == meta.input_ids.numel()

    # ------------------------------------------------------------------ decode rows
    def _decode(self, attn: DeepseekV3Attention, cache: torch.Tensor, q_nope: torch.Tensor,
                q_pe: torch.Tensor) -> torch.Tensor:
        """q_nope (S, H, nope) any strides, q_pe (S, H, P) rotated -> values (S, H, v)."""
        w_uk, w_uv = attn.absorbed_weights()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk)  # (H, S, R)
        return fused_ops.mla_decode_attention(q_latent, q_pe, cache, self.meta.decode_slots, self.decode_lengths,
                                              self.softmax_scale, w_uv, impl=self.kernels)

    def attend_fused(self, attn: DeepseekV3Attention, x: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
        """Pure-decode step: x (S, D) normed hidden rows -> attention output (S, H*v) before ``o_proj``: the
        projections, one prologue kernel (kv norm, RoPE, cache write, q_nope through W_UK) and the attention with
        W_UV applied in its epilogue."""
        n = x.shape[0]
        heads, nope, rope, rank = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.kv_lora_rank
        # before the projection: the prologue reads W_UK ahead of its PDL wait, so the kernel that first makes
        # the (fp8: dequantised) copy must not be the one right before it
        w_uk, w_uv = attn.absorbed_weights()
        q, kv = attn.project_qkv(x, fused=True)
        cache = self.kv_cache[attn.layer_idx]
        norm = attn.kv_a_layernorm
        q_latent, q_pe = fused_ops.mla_decode_prologue(q, kv, w_uk, heads, nope, rope, rank, norm.weight, norm.eps,
                                                       cos, sin, cache, self.meta.slot_mapping, impl=self.kernels)
        values = fused_ops.mla_decode_attention(q_latent.transpose(0, 1), q_pe, cache, self.meta.decode_slots,
                                                self.decode_lengths, self.softmax_scale, w_uv, impl=self.kernels)
        return values.view(n, heads * attn.v_head_dim)

    # ------------------------------------------------------------------ any step
    def attend(self, attn: DeepseekV3Attention, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        """q (T, H*(nope+rope)) and kv (T, R+P) from the projection, cos/sin (T, P/2) -> (T, H*v). Writes the step's
        latents into the layer's cache first (prompt chunks read their own keys back from it), in the kernel that
        norms and rotates them."""
        meta = self.meta
        n, heads = q.shape[0], attn.num_heads
        nope, rope, v_dim, rank = attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim, attn.kv_lora_rank
        cache = self.kv_cache[attn.layer_idx]
        norm = attn.kv_a_layernorm
        impl = "torch" if self.kernels == "torch" else "auto"
        query = prefill_layout.prologue(q, kv, heads, nope, rope, rank, norm.weight, norm.eps, cos, sin, cache,
                                        meta.slot_mapping, impl=impl)  # (T, H, nope+rope), rope part rotated
        q_nope, q_pe = query.split([nope, rope], dim=-1)
        if self.pure_decode:
            return self._decode(attn, cache, q_nope, q_pe).view(n, heads * v_dim)
        out = q.new_empty(n, heads, v_dim)
        if meta.decode_rows.numel():
            rows = meta.decode_rows
            out[rows] = self._decode(attn, cache, q_nope[rows], q_pe[rows])
        for chunk in meta.prefills:
            c, k_rope = cache[chunk.slots].split([rank, rope], dim=-1)
            # prefix + chunk through kv_b_proj in one GEMM, then K/V in the (H, L, ·) layout attention takes
            k, v = prefill_layout.expand_kv(attn.kv_b_proj(c), k_rope, heads, nope, v_dim, impl=impl)
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            # (1, heads, len, dim): for a step of one chunk the prologue's layout makes the query's view dense
            o = chunk_attention(query[rows].transpose(0, 1)[None], k[None], v[None], chunk.ctx_len - chunk.q_len,
                                self.softmax_scale, impl=impl)
            out[rows] = o[0].transpose(0, 1)
        return out.view(n, heads * v_dim)
