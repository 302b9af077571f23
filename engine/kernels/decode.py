"""Decode-step operations that fuse what the eager path does in many small kernels.

Each public function takes ``impl``: "auto" (Triton for CUDA bf16/fp16 tensors when available, else PyTorch),
"torch" or "triton". The ``*_torch`` functions are the references: plain PyTorch, any device and dtype.

Shapes use T tokens (one per decoding sequence), H heads, R = kv_lora_rank, P = qk_rope_head_dim, D hidden size,
I expert intermediate size, k = experts per token, ns = shared-expert slots (shared intermediate / I).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from engine.kernels import first_working, fp8, triton_device, use_triton
from engine.model.rope import apply_interleaved_rope


Impl = Literal["auto", "torch", "triton"]
_broken: set[str] = set()  # kernels that failed to build or launch here: "auto" uses the PyTorch path for them


def _triton(impl: Impl, x: torch.Tensor) -> bool:
    if impl == "auto":
        return use_triton(x)
    return impl == "triton"


def _dispatch(name: str, impl: Impl, use: bool, fn_name: str, reference, *args, module: str = "triton_decode"):
    """Run the Triton kernel ``fn_name`` (of ``engine.kernels.<module>``) when ``use``; under "auto", a kernel
    that fails (a Triton build this code does not compile on, a device without enough shared memory) is logged
    once and replaced by its reference from then on (:func:`engine.kernels.first_working`)."""
    if not use or name in _broken:
        return reference(*args)
    import importlib

    kernel = getattr(importlib.import_module(f"engine.kernels.{module}"), fn_name)
    if impl != "auto":
        return kernel(*args)
    return first_working(_broken, [(name, kernel)], reference, *args)


# --------------------------------------------------------------------------------------------- add + RMSNorm
def add_rms_norm(
    parts: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    want_fp32: bool = False,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """h = residual + Σ_s parts[:, s] (fp32 sum, rounded once to the residual's dtype); returns
    (h, rmsnorm(h) * weight, that normed row in fp32 when ``want_fp32``: the router's input).

    ``parts`` is (T, D) or (T, S, D) of any float dtype (the MoE's per-slot fp32 partial outputs); without a
    residual, h has ``parts``' dtype (the first layer's input norm)."""
    dtype = residual.dtype if residual is not None else parts.dtype
    probe = residual if residual is not None else parts
    use = _triton(impl, probe) and weight.dtype == dtype
    return _dispatch("add_rms_norm", impl, use, "add_rms_norm", add_rms_norm_torch, parts, residual, weight, eps,
                     want_fp32)


def add_rms_norm_torch(parts, residual, weight, eps, want_fp32=False):
    dtype = residual.dtype if residual is not None else parts.dtype
    if parts.dim() == 3:
        total = parts.float().sum(dim=1)
    else:
        total = parts.float()
    if residual is not None:
        total = total + residual.float()
    h = total.to(dtype)
    normed = F.rms_norm(h, (h.shape[-1],), weight.to(dtype), eps)
    return h, normed, (normed.float() if want_fp32 else None)


# --------------------------------------------------------------------------------------------- projections
# Few-row projections of a decode step (fused qkv, o_proj): cuBLAS streams a 2K x 2-4K weight at ~1.1 TB/s for
# one row on an H100 (6.8 µs for the 7.5 MB fused qkv weight, bench/RESULTS.md "Fourth H100 run"); one row takes
# a CUDA-core GEMV, up to LINEAR_SKINNY_MAX_ROWS rows a tensor-core kernel over one 16-row block, beyond that
# the library GEMM (or fp8.linear's own choice for an fp8 weight).
LINEAR_SKINNY_MAX_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, impl: Impl = "auto") -> torch.Tensor:
    """x (T, K) · weight (N, K)ᵀ (+ bias) in x's dtype, as ``engine.kernels.fp8.linear`` (``scale`` (N,) for an
    fp8 weight, None for a 16-bit one) -- with the few-row Triton kernels where they run."""
    rows = x.shape[0]
    fp8_weight = scale is not None and fp8.is_fp8(weight)
    use = (_triton(impl, x) and x.dim() == 2 and rows <= LINEAR_SKINNY_MAX_ROWS
           and (fp8_weight or (scale is None and weight.dtype == x.dtype)))
    if not use:
        return fp8.linear(x, weight, scale, bias)
    if rows == 1:
        return _dispatch("row_gemv", impl, True, "row_gemv", linear_torch, x, weight, scale, bias)
    return _dispatch("skinny_linear", impl, True, "skinny_linear", linear_torch, x, weight, scale, bias,
                     module="triton_fp8")


def linear_torch(x, weight, scale, bias, out_dtype=None):
    if out_dtype is not None and out_dtype != x.dtype:  # a 16-bit row into a wider product (the router's logits)
        assert scale is None
        x, weight = x.to(out_dtype), weight.to(out_dtype)
    return fp8.linear(x, weight, scale, bias, impl="torch")


# --------------------------------------------------------------------------------------------- MLA decode
def mla_decode_prologue(
    q: torch.Tensor,
    kv: torch.Tensor,
    w_uk: torch.Tensor,
    heads: int,
    nope: int,
    rope: int,
    rank: int,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention prologue of one decode step, in one kernel.

    q (T, H*(nope+rope)) and kv (T, R+P) are the projections (row-strided views of one fused GEMV output are
    fine); w_uk (H, nope, R) the absorbed key weight; cos/sin (T, P/2). Writes [rmsnorm(c_kv) | rope(k_pe)] into
    ``cache[slot_mapping]`` and returns (q_latent (T, H, R) = q_nope · W_UK per head, the rotated query rope part
    (T, H, P)), both contiguous."""
    use = (_triton(impl, q) and cache.dtype == q.dtype and w_uk.dtype == q.dtype
           and nope >= 16 and nope & (nope - 1) == 0)  # the kernel's tl.dot runs over the nope dims
    return _dispatch("mla_decode_prologue", impl, use, "mla_decode_prologue", mla_decode_prologue_torch,
                     q, kv, w_uk, heads, nope, rope, rank, norm_weight, eps, cos, sin, cache, slot_mapping)


def mla_decode_prologue_torch(q, kv, w_uk, heads, nope, rope, rank, norm_weight, eps, cos, sin, cache,
                              slot_mapping):
    n = q.shape[0]
    q_heads = q.reshape(n, heads, nope + rope)
    c_kv, k_pe = kv[:, :rank], kv[:, rank : rank + rope]
    c_kv = F.rms_norm(c_kv, (rank,), norm_weight.to(kv.dtype), eps)
    rotated = apply_interleaved_rope(torch.cat([q_heads[..., nope:], k_pe[:, None]], dim=1), cos[:, None],
                                     sin[:, None])
    cache[slot_mapping] = torch.cat([c_kv, rotated[:, heads]], dim=-1).to(cache.dtype)
    q_latent = torch.bmm(q_heads[..., :nope].transpose(0, 1), w_uk).transpose(0, 1)  # (T, H, R)
    return q_latent.contiguous(), rotated[:, :heads].contiguous()


def mla_decode_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    w_uv: torch.Tensor,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Absorbed-weight MLA decode attention over the paged latent cache, through W_UV.

    q_latent (H, T, R) = W_UKᵀ q_nope (any strides, last dim contiguous); q_pe (T, H, P); cache (N, R+P);
    slots (T, L) cache slots of each row's keys, of which the first ``lengths[t]`` are real; w_uv (H, v, R).
    z = softmax(scale·(q_latent·c + q_pe·k_pe)) · c, rounded to q_latent's dtype; returns the values
    (T, H, v) = z · W_UVᵀ per head, in q_latent's dtype (``o_proj``'s input once flattened)."""
    use = _triton(impl, q_latent) and cache.dtype == q_latent.dtype and w_uv.dtype == q_latent.dtype
    return _dispatch("mla_decode_attention", impl, use, "mla_decode_attention", mla_decode_attention_torch,
                     q_latent, q_pe, cache, slots, lengths, scale, w_uv)


def mla_decode_attention_torch(q_latent, q_pe, cache, slots, lengths, scale, w_uv):
    rank = q_latent.shape[-1]
    latents = cache[slots]  # (T, L, R+P)
    query = torch.cat([q_latent.transpose(0, 1), q_pe], dim=-1).to(latents.dtype)  # (T, H, R+P)
    scores = torch.bmm(query.float(), latents.float().transpose(1, 2)) * scale  # (T, H, L)
    valid = torch.arange(slots.shape[1], device=slots.device)[None, :] < lengths[:, None]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    z = torch.bmm(probs, latents[..., :rank].float()).transpose(0, 1).to(q_latent.dtype)  # (H, T, R)
    return torch.bmm(z, w_uv.transpose(1, 2)).transpose(0, 1).contiguous()  # (T, H, v)


# --------------------------------------------------------------------------------------------- router
# prompt chunks' logits from the 16-bit rows (decode batches keep the measured paths)
ROUTER_16BIT_MIN_ROWS = 512
ROUTER_GEMV_MAX_ROWS = 1  # one row's router logits on the one-row GEMV (one chained kernel, not cuBLAS's two)


def router_logits(x: torch.Tensor, x_fp32: torch.Tensor | None, weight: torch.Tensor,
                  impl: Impl = "auto", weight_16bit: torch.Tensor | None = None) -> torch.Tensor:
    """The router's logits (T, E) in fp32: x (T, D) · weight (E, D)ᵀ with x upcast (``x_fp32``, that upcast, when
    the caller has it), as ``MoEGate.selection_scores``. ``weight_16bit``: the fp32 weight in x's 16-bit dtype when
    every value is exact there (``MoEGate.weight_exact_in``); then many rows take a tensor-core kernel whose
    products are exact (``engine.kernels.triton_router``): the same sums up to their order, with no fp32 copy of x."""
    # an fp32 weight as loaded: the GEMV reads it ahead of its PDL wait, so it must not be a fresh cast
    use = (_triton(impl, x) and x.dim() == 2 and x.shape[0] <= ROUTER_GEMV_MAX_ROWS
           and weight.dtype == torch.float32)
    if use:
        return _dispatch("router_gemv", impl, True, "row_gemv", linear_torch, x, weight, None, None, torch.float32)
    many = (weight_16bit is not None and x.dim() == 2 and x.shape[0] >= ROUTER_16BIT_MIN_ROWS
            and weight_16bit.dtype == x.dtype and _triton(impl, x))
    if many:
        return _dispatch("router_logits_16bit", impl, True, "router_logits", lambda x, _w: router_logits_torch(x, weight),
                         x, weight_16bit, module="triton_router")
    return router_logits_torch(x if x_fp32 is None else x_fp32, weight)


def router_logits_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), weight.float())


def route_topk(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    scoring: str,
    norm_topk_prob: bool,
    scale: float,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router tail for one group (n_group 1): scores = sigmoid/softmax(logits), experts chosen by
    scores + bias, weights = their scores, normalised when asked, times ``scale``.

    logits (T, E) fp32 -> (ids (T, k) int64, weights (T, k) fp32), as ``MoEGate.forward``."""
    use = impl == "triton" or (impl == "auto" and triton_device(logits))
    return _dispatch("route_topk", impl, use, "route_topk", route_topk_torch,
                     logits, bias, top_k, scoring, norm_topk_prob, scale)


