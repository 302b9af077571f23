"""Kimi-VL input processing: image loading, the ``KimiVLImageProcessor`` geometry, patchify, prompt expansion.

Own implementation of the rules of the official remote ``KimiVLImageProcessor`` (``image_processing_kimi_vl.py``
in moonshotai/Kimi-VL-A3B-*) and ``KimiVLProcessor`` (``processing_kimi_vl.py``). Spec: /work/shared/kimi-vl-spec.md
§4.1-4.3, worked tables §4.1 and §7.3.

Per image (``cfg`` = ``ProcessorConfig``; p = patch_size 14, (kh, kw) = merge_kernel_size (2, 2),
L = in_token_limit 4096, Thinking-2506: 16384):

1. If ``(W // p) * (H // p) > L`` (patch count of the *unpadded* image, floor division), scale by
   ``s = sqrt(L / ((W // p) * (H // p)))`` to ``(int(W * s), int(H * s))`` (truncation, not rounding) with
   ``PIL.Image.resize(..., Image.Resampling.BICUBIC)`` (PIL antialiases when shrinking). Never upscales.
   Because L bounds the patches *before* padding, the final patch count may exceed L slightly.
2. ``pad_input`` true (all released checkpoints): pad right and bottom with black (0) pixels up to multiples of
   ``(kh * p, kw * p)`` = 28 px. ``pad_input`` false: centre-crop to multiples of p (torchvision
   ``center_crop`` offsets, ``int(round(diff / 2))``); we additionally reject a grid that is then not divisible
   by the merge kernel, since the patch merger could not consume it.
3. If ``W'' // p >= 512`` or ``H'' // p >= 512`` -> error ("Exceed pos emb"; MoonViT's RoPE grid is 512).
4. RGB -> float32 in [0, 1] (``uint8 / 255``, CHW, as torchvision ``to_tensor``), then
   ``(x - mean) / std`` with the OpenAI-CLIP mean/std (padding therefore becomes ``-mean / std``).
5. Patchify row-major over the grid: ``(3, H, W) -> (H/p * W/p, 3, p, p)``; ``grid_hw = (H/p, W/p)``.
   Several images are concatenated along dim 0; ``image_grid_hws`` is ``(n_images, 2)``.
Tokens per image: ``grid_h * grid_w / (kh * kw)``. The processor expands the k-th single ``<|media_pad|>`` of
the rendered prompt into that many copies (k-th image in message order).

Sources consulted (read for the rules; no code copied):
- vllm-project/vllm ``vllm/model_executor/models/kimi_vl.py`` -- ``KimiVLProcessingInfo.get_num_image_tokens``
  (floor patch count vs in_token_limit, sqrt scale, ``int()`` truncation, pad to kernel*patch, tokens
  ``(H''/28)*(W''/28)``) and the placeholder string ``<|media_start|>image<|media_content|><|media_pad|><|media_end|>``.
- Blaizzy/mlx-vlm ``mlx_vlm/models/kimi_vl/processing_kimi_vl.py`` -- re-implementation of
  ``KimiVLImageProcessor``: BICUBIC resize, bottom/right zero padding when ``pad_input``, ``>= 512`` check
  ("Exceed pos emb"), ``convert("RGB")`` + ``/255`` + CLIP mean/std, the (1, 3, 0, 2, 4) patch permutation,
  and the processor's k-th ``<|media_pad|>`` -> ``h*w // (kh*kw)`` copies replacement.
- NVIDIA megatron-bridge vendored MoonViT processor ("adapted from moonshotai/MoonViT-SO-400M",
  ``image_processing_moonvit.py`` / video processor) -- same resize/pad/crop/patchify; ``pad_input`` false is a
  centre crop to multiples of patch_size; notes the original uses PIL bicubic.
- NVIDIA LocateAnything ``image_processing_locateanything.py`` (a Kimi-VL-style sizer) -- identical
  token-limit resize and ``>= 512`` check (it resizes instead of padding; not used here).
- ml-explore Swift ``KimiVLProcessor`` (MLXVLM) -- same pad-or-crop + "Exceed pos emb limits" check.

Our own conventions (not from the official code):
- ``load_image`` normalises every input to an 8-bit RGB PIL image *before* the official pipeline: EXIF
  orientation applied; alpha (RGBA/LA/PA/RGBa/La, palette or colour-key transparency) composited on white;
  16-bit integer images scaled ``v / 257`` (not clipped as PIL's ``convert`` would); CMYK/YCbCr/LAB/HSV via PIL's
  ``convert("RGB")`` (not ICC-aware). The official code pads in the image's own mode then converts to RGB, so
  for alpha/palette inputs the two can differ; for RGB inputs the pixels are identical.
- Decompression-bomb guard: the header's declared size is checked against ``max_pixels`` before any pixel
  is decoded (PIL's lazy ``Image.open``). PIL's own ``DecompressionBombError`` (at 2x its global
  ``MAX_IMAGE_PIXELS``) is also mapped to ``ImageInputError``; our limit does not depend on that global.
  A ``max_pixels`` above PIL's hard limit additionally needs ``PIL.Image.MAX_IMAGE_PIXELS`` raised by the caller.
- Keys and deferred pixels (``prepare_image`` / ``ImageItem``): each image gets a content key (blake2b of its
  encoded bytes, or of the decoded RGB bytes for PIL / array inputs, plus every setting that shapes the patches)
  before any pixel work; with ``lookup`` a known image is not even decoded. ``pixels="device"`` stops after
  decoding: ``DecodedImage.patches(device)`` later runs the same resize / pad / normalise / patchify as torch ops
  (``engine.pixel_ops``, Pillow-exact), on the GPU in the engine.
- Video: Kimi-VL published no video path (Kimi-VL issues #24/#59); a video is fed as sampled frames, each an
  ordinary image with its own media block (see ``sample_frame_indices`` / ``VideoFrames``). The chat template
  (tokenizer) must render one media block per frame.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from engine.config import ProcessorConfig, load_processor_config
from engine.pixel_ops import patchify_u8

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_GRID_SIDE",
    "ProcessorError",
    "ImageInputError",
    "ImageGeometry",
    "load_image",
    "image_geometry",
    "image_grid",
    "num_image_tokens",
    "preprocess_image",
    "preprocess_images",
    "DecodedImage",
    "ImageItem",
    "PixelMode",
    "prepare_image",
    "sample_frame_indices",
    "VideoFrames",
    "ProcessedInputs",
    "KimiVLProcessor",
    "collect_media",
]

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
"""Default decompression-bomb limit for ``load_image``: 64 Mi pixels declared in the header."""

MAX_GRID_SIDE = 512
"""Official limit: a patch-grid side ``>= 512`` raises "Exceed pos emb" (MoonViT RoPE grid)."""

DEFAULT_MAX_FRAMES = 64
DEFAULT_TARGET_FPS = 1.0


class ProcessorError(ValueError):
    """Inputs the processor cannot turn into model inputs (e.g. media count and prompt disagree)."""


class ImageInputError(ProcessorError):
    """An image input is unreadable, corrupt, truncated, empty, too large, or of an unsupported kind."""


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_INT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _open_bytes(data: bytes, what: str) -> Image.Image:
    if not data:
        raise ImageInputError(f"{what}: empty image data")
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"{what}: image too large (decompression bomb guard): {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageInputError(f"{what}: not a recognised image format or corrupt data") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError(f"{what}: cannot read image header: {exc}") from None


def _decode_data_url(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep:
        raise ImageInputError("data URL without ',' separator")
    params = head[len("data:"):].split(";")
    if params and params[0] and not params[0].lower().startswith("image/"):
        raise ImageInputError(f"data URL media type {params[0]!r} is not an image type")
    if any(p.strip().lower() == "base64" for p in params[1:]):
        compact = "".join(urllib.parse.unquote(payload).split())
        compact += "=" * (-len(compact) % 4)
        try:
            return base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageInputError(f"data URL: invalid base64 payload: {exc}") from None
    return urllib.parse.unquote_to_bytes(payload)


def _u8(arr: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _scale_int_to_u8(arr: np.ndarray) -> np.ndarray:
    """Integer samples -> 8 bit. Values inside [0, 65535] are 16-bit data (``v / 257``, so 65535 -> 255);
    other non-negative data uses the int32 range, and data with negatives maps [-2^31, 2^31 - 1] linearly."""
    a = arr.astype(np.float64)
    if a.size == 0:
        return a.astype(np.uint8)
    lo, hi = a.min(), a.max()
    if lo >= 0 and hi <= 65535:
        return _u8(a / 257.0)
    if lo >= 0:
        return _u8(a * (255.0 / (2**31 - 1)))
    return _u8((a + 2**31) * (255.0 / (2**32 - 1)))


def _scale_float_to_u8(arr: np.ndarray) -> np.ndarray:
    """Float samples -> 8 bit: data inside [0, 1] is normalised (x 255); anything else is taken as 0..255 and
    clipped (PIL's own ``F`` -> ``L`` semantics). NaN -> 0."""
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if a.size and a.min() >= 0.0 and a.max() <= 1.0:
        a = a * 255.0
    return _u8(a)


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _INT16_MODES or mode == "I":
        gray = _scale_int_to_u8(np.asarray(im))
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        return Image.fromarray(_scale_float_to_u8(np.asarray(im))).convert("RGB")
    if mode == "La":  # premultiplied luminance + alpha: un-premultiply by hand (PIL has no La -> LA)
        la = np.asarray(im).astype(np.float64)
        lum, alpha = la[..., 0], la[..., 1]
        lum = np.where(alpha > 0, lum * 255.0 / np.maximum(alpha, 1.0), 0.0)
        im = Image.fromarray(np.stack([_u8(lum), alpha.astype(np.uint8)], axis=-1))
        mode = "LA"
    if mode in _ALPHA_MODES or "transparency" in im.info:
        try:
            rgba = im.convert("RGBA")
        except (ValueError, OSError) as exc:
            raise ImageInputError(f"cannot convert image mode {mode!r} with transparency to RGBA: {exc}") from None
        return _composite_on_white(rgba)
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageInputError(f"unsupported image mode {mode!r}: {exc}") from None


def _array_to_image(arr: np.ndarray) -> Image.Image:
    """HxW, HxWx1, HxWx2 (gray + alpha), HxWx3 (RGB) or HxWx4 (RGBA) arrays; uint8 as is, other integer
    types and floats scaled like the PIL ``I``/``I;16``/``F`` modes, bool as 0/255."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (2, 3, 4)):
        raise ImageInputError(
            f"array image must be HxW or HxWxC with C in 1..4 (channels last), got shape {tuple(arr.shape)}"
        )
    if arr.dtype == np.bool_:
        u8 = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint8:
        u8 = arr
    elif np.issubdtype(arr.dtype, np.integer):
        u8 = _scale_int_to_u8(arr)
    elif np.issubdtype(arr.dtype, np.floating):
        u8 = _scale_float_to_u8(arr)
    else:
        raise ImageInputError(f"unsupported array dtype {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(u8))  # uint8: HxW -> L, x2 -> LA, x3 -> RGB, x4 -> RGBA


def _check_size(size: tuple[int, int], max_pixels: int | None, what: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageInputError(f"{what}: image has zero size ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageInputError(
            f"{what}: declared image size {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels "
            "(possible decompression bomb; raise max_pixels to allow it)"
        )


def _finish(im: Image.Image, max_pixels: int | None, what: str) -> Image.Image:
    """Size check on the (lazy) image, then decode, EXIF orientation, RGB."""
    _check_size(im.size, max_pixels, what)
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"{what}: image too large (decompression bomb guard): {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ImageInputError(f"{what}: corrupt or truncated image data: {exc}") from None
    original = im
    try:
        im = ImageOps.exif_transpose(im)  # a new image (transposed or copied) unless it raises
    except Exception:  # malformed EXIF must not make an otherwise valid image unusable
        pass
    _check_size(im.size, max_pixels, what)
    try:
        rgb = _to_rgb(im)
    except ImageInputError as exc:
        raise ImageInputError(f"{what}: {exc}") from None
    if rgb is original:  # never hand back the caller's (or a file-backed) image object
        rgb = im.copy()
    return rgb


def _encoded_source(source: Any) -> tuple[bytes, str] | None:
    """(encoded bytes, label for errors) for byte / data-URL / file sources; None for PIL images and arrays."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "image bytes"
    if isinstance(source, str):
        stripped = source.strip()
        low = stripped[:16].lower()
        if low.startswith("data:"):
            return _decode_data_url(stripped), "data URL"
        if low.startswith(("http://", "https://")):
            raise ImageInputError(f"remote image URLs are not fetched; download it first: {stripped[:100]!r}")
        if low.startswith("file://"):
            parsed = urllib.parse.urlparse(stripped)
            source = urllib.parse.unquote(parsed.path)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageInputError(f"image file not found: {str(path)[:300]!r}") from None
        except (OSError, ValueError) as exc:
            raise ImageInputError(f"cannot read image file {str(path)[:300]!r}: {exc}") from None
        return data, f"image file {path.name!r}"
    return None


def _decode_encoded(data: bytes, what: str, max_pixels: int | None) -> Image.Image:
    with _open_bytes(data, what) as im:
        return _finish(im, max_pixels, what)


def load_image(source: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Return ``source`` as a decoded 8-bit RGB ``PIL.Image``.

    ``source``: encoded image ``bytes``/``bytearray``/``memoryview``; a file path (``str`` or ``os.PathLike``,
    also ``file://`` URLs); a ``data:`` URL string; a ``PIL.Image.Image`` (any mode); or a channels-last numpy
    array. Remote ``http(s)`` URLs are not fetched. ``max_pixels`` bounds width*height as declared in the
    header, checked before decoding (``None`` disables our check). Errors: ``ImageInputError``.
    """
    if isinstance(source, Image.Image):
        return _finish(source, max_pixels, "PIL image")
    if isinstance(source, np.ndarray):
        if source.ndim < 2:
            raise ImageInputError(f"array image must be HxW or HxWxC, got shape {tuple(source.shape)}")
        _check_size((int(source.shape[1]), int(source.shape[0])), max_pixels, "array image")
        return _finish(_array_to_image(source), max_pixels, "array image")
    encoded = _encoded_source(source)
    if encoded is not None:
        return _decode_encoded(*encoded, max_pixels)
    raise ImageInputError(f"unsupported image source type {type(source).__name__}")


# --------------------------------------------------------------------------------------------------------------
# Geometry (official KimiVLImageProcessor.rescale rules; pure arithmetic, no pixels)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageGeometry:
    """What the official processor does to an image of ``input_size`` = (w, h).

    ``resized_size``: (w, h) after the token-limit resize (== ``input_size`` when no resize happens).
    ``crop_box``: (left, top, right, bottom) inside the resized image when ``pad_input`` is false, else None.
    ``final_size``: (w, h) after padding / cropping. ``grid_hw``: pre-merge patch grid (rows, cols).
    ``num_tokens``: merged features = ``<|media_pad|>`` copies.
    """

    input_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_box: tuple[int, int, int, int] | None
    final_size: tuple[int, int]
    grid_hw: tuple[int, int]
    num_tokens: int

    @property
    def needs_resize(self) -> bool:
        return self.resized_size != self.input_size


def image_geometry(
    width: int, height: int, cfg: ProcessorConfig, *, in_token_limit: int | None = None
) -> ImageGeometry:
    """Official resize / pad (or crop) / pos-emb check for a ``width`` x ``height`` image. ``in_token_limit``
    overrides ``cfg.in_token_limit`` (used for video frames). Raises ``ImageInputError``."""
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ImageInputError(f"image {name} must be an int, got {type(v).__name__}")
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ImageInputError(f"image has zero size ({width}x{height})")
    p = int(cfg.patch_size)
    kh, kw = (int(k) for k in cfg.merge_kernel_size)
    limit = int(cfg.in_token_limit if in_token_limit is None else in_token_limit)
    if p <= 0 or kh <= 0 or kw <= 0 or limit <= 0:
        raise ProcessorError(
            f"invalid processor config: patch_size={p}, merge_kernel_size={(kh, kw)}, in_token_limit={limit}"
        )

    w, h = width, height
    patches = (w // p) * (h // p)
    if patches > limit:
        scale = math.sqrt(limit / patches)
        w, h = int(w * scale), int(h * scale)
        if w <= 0 or h <= 0:
            raise ImageInputError(f"image {width}x{height} has too extreme an aspect ratio (resizes to {w}x{h})")

    crop_box = None
    if cfg.pad_input:
        fw = -(-w // (kw * p)) * (kw * p)
        fh = -(-h // (kh * p)) * (kh * p)
    else:
        fw, fh = w - w % p, h - h % p
        if fw <= 0 or fh <= 0:
            raise ImageInputError(f"image {width}x{height} is smaller than one {p}x{p} patch (pad_input is false)")
        left, top = int(round((w - fw) / 2.0)), int(round((h - fh) / 2.0))
        crop_box = (left, top, left + fw, top + fh)

    gh, gw = fh // p, fw // p
    if gh >= MAX_GRID_SIDE or gw >= MAX_GRID_SIDE:
        raise ImageInputError(
            f"Exceed pos emb: image {width}x{height} gives a {gh}x{gw} patch grid; each side must be "
            f"< {MAX_GRID_SIDE} patches (< {MAX_GRID_SIDE * p} px after resizing)"
        )
    if gh % kh or gw % kw:
        raise ImageInputError(
            f"patch grid {gh}x{gw} of image {width}x{height} is not divisible by the merge kernel {(kh, kw)} "
            "(only possible with pad_input false)"
        )
    return ImageGeometry(
        input_size=(width, height),
        resized_size=(w, h),
        crop_box=crop_box,
        final_size=(fw, fh),
        grid_hw=(gh, gw),
        num_tokens=(gh // kh) * (gw // kw),
    )


def image_grid(width: int, height: int, cfg: ProcessorConfig, *, in_token_limit: int | None = None) -> tuple[int, int]:
    """Pre-merge patch grid ``(grid_h, grid_w)`` the official processor produces for a ``width`` x ``height`` image."""
    return image_geometry(width, height, cfg, in_token_limit=in_token_limit).grid_hw


def num_image_tokens(width: int, height: int, cfg: ProcessorConfig, *, in_token_limit: int | None = None) -> int:
    """Number of ``<|media_pad|>`` tokens (= merged features) for a ``width`` x ``height`` image."""
    return image_geometry(width, height, cfg, in_token_limit=in_token_limit).num_tokens


# --------------------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------------------


def _host_patches(rgb: Image.Image, geo: ImageGeometry, cfg: ProcessorConfig) -> torch.Tensor:
    """The official pixel pipeline on the host (Pillow resize, numpy pad, torch normalise + patchify)."""
    if geo.resized_size != rgb.size:
        rgb = rgb.resize(geo.resized_size, Image.Resampling.BICUBIC)
    if geo.crop_box is not None:
        rgb = rgb.crop(geo.crop_box)
    src = np.array(rgb, dtype=np.uint8)  # writable copy for torch.from_numpy
    fw, fh = geo.final_size
    if src.shape[:2] != (fh, fw):
        canvas = np.zeros((fh, fw, 3), dtype=np.uint8)  # black padding, right and bottom
        canvas[: src.shape[0], : src.shape[1]] = src
        src = canvas
    p = int(cfg.patch_size)
    gh, gw = geo.grid_hw
    x = torch.from_numpy(src).permute(2, 0, 1).to(torch.float32).div(255.0)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1, 1)
    x = x.sub(mean).div(std)
    return x.reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p).contiguous()


def preprocess_image(
    image: Any,
    cfg: ProcessorConfig,
    *,
    in_token_limit: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image -> ``(patches float32 (gh*gw, 3, p, p), (gh, gw))``. ``image``: anything ``load_image`` takes."""
    rgb = load_image(image, max_pixels=max_pixels)
    geo = image_geometry(rgb.width, rgb.height, cfg, in_token_limit=in_token_limit)
    return _host_patches(rgb, geo, cfg), geo.grid_hw


def preprocess_images(
    images: Sequence[Any],
    cfg: ProcessorConfig,
    *,
    in_token_limit: int | None | Sequence[int | None] = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Several images -> ``(pixel_values float32 (N_total, 3, p, p), image_grid_hws int64 (n, 2))``, patches of
    all images concatenated in order. ``in_token_limit`` may be one value or one per image."""
    images = list(images)
    limits = list(in_token_limit) if isinstance(in_token_limit, (list, tuple)) else [in_token_limit] * len(images)
    if len(limits) != len(images):
        raise ProcessorError(f"{len(limits)} in_token_limit values for {len(images)} images")
    p = int(cfg.patch_size)
    if not images:
        return torch.zeros((0, 3, p, p), dtype=torch.float32), torch.zeros((0, 2), dtype=torch.int64)
    out, grids = [], []
    for idx, (img, lim) in enumerate(zip(images, limits)):
        try:
            patches, grid = preprocess_image(img, cfg, in_token_limit=lim, max_pixels=max_pixels)
        except ImageInputError as exc:
            raise ImageInputError(f"image #{idx}: {exc}") from None
        out.append(patches)
        grids.append(grid)
    return torch.cat(out, dim=0), torch.tensor(grids, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------------------
# Keyed images: content hash first, pixel work on the host or deferred to the model's device
# --------------------------------------------------------------------------------------------------------------

PixelMode = Literal["host", "device"]
"""``host``: patches made here (Pillow resize); ``device``: decode only, ``DecodedImage.patches(device)`` later."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image and the processor's plan for it; the pixel work runs where ``patches`` is called."""

    rgb: torch.Tensor  # (H, W, 3) uint8 on the host: EXIF-oriented RGB, not resized
    geometry: ImageGeometry
    cfg: ProcessorConfig

    def patches(self, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 (gh*gw, 3, p, p) on ``device`` (default: the host), equal to ``preprocess_image``'s bit for bit
        (``engine.pixel_ops``): only 3 bytes per pixel cross to the device, the resize and normalise run there."""
        rgb = self.rgb if device is None else self.rgb.to(device, non_blocking=True)
        geo, cfg = self.geometry, self.cfg
        return patchify_u8(
            rgb,
            resized_size=geo.resized_size,
            crop_box=geo.crop_box,
            final_size=geo.final_size,
            patch_size=int(cfg.patch_size),
            mean=tuple(cfg.image_mean),
            std=tuple(cfg.image_std),
        )


@dataclass
class ImageItem:
    """One image or frame of a prompt: a content ``key`` (hash of the encoded bytes, or of the decoded pixels for
    PIL / array inputs, plus every setting that shapes the patches) and its geometry, with exactly one of: host
    ``patches``, a ``decoded`` image for device preprocessing, or cached projected ``features`` (a hit: nothing
    was decoded)."""

    key: bytes
    geometry: ImageGeometry
    patches: torch.Tensor | None = None
    decoded: DecodedImage | None = None
    features: torch.Tensor | None = None

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.geometry.grid_hw

    @property
    def num_tokens(self) -> int:
        return self.geometry.num_tokens


def _settings_tag(cfg: ProcessorConfig, in_token_limit: int | None) -> bytes:
    limit = cfg.in_token_limit if in_token_limit is None else in_token_limit
    kh, kw = cfg.merge_kernel_size
    return (
        f"|{int(limit)}|{int(cfg.patch_size)}|{int(kh)}x{int(kw)}|{bool(cfg.pad_input)}"
        f"|{tuple(cfg.image_mean)}|{tuple(cfg.image_std)}"
    ).encode()


def _key(kind: bytes, payload: Any, settings: bytes) -> bytes:
    digest = hashlib.blake2b(kind, digest_size=16)
    digest.update(payload)
    digest.update(settings)
    return digest.digest()


class _GeometryMemo:
    """key -> geometry of images seen recently, so a feature-cache hit needs no decode to know its token count."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, ImageGeometry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> ImageGeometry | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: bytes, geo: ImageGeometry) -> None:
        with self._lock:
            self._items[key] = geo
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


FeatureLookup = Callable[[bytes], "torch.Tensor | None"]


def prepare_image(
    source: Any,
    cfg: ProcessorConfig,
    *,
    in_token_limit: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    pixels: PixelMode = "host",
    lookup: FeatureLookup | None = None,
    memo: _GeometryMemo | None = None,
) -> ImageItem:
    """One image -> ``ImageItem``. The key is computed before any pixel work; when ``lookup(key)`` returns
    features whose row count matches the remembered geometry, the image is not decoded at all."""
    settings = _settings_tag(cfg, in_token_limit)
    encoded = _encoded_source(source)
    rgb: Image.Image | None = None
    array: np.ndarray | None = None  # the decoded pixels, copied out of PIL once (hashed and uploaded as is)
    if encoded is not None:
        key = _key(b"encoded", encoded[0], settings)
    else:
        rgb = load_image(source, max_pixels=max_pixels)
        array = np.array(rgb, dtype=np.uint8)
        key = _key(f"rgb{rgb.width}x{rgb.height}".encode(), memoryview(array).cast("B"), settings)
    if lookup is not None and memo is not None:
        geo = memo.get(key)
        features = lookup(key) if geo is not None else None
        if geo is not None and features is not None and features.shape[0] == geo.num_tokens:
            return ImageItem(key, geo, features=features)
    if rgb is None:
        rgb = _decode_encoded(encoded[0], encoded[1], max_pixels)
    geo = image_geometry(rgb.width, rgb.height, cfg, in_token_limit=in_token_limit)
    if memo is not None:
        memo.put(key, geo)
    if pixels == "device":
        array = np.array(rgb, dtype=np.uint8) if array is None else array
        return ImageItem(key, geo, decoded=DecodedImage(torch.from_numpy(array), geo, cfg))
    if pixels != "host":
        raise ValueError(f"pixels must be 'host' or 'device', got {pixels!r}")
    return ImageItem(key, geo, patches=_host_patches(rgb, geo, cfg))


# --------------------------------------------------------------------------------------------------------------
# Video (our convention: sampled frames fed as images)
# --------------------------------------------------------------------------------------------------------------


def sample_frame_indices(
    num_frames: int,
    fps: float | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    target_fps: float = DEFAULT_TARGET_FPS,
) -> list[int]:
    """Indices of the frames to feed for a decoded video of ``num_frames`` frames at ``fps``.

    Our convention (Kimi-VL published none): ``n = ceil(duration * target_fps)`` frames, clamped to
    ``[1, min(max_frames, num_frames)]``; the clip is cut into ``n`` equal segments and the frame at each
    segment's centre is taken (``floor((i + 0.5) * num_frames / n)``). Indices are strictly increasing.
    Without ``fps`` it samples ``min(max_frames, num_frames)`` frames uniformly the same way.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames <= 0:
        raise ProcessorError(f"num_frames must be a positive int, got {num_frames!r}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) or max_frames <= 0:
        raise ProcessorError(f"max_frames must be a positive int, got {max_frames!r}")
    num_frames, max_frames = int(num_frames), int(max_frames)
    cap = min(max_frames, num_frames)
    if fps is None:
        n = cap
    else:
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ProcessorError(f"fps must be a positive finite number, got {fps!r}")
        if not (isinstance(target_fps, (int, float)) and math.isfinite(target_fps) and target_fps > 0):
            raise ProcessorError(f"target_fps must be a positive finite number, got {target_fps!r}")
        duration = num_frames / float(fps)
        n = max(1, min(cap, math.ceil(duration * float(target_fps) - 1e-9)))
    return [min(num_frames - 1, int(math.floor((i + 0.5) * num_frames / n))) for i in range(n)]


@dataclass(frozen=True)
class VideoFrames:
    """A video as already-sampled frames (anything ``load_image`` takes) plus their timestamps in seconds.

    Fed to the model as ``len(frames)`` independent images, one media block each (our convention).
    """

    frames: tuple[Any, ...]
    timestamps: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        frames = tuple(self.frames)
        object.__setattr__(self, "frames", frames)
        if not frames:
            raise ProcessorError("VideoFrames needs at least one frame")
        if self.timestamps is not None:
            ts = tuple(float(t) for t in self.timestamps)
            if len(ts) != len(frames):
                raise ProcessorError(f"VideoFrames: {len(ts)} timestamps for {len(frames)} frames")
            if any(not math.isfinite(t) or t < 0 for t in ts) or any(b < a for a, b in zip(ts, ts[1:])):
                raise ProcessorError("VideoFrames: timestamps must be finite, >= 0 and non-decreasing")
            object.__setattr__(self, "timestamps", ts)

    @classmethod
    def from_decoded(
        cls,
        frames: Sequence[Any],
        fps: float | None = None,
        *,
        max_frames: int = DEFAULT_MAX_FRAMES,
        target_fps: float = DEFAULT_TARGET_FPS,
    ) -> "VideoFrames":
        """Sample ``frames`` (all decoded frames of a clip) with ``sample_frame_indices``."""
        frames = list(frames)
        idx = sample_frame_indices(len(frames), fps, max_frames, target_fps)
        ts = tuple(i / float(fps) for i in idx) if fps else None
        return cls(tuple(frames[i] for i in idx), ts)

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.frames)


# --------------------------------------------------------------------------------------------------------------
# Processor (prompt + images -> model inputs)
# --------------------------------------------------------------------------------------------------------------


class _Segment(Protocol):
    text: str
    trusted: bool


class _Tokenizer(Protocol):
    media_pad_id: int

    def render_chat_segments(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> Sequence[_Segment]: ...

    def encode_segments(self, segments: Iterable[_Segment]) -> list[int]: ...


@dataclass
class ProcessedInputs:
    """Model inputs for one prompt. ``input_ids`` (1, L) int64 with the media pads expanded;
    ``pixel_values`` (N, 3, p, p) float32 and ``image_grid_hws`` (n, 2) int64, or None without media (and None
    when some image's pixel work was deferred to the device or served from the feature cache: ``images`` then
    says what each image carries); ``num_image_tokens[k]`` = pads of the k-th image/frame; ``prompt`` = the
    rendered chat template; ``images[k]`` = the k-th image's key, geometry and pixels or features."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_hws: torch.Tensor | None
    num_image_tokens: list[int]
    prompt: str = ""
    images: list[ImageItem] = field(default_factory=list)


@dataclass(frozen=True)
class _Media:
    source: Any
    is_video_frame: bool


def _plain(obj: Any) -> Any:
    """Pydantic message / item models (e.g. the tokenizer's) -> dicts; everything else unchanged."""
    dump = getattr(obj, "model_dump", None)
    return dump() if callable(dump) and not isinstance(obj, dict) else obj


def _content_items(messages: Iterable[Any]) -> Iterator[dict[str, Any]]:
    if isinstance(messages, (str, bytes, dict)):
        raise ProcessorError("messages must be a list of messages")
    for i, msg in enumerate(messages):
        msg = _plain(msg)
        if not isinstance(msg, dict):
            raise ProcessorError(f"message #{i} must be a dict, got {type(msg).__name__}")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise ProcessorError(f"message #{i}: content must be a str or a list of items")
        for item in content:
            item = _plain(item)
            if isinstance(item, dict):
                yield item


def collect_media(messages: Iterable[Any]) -> list[_Media]:
    """Images and video frames of ``messages`` in order. Item kinds: ``type`` ``image`` (key ``image``),
    ``image_url`` (``{"url": ...}`` or a str), ``video`` (key ``frames`` or ``video``: a list or ``VideoFrames``);
    an item without ``type`` is typed by its first key among image / image_url / video / text, like the
    chat template does."""
    media: list[_Media] = []
    for item in _content_items(messages):
        kind = item.get("type")
        if kind is None:
            kind = next((k for k in ("image", "image_url", "video", "text") if k in item), None)
        if kind == "video":
            frames = item.get("frames", item.get("video"))
            if isinstance(frames, VideoFrames):
                frames = frames.frames
            if not isinstance(frames, (list, tuple)) or not frames:
                raise ProcessorError("video item needs a non-empty 'frames' list (decode and sample the video first)")
            media.extend(_Media(f, True) for f in frames)
        elif kind == "image_url":
            ref = item.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if url is None:
                raise ProcessorError("image_url item needs {'url': ...} or a string")
            media.append(_Media(url, False))
        elif kind == "image":
            src = item.get("image", item.get("url"))
            if src is None:
                raise ProcessorError("image item needs an 'image' key (bytes, path, data URL, PIL image or array)")
            media.append(_Media(src, False))
    return media


class KimiVLProcessor:
    """Chat messages with images / video frames -> ``ProcessedInputs`` for ``KimiVLForConditionalGeneration``.

    ``tokenizer`` needs ``render_chat_segments(messages, add_generation_prompt)`` (one ``<|media_pad|>`` per
    image / frame, in trusted template segments), ``encode_segments(segments)`` (special tokens only from trusted
    segments: message text is data, never control) and ``media_pad_id``. ``video_in_token_limit``
    optionally lowers the per-frame patch budget for video frames (our convention; default = images').
    """

    def __init__(
        self,
        cfg: ProcessorConfig,
        tokenizer: _Tokenizer,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        video_in_token_limit: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_pixels = max_pixels
        self.video_in_token_limit = video_in_token_limit
        self._geometry_memo = _GeometryMemo()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], tokenizer: _Tokenizer, **kwargs: Any) -> "KimiVLProcessor":
        return cls(load_processor_config(path), tokenizer, **kwargs)

    @property
    def merge_length(self) -> int:
        kh, kw = self.cfg.merge_kernel_size
        return int(kh) * int(kw)

    def __call__(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        pixels: PixelMode = "host",
        lookup: FeatureLookup | None = None,
    ) -> ProcessedInputs:
        """``pixels="device"`` decodes only (``ImageItem.decoded``; the engine makes the patches on the GPU);
        ``lookup(key)`` (e.g. the engine's vision-feature cache) lets a known image skip decoding entirely."""
        media = collect_media(messages)
        segments = self.tokenizer.render_chat_segments(messages, add_generation_prompt=add_generation_prompt)
        prompt = "".join(s.text for s in segments)
        ids = [int(t) for t in self.tokenizer.encode_segments(segments)]
        pad = int(self.tokenizer.media_pad_id)
        n_pads = sum(1 for t in ids if t == pad)
        if n_pads != len(media):
            n_frames = sum(m.is_video_frame for m in media)
            raise ProcessorError(
                f"the rendered prompt has {n_pads} media placeholders (<|media_pad|>, id {pad}) but the messages "
                f"carry {len(media)} images/frames ({len(media) - n_frames} images, {n_frames} video frames); "
                "every image and video frame needs exactly one media block"
            )
        if not media:
            return ProcessedInputs(torch.tensor([ids], dtype=torch.int64), None, None, [], prompt)

        items: list[ImageItem] = []
        for idx, m in enumerate(media):
            try:
                items.append(
                    prepare_image(
                        m.source,
                        self.cfg,
                        in_token_limit=self.video_in_token_limit if m.is_video_frame else None,
                        max_pixels=self.max_pixels,
                        pixels=pixels,
                        lookup=lookup,
                        memo=self._geometry_memo,
                    )
                )
            except ImageInputError as exc:
                raise ImageInputError(f"image #{idx}: {exc}") from None
        counts = [item.num_tokens for item in items]
        pixel_values = grids = None
        if all(item.patches is not None for item in items):
            pixel_values = torch.cat([item.patches for item in items], dim=0)
            grids = torch.tensor([item.grid_hw for item in items], dtype=torch.int64)

        expanded: list[int] = []
        k = 0
        for t in ids:
            if t == pad:
                expanded.extend([pad] * counts[k])
                k += 1
            else:
                expanded.append(t)
        return ProcessedInputs(
            torch.tensor([expanded], dtype=torch.int64), pixel_values, grids, counts, prompt, items
        )
