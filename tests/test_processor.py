"""Tests for engine/processor.py (spec §4.1-4.3, §7.3)."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import ProcessorConfig
from engine.processor import (
    ImageInputError,
    KimiVLProcessor,
    ProcessorError,
    VideoFrames,
    collect_media,
    image_geometry,
    image_grid,
    load_image,
    num_image_tokens,
    preprocess_image,
    preprocess_images,
    sample_frame_indices,
)

CFG = ProcessorConfig()  # Instruct / Thinking: in_token_limit 4096
CFG_2506 = ProcessorConfig(in_token_limit=16384)
CFG_TINY = ProcessorConfig(in_token_limit=64)  # spec §7.1 config A
MEAN = torch.tensor(CFG.image_mean, dtype=torch.float32)
STD = torch.tensor(CFG.image_std, dtype=torch.float32)


def _rand_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _expected_normalised(rgb_u8: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 normalised, computed independently of the processor."""
    x = rgb_u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(CFG.image_mean, np.float32)) / np.asarray(CFG.image_std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _reassemble(patches: torch.Tensor, grid: tuple[int, int], p: int = 14) -> torch.Tensor:
    gh, gw = grid
    out = torch.empty(3, gh * p, gw * p)
    for idx in range(gh * gw):
        r, c = divmod(idx, gw)  # row-major
        out[:, r * p:(r + 1) * p, c * p:(c + 1) * p] = patches[idx]
    return out


# ------------------------------------------------------------------------------------------------ geometry tables

SPEC_7_3 = [  # W, H, grid (h, w), tokens — in_token_limit 64
    (28, 28, (2, 2), 1),
    (50, 30, (4, 4), 4),
    (84, 56, (4, 6), 6),
    (112, 112, (8, 8), 16),
    (200, 150, (8, 10), 20),
    (300, 40, (4, 22), 22),
]


@pytest.mark.parametrize("w,h,grid,tokens", SPEC_7_3)
def test_spec_7_3_table(w, h, grid, tokens):
    assert image_grid(w, h, CFG_TINY) == grid
    assert num_image_tokens(w, h, CFG_TINY) == tokens
    patches, g = preprocess_image(_rand_image(w, h), CFG_TINY)
    assert g == grid
    assert patches.shape == (grid[0] * grid[1], 3, 14, 14) and patches.dtype == torch.float32


def test_spec_7_3_resize_branch_sizes():
    geo = image_geometry(200, 150, CFG_TINY)
    assert geo.needs_resize and geo.resized_size == (135, 101) and geo.final_size == (140, 112)
    assert not image_geometry(300, 40, CFG_TINY).needs_resize


SPEC_4_1 = [  # W, H, cfg, resized (w, h) or None, final (w, h) or None, grid or None, tokens
    (28, 28, CFG, None, (28, 28), (2, 2), 1),
    (448, 448, CFG, None, None, (32, 32), 256),
    (896, 896, CFG, None, None, (64, 64), 1024),
    (1024, 1024, CFG, (897, 897), (924, 924), (66, 66), 1089),
    (1280, 720, CFG, (1202, 676), (1204, 700), (50, 86), 1075),
    (1920, 1080, CFG, (1196, 672), (1204, 672), (48, 86), 1032),
    (1792, 1792, CFG, (896, 896), None, None, 1024),
    (3840, 2160, CFG, None, None, None, 1032),
    (28, 28, CFG_2506, None, None, None, 1),
    (448, 448, CFG_2506, None, None, None, 256),
    (896, 896, CFG_2506, None, None, None, 1024),
    (1024, 1024, CFG_2506, None, (1036, 1036), (74, 74), 1369),
    (1280, 720, CFG_2506, None, (1288, 728), None, 1196),
    (1920, 1080, CFG_2506, None, (1932, 1092), None, 2691),
    (1792, 1792, CFG_2506, None, None, (128, 128), 4096),
    (3840, 2160, CFG_2506, (2392, 1345), (2408, 1372), (98, 172), 4214),
]


@pytest.mark.parametrize("w,h,cfg,resized,final,grid,tokens", SPEC_4_1)
def test_spec_4_1_table(w, h, cfg, resized, final, grid, tokens):
    geo = image_geometry(w, h, cfg)
    assert geo.num_tokens == tokens == num_image_tokens(w, h, cfg)
    if resized is not None:
        assert geo.resized_size == resized
    if final is not None:
        assert geo.final_size == final
    if grid is not None:
        assert geo.grid_hw == grid == image_grid(w, h, cfg)
    gh, gw = geo.grid_hw
    assert gh % 2 == 0 and gw % 2 == 0 and geo.num_tokens == gh * gw // 4


def test_never_upscales_and_limit_counts_unpadded_patches():
    geo = image_geometry(10, 10, CFG)
    assert geo.resized_size == (10, 10) and geo.grid_hw == (2, 2)
    # 64 x 64 patches exactly = 4096 -> no resize; 4097 patches -> resize
    assert not image_geometry(896, 896, CFG).needs_resize
    assert image_geometry(896 + 14, 896, CFG).needs_resize
    # final patch count may exceed the limit (padding happens after the budget check)
    geo = image_geometry(1024, 1024, CFG)
    assert geo.grid_hw[0] * geo.grid_hw[1] > CFG.in_token_limit


def test_real_resize_matches_geometry_and_pil_bicubic():
    im = _rand_image(1280, 720, seed=3)
    patches, grid = preprocess_image(im, CFG)
    assert grid == (50, 86)
    full = _reassemble(patches, grid)
    ref = np.asarray(im.resize((1202, 676), Image.Resampling.BICUBIC))
    torch.testing.assert_close(full[:, :676, :1202], _expected_normalised(ref), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ pixels / layout


def test_patch_layout_reassembles_padded_normalised_image():
    im = _rand_image(50, 30, seed=1)
    patches, grid = preprocess_image(im, CFG)
    assert grid == (4, 4)
    padded = np.zeros((56, 56, 3), np.uint8)
    padded[:30, :50] = np.asarray(im)
    full = _reassemble(patches, grid)
    torch.testing.assert_close(full, _expected_normalised(padded), rtol=0, atol=0)
    pad_value = ((torch.zeros(3) - MEAN) / STD).view(3, 1, 1)
    assert torch.equal(full[:, 30:, :], pad_value.expand(3, 26, 56))  # bottom padding
    assert torch.equal(full[:, :, 50:], pad_value.expand(3, 56, 6))  # right padding
    # patch 0 is the top-left 14x14 block, patch 1 its right neighbour (row-major)
    assert torch.equal(patches[1], full[:, 0:14, 14:28])
    assert torch.equal(patches[4], full[:, 14:28, 0:14])


def test_preprocess_several_images_concatenates():
    ims = [_rand_image(28, 28, 0), _rand_image(50, 30, 1), _rand_image(84, 56, 2), _rand_image(200, 150, 3)]
    pv, grids = preprocess_images(ims, CFG_TINY)
    assert grids.dtype == torch.int64 and grids.tolist() == [[2, 2], [4, 4], [4, 6], [8, 10]]
    assert pv.dtype == torch.float32 and pv.shape == (4 + 16 + 24 + 80, 3, 14, 14)
    start = 0
    for im in ims:
        single, (gh, gw) = preprocess_image(im, CFG_TINY)
        assert torch.equal(pv[start:start + gh * gw], single)
        start += gh * gw
    empty_pv, empty_grids = preprocess_images([], CFG)
    assert empty_pv.shape == (0, 3, 14, 14) and empty_grids.shape == (0, 2)


def test_grid_side_512_rejected():
    assert image_grid(7140, 28, CFG) == (2, 510)
    for w in (7154, 7168):  # both pad to 7168 px = 512 patches
        with pytest.raises(ImageInputError, match="Exceed pos emb"):
            image_grid(w, 28, CFG)
    with pytest.raises(ImageInputError, match="Exceed pos emb"):
        image_grid(28, 7200, CFG)
    with pytest.raises(ImageInputError, match="Exceed pos emb"):
        preprocess_image(Image.new("RGB", (7168, 28)), CFG)
    assert issubclass(ImageInputError, ValueError)


def test_pad_input_false_center_crops():
    cfg = ProcessorConfig(pad_input=False)
    geo = image_geometry(58, 30, cfg)
    assert geo.final_size == (56, 28) and geo.crop_box == (1, 1, 57, 29) and geo.grid_hw == (2, 4)
    im = _rand_image(58, 30, seed=5)
    patches, grid = preprocess_image(im, cfg)
    ref = np.asarray(im)[1:29, 1:57]
    torch.testing.assert_close(_reassemble(patches, grid), _expected_normalised(ref), rtol=0, atol=0)
    with pytest.raises(ImageInputError, match="merge kernel"):
        image_grid(50, 30, cfg)  # crop 42x28 -> grid 2x3
    with pytest.raises(ImageInputError):
        image_grid(10, 30, cfg)


def test_geometry_argument_errors():
    with pytest.raises(ImageInputError, match="zero size"):
        image_grid(0, 10, CFG)
    with pytest.raises(ImageInputError):
        image_grid(10.0, 10, CFG)


# ------------------------------------------------------------------------------------------------ modes


def _px(im: Image.Image, xy=(0, 0)):
    out = load_image(im)
    assert out.mode == "RGB"
    return out.getpixel(xy)


def _roundtrip(im: Image.Image, fmt: str = "PNG", **kw) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_mode_rgb_l_1():
    assert _px(Image.new("RGB", (3, 3), (10, 20, 30))) == (10, 20, 30)
    assert _px(Image.new("L", (3, 3), 77)) == (77, 77, 77)
    one = Image.new("1", (3, 3), 0)
    one.putpixel((1, 1), 1)
    assert _px(one, (0, 0)) == (0, 0, 0) and _px(one, (1, 1)) == (255, 255, 255)
    assert load_image(_roundtrip(one)).getpixel((1, 1)) == (255, 255, 255)


def test_mode_alpha_composited_on_white():
    assert _px(Image.new("RGBA", (2, 2), (255, 0, 0, 0))) == (255, 255, 255)
    assert _px(Image.new("RGBA", (2, 2), (0, 0, 0, 255))) == (0, 0, 0)
    r, g, b = _px(Image.new("RGBA", (2, 2), (0, 0, 0, 128)))
    assert r == g == b and abs(r - 127) <= 1
    assert _px(Image.new("LA", (2, 2), (0, 0))) == (255, 255, 255)
    assert _px(Image.new("LA", (2, 2), (100, 255))) == (100, 100, 100)
    assert _px(_roundtrip(Image.new("LA", (2, 2), (100, 0)))) == (255, 255, 255)
    assert _px(Image.new("RGBa", (2, 2), (0, 0, 0, 0))) == (255, 255, 255)
    la = Image.frombytes("La", (1, 1), bytes([50, 100]))  # premultiplied: L = 50 * 255 / 100 = 127.5
    r, g, b = _px(la)  # un-premultiplied 128 at alpha 100/255 over white: 128 * 100/255 + 255 * 155/255 = 205
    assert r == g == b and abs(r - 205) <= 1


def test_mode_palette_with_and_without_transparency():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    p.putpixel((1, 1), 1)
    assert _px(p, (0, 0)) == (10, 20, 30) and _px(p, (1, 1)) == (200, 100, 50)
    reloaded = _roundtrip(p, transparency=0)  # index 0 transparent (PNG tRNS)
    assert reloaded.mode == "P" and "transparency" in reloaded.info
    out = load_image(reloaded)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (200, 100, 50)
    gif = _roundtrip(p, "GIF", transparency=0)
    assert load_image(gif).getpixel((0, 0)) == (255, 255, 255)
    pa = p.convert("PA")
    pa.putpixel((2, 2), (1, 0))
    out = load_image(pa)
    assert out.getpixel((2, 2)) == (255, 255, 255) and out.getpixel((1, 1)) == (200, 100, 50)


def test_mode_rgb_colour_key_transparency():
    im = _roundtrip(Image.new("RGB", (2, 2), (10, 20, 30)), transparency=(10, 20, 30))
    assert "transparency" in im.info
    assert _px(im) == (255, 255, 255)


def test_mode_cmyk():
    assert _px(Image.new("CMYK", (2, 2), (0, 255, 255, 0))) == (255, 0, 0)
    assert _px(Image.new("CMYK", (2, 2), (0, 0, 0, 255))) == (0, 0, 0)
    jpg = _roundtrip(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert jpg.mode == "CMYK"
    r, g, b = load_image(jpg).getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_mode_16_bit_scaled_not_clipped():
    vals = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # -> 0, 1, 128, 255
    im16 = Image.fromarray(vals)
    assert im16.mode == "I;16"
    for im in (im16, _roundtrip(im16)):
        out = np.asarray(load_image(im))
        assert out[0, :, 0].tolist() == [0, 1, 128, 255] and (out[..., 0] == out[..., 2]).all()
    big = Image.frombytes("I;16B", (4, 1), vals.astype(">u2").tobytes())
    assert big.mode == "I;16B"
    assert np.asarray(load_image(big))[0, :, 1].tolist() == [0, 1, 128, 255]
    i32 = Image.fromarray(vals.astype(np.int32))
    assert i32.mode == "I"
    assert np.asarray(load_image(i32))[0, :, 0].tolist() == [0, 1, 128, 255]
    i32_wide = Image.fromarray(np.array([[0, 2**31 - 1]], dtype=np.int32))
    assert np.asarray(load_image(i32_wide))[0, :, 0].tolist() == [0, 255]


def test_mode_float():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert f.mode == "F"
    assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 128, 255]
    f2 = Image.fromarray(np.array([[-5.0, 100.0, 300.0, np.nan]], dtype=np.float32))
    assert np.asarray(load_image(f2))[0, :, 0].tolist() == [0, 100, 255, 0]


def test_mode_other_converts():
    r, g, b = _px(Image.new("RGB", (2, 2), (200, 30, 60)).convert("YCbCr"))
    assert abs(r - 200) <= 2 and abs(g - 30) <= 2 and abs(b - 60) <= 2
    assert _px(Image.new("RGBX", (2, 2), (1, 2, 3, 4))) == (1, 2, 3)


def test_numpy_arrays():
    assert load_image(np.full((4, 5, 3), 9, np.uint8)).getpixel((0, 0)) == (9, 9, 9)
    assert load_image(np.full((4, 5, 3), 9, np.uint8)).size == (5, 4)
    assert load_image(np.full((4, 5), 0.5, np.float32)).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(np.zeros((4, 5, 4), np.uint8)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.full((2, 2), 65535, np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageInputError):
        load_image(np.zeros((3, 4, 3, 2), np.uint8))
    with pytest.raises(ImageInputError, match="zero size"):
        load_image(np.zeros((0, 4, 3), np.uint8))


# ------------------------------------------------------------------------------------------------ EXIF


def _exif_jpeg(orientation: int) -> bytes:
    im = Image.new("RGB", (40, 20), (255, 0, 0))  # left half red, right half blue
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def _is_red(px):
    return px[0] > 200 and px[2] < 60


def _is_blue(px):
    return px[2] > 200 and px[0] < 60


def test_exif_orientation_6_rotates_clockwise():
    out = load_image(_exif_jpeg(6))
    assert out.size == (20, 40)
    assert _is_red(out.getpixel((10, 5))) and _is_blue(out.getpixel((10, 35)))  # left went to the top


def test_exif_orientation_8_rotates_counter_clockwise():
    out = load_image(_exif_jpeg(8))
    assert out.size == (20, 40)
    assert _is_blue(out.getpixel((10, 5))) and _is_red(out.getpixel((10, 35)))


def test_exif_orientation_1_unchanged():
    out = load_image(_exif_jpeg(1))
    assert out.size == (40, 20) and _is_red(out.getpixel((5, 10)))


# ------------------------------------------------------------------------------------------------ sources & errors


def test_sources_bytes_path_data_url(tmp_path):
    im = _rand_image(6, 5, seed=7)
    data = _png(im)
    ref = np.asarray(im)
    path = tmp_path / "x y.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for src in (
        data,
        bytearray(data),
        str(path),
        path,
        path.as_uri(),
        f"data:image/png;base64,{b64}",
        f"  data:image/png;base64,{b64[:20]}\n{b64[20:]}  ",
        f"data:;base64,{b64}",
    ):
        assert np.array_equal(np.asarray(load_image(src)), ref), repr(src)[:60]


def test_error_corrupt_bytes():
    with pytest.raises(ImageInputError, match="not a recognised image"):
        load_image(b"this is not an image at all" * 10)
    with pytest.raises(ImageInputError, match="empty"):
        load_image(b"")


def test_error_truncated_png():
    data = _png(_rand_image(64, 64, seed=2))
    with pytest.raises(ImageInputError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


def test_error_zero_size():
    with pytest.raises(ImageInputError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageInputError):
        load_image(_patch_png_size(_png(Image.new("L", (8, 8))), 0, 8))


def _patch_png_size(png: bytes, w: int, h: int) -> bytes:
    """Rewrite the IHDR width/height (and its CRC) of a PNG; pixel data stays that of the small image."""
    d = bytearray(png)
    assert d[12:16] == b"IHDR"
    d[16:24] = struct.pack(">II", w, h)
    d[29:33] = struct.pack(">I", zlib.crc32(bytes(d[12:29])) & 0xFFFFFFFF)
    return bytes(d)


def test_error_decompression_bomb_rejected_quickly(monkeypatch):
    bomb = _patch_png_size(_png(Image.new("1", (8, 8))), 30000, 30000)
    t0 = time.perf_counter()
    with pytest.raises(ImageInputError, match="too large|exceeds"):
        load_image(bomb)
    # independent of PIL's global guard
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageInputError, match="exceeds the limit"):
        load_image(bomb)
    assert time.perf_counter() - t0 < 1.0
    # our limit is configurable and applies below PIL's 89 MP warning level too
    medium = _patch_png_size(_png(Image.new("L", (8, 8))), 9000, 9000)  # 81 MP > 64 Mi
    with pytest.raises(ImageInputError, match="exceeds the limit"):
        load_image(medium)
    with pytest.raises(ImageInputError, match="exceeds the limit"):
        load_image(_png(Image.new("L", (100, 100))), max_pixels=5000)
    assert load_image(_png(Image.new("L", (100, 100))), max_pixels=10000).size == (100, 100)


def test_error_misc_sources(tmp_path):
    with pytest.raises(ImageInputError, match="not found"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ImageInputError, match="remote"):
        load_image("https://example.com/a.png")
    with pytest.raises(ImageInputError, match="base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageInputError, match="not an image type"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ImageInputError, match="unsupported image source"):
        load_image(12345)
    with pytest.raises(ImageInputError, match="image #1"):
        preprocess_images([Image.new("RGB", (28, 28)), b"garbage"], CFG)


# ------------------------------------------------------------------------------------------------ video


def test_sample_frame_indices():
    assert sample_frame_indices(300, 30.0, 64, 1.0) == [15 + 30 * i for i in range(10)]
    assert sample_frame_indices(300, 30.0, 4, 1.0) == [37, 112, 187, 262]
    assert sample_frame_indices(5) == [0, 1, 2, 3, 4]
    assert sample_frame_indices(10, 30.0) == [5]  # 1/3 s clip -> one frame
    assert sample_frame_indices(60, 30.0, 64, 2.0) == [7, 22, 37, 52]
    for n, fps, mx, tf in [(1, 25.0, 8, 2.0), (7, 1.0, 64, 10.0), (10000, 24.0, 32, 1.0), (33, None, 16, 1.0)]:
        idx = sample_frame_indices(n, fps, mx, tf)
        assert 1 <= len(idx) <= min(n, mx)
        assert all(0 <= i < n for i in idx) and all(b > a for a, b in zip(idx, idx[1:]))
    assert len(sample_frame_indices(7, 1.0, 64, 10.0)) == 7  # never more frames than exist
    for bad in [(0, 30.0), (10, 0.0), (10, -1.0), (10, float("nan"))]:
        with pytest.raises(ProcessorError):
            sample_frame_indices(*bad)
    with pytest.raises(ProcessorError):
        sample_frame_indices(10, 30.0, 0)


def test_video_frames_container():
    frames = [np.full((20, 30, 3), i, np.uint8) for i in range(90)]
    vf = VideoFrames.from_decoded(frames, fps=30.0, max_frames=8, target_fps=1.0)
    assert len(vf) == 3 and vf.timestamps == (0.5, 1.5, 2.5)
    assert [int(f[0, 0, 0]) for f in vf] == [15, 45, 75]
    with pytest.raises(ProcessorError):
        VideoFrames(())
    with pytest.raises(ProcessorError):
        VideoFrames((frames[0], frames[1]), (1.0,))
    with pytest.raises(ProcessorError):
        VideoFrames((frames[0], frames[1]), (2.0, 1.0))


# ------------------------------------------------------------------------------------------------ processor


@dataclass(frozen=True)
class Segment:
    text: str
    trusted: bool


class FakeTokenizer:
    """Implements the KimiTokenizer interface the processor uses; renders per spec §4.4."""

    SPECIAL = {
        "<|im_end|>": 163586,
        "<|im_user|>": 163587,
        "<|im_assistant|>": 163588,
        "<|im_system|>": 163594,
        "<|im_middle|>": 163601,
        "<|media_start|>": 163602,
        "<|media_content|>": 163603,
        "<|media_end|>": 163604,
        "<|media_pad|>": 163605,
    }
    BLOCK = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
    media_pad_id = 163605

    def __init__(self, drop_media: bool = False):
        self.drop_media = drop_media

    def render_chat_segments(self, messages, add_generation_prompt=True):
        """(text, trusted) segments: markers are trusted, message text is not."""
        out = []
        if not messages or messages[0]["role"] != "system":
            out.append(Segment("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>", True))
        for m in messages:
            out.append(Segment(f"<|im_{m['role']}|>{m['role']}<|im_middle|>", True))
            content = m["content"]
            if isinstance(content, str):
                out.append(Segment(content, False))
            else:
                for it in content:
                    if it.get("type") == "text":
                        out.append(Segment(it["text"], False))
                    elif it.get("type") in ("image", "image_url") and not self.drop_media:
                        out.append(Segment(self.BLOCK, True))
                    elif it.get("type") == "video" and not self.drop_media:
                        out.append(Segment(self.BLOCK * len(it["frames"]), True))
            out.append(Segment("<|im_end|>", True))
        if add_generation_prompt:
            out.append(Segment("<|im_assistant|>assistant<|im_middle|>", True))
        return out

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(s.text for s in self.render_chat_segments(messages, add_generation_prompt))

    def encode_segments(self, segments):
        return [t for s in segments for t in self.encode(s.text, allow_special=s.trusted)]

    def encode(self, text, allow_special=True):
        ids = []
        for piece in re.split(r"(<\|[a-z_]+\|>)", text):
            if piece in self.SPECIAL and allow_special:
                ids.append(self.SPECIAL[piece])
            else:
                ids.extend(piece.encode("utf-8"))
        return ids


def test_processor_expands_media_pads_in_order():
    tok = FakeTokenizer()
    proc = KimiVLProcessor(CFG_TINY, tok)
    im_a, im_b = _rand_image(200, 150, 1), _rand_image(50, 30, 2)
    data_url = "data:image/png;base64," + base64.b64encode(_png(im_b)).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": im_a},
                {"type": "text", "text": "and"},
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": "What differs?"},
            ],
        }
    ]
    out = proc(messages)
    assert out.num_image_tokens == [20, 4]
    assert out.image_grid_hws.tolist() == [[8, 10], [4, 4]]
    assert out.pixel_values.shape == (80 + 16, 3, 14, 14)
    raw = tok.encode(tok.apply_chat_template(messages))
    ids = out.input_ids
    assert ids.dtype == torch.int64 and ids.shape == (1, len(raw) - 2 + 24)
    flat = ids[0].tolist()
    pad = tok.media_pad_id
    assert flat.count(pad) == 24
    # each image's pads are contiguous and sit between media_content and media_end
    runs = [len(m.group(0)) for m in re.finditer(r"P+", "".join("P" if t == pad else "." for t in flat))]
    assert runs == [20, 4]
    first = flat.index(pad)
    assert flat[first - 1] == 163603 and flat[first + 20] == 163604
    # removing the extra pads gives back the unexpanded encoding
    collapsed, prev = [], None
    for t in flat:
        if not (t == pad and prev == pad):
            collapsed.append(t)
        prev = t
    assert collapsed == raw
    assert out.prompt.endswith("<|im_assistant|>assistant<|im_middle|>")
    # pixel values equal the standalone preprocessing
    pv, grids = preprocess_images([im_a, im_b], CFG_TINY)
    assert torch.equal(out.pixel_values, pv) and torch.equal(out.image_grid_hws, grids)


