"""The data movement of MLA attention over many rows (prompt chunks), each in one pass.

``prologue`` takes the fused projection's q (T, H*(nope+rope)) and kv (T, R+P), writes each row's latent
[rmsnorm(c_kv) | rope(k_pe)] into the paged cache and returns the query (T, H, nope+rope) with its rope part
rotated. The Triton kernel lays the query out as (H, T, ·) underneath, so a one-chunk step's (1, H, T, ·) view is
the dense layout the attention kernels take with no copy. In PyTorch this is a cat of the rope parts, six
elementwise RoPE kernels and a stack, the norm, a cat + scatter into the cache, a cat of the query and its
contiguous copy: 5 copies of an 8K prompt's 48 MB query a layer and ~15 kernels.

``expand_kv`` takes ``kv_b_proj``'s output (L, H*(nope+v)) for the keys a chunk attends to and their rope part
(L, P) and returns K (H, L, nope+P) and V (H, L, v), both contiguous: in PyTorch a cat with the broadcast rope
key and two contiguous copies.

``impl``: "auto" (Triton for CUDA 16-bit tensors where it runs, else the reference), "torch" or "triton". The
``*_torch`` functions are the references (the decoder's reference context uses :func:`query_and_latent_torch`,
so the paged and reference paths compute the same numbers on CPU).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from engine.kernels import first_working, use_triton
from engine.model.rope import apply_interleaved_rope

Impl = Literal["auto", "torch", "triton"]
_broken: set[str] = set()  # kernels that failed to build or launch here: "auto" uses the references from then on


def _use(impl: Impl, x: torch.Tensor, *same_dtype: torch.Tensor) -> bool:
    if impl != "auto":
        return impl == "triton"
    return use_triton(x) and all(t.dtype == x.dtype for t in same_dtype)


def _run(impl: Impl, name: str, reference, *args):
    from engine.kernels import triton_prefill_layout

    kernel = getattr(triton_prefill_layout, name)
    if impl == "triton":
        return kernel(*args)
    return first_working(_broken, [(name, kernel)], reference, *args)


def query_and_latent_torch(q: torch.Tensor, kv: torch.Tensor, heads: int, nope: int, rope: int, rank: int,
                           norm_weight: torch.Tensor, eps: float, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (..., H*(nope+rope)), kv (..., R+P), cos/sin (..., P/2) -> (query (..., H, nope+rope) with the rope part
    rotated, latent (..., R+P) = [rmsnorm(c_kv) | rope(k_pe)]), in q's and kv's dtype."""
    q_heads = q.view(*q.shape[:-1], heads, nope + rope)
    q_nope, q_pe = q_heads.split([nope, rope], dim=-1)
    c_kv, k_pe = kv.split([rank, rope], dim=-1)
    rotated = apply_interleaved_rope(torch.cat([q_pe, k_pe.unsqueeze(-2)], dim=-2), cos.unsqueeze(-2),
                                     sin.unsqueeze(-2))
    c_kv = F.rms_norm(c_kv, (rank,), norm_weight.to(kv.dtype), eps)
    query = torch.cat([q_nope, rotated[..., :heads, :]], dim=-1)
    return query, torch.cat([c_kv, rotated[..., heads, :]], dim=-1)


def prologue(q: torch.Tensor, kv: torch.Tensor, heads: int, nope: int, rope: int, rank: int,
             norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
             slot_mapping: torch.Tensor, impl: Impl = "auto") -> torch.Tensor:
    """q (T, H*(nope+rope)) and kv (T, R+P) (row-strided views of one fused GEMM output are fine), cos/sin (T, P/2);
    writes the latents into ``cache[slot_mapping]`` and returns the query (T, H, nope+rope) (on Triton a view of an
    (H, T, nope+rope) tensor)."""
    if q.shape[0] > 0 and _use(impl, q, kv, cache):
        return _run(impl, "prologue", prologue_torch, q, kv, heads, nope, rope, rank, norm_weight, eps, cos, sin,
                    cache, slot_mapping)
    return prologue_torch(q, kv, heads, nope, rope, rank, norm_weight, eps, cos, sin, cache, slot_mapping)


def prologue_torch(q, kv, heads, nope, rope, rank, norm_weight, eps, cos, sin, cache, slot_mapping):
    query, latent = query_and_latent_torch(q, kv, heads, nope, rope, rank, norm_weight, eps, cos, sin)
    cache[slot_mapping] = latent.to(cache.dtype)
    return query


def expand_kv(kv: torch.Tensor, k_rope: torch.Tensor, heads: int, nope: int, v_dim: int,
              impl: Impl = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """kv (L, H*(nope+v)) = kv_b_proj(c) of L keys, k_rope (L, P) their rotated rope key (any row stride) ->
    (K (H, L, nope+P), V (H, L, v)), both contiguous, in kv's dtype."""
    if kv.shape[0] > 0 and _use(impl, kv, k_rope):
        return _run(impl, "expand_kv", expand_kv_torch, kv, k_rope, heads, nope, v_dim)
    return expand_kv_torch(kv, k_rope, heads, nope, v_dim)


def expand_kv_torch(kv, k_rope, heads, nope, v_dim):
    k_nope, v = kv.view(kv.shape[0], heads, nope + v_dim).split([nope, v_dim], dim=-1)
    k = torch.cat([k_nope, k_rope[:, None].expand(-1, heads, -1)], dim=-1)
    return k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
