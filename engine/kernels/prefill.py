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
mem-efficient; torch 2.11, cuDNN 9.19), checks each on sampled rows of its first real call of each kind, and drops
one that fails or disagrees for the rest of the process (``engine.kernels.first_working``). On CPU it pads v for
the CPU flash op; ``attention_with_lse_torch`` is the plain reference every one is tested against.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from engine.kernels import first_working

_broken: set[str] = set()  # "kernel:dtype" of LSE kernels that failed or disagreed here: skipped from then on
_checked: set[tuple] = set()  # kinds of call (_check_key) whose first real call matched the reference


def attention_with_lse_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
    query_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Lq, Dqk), k (B, H, Lk, Dqk), v (B, H, Lk, Dv) -> (out (B, H, Lq, Dv) in q's dtype, lse (B, H, Lq)
    fp32). ``causal``: query i sees keys j <= i (upper-left aligned, used only with Lq == Lk). ``query_rows``:
    the rows of a causal square that ``q`` holds (a sample of them), when it is not the whole square."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        rows = torch.arange(q.shape[-2], device=q.device) if query_rows is None else query_rows
        allowed = torch.arange(k.shape[-2], device=q.device)[None, :] <= rows[:, None]
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
    or one kernel name (tests; no check, no fallback then). The LSE comes back as (B, H, Lq) fp32 whatever the
    kernel's own layout (some pad Lq or add a trailing dim).

    fp32 takes the reference: the private ops are half-precision kernels, and on the H100 the "auto" path gave
    non-finite rows for fp32 inputs at MLA's dims (fp32 engines are for tests and references only)."""
    if impl == "torch" or (impl == "auto" and q.dtype == torch.float32 and q.is_cuda):
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
    """The kernel ``name`` on this call; the first call of each kind (:func:`_check_key`) is verified against
    the reference on sampled rows of the call itself, and raises :class:`KernelDisagrees` (the caller then takes
    the next kernel) if they differ."""
    out, lse = _run(CUDA_KERNELS.get(name, _cpu_flash), q, k, v, causal, scale)
    key = _check_key(name, q, k, v, causal)
    if key not in _checked:
        if not _rows_agree(q, k, v, causal, scale, out, lse):
            raise KernelDisagrees(f"prefill attention kernel {name} disagrees with the reference here ({key})")
        _checked.add(key)
    return out, lse


def _run(kernel, q, k, v, causal, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on dense (B, H, L, D) copies of the caller's views: private SDPA ops skip the public API's
    stride checks, and strided inputs are a known source of silently wrong results in such kernels. The copies are
    a few hundred MB per layer at a 131K prompt (about 1 ms of bandwidth by estimate, against 159 ms of attention);
    the H100 figures of 0385e01 include them."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, lse = kernel(q, k, v, causal, scale)
    return out, _lse_layout(lse, q)


def _check_key(name: str, q, k, v, causal: bool) -> tuple:
    """What a check covers: kernel, device, dtype, heads, head dims, causal, and whether queries and keys differ
    in number (a chunk's prefix part) -- not the lengths, which change with every chunk."""
    return (name, q.device, q.dtype, q.shape[1], q.shape[-1], v.shape[-1], causal, q.shape[-2] != k.shape[-2])


def _sample_rows(n: int, count: int = 12) -> torch.Tensor:
    """Rows to verify: the first and last few (where causal alignment and tile edges go wrong) and a spread."""
    rows = set(range(min(n, 3))) | set(range(max(0, n - 3), n))
    rows |= {int(i) for i in torch.linspace(0, n - 1, count).round().tolist()}
    return torch.tensor(sorted(rows))


def _rows_agree(q, k, v, causal: bool, scale: float, out: torch.Tensor, lse: torch.Tensor) -> bool:
    """Sampled rows (first and last head) of a kernel's output and LSE equal the reference's. Private ops are
    not a stable API and a toy probe missed shape-dependent failures on the H100, so the first real call of each
    kind is what gets checked."""
    rows = _sample_rows(q.shape[-2]).to(q.device)
    heads = torch.tensor(sorted({0, q.shape[1] - 1}), device=q.device)
    ref_out, ref_lse = attention_with_lse_torch(q.index_select(1, heads).index_select(2, rows).float(),
                                                k.index_select(1, heads), v.index_select(1, heads), causal, scale,
                                                query_rows=rows)
    got_out = out.index_select(1, heads).index_select(2, rows).float()
    got_lse = lse.index_select(1, heads).index_select(2, rows)
    half = q.dtype != torch.float32  # kernels round probabilities to the input dtype before P·V
    out_err = (got_out - ref_out).abs().max().item()
    lse_err = (got_lse - ref_lse).abs().max().item()
    out_bound = (3e-2 if half else 1e-4) * max(1.0, ref_out.abs().max().item())
    lse_bound = (1e-2 + 1e-3 * ref_lse.abs().max().item()) if half else 1e-4 * max(1.0, ref_lse.abs().max().item())
    return math.isfinite(out_err) and math.isfinite(lse_err) and out_err <= out_bound and lse_err <= lse_bound


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