def test_processor_image_url_string_and_no_generation_prompt(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_png(_rand_image(84, 56)))
    proc = KimiVLProcessor(CFG_TINY, FakeTokenizer())
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": str(path)}]}]
    out = proc(messages, add_generation_prompt=False)
    assert out.num_image_tokens == [6]
    assert not out.prompt.endswith("<|im_middle|>")


def test_processor_text_only():
    out = KimiVLProcessor(CFG, FakeTokenizer())([{"role": "user", "content": "hi"}])
    assert out.pixel_values is None and out.image_grid_hws is None and out.num_image_tokens == []
    assert out.input_ids.shape[0] == 1 and out.input_ids.dtype == torch.int64


def test_processor_media_count_mismatch():
    img = {"type": "image", "image": _rand_image(28, 28)}
    with pytest.raises(ProcessorError, match="1 images/frames"):
        KimiVLProcessor(CFG, FakeTokenizer(drop_media=True))([{"role": "user", "content": [img]}])
    # a literal pad in user text is plain text: no extra placeholder, no error
    out = KimiVLProcessor(CFG, FakeTokenizer())(
        [{"role": "user", "content": [img, {"type": "text", "text": "<|media_pad|>"}]}]
    )
    assert out.input_ids[0].tolist().count(FakeTokenizer.media_pad_id) == out.num_image_tokens[0]


