"""MoonViT, the Kimi-VL vision tower (``vision_tower.*`` in the official checkpoints).

Module attribute names reproduce the official safetensors keys exactly (spec §3.1), so
``MoonVitPretrainedModel(cfg).load_state_dict(official_vision_tower_tensors, strict=True)`` works with no renaming:

    patch_embed.proj.{weight,bias}                  Conv2d(3 -> C, kernel = stride = patch)
    patch_embed.pos_emb.weight                      (init_h, init_w, C)
    encoder.blocks.{i}.norm0 / norm1.{weight,bias}  LayerNorm(C, eps 1e-5)
    encoder.blocks.{i}.wqkv.{weight,bias}           Linear(C -> 3C)
    encoder.blocks.{i}.wo.{weight,bias}             Linear(C -> C)
    encoder.blocks.{i}.mlp.fc0 / fc1.{weight,bias}  Linear(C -> I), Linear(I -> C)
    encoder.final_layernorm.{weight,bias}           LayerNorm(C, eps 1e-5)

Nothing else is registered (the 2-D RoPE angles are recomputed from the grid each call, in float32, and never
stored), so ``state_dict()`` holds exactly the official keys.

Math (confirmed against public ports of the official ``modeling_kimi_vl.py``; see the report of the task that
wrote this file):

* Patch embedding: Conv2d on each (3, p, p) patch -> one C-vector per patch
  (vLLM ``vllm/model_executor/models/moonvit.py`` ``MoonVisionPatchEmbed``).
* Absolute position embedding: the (H0, W0, C) table is resized per image to its (h, w) patch grid with
  ``F.interpolate(mode="bicubic")`` (align_corners False, no antialias) on the (1, C, H0, W0) view, flattened
  row-major and added, in the parameter dtype (vLLM ``Learnable2DInterpPosEmb``; llama.cpp's converter reshapes
  the same tensor (H0, W0, C) -> (H0*W0, C)). At (h, w) == (H0, W0) the table is used as is (vLLM skips the
  resize; the official code resizes, which at identical size is the identity - ``tests/test_vision.py`` checks).
* 2-D RoPE (official ``Rope2DPosEmb`` / ``apply_rope``, verbatim in vLLM and in a public PyTorch copy of the
  official file): head_dim d, frequencies f_i = theta ** (-(4 i) / d), i = 0 .. d/4 - 1, theta = 10000,
  computed in float32 exactly as ``1 / (theta ** (arange(0, d, 4)[:d//4].float() / d))``. Consecutive pairs
  (2j, 2j+1) of q and k are complex numbers; pair 2i is rotated by x * f_i (x = column), pair 2i+1 by
  y * f_i (y = row); positions restart at (0, 0) per image. Done in float32, cast back.
  (The official docstring claims the opposite axis order; the code, which is what the weights were trained
  with, uses ``x_pos = flat_pos % max_width`` for the even pairs.) Grids are limited to 512 per side like the
  official 512 x 512 table.
* Encoder block (pre-norm): x += wo(attn(rope(split(wqkv(norm0(x)))))); x += fc1(gelu_tanh(fc0(norm1(x)))).
  ``wqkv`` output is viewed as (3, heads, head_dim): Q = rows [0, C), K = [C, 2C), V = [2C, 3C)
  (official ``xqkv.view(..., 3, nheads, headdim)``; llama.cpp ``wqkv.chunk(3, dim=0)``). Attention is
  non-causal, scale 1/sqrt(head_dim), block-diagonal per image. MLP activation ``gelu_pytorch_tanh``
  (vLLM ``ACT2FN["gelu_pytorch_tanh"]``; official ``PytorchGELUTanh()``). LayerNorm eps is PyTorch's default
  1e-5 (official ``nn.LayerNorm(hidden_dim)``; llama.cpp writes 1e-5 "same as pytorch's default").
* ``encoder.final_layernorm`` after the last block, then the patch merger: per image (h, w) view tokens as
  (h/kh, kh, w/kw, kw, C), permute to (h/kh, w/kw, kh, kw, C), flatten to ((h/kh)(w/kw), kh*kw, C)
  (official / vLLM ``patch_merger``).

Attention never materialises a (N, N) mask across images (the official SDPA/eager paths do and run out of memory
on a few 720p frames, Kimi-VL issue #7): images of equal patch count are batched into one
``F.scaled_dot_product_attention`` call without a mask (this is the default on every device). On CUDA with
fp16/bf16, ``attn_backend = "varlen"`` switches to PyTorch's flash varlen kernel
(``torch.nn.attention.varlen.varlen_attn``, torch >= 2.9); any failure falls back to SDPA. Measured on one H100
(torch 2.11, bf16, A3B-size tower): grouped SDPA 24 ms vs varlen 27 ms for one 64x64 grid, 174 vs 183 ms for 8
distinct grids (20.6k patches), 104 vs 110 ms for 16 frames of 28x50; varlen's first call also took ~3.8 s of
warm-up. Both agree with each other and with fp32 to bf16 precision; hence SDPA is the default.
``attn_backend = "cudnn"`` runs those SDPA calls with cuDNN attention first in the priority list on CUDA (on the
H100 cuDNN was 2.3-5x faster than flash at the decoder's head dims); flash / mem-efficient / math follow, and an
error inside cuDNN falls back to plain SDPA for the process. It is not the default: cuDNN builds an execution
plan per new shape (reported at hundreds of ms), and every new image size is a new shape, so a first-seen
screenshot size could lose far more than the kernel saves. ``bench/vision_ttft_bench.py`` times every backend on
the screenshot grid, including the first call at a new grid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import VisionConfig

log = logging.getLogger(__name__)

__all__ = [
    "Learnable2DInterpPosEmb",
    "MoonVisionPatchEmbed",
    "MoonVitEncoderLayer",
    "MoonVitEncoder",
    "MoonVitPretrainedModel",
    "VisionBatch",
    "rope_inv_freq",
    "rope_cos_sin",
    "apply_rope_2d",
    "rotate_qk",
    "merge_gather_index",
    "encode_images",
]


# ----------------------------------------------------------------------------------------------------------------
# Grid bookkeeping


@dataclass(frozen=True)
class VisionBatch:
    """Per-call metadata derived once from ``grid_hws`` (host-side ints) and shared by every layer."""

    grids: tuple[tuple[int, int], ...]
    offsets: tuple[int, ...]  # start token of each image in the packed sequence
    device: torch.device

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.grids)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @classmethod
    def from_grids(cls, grid_hws: torch.Tensor | Sequence[Sequence[int]], device: torch.device) -> "VisionBatch":
        rows = grid_hws.tolist() if isinstance(grid_hws, torch.Tensor) else [list(g) for g in grid_hws]
        grids: list[tuple[int, int]] = []
        for row in rows:
            if len(row) != 2:
                raise ValueError(f"grid_hws rows must be (h, w); got {row!r}")
            grids.append((int(row[0]), int(row[1])))
        offsets, acc = [], 0
        for h, w in grids:
            offsets.append(acc)
            acc += h * w
        return cls(tuple(grids), tuple(offsets), device)


# ----------------------------------------------------------------------------------------------------------------
# Position embeddings


class Learnable2DInterpPosEmb(nn.Module):
    """``patch_embed.pos_emb``: learnable (H0, W0, C) table, bicubically resized to each image's grid."""

    def __init__(self, height: int, width: int, dim: int) -> None:
        super().__init__()
        self.height, self.width = height, width
        self.weight = nn.Parameter(torch.empty(height, width, dim))
        if not self.weight.is_meta:  # meta init of normal_ pulls in torch._refs (~1 s); nothing to fill anyway
            nn.init.normal_(self.weight)  # official reset_parameters

    def interpolated(self, h: int, w: int, *, force_resize: bool = False) -> torch.Tensor:
        """(h*w, C) embedding for an h x w grid, row-major, in the parameter dtype."""
        if (h, w) == (self.height, self.width) and not force_resize:
            return self.weight.flatten(0, 1)
        grid = self.weight.permute(2, 0, 1).unsqueeze(0)  # (1, C, H0, W0)
        out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return out.squeeze(0).permute(1, 2, 0).flatten(0, 1)

    def packed(self, batch: VisionBatch) -> torch.Tensor:
        cache: dict[tuple[int, int], torch.Tensor] = {}
        parts = []
        for hw in batch.grids:
            if hw not in cache:
                cache[hw] = self.interpolated(*hw)
            parts.append(cache[hw])
        return torch.cat(parts) if parts else self.weight.new_zeros(0, self.weight.shape[-1])


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """The d/4 base frequencies, float32, computed with the official expression."""
    dim_range = torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float()
    return 1.0 / (theta ** (dim_range / head_dim))