def route_topk_torch(logits, bias, top_k, scoring, norm_topk_prob, scale):
    logits = logits.float()
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(dim=-1)
    choice = scores + bias.float() if bias is not None else scores
    ids = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if top_k > 1 and norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scale


# --------------------------------------------------------------------------------------------- MoE experts
ExpertOrder = tuple[torch.Tensor, torch.Tensor]


def moe_expert_order(ids: torch.Tensor, n_experts: int, impl: Impl = "auto") -> ExpertOrder:
    """The (token, slot) pairs grouped by expert, for the expert-tiled kernels: ids (T, k) -> (order (T·k,)
    int32, the flat pair indices sorted by (expert, index); starts (E+1,) int32, where each expert's run begins)."""
    use = impl == "triton" or (impl == "auto" and triton_device(ids))
    return _dispatch("moe_expert_order", impl, use, "expert_order", moe_expert_order_torch, ids, n_experts,
                     module="triton_moe_tiles")


def moe_expert_order_torch(ids, n_experts):
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True).to(torch.int32)
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=ids.device)
    counts[1:].scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.long))
    return order, counts.cumsum(0).to(torch.int32)


def moe_gate_up(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    shared_gate: torch.Tensor | None = None,
    shared_up: torch.Tensor | None = None,
    impl: Impl = "auto",
    *,
    gate_scale: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
    shared_gate_scale: torch.Tensor | None = None,
    shared_up_scale: torch.Tensor | None = None,
    order: ExpertOrder | None = None,
) -> torch.Tensor:
    """Per (token, slot): hidden = silu(x W_gate[e]ᵀ) · (x W_up[e]ᵀ) · weight. Slots k..k+ns-1 are the shared
    experts' SwiGLU (shared_gate/up (ns·I, D)) cut into ns slices of width I, with weight 1.

    Without ``order``: GEMVs that read the stacked expert weights (E, I, D) by expert id, no sorting or dispatch
    (few rows). With :func:`moe_expert_order`'s ``order``: expert-tiled kernels that read each chosen expert's
    weights once for all its rows (``engine.kernels.triton_moe_tiles``). Same result either way.

    FP8 weights (``engine.kernels.fp8``) come with their per-row scales: gate/up_scale (E, I), shared ones
    (ns·I,); each fp32 sum is multiplied by its row's scale before the activation.

    x (T, D); ids (T, k); weights (T, k) -> hidden (T, k+ns, I) in x's dtype."""
    scales = (gate_scale, up_scale, shared_gate_scale, shared_up_scale)
    if order is not None:
        return _dispatch("moe_tiled_gate_up", impl, _triton(impl, x), "tiled_gate_up",
                         lambda x, _o, _s, *rest: moe_gate_up_torch(x, ids, *rest),
                         x, order[0], order[1], weights, w_gate, w_up, shared_gate, shared_up, *scales,
                         module="triton_moe_tiles")
    return _dispatch("moe_gate_up", impl, _triton(impl, x), "moe_gate_up", moe_gate_up_torch,
                     x, ids, weights, w_gate, w_up, shared_gate, shared_up, *scales)


