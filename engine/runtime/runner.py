"""Runs one scheduled step through the model over the paged MLA latent cache.

The cache holds, per layer and per token slot, the normalised compressed KV (``kv_lora_rank``) and the rotated
shared rope key (``qk_rope_head_dim``) — 576 values per token per layer for A3B, never expanded K/V.

Attention, per step, over a flat batch of tokens from many sequences:
- decode rows (one new token): absorbed-weight MLA in latent space, batched over sequences:
  q̃ = W_UKᵀ q_nope, scores = q̃·c + q_pe·k_pe, z = Σ p·c, out = W_UV z;
- prompt chunks: the chunk's queries against the sequence's cached latents expanded through ``kv_b_proj``.
Dense projections and the MoE run once over all tokens of the step.

Pure-decode steps of up to ``FAST_DECODE_MAX_ROWS`` rows on CUDA (every step a decode CUDA graph replays) take
``_forward_fast_decode``: the same math in about a dozen kernels per layer instead of ~90 (``engine.kernels``):
one GEMV for q and the compressed kv (their weights laid out as one matrix), one prologue kernel (kv RMSNorm,
RoPE of q and k, the cache write), latent attention straight from the paged cache, residual add fused with each
RMSNorm, and for at most ``MOE_GEMV_MAX_ROWS`` rows the MoE as two GEMV kernels reading the chosen experts'
weights by id (no sort/dispatch), the shared experts folded in as extra slots. Each fused op has a PyTorch path
(CPU tests run the fast path through it); CUDA uses the Triton kernels.

A graph-covered decode step skips ``prepare``: ``DecodeGraphs.run_sequences`` writes the step's inputs from the
sequences into the graph's pinned staging buffer and sends them in one host->device copy (at batch 1 the host side
of a step was a quarter of it). A step may take some input ids from the previous step's samples still on the device
(``carry``), so the engine can launch it before reading those samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from engine.kernels import decode as fused
from engine.kernels import use_triton
from engine.model.decoder import DeepseekV3MoE, apply_interleaved_rope, grouped_mm_available
from engine.model.kimi_vl import KimiVLForConditionalGeneration
from engine.runtime.block_manager import BlockTables
from engine.runtime.graphs import DecodeGraphs
from engine.runtime.sequence import ImageSpan, Sequence
from engine.runtime.step import PrefillChunk, StepMetadata
from engine.runtime.vision_cache import VisionCache

__all__ = ["ModelRunner", "PrefillChunk", "StepMetadata", "VisionCache", "DecodeGraphs"]


# pure-decode steps up to this many rows take the fused path: every CUDA-graph bucket. Its attention reads key
# counts, not a (rows, keys) mask: graphs of the mask-based path read a corrupted mask on the H100 (see RESULTS)
FAST_DECODE_MAX_ROWS = 128
MOE_GEMV_MAX_ROWS = 8  # up to here the per-(token, slot) expert GEMVs beat sort + grouped GEMM (measured at 8)


@dataclass
class _FastLayer:
    qkv_weight: torch.Tensor | None  # [q_proj; kv_a_proj_with_mqa] as one (H*(nope+rope) + R + P, D) matrix
    router: tuple[torch.Tensor, torch.Tensor | None] | None  # fp32 gate weight, bias (None: use MoEGate itself)
    moe: bool  # the layer's MoE can run as expert GEMVs


class ModelRunner:
    def __init__(
        self,
        model: KimiVLForConditionalGeneration,
        num_blocks: int,
        block_size: int,
        vision_cache_rows: int = 65536,
        use_cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.config = model.config.text_config
        self.device = model.device
        self.dtype = model.language_model.lm_head.weight.dtype
        self.block_size = block_size
        cfg = self.config
        self.latent_dim = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        # one extra block at the end is scratch space: padded rows of a CUDA-graph batch write and read there
        self.scratch_slot = num_blocks * block_size
        self.kv_cache = torch.zeros(
            cfg.num_hidden_layers, (num_blocks + 1) * block_size, self.latent_dim, dtype=self.dtype, device=self.device
        )
        capturable = self.device.type == "cuda" and grouped_mm_available(
            torch.empty(1, device=self.device, dtype=self.dtype)
        )  # the per-expert loop fallback syncs with the host, which a CUDA graph cannot contain
        self.graphs = DecodeGraphs(self) if (use_cuda_graphs and capturable) else None
        self.vision_cache = VisionCache(vision_cache_rows)
        heads = cfg.num_attention_heads
        self.absorbed = []
        for layer in model.language_model.model.layers:
            w = layer.self_attn.kv_b_proj.weight.view(heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
            self.absorbed.append((w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim :]))  # W_UK, W_UV views
        # "auto": the fused decode path on CUDA for small pure-decode steps; "on" also on CPU (through the
        # PyTorch references, for tests); "off" never
        self.fast_decode: str = "auto"
        self._fast_layers: list[_FastLayer] | None = None
        if use_triton(self.kv_cache):
            # now, before any CUDA graph is captured: the fp32 router copies it may make must exist (and stay) before
            # a graph records their addresses
            self._prepare_fast_layers()

    @staticmethod
    def cache_bytes_per_token(config, dtype: torch.dtype) -> int:
        latent = config.kv_lora_rank + config.qk_rope_head_dim
        return config.num_hidden_layers * latent * torch.empty((), dtype=dtype).element_size()

    # ------------------------------------------------------------------ inputs
    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        table = torch.tensor(seq.block_table, dtype=torch.long)
        positions = torch.arange(start, end)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def _image_features(self, images: list[ImageSpan]) -> dict[bytes, torch.Tensor]:
        """Features for the given images, encoding the uncached ones in one packed vision call."""
        found: dict[bytes, torch.Tensor] = {}
        todo: list[ImageSpan] = []
        for image in images:
            if image.content_hash in found:
                continue
            cached = self.vision_cache.get(image.content_hash)
            if cached is not None:
                self.vision_cache.hits += 1
                found[image.content_hash] = cached
            elif all(image.content_hash != t.content_hash for t in todo):
                todo.append(image)
        if todo:
            self.vision_cache.misses += len(todo)
            pixels = torch.cat([t.pixel_values for t in todo]).to(self.device)
            grids = torch.tensor([t.grid_hw for t in todo], device=self.device)
            features = self.model.encode_images(pixels, grids)
            offset = 0
            for image in todo:
                rows = features[offset : offset + image.length]
                offset += image.length
                self.vision_cache.put(image.content_hash, rows)
                found[image.content_hash] = rows
        return found

    def prepare(self, seqs: list[Sequence], num_new_tokens: list[int]) -> StepMetadata:
        """Flat token batch of the step plus the cache addressing each attention path needs.

        Decode rows address their keys through their block tables in one vectorised expansion (no per-token
        Python work), so a step's CPU cost grows with the number of sequences, not their lengths.
        """
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        logit_rows: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        needed_images: list[ImageSpan] = []
        image_places: list[tuple[int, ImageSpan, int, int]] = []  # (row, image, first feature row, count)
        row = 0
        for seq, n in zip(seqs, num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            ids.extend(seq.tokens_between(start, end))
            positions.extend(range(start, end))
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_tables.append(seq.block_table)
                decode_lens.append(end)
                slot_mapping.append(seq.block_table[start // bs] * bs + start % bs)
            else:
                seq_slots = self._slots(seq, 0, end)
                slot_mapping.extend(seq_slots[start:end].tolist())
                prefills.append(PrefillChunk(row, n, end, seq_slots.to(self.device)))
            for image in seq.images:
                lo, hi = max(image.start, start), min(image.end, end)
                if lo < hi:
                    needed_images.append(image)
                    image_places.append((row + lo - start, image, lo - image.start, hi - lo))
            if end == len(seq):
                logit_rows.append(row + n - 1)
            row += n

        image_rows = image_features = None
        if image_places:
            features = self._image_features(needed_images)
            image_rows = torch.cat([torch.arange(r, r + c) for r, _, _, c in image_places]).to(self.device)
            image_features = torch.cat([features[im.content_hash][f : f + c] for _, im, f, c in image_places])

        if decode_rows:
            width = max(len(t) for t in decode_tables)
            tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long)
            decode_slots = (tables[:, :, None] * bs + torch.arange(bs)).view(len(decode_rows), width * bs)
            decode_mask = torch.arange(width * bs)[None, :] < torch.tensor(decode_lens)[:, None]
        else:
            decode_slots = torch.zeros(0, 1, dtype=torch.long)
            decode_mask = torch.zeros(0, 1, dtype=torch.bool)
        dev = self.device
        return StepMetadata(
            input_ids=torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True),
            positions=torch.tensor(positions, dtype=torch.long).to(dev, non_blocking=True),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long).to(dev, non_blocking=True),
            decode_rows=torch.tensor(decode_rows, dtype=torch.long).to(dev, non_blocking=True),
            decode_slots=decode_slots.to(dev, non_blocking=True),
            decode_mask=decode_mask.to(dev, non_blocking=True),
            prefills=prefills,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long).to(dev, non_blocking=True),
            image_rows=image_rows,
            image_features=image_features,
            decode_lengths=torch.tensor(decode_lens, dtype=torch.int32).to(dev, non_blocking=True),
        )

    # ------------------------------------------------------------------ forward
    def _attention(
        self, layer_idx: int, attn, h: torch.Tensor, cos, sin, meta: StepMetadata, softmax_scale: float,
        decode_bias: torch.Tensor | None,
    ):
        cfg = self.config
        n_tokens = h.shape[0]
        heads, nope, rope, v_dim, rank = (
            cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank,
        )
        q = attn.project_q(h).view(n_tokens, heads, nope + rope)
        q_nope, q_pe = q.split([nope, rope], dim=-1)
        c_kv, k_pe = attn.project_latent(h)
        # one RoPE pass for the query heads and the shared key
        rotated = apply_interleaved_rope(torch.cat([q_pe, k_pe[:, None]], dim=1), cos[:, None], sin[:, None])
        q_pe, k_pe = rotated[:, :heads], rotated[:, heads]
        cache = self.kv_cache[layer_idx]
        cache[meta.slot_mapping] = torch.cat([c_kv, k_pe], dim=-1).to(cache.dtype)

        out = h.new_empty(n_tokens, heads, v_dim)
        if meta.decode_rows.numel():
            w_uk, w_uv = self.absorbed[layer_idx]
            pure = not meta.prefills  # every row is a decode row, in order: no gather / scatter of rows
            rows = meta.decode_rows
            q_nope_d, q_pe_d = (q_nope, q_pe) if pure else (q_nope[rows], q_pe[rows])
            # absorbed query [W_UKᵀ q_nope | q_pe] against the cached latents [c | k_pe] in one product
            q_latent = torch.bmm(q_nope_d.transpose(0, 1), w_uk).transpose(0, 1)  # (S, H, rank)
            query = torch.cat([q_latent, q_pe_d], dim=-1)  # (S, H, rank + rope)
            latents = cache[meta.decode_slots]  # (S, L, rank + rope)
            scores = torch.bmm(query, latents.transpose(1, 2))  # (S, H, L)
            probs = torch.softmax(scores.float() * softmax_scale + decode_bias[:, None, :], dim=-1).to(latents.dtype)
            z = torch.bmm(probs, latents[..., :rank])  # (S, H, rank)
            values = torch.bmm(z.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # (S, H, v)
            if pure:
                out = values.contiguous()
            else:
                out[rows] = values
        for chunk in meta.prefills:
            latents = cache[chunk.slots]
            c, kp = latents.split([rank, rope], dim=-1)
            kv = attn.kv_b_proj(c).view(chunk.ctx_len, heads, nope + v_dim)
            k_nope, v = kv.split([nope, v_dim], dim=-1)
            k = torch.cat([k_nope, kp[:, None].expand(-1, heads, -1)], dim=-1)
            sl = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            query = torch.cat([q_nope[sl], q_pe[sl]], dim=-1)
            # 4-D (1, heads, len, dim) so SDPA picks a fused kernel; a chunk after a cached prefix uses a
            # lower-right causal bias, which fused kernels apply without materialising a (q, ctx) mask
            if chunk.ctx_len == chunk.q_len:
                mask, causal = None, chunk.q_len > 1
            else:
                mask, causal = causal_lower_right(chunk.q_len, chunk.ctx_len), False
            o = F.scaled_dot_product_attention(
                query.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attn_mask=mask, is_causal=causal, scale=softmax_scale,
            )
            out[sl] = o[0].transpose(0, 1)
        return attn.o_proj(out.view(n_tokens, heads * v_dim))

    # ------------------------------------------------------------------ fused small-batch decode
    def fast_decode_applicable(self, meta: StepMetadata) -> bool:
        if self.fast_decode == "off":
            return False
        n = meta.input_ids.numel()
        if self.fast_decode == "auto" and not (use_triton(self.kv_cache) and n <= FAST_DECODE_MAX_ROWS):
            return False
        return (
            n > 0 and not meta.prefills and meta.image_rows is None and meta.decode_rows.numel() == n
            and meta.logit_rows.numel() == n
        )

    def _prepare_fast_layers(self) -> list[_FastLayer]:
        """Per-layer weights the fused path uses; built once (and outside any graph capture: the graph
        warm-up runs the step eagerly first). The q and compressed-kv projections are one matrix the loader
        made (both parameters are views of it), read here as is, so they cost one GEMV and no extra memory."""
        if self._fast_layers is not None:
            return self._fast_layers
        layers = []
        for layer in self.model.language_model.model.layers:
            attn = layer.self_attn
            qkv = attn.fused_qkv_weight  # laid out by the loader (DeepseekV3Attention.fuse_qkv_); None: two GEMVs
            router, moe = None, False
            mlp = layer.mlp
            if isinstance(mlp, DeepseekV3MoE):
                gate, experts = mlp.gate, mlp.experts
                if gate.n_group == 1 or gate.topk_group >= gate.n_group:  # no group restriction to apply
                    bias = gate.e_score_correction_bias.float() if gate.topk_method == "noaux_tc" else None
                    router = (gate.weight.float(), bias)
                inter = experts.gate_proj.shape[1]
                shared = getattr(mlp, "shared_experts", None)
                moe = shared is None or shared.gate_proj.weight.shape[0] % inter == 0
            layers.append(_FastLayer(qkv_weight=qkv, router=router, moe=moe))
        self._fast_layers = layers
        return layers

    def _attention_fast(self, idx: int, attn, normed: torch.Tensor, cos, sin, meta: StepMetadata,
                        lengths: torch.Tensor, softmax_scale: float, fast: _FastLayer) -> torch.Tensor:
        cfg = self.config
        n = normed.shape[0]
        heads, nope, rope, v_dim, rank = (
            cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank,
        )
        if fast.qkv_weight is not None:
            q, kv = F.linear(normed, fast.qkv_weight).split([heads * (nope + rope), rank + rope], dim=-1)
        else:
            q, kv = attn.project_q(normed), attn.kv_a_proj_with_mqa(normed)
        cache = self.kv_cache[idx]
        q_pe = fused.mla_decode_prep(
            q, kv, heads, nope, rope, rank, attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps, cos, sin,
            cache, meta.slot_mapping,
        )
        w_uk, w_uv = self.absorbed[idx]
        q_nope = q.view(n, heads, nope + rope)[..., :nope].transpose(0, 1)  # (H, S, nope)
        q_latent = torch.bmm(q_nope, w_uk)  # (H, S, rank)
        z = fused.mla_decode_attention(q_latent, q_pe, cache, meta.decode_slots, lengths, softmax_scale)
        values = torch.bmm(z, w_uv.transpose(1, 2))  # (H, S, v)
        return attn.o_proj(values.transpose(0, 1).reshape(n, heads * v_dim))

    def _moe_fast(self, moe: DeepseekV3MoE, normed: torch.Tensor, normed_fp32: torch.Tensor | None,
                  fast: _FastLayer) -> torch.Tensor:
        """Per-slot partial outputs (S, k+ns, D) fp32, summed by the next ``add_rms_norm``."""
        gate, experts = moe.gate, moe.experts
        if fast.router is not None:
            weight, bias = fast.router
            logits = F.linear(normed_fp32 if normed_fp32 is not None else normed.float(), weight)
            ids, weights = fused.route_topk(logits, bias, gate.top_k, gate.scoring_func, gate.norm_topk_prob,
                                            gate.routed_scaling_factor)
        else:
            ids, weights = gate(normed)
        shared = getattr(moe, "shared_experts", None)
        sg = su = sd = None
        if shared is not None:
            sg, su, sd = shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight
        hidden = fused.moe_gate_up(normed, ids, weights, experts.gate_proj, experts.up_proj, sg, su)
        return fused.moe_down(hidden, ids, experts.down_proj, sd)

    def _forward_fast_decode(self, meta: StepMetadata) -> torch.Tensor:
        lm = self.model.language_model
        layers = lm.model.layers
        fast_layers = self._prepare_fast_layers()
        n = meta.input_ids.numel()
        rotary = lm.model.rotary_emb
        h = lm.model.embed_tokens(meta.input_ids)
        cos, sin = rotary.cos_sin(meta.positions, h.dtype)
        lengths = meta.decode_lengths
        if lengths is None or lengths.numel() != n:
            lengths = meta.decode_mask.sum(dim=1, dtype=torch.int32)
        first = layers[0].input_layernorm
        h, normed, _ = fused.add_rms_norm(h, None, first.weight, first.eps)
        for idx, layer in enumerate(layers):
            fast = fast_layers[idx]
            attn_out = self._attention_fast(
                idx, layer.self_attn, normed, cos, sin, meta, lengths, rotary.softmax_scale, fast
            )
            mlp = layer.mlp
            moe_fast = fast.moe and n <= MOE_GEMV_MAX_ROWS
            post = layer.post_attention_layernorm
            h, normed, normed_fp32 = fused.add_rms_norm(
                attn_out, h, post.weight, post.eps, want_fp32=moe_fast and fast.router is not None
            )
            parts = self._moe_fast(mlp, normed, normed_fp32, fast) if moe_fast else mlp(normed)
            nxt = layers[idx + 1].input_layernorm if idx + 1 < len(layers) else lm.model.norm
            h, normed, _ = fused.add_rms_norm(parts, h, nxt.weight, nxt.eps)
        return lm.lm_head(normed[meta.logit_rows]).float()

    @torch.inference_mode()
    def run_step(self, seqs: list[Sequence], num_new_tokens: list[int], tables: BlockTables | None = None,
                 carry: tuple[torch.Tensor, np.ndarray] | None = None) -> torch.Tensor:
        """The step's float32 logits. A pure-decode step that a CUDA graph covers goes from the sequences straight
        into the graph's inputs (one host->device copy, one launch); every other step through prepare + forward.
        ``tables``: the block manager's mirrored block tables. ``carry``: (the previous step's sampled ids on the
        device, per row of this pure-decode step the index of its input id there); those rows' last token is a
        placeholder on the host."""
        if self.graphs is not None:
            logits = self.graphs.run_sequences(seqs, num_new_tokens, tables, carry)
            if logits is not None:
                return logits
        meta = self.prepare(seqs, num_new_tokens)
        if carry is not None:
            tokens, rows = carry
            index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(self.device, non_blocking=True)
            meta.input_ids = torch.where(index >= 0, tokens[index.clamp(min=0)], meta.input_ids)
        return self.forward(meta)

    @torch.inference_mode()
    def forward(self, meta: StepMetadata) -> torch.Tensor:
        """Computes the step's latents into the cache; returns float32 logits for ``meta.logit_rows``."""
        return self.forward_eager(meta)

    def forward_eager(self, meta: StepMetadata) -> torch.Tensor:
        if self.fast_decode_applicable(meta):
            return self._forward_fast_decode(meta)
        lm = self.model.language_model
        h = lm.model.embed_tokens(meta.input_ids)
        if meta.image_rows is not None:
            h[meta.image_rows] = meta.image_features.to(h.dtype)
        rotary = lm.model.rotary_emb
        cos, sin = rotary.cos_sin(meta.positions, h.dtype)
        decode_bias = None
        if meta.decode_rows.numel():  # additive key mask shared by every layer's decode attention
            decode_bias = torch.zeros(meta.decode_mask.shape, dtype=torch.float32, device=h.device)
            decode_bias.masked_fill_(~meta.decode_mask, float("-inf"))
        for idx, layer in enumerate(lm.model.layers):
            h = h + self._attention(
                idx, layer.self_attn, layer.input_layernorm(h), cos, sin, meta, rotary.softmax_scale, decode_bias
            )
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if meta.logit_rows.numel() == 0:
            return torch.empty(0, lm.config.vocab_size, device=self.device)
        return lm.lm_head(lm.model.norm(h[meta.logit_rows])).float()