def rope_cos_sin(
    grids: Sequence[tuple[int, int]], head_dim: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 2-D RoPE angles for packed images: two float32 tensors of shape (sum h*w, head_dim/2).

    Column j of the result is complex pair j of a head: angle x * f_{j//2} for even j, y * f_{j//2} for odd j.
    """
    inv_freq = rope_inv_freq(head_dim, theta, device)
    if not grids:
        empty = torch.zeros(0, head_dim // 2, device=device)
        return empty, empty
    ys, xs = [], []
    for h, w in grids:
        yy, xx = torch.meshgrid(
            torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
        )
        ys.append(yy.reshape(-1))
        xs.append(xx.reshape(-1))
    y = torch.cat(ys).float()
    x = torch.cat(xs).float()
    angles = torch.stack([torch.outer(x, inv_freq), torch.outer(y, inv_freq)], dim=-1).flatten(1)
    return angles.cos(), angles.sin()


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of ``x`` (tokens, heads, head_dim) in float32; returns x's dtype.

    Equivalent to the official ``view_as_complex(x.float().view(..., -1, 2)) * freqs_cis`` (complex product
    (a + ib)(c + is) = (ac - bs) + i(as + bc)), written with real arithmetic so it runs on every backend.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


def rotate_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE on the q and k of a packed ``wqkv`` output (tokens, 3, heads, head_dim) in one pass -> contiguous
    (tokens, heads, head_dim) q and k in its dtype.

    On CUDA it is the official formulation itself (float32 ``view_as_complex`` product, 4 kernels for q and k
    together instead of ~18 elementwise passes of the real form: RoPE was ~1/5 of the tower's memory traffic at a
    screenshot's 4,300 patches); elsewhere ``apply_rope_2d`` (same values per element as before).
    """
    x = qkv[:, :2].transpose(0, 1)  # (2, tokens, heads, d): the float32 copy below comes out contiguous per q / k
    if x.is_cuda:
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        out = torch.view_as_real(pairs * torch.complex(cos, sin).unsqueeze(-2)).flatten(-2).to(x.dtype)
    else:
        out = apply_rope_2d(x, cos, sin)
    return out[0].contiguous(), out[1].contiguous()  # no-ops unless the float32 input needed no copy


# ----------------------------------------------------------------------------------------------------------------
# Attention over packed images, block-diagonal without a global mask


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.9
    except Exception:  # pragma: no cover - depends on the torch build
        return None
    return varlen_attn


class _AttentionPlan:
    """How one forward call runs attention; built once per call and reused by every layer."""

    def __init__(self, batch: VisionBatch, use_varlen: bool) -> None:
        self.batch = batch
        self.use_varlen = use_varlen
        self._cu: torch.Tensor | None = None
        # group images by token count; each group is one batched SDPA call
        by_len: dict[int, list[int]] = {}
        for i, n in enumerate(batch.lengths):
            if n:
                by_len.setdefault(n, []).append(i)
        self.groups: list[tuple[int, list[int], torch.Tensor | None, int | None]] = []
        for n, imgs in by_len.items():
            starts = [batch.offsets[i] for i in imgs]
            contiguous = all(starts[k] == starts[0] + k * n for k in range(len(starts)))
            if contiguous:  # a plain slice of the packed sequence
                self.groups.append((n, imgs, None, starts[0]))
            else:
                idx = torch.cat([torch.arange(s, s + n) for s in starts]).to(batch.device)
                self.groups.append((n, imgs, idx, None))

    @property
    def cu_seqlens(self) -> torch.Tensor:
        if self._cu is None:
            cu = [0]
            for n in self.batch.lengths:
                cu.append(cu[-1] + n)
            self._cu = torch.tensor(cu, dtype=torch.int32, device=self.batch.device)
        return self._cu

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (N, heads, head_dim) packed -> (N, heads, head_dim)."""
        if self.use_varlen:
            out = self._run_varlen(q, k, v)
            if out is not None:
                return out
        return self._run_sdpa(q, k, v)

    def _run_varlen(self, q, k, v):
        fn = _varlen_attn()
        if fn is None or not self.batch.lengths:
            self.use_varlen = False
            return None
        try:
            n_max = max(self.batch.lengths)
            return fn(q, k, v, self.cu_seqlens, self.cu_seqlens, n_max, n_max)
        except Exception as exc:  # unsupported head_dim / arch / dtype: remember and fall back
            log.warning("varlen flash attention unavailable (%s); using SDPA", exc)
            self.use_varlen = False
            MoonVitPretrainedModel._varlen_broken = True
            return None

    def _run_sdpa(self, q, k, v):
        if len(self.groups) == 1:
            n, imgs, _, start = self.groups[0]
            if start == 0 and n * len(imgs) == q.shape[0]:  # every image has the same size: one call, no copies
                return self._sdpa(q, k, v, len(imgs), n)
        out = torch.empty_like(q)
        for n, imgs, idx, start in self.groups:
            b = len(imgs)
            if idx is None:
                sl = slice(start, start + b * n)
                out[sl] = self._sdpa(q[sl], k[sl], v[sl], b, n)
            else:
                res = self._sdpa(q.index_select(0, idx), k.index_select(0, idx), v.index_select(0, idx), b, n)
                out.index_copy_(0, idx, res)
        return out

    @staticmethod
    def _sdpa(q, k, v, b: int, n: int) -> torch.Tensor:
        heads, d = q.shape[-2:]

        def bhnd(t):
            return t.reshape(b, n, heads, d).transpose(1, 2)

        o = F.scaled_dot_product_attention(bhnd(q), bhnd(k), bhnd(v))  # scale 1/sqrt(d), no mask, non-causal
        return o.transpose(1, 2).reshape(b * n, heads, d)


# ----------------------------------------------------------------------------------------------------------------
# Modules (names = official checkpoint keys)


class MoonVisionPatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.patch_size = p
        self.proj = nn.Conv2d(3, cfg.hidden_size, kernel_size=p, stride=p, bias=True)
        self.pos_emb = Learnable2DInterpPosEmb(cfg.init_pos_emb_height, cfg.init_pos_emb_width, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, batch: VisionBatch) -> torch.Tensor:
        x = self.proj(pixel_values).flatten(1)  # (N, C, 1, 1) -> (N, C)
        return x + self.pos_emb.packed(batch)


class MLP2(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc0 = nn.Linear(dim, hidden, bias=True)
        self.fc1 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class MoonVitEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.norm0 = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.norm1 = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.mlp = MLP2(c, cfg.intermediate_size)
        self.wqkv = nn.Linear(c, 3 * c, bias=True)
        self.wo = nn.Linear(c, c, bias=True)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: _AttentionPlan) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.wqkv(x).view(n, 3, self.num_heads, self.head_dim)
        q, k = rotate_qk(qkv, cos, sin)
        out = plan.run(q, k, qkv[:, 2].contiguous())
        return self.wo(out.reshape(n, self.num_heads * self.head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: _AttentionPlan) -> torch.Tensor:
        x = x + self.attention(self.norm0(x), cos, sin, plan)
        return x + self.mlp(self.norm1(x))


class MoonVitEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MoonVitEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: _AttentionPlan) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, cos, sin, plan)
        return self.final_layernorm(x)


def merge_gather_index(grids: Sequence[tuple[int, int]], kernel: tuple[int, int], device=None) -> torch.Tensor:
    """Indices into the packed (sum h*w) tokens giving the merged order ((h/kh)*(w/kw) blocks, kh*kw each).

    For image (h, w) at offset o, merged token (r, c) takes rows o + (r*kh + i)*w + (c*kw + j) for i < kh,
    j < kw in row-major (i, j) order: top-left, top-right, bottom-left, bottom-right for 2 x 2.
    """
    kh, kw = kernel
    parts, offset = [], 0
    for h, w in grids:
        r = torch.arange(h // kh).view(-1, 1, 1, 1)
        c = torch.arange(w // kw).view(1, -1, 1, 1)
        i = torch.arange(kh).view(1, 1, -1, 1)
        j = torch.arange(kw).view(1, 1, 1, -1)
        parts.append((offset + (r * kh + i) * w + (c * kw + j)).reshape(-1))
        offset += h * w
    idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return idx.to(device)


class MoonVitPretrainedModel(nn.Module):
    """MoonViT with the official parameter names; output = merged patch features per image.

    ``forward(pixel_values (N, 3, p, p), grid_hws (n, 2))`` -> list of n tensors ((h/kh)*(w/kw), kh*kw, C).
    ``forward_packed`` returns the same rows concatenated: (sum (h/kh)*(w/kw), kh*kw, C).
    ``attn_backend``: "sdpa" (default; per-image attention, equal-size images batched, PyTorch's kernel choice),
    "cudnn" (the same with cuDNN attention first on CUDA) or "varlen" (CUDA fp16/bf16 only, PyTorch's flash
    varlen kernel when the installed torch has it; otherwise SDPA).
    """

    _varlen_broken = False  # set once a varlen call failed in this process
    _cudnn_broken = False  # set once cuDNN-first SDPA raised in this process

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.merge_kernel_size = tuple(cfg.merge_kernel_size)
        self.attn_backend = "sdpa"
        self.patch_embed = MoonVisionPatchEmbed(cfg)
        self.encoder = MoonVitEncoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def _check(self, pixel_values: torch.Tensor, batch: VisionBatch) -> None:
        p = self.config.patch_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, p, p):
            raise ValueError(f"pixel_values must be (N, 3, {p}, {p}); got {tuple(pixel_values.shape)}")
        kh, kw = self.merge_kernel_size
        limit = self.config.rope_max_grid
        for h, w in batch.grids:
            if not (1 <= h <= limit and 1 <= w <= limit):
                raise ValueError(f"grid {(h, w)} outside 1..{limit} (official 2-D RoPE table size)")
            if h % kh or w % kw:
                raise ValueError(f"grid {(h, w)} not divisible by merge kernel {(kh, kw)}")
        if batch.total != pixel_values.shape[0]:
            raise ValueError(f"grid_hws covers {batch.total} patches but pixel_values has {pixel_values.shape[0]}")

    def _use_varlen(self, x: torch.Tensor) -> bool:
        return (
            self.attn_backend == "varlen"
            and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16)
            and not MoonVitPretrainedModel._varlen_broken
            and _varlen_attn() is not None
        )

    def _cudnn_first(self, x: torch.Tensor) -> bool:
        return self.attn_backend == "cudnn" and x.is_cuda and not MoonVitPretrainedModel._cudnn_broken

    def _encode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: _AttentionPlan) -> torch.Tensor:
        if plan.use_varlen or not self._cudnn_first(x):
            return self.encoder(x, cos, sin, plan)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        try:
            with sdpa_kernel(order, set_priority=True):
                return self.encoder(x, cos, sin, plan)
        except RuntimeError as exc:  # a cuDNN build / shape problem: remember and use PyTorch's own choice
            log.warning("cuDNN-first SDPA failed in the vision tower (%s); using default SDPA", exc)
            MoonVitPretrainedModel._cudnn_broken = True
            return self.encoder(x, cos, sin, plan)

    def forward_packed(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        device = self.patch_embed.proj.weight.device
        batch = VisionBatch.from_grids(grid_hws, device)
        self._check(pixel_values, batch)
        x = self.patch_embed(pixel_values.to(device=device, dtype=self.dtype), batch)
        cos, sin = rope_cos_sin(batch.grids, self.config.head_dim, self.config.rope_theta, device)
        plan = _AttentionPlan(batch, use_varlen=self._use_varlen(x))
        x = self._encode(x, cos, sin, plan)
        idx = merge_gather_index(batch.grids, self.merge_kernel_size, device)
        kh, kw = self.merge_kernel_size
        return x.index_select(0, idx).view(-1, kh * kw, x.shape[-1])

    def forward(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> list[torch.Tensor]:
        packed = self.forward_packed(pixel_values, grid_hws)
        kh, kw = self.merge_kernel_size
        rows = grid_hws.tolist() if isinstance(grid_hws, torch.Tensor) else grid_hws
        counts = [(int(h) // kh) * (int(w) // kw) for h, w in rows]
        return list(torch.split(packed, counts)) if counts else []


def encode_images(
    vision_tower: MoonVitPretrainedModel,
    projector: nn.Module,
    pixel_values: torch.Tensor,
    grid_hws: torch.Tensor,
) -> torch.Tensor:
    """Vision tower + projector -> (total merged tokens, text hidden), images concatenated in ``grid_hws`` order.

    Image i contributes (h_i/kh)*(w_i/kw) rows, the number of ``<|media_pad|>`` placeholders the processor emits
    for it. ``projector`` is a ``KimiVLMultiModalProjector`` (engine.model.projector).
    """
    return projector(vision_tower.forward_packed(pixel_values, grid_hws))
