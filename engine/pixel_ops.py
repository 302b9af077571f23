"""The processor's pixel work (resize, pad/crop, normalise, patchify) in torch ops, so it can run on the GPU.

The official processor resizes with ``PIL.Image.resize(..., BICUBIC)``. ``pil_bicubic_resize`` reproduces Pillow's
8-bit resampler bit for bit (``libImaging/Resample.c``: separable convolution, each pass rounded to uint8; filter ``a = -0.5``, support 2 scaled by the downscale factor (antialiasing); weights
normalised in double precision, then turned into 22-bit fixed point; accumulator starts at 2^21 (round half up)
and is clipped to 0..255 after the shift). The weights are computed on the host in float64 with the same
operation order as Pillow's C code; the convolution is a gather of ``ksize`` taps and an exact int32
multiply-add, so it gives the same bytes on any device (tests compare against Pillow itself).

Pass order: Pillow <= 11 always resamples horizontally first; newer Pillow (13.0 here) runs the vertical pass
first when the height shrinks by more than twice as many pixels as the width. The order changes the rounding,
so ``vertical_first_rule()`` probes the installed Pillow once (a 64x64 -> 63x17 resize, where the orders differ)
and follows it; without Pillow the newer rule is used.

Normalisation goes through a 256-entry float32 table per channel computed with the CPU path's exact operations
(``(v / 255 - mean) / std``), so device results are bit-identical to ``engine.processor.preprocess_image``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

__all__ = ["pil_bicubic_resize", "vertical_first_rule", "normalise_lut", "patchify_u8", "PRECISION_BITS"]

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images
_BICUBIC_SUPPORT = 2.0
_A = -0.5


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's ``bicubic_filter`` (a = -0.5), same expression order (float64)."""
    x = np.abs(x)
    inner = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * _A
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


