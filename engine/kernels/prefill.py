"""Attention of a prefill chunk that follows a cached prefix: two mask-free fused kernels merged by log-sum-exp.

A chunk of C queries at positions [P, P+C) attends to the P cached prefix keys (every one allowed: no mask) and to
its own C keys (causal, a square: the ordinary causal flag). Each part runs on a fused kernel that also returns
the rows' log-sum-exp ``lse = log Σ exp(scale·q·k)``, and the two results combine exactly:

    lse = logaddexp(lse₁, lse₂),   o = o₁·exp(lse₁ − lse) + o₂·exp(lse₂ − lse).

Why: one SDPA call with a lower-right causal bias over (C, P+C) falls to a slow kernel at MLA's head dims
(q/k 192, v 128): 7.0 s of a 131K-token prompt's 22 s on an H100 went to attention (gpu_facts). Mask-free and
square-causal calls keep flash-class kernels.

Which kernel returns the LSE: only private aten ops do (``torch.nn.functional.scaled_dot_product_attention``
returns the output alone). ``attention_with_lse`` tries them in the order of ``KIMIRAY_PREFILL_ATTENTION``
(default "cudnn,flash,efficient": on the H100 at our dims cuDNN took 0.6 / 8.6 / 159 ms for a causal 8K / 32K /
131K square and 16.4 ms for 8K queries over 131K keys, 2.3-5x faster than flash with v padded to 192 or
mem-efficient; torch 2.11, cuDNN 9.19), checks each once against the reference on a small problem, and drops
one that fails or disagrees for the rest of the process (``engine.kernels.first_working``). On CPU it pads v for
the CPU flash op; ``attention_with_lse_torch`` is the plain reference every one is tested against.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from engine.kernels import first_working

_broken: set[str] = set()  # "kernel:dtype" of LSE kernels that failed or disagreed here: skipped from then on
_checked: set[tuple] = set()  # (kernel, device, dtype, q/k dim, v dim) whose output and LSE matched the reference


def attention_with_lse_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Lq, Dqk), k (B, H, Lk, Dqk), v (B, H, Lk, Dv) -> (out (B, H, Lq, Dv) in q's dtype, lse (B, H, Lq)
    fp32). ``causal``: query i sees keys j <= i (upper-left aligned, used only with Lq == Lk)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float())
    return out.to(q.dtype), lse


def _pad_v(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v if v.shape[-1] == q.shape[-1] else F.pad(v, (0, q.shape[-1] - v.shape[-1]))


def _cudnn(q, k, v, causal, scale):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def _flash(q, k, v, causal, scale):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, _pad_v(q, v), 0.0, causal, False, scale=scale)
    return out[0][..., : v.shape[-1]], out[1]


def _efficient(q, k, v, causal, scale):
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return out[0], out[1]


def _cpu_flash(q, k, v, causal, scale):
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, _pad_v(q, v), 0.0, causal, scale=scale)
    return out[0][..., : v.shape[-1]], out[1]


CUDA_KERNELS = {"cudnn": _cudnn, "flash": _flash, "efficient": _efficient}


def cuda_order() -> list[str]:
    names = os.environ.get("KIMIRAY_PREFILL_ATTENTION", "cudnn,flash,efficient")
    return [n.strip() for n in names.split(",") if n.strip() in CUDA_KERNELS]


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`attention_with_lse_torch`, on the first fused kernel that runs here. ``impl``: "auto", "torch"
    or one kernel name (tests; no fallback then). The LSE comes back as (B, H, Lq) fp32 whatever the kernel's own
    layout (some pad Lq or add a trailing dim)."""
    if impl == "torch":
        return attention_with_lse_torch(q, k, v, causal, scale)
    if impl != "auto":
        return _run(CUDA_KERNELS[impl] if impl in CUDA_KERNELS else _cpu_flash, q, k, v, causal, scale)
    names = cuda_order() if q.is_cuda else ["cpu_flash"]
    tag = str(q.dtype).replace("torch.", "")
    candidates = [(f"{name}:{tag}", functools.partial(_checked_run, name)) for name in names]
    return first_working(_broken, candidates, attention_with_lse_torch, q, k, v, causal, scale)


class KernelDisagrees(RuntimeError):
    """A private attention op's output or LSE differs from the reference here (another base or layout)."""


