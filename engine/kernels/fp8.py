"""FP8 (float8_e4m3fn) weights with per-output-channel fp32 scales, and the linear layer that uses them.

Why per-output-channel scales: the decode step is bandwidth-bound, so the win is halving the bytes each weight
row costs; one scale per row is applied once in a GEMV/GEMM epilogue (``y[n] = s[n] · Σ_k q[n, k] x[k]``) and
costs 4 bytes per row, while block scales would need a scale load inside the reduction loop of every kernel.
The error is the same order (e4m3 has 3 mantissa bits either way: relative error ≤ 2⁻⁴ per weight).

``linear(x, weight, scale)`` picks, by rows and device:
- few rows (decode) on CUDA with Triton: a weight-only GEMM reading the fp8 weight and converting it in
  registers, bf16 activations, scales in the epilogue (``engine.kernels.triton_fp8``);
- many rows on a GPU with FP8 tensor cores (SM 8.9+): ``torch._scaled_mm`` with the activation quantised per row
  on the fly (rowwise scales);
- anything else (CPU, older GPUs, a kernel that failed once): dequantise to the activation dtype and
  ``F.linear`` (the reference; the bf16 fallback).

Nothing here imports the model: ``engine.model.decoder`` (ExpertBank) and ``engine.loader`` (the quantisation
step) build on it.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import first_working, use_triton


FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# up to this many rows the weight-only Triton GEMM (bandwidth-bound: weights read once per 64 rows) beats
# quantising the activations for the tensor-core FP8 GEMM
GEMV_MAX_ROWS = 64
_MIN_SCALE = 1e-12  # an all-zero row gets this scale (its values stay 0), never a division by zero
Impl = Literal["auto", "torch", "triton", "scaled_mm"]
_broken: set[str] = set()  # paths that failed to build or launch here: "auto" skips them from then on


# --------------------------------------------------------------------------------------------- quantisation
def is_fp8(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype == FP8_DTYPE


@torch.no_grad()
def quantize_rows(w: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., N, K) -> (q (..., N, K) float8_e4m3fn, scale (..., N) fp32) with q·scale ≈ w per row: the row's
    absolute maximum maps to 448. Works in row chunks so a big matrix never needs a full fp32 copy."""
    flat = w.reshape(-1, w.shape[-1])
    q = torch.empty(flat.shape, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(flat.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, flat.shape[0], chunk_rows):
        part = flat[start : start + chunk_rows].float()
        s = (part.abs().amax(dim=-1) / FP8_MAX).clamp_min(_MIN_SCALE)
        q[start : start + chunk_rows] = (part / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        scale[start : start + chunk_rows] = s
    return q.view(w.shape), scale.view(w.shape[:-1])


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The inverse of :func:`quantize_rows`: (..., N, K) in ``dtype``."""
    return (q.float() * scale.float()[..., None]).to(dtype)


def quantize_activation_rows(x: torch.Tensor, impl: Literal["auto", "torch", "triton"] = "auto"
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row quantisation of activations for the FP8 tensor-core GEMM: (M, K) -> (fp8, (M, 1) fp32).
    CUDA with Triton: one fused pass (``triton_fp8.quantize_activation_rows``)."""
    if impl == "torch" or not (impl == "triton" or use_triton(x)):
        return quantize_activation_rows_torch(x)
    from engine.kernels import triton_fp8

    def fused(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return triton_fp8.quantize_activation_rows(x, FP8_MAX, _MIN_SCALE)

    if impl == "triton":
        return fused(x)
    return first_working(_broken, [("quantize_triton", fused)], quantize_activation_rows_torch, x)


def quantize_activation_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    s = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(_MIN_SCALE)
    return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s


# --------------------------------------------------------------------------------------------- capability
@functools.cache
def _fp8_tensor_cores(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9) and hasattr(torch, "_scaled_mm")


def scaled_mm_available(x: torch.Tensor) -> bool:
    """``torch._scaled_mm`` with rowwise scales: FP8 tensor cores (Ada/Hopper+), bf16 output."""
    return x.is_cuda and x.dtype == torch.bfloat16 and _fp8_tensor_cores(x.device.index or 0)


# --------------------------------------------------------------------------------------------- linear
def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a bf16/fp32 weight (``scale`` None) or an fp8 weight (N, K) with its
    per-row ``scale`` (N,): the result is in x's dtype either way, so callers need not know the format."""
    if scale is None or not is_fp8(weight):
        return F.linear(x, weight, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if impl == "auto":
        out = first_working(_broken, [(n, _PATHS[n]) for n in _linear_candidates(x2, weight)], _PATHS["torch"],
                             x2, weight, scale, bias)
    else:
        out = _PATHS[impl](x2, weight, scale, bias)
    return out.view(*shape[:-1], weight.shape[0])


def _linear_candidates(x2: torch.Tensor, weight: torch.Tensor) -> list[str]:
    """Paths to try in order (the reference last). The weight-only kernel serves every row count, so it is also
    the fallback of the FP8 tensor-core GEMM."""
    rows = x2.shape[0]
    triton_ok = use_triton(x2)
    tensor_cores = scaled_mm_available(x2) and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0
    order = []
    if triton_ok and rows <= GEMV_MAX_ROWS:
        order.append("triton")
    if tensor_cores:
        order.append("scaled_mm")
    if triton_ok and "triton" not in order:
        order.append("triton")
    return order


def linear_torch(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """Reference / fallback: dequantise to the activation dtype, then the ordinary GEMM."""
    return F.linear(x2, dequantize_rows(weight, scale, x2.dtype), bias)


def linear_triton(x2, weight, scale, bias):
    from engine.kernels import triton_fp8

    return triton_fp8.skinny_linear(x2, weight, scale, bias)


def linear_scaled_mm(x2, weight, scale, bias):
    """FP8 x FP8 tensor-core GEMM: activation rows quantised on the fly, both scales applied in the epilogue."""
    xq, xs = quantize_activation_rows(x2)
    out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.view(1, -1).float(), out_dtype=x2.dtype)
    return out if bias is None else out + bias


_PATHS = {"torch": linear_torch, "triton": linear_triton, "scaled_mm": linear_scaled_mm}


class Fp8Linear(nn.Module):
    """Drop-in for ``nn.Linear`` holding ``weight`` (N, K) float8_e4m3fn and ``weight_scale`` (N,) fp32; the
    forward returns the input's dtype. Built from a loaded ``nn.Linear`` by :meth:`from_linear` (the loader's
    quantisation step); ``dequantized_weight`` gives the bf16 matrix for callers that need the values
    themselves (the runner's absorbed MLA matrices)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        assert is_fp8(weight) and weight.dim() == 2 and scale.shape == weight.shape[:1]
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale.float(), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, module: nn.Linear) -> "Fp8Linear":
        q, s = quantize_rows(module.weight.detach())
        return cls(q, s, module.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3, per-row scales"


def dense_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight of an ``nn.Linear`` or :class:`Fp8Linear` as a ``dtype`` matrix (a dequantised copy for fp8)."""
    if isinstance(module, Fp8Linear):
        return module.dequantized_weight(dtype)
    return module.weight


def weight_scale(module: nn.Module) -> torch.Tensor | None:
    """The per-row scale of an :class:`Fp8Linear`, else None (callers then pass the weight as is)."""
    return getattr(module, "weight_scale", None) if isinstance(module, Fp8Linear) else None


# --------------------------------------------------------------------------------------------- grouped experts
# from this many expert rows (prefill) the FP8 tensor-core grouped GEMM, if it works here, beats the weight-only
# kernel (which converts every weight tile to bf16 for the bf16 tensor cores)
SCALED_GROUPED_MIN_ROWS = 4096
GroupedImpl = Literal["auto", "triton", "scaled_grouped_mm", "torch"]


@functools.cache
def _scaled_grouped_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9 and hasattr(torch, "_scaled_grouped_mm")


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor, impl: GroupedImpl = "auto"
) -> torch.Tensor:
    """Rows of ``x`` (M, K), sorted by expert with group ends ``offsets`` (E,) int32, times their expert's fp8
    weight (E, N, K) with per-row scales (E, N): (M, N) in x's dtype.

    CUDA: the Triton weight-only grouped GEMM (``triton_fp8.fp8_grouped_linear``: reads each used expert's fp8
    weight once per row block; the decode batches past the GEMV path live here), or from
    ``SCALED_GROUPED_MIN_ROWS`` rows on Hopper ``torch._scaled_grouped_mm`` with the activation rows quantised on
    the fly. Reference / fallback (CPU, or a path that failed once): the whole bank dequantised per call, then
    the bf16 grouped GEMM -- E·N·K values written and read again (~1.1 GB per A3B MoE layer, ~0.8 ms on an H100),
    correct but slow."""
    if impl == "auto":
        return first_working(_broken, [(n, _GROUPED[n]) for n in _grouped_candidates(x, weight)], _GROUPED["torch"],
                             x, weight, scale, offsets)
    return _GROUPED[impl](x, weight, scale, offsets)


def _grouped_candidates(x: torch.Tensor, weight: torch.Tensor) -> list[str]:
    order = []
    if (x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] >= SCALED_GROUPED_MIN_ROWS
            and _scaled_grouped_ok(x.device.index or 0) and x.shape[1] % 16 == 0 and weight.shape[1] % 16 == 0):
        order.append("scaled_grouped_mm")
    if use_triton(x):
        order.append("grouped_triton")
    return order


def _grouped_torch(x, weight, scale, offsets):
    return F.grouped_mm(x, dequantize_rows(weight, scale, x.dtype).transpose(1, 2), offs=offsets)


def _grouped_triton(x, weight, scale, offsets):
    from engine.kernels import triton_fp8

    return triton_fp8.fp8_grouped_linear(x, weight, scale, offsets)


def _grouped_scaled(x, weight, scale, offsets):
    xq, xs = quantize_activation_rows(x)
    return torch._scaled_grouped_mm(xq, weight.transpose(1, 2), xs.view(-1), scale.float(), offs=offsets,
                                    out_dtype=x.dtype)


_GROUPED = {"torch": _grouped_torch, "triton": _grouped_triton, "grouped_triton": _grouped_triton,
            "scaled_grouped_mm": _grouped_scaled}