@lru_cache(maxsize=64)
def _coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(first input index per output (out,), fixed-point weights (out, ksize) int32) as Pillow's
    ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` compute them; taps past an output's window weigh 0."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.trunc(center - support + 0.5).astype(np.int64)  # C (int) cast truncates toward zero
    xmin = np.maximum(xmin, 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize, dtype=np.int64)
    valid = taps[None, :] < xmax[:, None]
    w = _bicubic(((taps[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * ss)
    w = np.where(valid, w, 0.0)
    ww = np.zeros(out_size, dtype=np.float64)
    for k in range(ksize):  # sequential sum, as the C loop (numpy's pairwise sum could round differently)
        ww += w[:, k]
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * (1 << PRECISION_BITS)), np.trunc(0.5 + w * (1 << PRECISION_BITS)))
    return xmin, fixed.astype(np.int32)


_DEVICE_COEFFS: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _device_coeffs(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat tap indices (out*ksize,) int64 and weights (out, ksize) int32 on ``device`` (kept: a handful of
    screen sizes recur, and each upload would be a host-to-device copy on the critical path)."""
    key = (in_size, out_size, str(device))
    hit = _DEVICE_COEFFS.get(key)
    if hit is None:
        xmin, fixed = _coeffs(in_size, out_size)
        idx = np.minimum(xmin[:, None] + np.arange(fixed.shape[1])[None, :], in_size - 1).reshape(-1)
        if len(_DEVICE_COEFFS) >= 64:
            _DEVICE_COEFFS.clear()
        hit = _DEVICE_COEFFS[key] = (torch.from_numpy(idx).to(device), torch.from_numpy(fixed).to(device))
    return hit


def _resample_axis(x: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    """One Pillow pass along ``dim`` (0 = rows, 1 = columns) of a uint8 (H, W, C) tensor -> uint8."""
    idx, weight = _device_coeffs(x.shape[dim], out_size, x.device)
    ksize = weight.shape[1]
    taps = x.index_select(dim, idx).to(torch.int32).unflatten(dim, (out_size, ksize))
    shape = [1, 1, 1, 1]
    shape[dim], shape[dim + 1] = out_size, ksize
    acc = (taps * weight.view(shape)).sum(dim + 1, dtype=torch.int32) + (1 << (PRECISION_BITS - 1))
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _vertical_first(in_w: int, in_h: int, out_w: int, out_h: int, rule: bool) -> bool:
    return rule and (in_h - out_h) > 0 and (in_h - out_h) > (in_w - out_w) * 2


def _resize(rgb: torch.Tensor, size: tuple[int, int], rule: bool) -> torch.Tensor:
    w, h = size
    in_h, in_w = rgb.shape[:2]
    passes = [(1, w), (0, h)]
    if _vertical_first(in_w, in_h, w, h, rule):
        passes.reverse()
    out = rgb
    for dim, n in passes:
        if n != out.shape[dim]:
            out = _resample_axis(out, dim, n)
    return out


@lru_cache(maxsize=1)
def vertical_first_rule() -> bool:
    """Whether the installed Pillow runs the vertical pass first on strong vertical shrinks (see module doc)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency; the GPU host may lack it
        return True
    probe = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(probe, "RGB").resize((63, 17), Image.Resampling.BICUBIC))
    return bool(np.array_equal(_resize(torch.from_numpy(probe), (63, 17), True).numpy(), ref))


def pil_bicubic_resize(rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (H, W, C) -> uint8 (h, w, C) with (w, h) = ``size``, equal to ``PIL.Image.resize(size, BICUBIC)``.

    Like Pillow, a pass runs only along an axis whose size changes, in Pillow's order.
    """
    if rgb.dtype != torch.uint8 or rgb.dim() != 3:
        raise ValueError(f"expected a uint8 (H, W, C) tensor, got {rgb.dtype} {tuple(rgb.shape)}")
    w, h = size
    if w <= 0 or h <= 0:
        raise ValueError(f"target size must be positive, got {size}")
    return _resize(rgb, (int(w), int(h)), vertical_first_rule())


@lru_cache(maxsize=8)
def _lut_cpu(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    values = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255.0).expand(3, 256)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1)
    return values.sub(m).div(s).contiguous()


_LUTS: dict[tuple, torch.Tensor] = {}


def normalise_lut(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(3, 256) float32: ``lut[c, v] = (v / 255 - mean[c]) / std[c]`` computed as the CPU path does."""
    key = (tuple(mean), tuple(std), str(device))
    lut = _LUTS.get(key)
    if lut is None:
        lut = _LUTS[key] = _lut_cpu(tuple(mean), tuple(std)).to(device)
    return lut


def patchify_u8(
    rgb: torch.Tensor,
    *,
    resized_size: tuple[int, int],
    crop_box: tuple[int, int, int, int] | None,
    final_size: tuple[int, int],
    patch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> torch.Tensor:
    """Decoded uint8 (H, W, 3) on any device -> float32 patches (gh*gw, 3, p, p) on that device: resize, crop
    or pad right/bottom with black, normalise, patchify row-major (the processor's rules, its exact numbers)."""
    if tuple(rgb.shape[1::-1]) != tuple(resized_size):
        rgb = pil_bicubic_resize(rgb, resized_size)
    if crop_box is not None:
        left, top, right, bottom = crop_box
        rgb = rgb[top:bottom, left:right]
    fw, fh = final_size
    if tuple(rgb.shape[:2]) != (fh, fw):
        canvas = torch.zeros((fh, fw, 3), dtype=torch.uint8, device=rgb.device)
        canvas[: rgb.shape[0], : rgb.shape[1]] = rgb
        rgb = canvas
    p = int(patch_size)
    gh, gw = fh // p, fw // p
    lut = normalise_lut(mean, std, rgb.device)
    chw = rgb.permute(2, 0, 1).reshape(3, -1).to(torch.int64)
    x = lut.gather(1, chw).view(3, fh, fw)
    return x.reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p).contiguous()