def test_processor_video_frames():
    frames = [np.full((30, 50, 3), i * 4, np.uint8) for i in range(60)]
    vf = VideoFrames.from_decoded(frames, fps=30.0, target_fps=2.0)
    assert len(vf) == 4
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": _rand_image(112, 112)},
                {"type": "video", "frames": vf},
                {"type": "text", "text": "describe"},
            ],
        }
    ]
    out = KimiVLProcessor(CFG_TINY, FakeTokenizer())(messages)
    assert out.num_image_tokens == [16, 4, 4, 4, 4]
    assert out.image_grid_hws.shape == (5, 2)
    # per-frame budget for video frames
    big = [np.zeros((150, 200, 3), np.uint8)] * 2
    messages = [{"role": "user", "content": [{"type": "image", "image": big[0]}, {"type": "video", "frames": big}]}]
    out = KimiVLProcessor(CFG_TINY, FakeTokenizer(), video_in_token_limit=16)(messages)
    per_frame = num_image_tokens(200, 150, ProcessorConfig(in_token_limit=16))
    assert per_frame < 20 and out.num_image_tokens == [20, per_frame, per_frame]
    with pytest.raises(ProcessorError, match="frames"):
        KimiVLProcessor(CFG_TINY, FakeTokenizer())([{"role": "user", "content": [{"type": "video", "frames": []}]}])


