"""Runs one scheduled step: prepare the step's metadata, call the model, return the logits.

The runner never re-implements the model: ``forward_eager`` builds the step's attention context
(:class:`engine.model.paged_attention.PagedAttention`: the paged MLA latent cache, slot mapping, decode rows and
their key counts, prompt chunks, and the kernel backend) and runs the decoder's own layers
(``DeepseekV3Model.run_layers``) over the step's flat token batch.

Backends (``decode_backend``): pure-decode steps of up to ``FAST_DECODE_MAX_ROWS`` rows take the fused decode
kernels (``engine.kernels.decode``: one GEMV for q and the compressed kv, one prologue kernel for kv norm + RoPE +
cache write, latent attention straight from the paged cache, residual add fused with each RMSNorm, the MoE as
expert GEMVs for few rows and expert-tiled kernels past them (``engine.model.decoder.MOE_GEMV_MAX_ROWS``)): about
a dozen kernels per layer instead of ~90. "auto" does so where
Triton runs (CUDA), "fused" everywhere (the kernels' PyTorch references off-GPU), "modules" never.

A graph-covered decode step skips ``prepare``: ``DecodeGraphs.run_sequences`` writes the step's inputs from the
sequences into the graph's pinned staging buffer and sends them in one host->device copy (at batch 1 the host side
of a step was a quarter of it). A step may take some input ids from the previous step's samples still on the device
(``carry``), so the engine can launch it before reading those samples.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from engine.kernels import use_triton
from engine.model.decoder import grouped_mm_available
from engine.model.kimi_vl import KimiVLForConditionalGeneration
from engine.model.paged_attention import PagedAttention
from engine.runtime.block_manager import BlockTables
from engine.runtime.graphs import DecodeGraphs
from engine.runtime.sequence import ImageSpan, Sequence
from engine.runtime.step import PrefillChunk, StepMetadata
from engine.runtime.vision_cache import VisionCache

__all__ = ["ModelRunner", "PrefillChunk", "StepMetadata", "VisionCache", "DecodeGraphs"]


# pure-decode steps up to this many rows take the fused backend: every CUDA-graph bucket
FAST_DECODE_MAX_ROWS = 128
DecodeBackend = Literal["auto", "fused", "modules"]


class ModelRunner:
    def __init__(
        self,
        model: KimiVLForConditionalGeneration,
        num_blocks: int,
        block_size: int,
        vision_cache_rows: int = 65536,
        use_cuda_graphs: bool = True,
        decode_backend: DecodeBackend = "auto",
    ) -> None:
        self.model = model
        self.config = model.config.text_config
        self.device = model.device
        self.dtype = model.language_model.model.embed_tokens.weight.dtype  # activations (fp8 weights or not)
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
        # "auto": the fused decode kernels where Triton runs; "fused": for every small pure-decode step (their
        # PyTorch references off-GPU); "modules": the modules' unfused ops only
        self.decode_backend: DecodeBackend = decode_backend
        # "torch": every attention kernel on its PyTorch reference (what GPU tests compare the kernels with)
        self.kernels: Literal["auto", "torch"] = "auto"

    @staticmethod
    def default_prefill_chunk(device: torch.device, step_budget: int) -> int:
        """The largest prompt chunk a step may take by default: 32K tokens on CUDA, the step budget elsewhere
        (CPU serving and tests keep their small steps).

        Memory (A3B, bf16; the measured peak is in bench/engine_bench.py's long-prompt round): a chunk of C tokens
        over P cached keys peaks at max(MoE ~130 KB per chunk token: gathered rows, gate/up/hidden, per-slot
        outputs; attention ~70 KB per chunk token + ~20 KB per key: gathered latents, expanded K/V, the two
        partial outputs and their fp32 merge). C = 32K over a 96K prefix: ~5 GB; C = 8K over 120K: ~3 GB. The
        engine keeps 4 GiB plus (1 - gpu_memory_utilization) of the card (12 GB of 80 GB) out of the cache, so
        32K fits; each larger chunk re-expands the prefix fewer times (4 instead of 16 chunks for 128K)."""
        return max(step_budget, 32768) if device.type == "cuda" else step_budget

    @staticmethod
    def cache_bytes_per_token(config, dtype: torch.dtype) -> int:
        latent = config.kv_lora_rank + config.qk_rope_head_dim
        return config.num_hidden_layers * latent * torch.empty((), dtype=dtype).element_size()

    # ------------------------------------------------------------------ inputs
    def _slots(self, seq: Sequence, end: int) -> np.ndarray:
        """Cache slots of the sequence's first ``end`` positions (every block holds ``block_size`` of them)."""
        bs = self.block_size
        blocks = np.asarray(seq.block_table[: -(-end // bs)], dtype=np.int64)
        return (blocks[:, None] * bs + np.arange(bs)).reshape(-1)[:end]

    def _image_features(self, images: list[ImageSpan]) -> dict[bytes, torch.Tensor]:
        """Features for the given images, encoding the uncached ones in one packed vision call. Pixels deferred
        by the processor (``ImageSpan.decoded``) are resized/normalised/patchified here, on the model's device."""
        found: dict[bytes, torch.Tensor] = {}
        todo: list[ImageSpan] = []
        for image in images:
            if image.content_hash in found:
                continue
            cached = self.vision_cache.get(image.content_hash)
            if cached is None and image.features is not None:  # evicted since admission; the span kept them
                cached = image.features
                self.vision_cache.put(image.content_hash, cached)
            if cached is not None:
                self.vision_cache.hits += 1
                found[image.content_hash] = cached
            elif all(image.content_hash != t.content_hash for t in todo):
                todo.append(image)
        if todo:
            self.vision_cache.misses += len(todo)
            pixels = torch.cat([
                t.pixel_values.to(self.device) if t.pixel_values is not None else t.decoded.patches(self.device)
                for t in todo
            ])
            grids = torch.tensor([t.grid_hw for t in todo])  # host ints: the tower plans attention from them
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
        total = sum(num_new_tokens)
        # token-wise inputs filled slice by slice in numpy: a prompt chunk's 8K+ tokens cost no per-token Python
        # work (the device waits on this before a prompt's first kernel)
        ids = np.empty(total, dtype=np.int64)
        positions = np.empty(total, dtype=np.int64)
        slot_mapping = np.empty(total, dtype=np.int64)
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
            rows = slice(row, row + n)
            ids[rows] = seq.tokens_between(start, end)
            positions[rows] = np.arange(start, end)
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_tables.append(seq.block_table)
                decode_lens.append(end)
                slot_mapping[row] = seq.block_table[start // bs] * bs + start % bs
            else:
                seq_slots = self._slots(seq, end)
                slot_mapping[rows] = seq_slots[start:end]
                prefills.append(PrefillChunk(row, n, end, torch.from_numpy(seq_slots).to(self.device)))
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
            input_ids=torch.from_numpy(ids).to(dev, non_blocking=True),
            positions=torch.from_numpy(positions).to(dev, non_blocking=True),
            slot_mapping=torch.from_numpy(slot_mapping).to(dev, non_blocking=True),
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
    def fused_decode_applicable(self, meta: StepMetadata) -> bool:
        """The step runs on the fused decode backend: a small pure-decode step (every row one decode token whose
        logits are wanted), under the chosen backend."""
        if self.decode_backend == "modules":
            return False
        n = meta.input_ids.numel()
        if self.decode_backend == "auto" and not use_triton(self.kv_cache):
            return False
        return (
            0 < n <= FAST_DECODE_MAX_ROWS and not meta.prefills and meta.image_rows is None
            and meta.decode_rows.numel() == n and meta.logit_rows.numel() == n
        )

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
        """The model over the step without graphs (a CUDA graph captures exactly this call on static metadata)."""
        lm = self.model.language_model
        decoder = lm.model
        h = decoder.embed_tokens(meta.input_ids)
        if meta.image_rows is not None:
            h[meta.image_rows] = meta.image_features.to(h.dtype)
        rotary = decoder.rotary_emb
        cos, sin = rotary.cos_sin(meta.positions, h.dtype)
        ctx = PagedAttention(self.kv_cache, meta, rotary.softmax_scale, fused=self.fused_decode_applicable(meta),
                             kernels=self.kernels)
        normed = decoder.run_layers(h, cos, sin, ctx)
        if meta.logit_rows.numel() == 0:
            return torch.empty(0, lm.config.vocab_size, device=self.device)
        return lm.logits(normed[meta.logit_rows], ctx.fused)
