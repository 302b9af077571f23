"""Image preprocessing on the model's device: the torch pipeline (``engine.pixel_ops``) against Pillow and the host
path, content keys before pixel work, vision-cache hits that skip decoding, and the engine in both modes.

"Device" here is CPU tensors through the same torch code the GPU runs (tests/test_gpu_vision.py repeats the
equality on CUDA).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine import processor as processor_module
from engine.config import ProcessorConfig
from engine.pixel_ops import pil_bicubic_resize, vertical_first_rule
from engine.processor import ImageInputError, prepare_image, preprocess_image
from engine.runtime.engine import EngineOptions, LLMEngine
from tests.runtime_helpers import image, image_message


def _noise(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _ramps(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * 7 + yy * 3) % 256], -1).astype(np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


# (input w, h) -> (output w, h): downscales (antialiased), upscales, one axis only, strong vertical shrink (newer
# Pillow runs that pass first), 1-pixel results, and the screenshot resize of the official 4096-patch limit
RESIZES = [
    ((1280, 720), (1202, 676)), ((64, 64), (63, 17)), ((300, 100), (100, 90)), ((300, 100), (290, 30)),
    ((37, 23), (20, 11)), ((50, 50), (120, 90)), ((7, 5), (3, 2)), ((200, 3), (199, 1)), ((3, 200), (1, 150)),
    ((100, 80), (100, 40)), ((100, 80), (60, 80)), ((31, 373), (17, 134)), ((202, 243), (197, 178)),
]


@pytest.mark.parametrize(("src", "dst"), RESIZES)
def test_resize_equals_pillow_bicubic(src, dst):
    for arr in (_noise(*src, seed=sum(src)), _ramps(*src)):
        ref = np.asarray(Image.fromarray(arr, "RGB").resize(dst, Image.Resampling.BICUBIC))
        got = pil_bicubic_resize(torch.from_numpy(arr), dst).numpy()
        assert got.shape == ref.shape
        assert np.array_equal(got, ref), f"{src}->{dst}: {int((got != ref).sum())} bytes differ"


def test_resize_random_sizes_equal_pillow():
    rng = np.random.default_rng(7)
    for _ in range(25):
        w, h = (int(v) for v in rng.integers(1, 160, 2))
        ow, oh = int(rng.integers(1, 2 * w + 1)), int(rng.integers(1, 2 * h + 1))
        arr = _noise(w, h, seed=w * 1000 + h)
        ref = np.asarray(Image.fromarray(arr, "RGB").resize((ow, oh), Image.Resampling.BICUBIC))
        assert np.array_equal(pil_bicubic_resize(torch.from_numpy(arr), (ow, oh)).numpy(), ref), ((w, h), (ow, oh))


def test_pass_order_rule_is_detected():
    assert isinstance(vertical_first_rule(), bool)
    with pytest.raises(ValueError):
        pil_bicubic_resize(torch.zeros(4, 4, 3), (2, 2))  # not uint8


CONFIGS = {
    "a3b": ProcessorConfig(),  # in_token_limit 4096: the real screenshot geometry
    "small_limit": ProcessorConfig(in_token_limit=64),
    "crop": ProcessorConfig(in_token_limit=64, pad_input=False),
}
# (w, h, config): resize + pad, no resize + pad, resize + crop, tall image (vertical pass first), tiny image
CASES = [(1280, 720, "a3b"), (84, 56, "small_limit"), (300, 170, "small_limit"), (97, 403, "small_limit"),
         (300, 170, "crop"), (43, 327, "crop"), (5, 3, "small_limit"), (1920, 1080, "a3b")]


@pytest.mark.parametrize(("w", "h", "name"), CASES)
def test_device_patches_equal_host_patches(w, h, name):
    cfg = CONFIGS[name]
    data = _png(_noise(w, h, seed=w + h))
    host = prepare_image(data, cfg, pixels="host")
    dev = prepare_image(data, cfg, pixels="device")
    ref, grid = preprocess_image(data, cfg)
    assert host.key == dev.key and host.geometry == dev.geometry and dev.grid_hw == grid
    assert dev.patches is None and dev.decoded is not None and dev.decoded.rgb.dtype == torch.uint8
    assert torch.equal(host.patches, ref)
    got = dev.decoded.patches(torch.device("cpu"))
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.equal(got, ref)  # bit for bit


def test_keys_identify_content_and_settings(tmp_path):
    cfg = CONFIGS["small_limit"]
    arr = _noise(40, 30, seed=1)
    data = _png(arr)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    import base64

    url = "data:image/png;base64," + base64.b64encode(data).decode()
    k_bytes = prepare_image(data, cfg).key
    assert prepare_image(path, cfg).key == k_bytes == prepare_image(url, cfg).key  # same encoded bytes
    assert prepare_image(data, cfg, in_token_limit=16).key != k_bytes  # another patch budget (video frames)
    assert prepare_image(data, ProcessorConfig(in_token_limit=64, pad_input=False)).key != k_bytes
    other = arr.copy()
    other[0, 0, 0] ^= 1
    assert prepare_image(_png(other), cfg).key != k_bytes
    pil_key = prepare_image(Image.fromarray(arr, "RGB"), cfg).key  # decoded-pixel key for PIL / array inputs
    assert prepare_image(arr, cfg).key == pil_key != k_bytes
    assert prepare_image(Image.fromarray(other, "RGB"), cfg).key != pil_key


def test_cache_hit_skips_decoding(monkeypatch):
    cfg = CONFIGS["small_limit"]
    data = _png(_noise(84, 56, seed=3))
    memo = processor_module._GeometryMemo()
    first = prepare_image(data, cfg, pixels="device", lookup=lambda key: None, memo=memo)
    features = torch.randn(first.num_tokens, 8)
    store = {first.key: features}

    def no_decode(*args, **kwargs):
        raise AssertionError("a cached image must not be decoded")

    monkeypatch.setattr(processor_module, "_decode_encoded", no_decode)
    hit = prepare_image(data, cfg, pixels="device", lookup=store.get, memo=memo)
    assert hit.features is features and hit.decoded is None and hit.patches is None
    assert hit.key == first.key and hit.geometry == first.geometry
    monkeypatch.undo()
    # rows that do not match the remembered geometry are not trusted: the image is processed again
    store[first.key] = torch.randn(first.num_tokens + 1, 8)
    again = prepare_image(data, cfg, pixels="device", lookup=store.get, memo=memo)
    assert again.features is None and again.decoded is not None
    # a bad image still fails with the processor's error, in both modes
    for mode in ("host", "device"):
        with pytest.raises(ImageInputError):
            prepare_image(b"not an image", cfg, pixels=mode, lookup=store.get, memo=memo)


def test_processor_device_mode_and_lookup(tiny_bundle):
    proc = tiny_bundle.processor
    shots = [image(11, (84, 56)), image(12, (200, 150))]
    messages = image_message(shots, "What changed?")
    host = proc(messages)
    dev = proc(messages, pixels="device")
    assert torch.equal(host.input_ids, dev.input_ids) and host.num_image_tokens == dev.num_image_tokens
    assert dev.pixel_values is None and dev.image_grid_hws is None
    assert [i.key for i in host.images] == [i.key for i in dev.images]
    packed = torch.cat([i.decoded.patches() for i in dev.images])
    assert torch.equal(packed, host.pixel_values)
    assert torch.equal(torch.tensor([i.grid_hw for i in dev.images]), host.image_grid_hws)
    known = {host.images[0].key: torch.zeros(host.num_image_tokens[0], 4)}
    mixed = proc(messages, pixels="device", lookup=known.get)
    assert mixed.images[0].features is not None and mixed.images[1].decoded is not None
    assert torch.equal(mixed.input_ids, host.input_ids)


def _greedy(engine: LLMEngine, messages, max_tokens: int = 6) -> list[int]:
    seq = engine.make_sequence({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                                "ignore_eos": True})
    engine.add(seq)
    while engine.has_work():
        engine.step()
    return list(seq.output_ids)


def test_engine_device_pixels_equal_host_pixels(tiny_bundle):
    """The engine with pixel work deferred to the runner gives the same greedy tokens as host preprocessing, and a
    resent image is served from the vision cache at admission (nothing decoded, nothing re-encoded)."""
    opts = dict(cpu_cache_tokens=2048, max_num_batched_tokens=256)
    host = LLMEngine(tiny_bundle, EngineOptions(image_pixels="host", **opts))
    dev = LLMEngine(tiny_bundle, EngineOptions(image_pixels="device", **opts))
    assert host.image_pixels == "host" and dev.image_pixels == "device"
    assert LLMEngine(tiny_bundle, EngineOptions(**opts)).image_pixels == "host"  # auto on a CPU model
    messages = image_message([image(21, (120, 90)), image(22, (56, 84))], "Describe both.")
    assert _greedy(host, messages) == _greedy(dev, messages)
    assert dev.runner.vision_cache.misses == 2
    other_prefix = [{"role": "system", "content": "A different system prompt, so the prefix cache cannot help."}]
    resent = other_prefix + image_message([image(21, (120, 90))], "Again, briefly.")
    seq = dev.make_sequence({"messages": resent, "max_tokens": 2})
    assert seq.images[0].features is not None and seq.images[0].decoded is None
    dev.add(seq)
    while dev.has_work():
        dev.step()
    assert dev.runner.vision_cache.misses == 2 and dev.runner.vision_cache.hits >= 1
    assert seq.finish_reason == "length"