def test_collect_media_item_kinds_and_order():
    vf = VideoFrames(("f0", "f1"), (0.0, 1.0))
    messages = [
        {"role": "system", "content": "sys"},
        {
            "role": "user",
            "content": [
                {"image": "a"},  # no type: typed by key, like the chat template
                {"type": "image_url", "image_url": "b"},
                {"type": "text", "text": "x"},
                {"type": "video", "frames": vf},
                {"video": ["g0"]},
                {"type": "image_url", "image_url": {"url": "c"}},
            ],
        },
    ]
    media = collect_media(messages)
    assert [m.source for m in media] == ["a", "b", "f0", "f1", "g0", "c"]
    assert [m.is_video_frame for m in media] == [False, False, True, True, True, False]
    with pytest.raises(ProcessorError):
        collect_media([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(ProcessorError):
        collect_media("not a list")


def test_processor_bad_image_is_image_input_error():
    proc = KimiVLProcessor(CFG, FakeTokenizer())
    with pytest.raises(ImageInputError):
        proc([{"role": "user", "content": [{"type": "image", "image": b"\x89PNG broken"}]}])


def test_from_pretrained_reads_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "KimiVLImageProcessor",
                "patch_size": 14,
                "merge_kernel_size": [2, 2],
                "pad_input": True,
                "in_token_limit": 16384,
                "num_pooled_tokens": 1024,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    proc = KimiVLProcessor.from_pretrained(tmp_path, FakeTokenizer())
    assert proc.cfg.in_token_limit == 16384
    assert num_image_tokens(3840, 2160, proc.cfg) == 4214