def _checked_run(name: str, q, k, v, causal, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel ``name`` once checked against the reference for these dims (:func:`_agrees`), then run."""
    kernel = CUDA_KERNELS.get(name, _cpu_flash)
    if not _agrees(name, kernel, q, v):
        raise KernelDisagrees(f"prefill attention kernel {name} disagrees with the reference here")
    return _run(kernel, q, k, v, causal, scale)


def _run(kernel, q, k, v, causal, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on dense (B, H, L, D) copies of the caller's views. Private SDPA ops skip the public API's
    stride handling, and on the H100 they returned silently wrong rows for the engine's views (q transposed
    from (L, H, D), v sliced out of the kv projection): cached latents of a chunked bf16 prefill were off by 1.16
    where bf16 rounding gives 0.035, and fp32 prompts went non-finite (mem-efficient). A copy costs about 1 ms of
    a 131K prompt's 159 ms of attention per layer; the kernels are checked (:func:`_agrees`) on dense inputs."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, lse = kernel(q, k, v, causal, scale)
    return out, _lse_layout(lse, q)


def _agrees(name: str, kernel, q: torch.Tensor, v: torch.Tensor) -> bool:
    """Once per kernel, device, dtype and head dims: its output and LSE on a small problem equal the reference's
    (private ops are not a stable API: an LSE in another base or layout would otherwise merge silently wrong)."""
    key = (name, q.device, q.dtype, q.shape[-1], v.shape[-1])
    if key in _checked:
        return True
    gen = torch.Generator(device=q.device).manual_seed(0)
    probe_q = torch.randn(1, 2, 40, q.shape[-1], device=q.device, generator=gen).to(q.dtype)
    probe_k = torch.randn(1, 2, 40, q.shape[-1], device=q.device, generator=gen).to(q.dtype)
    probe_v = torch.randn(1, 2, 40, v.shape[-1], device=q.device, generator=gen).to(q.dtype)
    tol = 1e-4 if q.dtype == torch.float32 else 3e-2
    for causal in (False, True):
        out, lse = kernel(probe_q, probe_k, probe_v, causal, 0.1)
        ref_out, ref_lse = attention_with_lse_torch(probe_q, probe_k, probe_v, causal, 0.1)
        if (out.float() - ref_out.float()).abs().max() > tol or (_lse_layout(lse, probe_q) - ref_lse).abs().max() > tol:
            return False
    _checked.add(key)
    return True


def _lse_layout(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    b, h, n = q.shape[0], q.shape[1], q.shape[2]
    if lse.dim() == 4:  # (B, H, Lq, 1)
        lse = lse[..., 0]
    return lse[..., :n].float().reshape(b, h, n)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Exact softmax over the union of two disjoint key sets from each set's normalised output and LSE.
    out_* (B, H, L, Dv), lse_* (B, H, L) fp32 -> (B, H, L, Dv) in out_a's dtype."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse)[..., None]
    wb = torch.exp(lse_b - lse)[..., None]
    return (out_a.float() * wa + out_b.float() * wb).to(out_a.dtype)


def chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, scale: float, impl: str = "auto"
) -> torch.Tensor:
    """A prefill chunk's attention: q (B, H, C, Dqk) against k/v (B, H, P + C, D) whose first ``prefix_len`` keys
    are the cached prefix (all visible) and last C the chunk itself (causal). Equals causal attention with the
    queries aligned to the end of the keys."""
    chunk = q.shape[-2]
    assert k.shape[-2] == prefix_len + chunk
    if prefix_len == 0:
        if impl == "torch":
            return attention_with_lse_torch(q, k, v, chunk > 1, scale)[0]
        if q.is_cuda:  # the same (fastest, checked) kernel; SDPA's own choice at these dims may be a slower one
            return attention_with_lse(q, k, v, chunk > 1, scale, impl)[0]
        return F.scaled_dot_product_attention(q, k, v, is_causal=chunk > 1, scale=scale)
    out_p, lse_p = attention_with_lse(q, k[..., :prefix_len, :], v[..., :prefix_len, :], False, scale, impl)
    out_c, lse_c = attention_with_lse(q, k[..., prefix_len:, :], v[..., prefix_len:, :], chunk > 1, scale, impl)
    return merge_attention(out_p, lse_p, out_c, lse_c)
