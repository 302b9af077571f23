"""Vision on CUDA: device preprocessing equals the host processor bit for bit, and MoonViT's attention backends
(grouped SDPA, flash varlen) agree with a per-image float32 reference on multi-image batches (skipped without
CUDA)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.config import ProcessorConfig, parse_config
from engine.processor import prepare_image, preprocess_image
from engine.tiny import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _png(w: int, h: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.gpu
@pytest.mark.parametrize(("w", "h", "limit", "pad"), [(1280, 720, 4096, True), (1920, 1080, 4096, True),
                                                      (720, 1600, 4096, True), (43, 327, 64, False)])
def test_cuda_patches_equal_host_patches(w, h, limit, pad) -> None:
    cfg = ProcessorConfig(in_token_limit=limit, pad_input=pad)
    data = _png(w, h, seed=w)
    ref, _ = preprocess_image(data, cfg)
    item = prepare_image(data, cfg, pixels="device")
    got = item.decoded.patches(torch.device("cuda"))
    assert got.is_cuda and got.shape == ref.shape
    assert torch.equal(got.cpu(), ref)


@pytest.mark.gpu
def test_rotate_qk_complex_path_matches_real_reference() -> None:
    from engine.model.vision import apply_rope_2d, rope_cos_sin, rotate_qk

    grids = [(50, 86), (8, 8)]
    n = sum(h * w for h, w in grids)
    cos, sin = rope_cos_sin(grids, 72, 10000.0, torch.device("cuda"))
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        qkv = torch.randn(n, 3, 16, 72, device="cuda").to(dtype)
        q, k = rotate_qk(qkv, cos, sin)
        assert q.is_contiguous() and k.is_contiguous() and q.dtype == dtype
        for got, src in ((q, qkv[:, 0]), (k, qkv[:, 1])):
            ref = apply_rope_2d(src, cos, sin)
            assert (got.float() - ref.float()).abs().max().item() <= tol * ref.float().abs().max().item()


def _tower(layers: int = 2):
    from engine.model.vision import MoonVitPretrainedModel

    raw = dict(tiny_config())
    raw["vision_config"] = {"patch_size": 14, "hidden_size": 1152, "num_hidden_layers": layers,
                            "num_attention_heads": 16, "intermediate_size": 4304, "init_pos_emb_height": 64,
                            "init_pos_emb_width": 64, "merge_kernel_size": [2, 2]}
    cfg = parse_config(raw)
    torch.manual_seed(0)
    tower = MoonVitPretrainedModel(cfg.vision_config)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
            elif "norm" in name:
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.normal_(0, 1 / (p[0].numel() ** 0.5))
    return tower.eval()


@pytest.mark.gpu
def test_varlen_and_grouped_sdpa_match_per_image_reference() -> None:
    """A batch of distinct grids (A3B head_dim 72): bf16 grouped SDPA (PyTorch's choice, and cuDNN first) and bf16
    flash varlen all match each image encoded alone in float32 (attention never crosses images), and cuDNN and
    varlen really ran."""
    import engine.model.vision as vision

    grids = [(50, 86), (8, 8), (24, 40), (8, 8), (48, 86)]
    n = sum(h * w for h, w in grids)
    px = torch.randn(n, 3, 14, 14, generator=torch.Generator().manual_seed(1))
    g = torch.tensor(grids)
    tower = _tower().cuda()
    with torch.no_grad():
        ref, off = [], 0
        for h, w in grids:
            ref.append(tower.forward_packed(px[off:off + h * w].cuda(), torch.tensor([[h, w]])).float())
            off += h * w
        ref = torch.cat(ref)
        tb = tower.to(torch.bfloat16)
        tb.attn_backend = "sdpa"
        sdpa = tb.forward_packed(px.cuda(), g).float()
        tb.attn_backend = "cudnn"  # cuDNN first
        vision.MoonVitPretrainedModel._cudnn_broken = False
        cudnn = tb.forward_packed(px.cuda(), g).float()
        assert not vision.MoonVitPretrainedModel._cudnn_broken, "cuDNN-first SDPA failed and fell back"
        tb.attn_backend = "varlen"
        vision.MoonVitPretrainedModel._varlen_broken = False
        varlen = tb.forward_packed(px.cuda(), g).float()
        tb.attn_backend = "sdpa"
    scale = ref.abs().max().item()
    for out in (sdpa, cudnn, varlen):
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 0.05 * scale
        assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item() > 0.999
    if vision._varlen_attn() is not None:
        assert not vision.MoonVitPretrainedModel._varlen_broken, "varlen flash attention failed and fell back"


@pytest.mark.gpu
def test_engine_on_cuda_device_pixels_equal_host_pixels(tiny_checkpoint) -> None:
    """The real engine on CUDA (tiny checkpoint, fp32): pixels made by the runner on the GPU give the same greedy
    tokens as host preprocessing; a resent PNG behind another prefix is a vision-cache hit at admission."""
    import base64

    from engine.loader import load
    from engine.runtime.engine import EngineOptions, LLMEngine

    bundle = load(tiny_checkpoint, device="cuda", dtype=torch.float32)
    urls = ["data:image/png;base64," + base64.b64encode(_png(w, h, seed=w)).decode() for w, h in ((120, 90), (56, 84))]
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "Both?"}]
    messages = [{"role": "user", "content": content}]

    def greedy(engine, msgs, n=6):
        seq = engine.make_sequence({"messages": msgs, "max_tokens": n, "ignore_eos": True})
        engine.add(seq)
        while engine.has_work():
            engine.step()
        return seq

    opts = dict(cache_tokens=4096, cuda_graphs=False, max_num_batched_tokens=512)
    host = LLMEngine(bundle, EngineOptions(image_pixels="host", **opts))
    dev = LLMEngine(bundle, EngineOptions(**opts))
    assert dev.image_pixels == "device"  # auto on a CUDA model
    first = greedy(dev, messages)
    assert first.finish_reason == "length" and len(first.output_ids) == 6, first.error  # never equal by both failing
    assert first.images[0].decoded is not None and first.images[0].pixel_values is None
    assert greedy(host, messages).output_ids == first.output_ids
    resent = [{"role": "system", "content": "Another prefix."},
              {"role": "user", "content": [content[0], {"type": "text", "text": "Again?"}]}]
    seq = greedy(dev, resent, 2)
    assert seq.images[0].features is not None and seq.finish_reason == "length"
    assert dev.runner.vision_cache.misses == 2 and dev.runner.vision_cache.hits >= 1