def _scaled(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """fp32 weights, dequantised when ``scale`` is given (per row: the last dim is the reduction)."""
    return w.float() if scale is None else w.float() * scale.float()[..., None]


def moe_gate_up_torch(x, ids, weights, w_gate, w_up, shared_gate=None, shared_up=None,
                      gate_scale=None, up_scale=None, shared_gate_scale=None, shared_up_scale=None):
    n, k = ids.shape
    inter = w_gate.shape[1]
    xf = x.float()[:, :, None]  # (T, D, 1)
    slots = []
    for j in range(k):
        e = ids[:, j]
        g = torch.bmm(_scaled(w_gate[e], None if gate_scale is None else gate_scale[e]), xf)[..., 0]
        u = torch.bmm(_scaled(w_up[e], None if up_scale is None else up_scale[e]), xf)[..., 0]
        slots.append(F.silu(g) * u * weights[:, j, None].float())
    if shared_gate is not None:
        g = (x.float() @ _scaled(shared_gate, shared_gate_scale).T).view(n, -1, inter)
        u = (x.float() @ _scaled(shared_up, shared_up_scale).T).view(n, -1, inter)
        slots.extend((F.silu(g) * u).unbind(1))
    return torch.stack(slots, dim=1).to(x.dtype)


def moe_down(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    w_down: torch.Tensor,
    shared_down: torch.Tensor | None = None,
    impl: Impl = "auto",
    *,
    down_scale: torch.Tensor | None = None,
    shared_down_scale: torch.Tensor | None = None,
    order: ExpertOrder | None = None,
) -> torch.Tensor:
    """Per (token, slot): hidden · W_down[e]ᵀ (w_down (E, D, I); the shared slots use column slices of
    shared_down (D, ns·I)). Returns the per-slot outputs (T, k+ns, D) in fp32, unsummed: ``add_rms_norm``
    sums them with the residual in the next kernel, so no atomics and one rounding. FP8 weights come with
    their per-output-row scales: down_scale (E, D), shared_down_scale (D,). ``order`` as in :func:`moe_gate_up`."""
    if order is not None:
        return _dispatch("moe_tiled_down", impl, _triton(impl, hidden), "tiled_down",
                         lambda h, _o, _s, *rest: moe_down_torch(h, ids, *rest),
                         hidden, order[0], order[1], w_down, shared_down, down_scale, shared_down_scale,
                         module="triton_moe_tiles")
    return _dispatch("moe_down", impl, _triton(impl, hidden), "moe_down", moe_down_torch,
                     hidden, ids, w_down, shared_down, down_scale, shared_down_scale)


def moe_down_torch(hidden, ids, w_down, shared_down=None, down_scale=None, shared_down_scale=None):
    n, k = ids.shape
    inter = w_down.shape[2]
    h = hidden.float()
    slots = [torch.bmm(_scaled(w_down[ids[:, j]], None if down_scale is None else down_scale[ids[:, j]]),
                       h[:, j, :, None])[..., 0] for j in range(k)]
    if shared_down is not None:
        ns = shared_down.shape[1] // inter
        sd = _scaled(shared_down, shared_down_scale)
        for j in range(ns):
            slots.append(h[:, k + j] @ sd[:, j * inter : (j + 1) * inter].T)
    return torch.stack(slots, dim=1)
