"""MoonViT vision tower + projector: official key names, packing invariance, RoPE / pos-emb / merger references,
an independent dense-mask reference, and parity with transformers' Kimi-K2.5 vision tower (MoonViT3d, t = 1).

CPU, float32, tiny Config A (spec §7.1).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import parse_config
from engine.tiny import tiny_config
from engine.model.projector import KimiVLMultiModalProjector, encode_images
from engine.model.vision import (
    MoonVitPretrainedModel,
    apply_rope_2d,
    merge_gather_index,
    rope_cos_sin,
)

# the project's tiny checkpoint config (spec §7.1 Config A): vision 64 wide, 4 heads, 2 layers, 8x8 pos-emb
TINY = tiny_config()

# identity (8,8), downsample (2,2)/(4,6)/(6,4)/(2,14 mixed), upsample (8,10)/(4,22); repeats exercise the
# batched-by-size attention groups, contiguous (2,2)+(2,2) and scattered (4,6)...(4,6)
GRIDS = [(2, 2), (2, 2), (4, 6), (8, 8), (8, 10), (4, 22), (6, 4), (4, 6), (2, 14)]


def _official_keys(n_layers: int) -> list[str]:
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.pos_emb.weight"]
    for i in range(n_layers):
        for name in ("norm0", "norm1", "wqkv", "wo", "mlp.fc0", "mlp.fc1"):
            keys += [f"encoder.blocks.{i}.{name}.weight", f"encoder.blocks.{i}.{name}.bias"]
    keys += ["encoder.final_layernorm.weight", "encoder.final_layernorm.bias"]
    return keys


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (norm affine included) so every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("norm0.weight", "norm1.weight", "final_layernorm.weight")) or name == "pre_norm.weight":
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("pos_emb.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1] if p.dim() == 2 else (p[0].numel() if p.dim() == 4 else 16)
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


@pytest.fixture(scope="module")
def cfg():
    return parse_config(TINY)


@pytest.fixture(scope="module")
def tower(cfg):
    torch.manual_seed(0)
    m = MoonVitPretrainedModel(cfg.vision_config).eval()
    _randomize(m, 1)
    return m


@pytest.fixture(scope="module")
def projector(cfg):
    torch.manual_seed(0)
    p = KimiVLMultiModalProjector(cfg).eval()
    _randomize(p, 2)
    return p


def _pixels(grids, seed=0):
    n = sum(h * w for h, w in grids)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 14, 14, generator=g), torch.tensor(grids, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# names and shapes


def test_state_dict_keys_and_shapes(cfg, tower, projector):
    sd = tower.state_dict()
    assert sorted(sd) == sorted(_official_keys(2))
    c, i = 64, 128
    shapes = {"patch_embed.proj.weight": (c, 3, 14, 14), "patch_embed.proj.bias": (c,),
              "patch_embed.pos_emb.weight": (8, 8, c), "encoder.final_layernorm.weight": (c,),
              "encoder.final_layernorm.bias": (c,)}
    for b in range(2):
        p = f"encoder.blocks.{b}."
        shapes.update({p + "norm0.weight": (c,), p + "norm0.bias": (c,), p + "norm1.weight": (c,),
                       p + "norm1.bias": (c,), p + "wqkv.weight": (3 * c, c), p + "wqkv.bias": (3 * c,),
                       p + "wo.weight": (c, c), p + "wo.bias": (c,), p + "mlp.fc0.weight": (i, c),
                       p + "mlp.fc0.bias": (i,), p + "mlp.fc1.weight": (c, i), p + "mlp.fc1.bias": (c,)})
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert not list(tower.buffers())  # no RoPE table / buffers at all

    psd = projector.state_dict()
    assert {k: tuple(v.shape) for k, v in psd.items()} == {
        "pre_norm.weight": (64,), "pre_norm.bias": (64,), "linear_1.weight": (256, 256), "linear_1.bias": (256,),
        "linear_2.weight": (64, 256), "linear_2.bias": (64,)}
    assert projector.pre_norm.eps == 1e-5 and tower.encoder.blocks[0].norm0.eps == 1e-5

    # strict load of an "official" dict works both ways
    fresh = MoonVitPretrainedModel(cfg.vision_config)
    fresh.load_state_dict(sd, strict=True)


def test_full_size_shapes_on_meta():
    """A3B sizes (spec §3.1/3.2): 329 vision + 6 projector tensors with the documented shapes."""
    big = dict(TINY)
    big["vision_config"] = {"patch_size": 14, "hidden_size": 1152, "num_hidden_layers": 27,
                            "num_attention_heads": 16, "intermediate_size": 4304, "init_pos_emb_height": 64,
                            "init_pos_emb_width": 64, "merge_kernel_size": [2, 2]}
    big["text_config"] = dict(TINY["text_config"], hidden_size=2048)
    c = parse_config(big)
    with torch.device("meta"):
        vt = MoonVitPretrainedModel(c.vision_config)
        pj = KimiVLMultiModalProjector(c)
    sd = vt.state_dict()
    assert sorted(sd) == sorted(_official_keys(27)) and len(sd) + len(pj.state_dict()) == 335
    assert sd["patch_embed.pos_emb.weight"].shape == (64, 64, 1152)
    assert sd["encoder.blocks.26.wqkv.weight"].shape == (3456, 1152)
    assert sd["encoder.blocks.0.mlp.fc0.weight"].shape == (4304, 1152)
    assert pj.linear_1.weight.shape == (4608, 4608) and pj.linear_2.weight.shape == (2048, 4608)


# ----------------------------------------------------------------------------------------------------------------
# packing invariance and token counts


def test_packed_equals_one_at_a_time(tower):
    px, grids = _pixels(GRIDS)
    with torch.no_grad():
        packed = tower(px, grids)
        assert len(packed) == len(GRIDS)
        off = 0
        for (h, w), out in zip(GRIDS, packed):
            single = tower(px[off:off + h * w], torch.tensor([[h, w]]))[0]
            off += h * w
            assert out.shape == ((h // 2) * (w // 2), 4, 64)
            assert (out - single).abs().max().item() <= 1e-5, (h, w)
        flat = tower.forward_packed(px, grids)
    assert torch.equal(flat, torch.cat(packed))


def test_image_order_and_projector_counts(tower, projector):
    px, grids = _pixels(GRIDS, seed=3)
    with torch.no_grad():
        feats = encode_images(tower, projector, px, grids)
        assert feats.shape == (sum((h // 2) * (w // 2) for h, w in GRIDS), 64)
        # reversing the image order reverses the row blocks
        rev = GRIDS[::-1]
        chunks, off = [], 0
        for h, w in GRIDS:
            chunks.append(px[off:off + h * w])
            off += h * w
        feats_rev = encode_images(tower, projector, torch.cat(chunks[::-1]), torch.tensor(rev))
    counts = [(h // 2) * (w // 2) for h, w in GRIDS]
    a = torch.split(feats, counts)
    b = torch.split(feats_rev, counts[::-1])[::-1]
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() <= 1e-5


def test_input_validation(tower):
    px, _ = _pixels([(2, 2)])
    with pytest.raises(ValueError, match="divisible"):
        tower(torch.randn(3, 3, 14, 14), torch.tensor([[1, 3]]))
    with pytest.raises(ValueError, match="covers"):
        tower(px, torch.tensor([[2, 4]]))
    with pytest.raises(ValueError, match="pixel_values"):
        tower(torch.randn(4, 3, 16, 16), torch.tensor([[2, 2]]))
    assert tower(px[:0], torch.zeros(0, 2, dtype=torch.long)) == []


def test_dtype_cast_and_bf16(cfg):
    m = MoonVitPretrainedModel(cfg.vision_config).eval()
    _randomize(m, 5)
    px, grids = _pixels([(4, 6), (2, 2)])
    with torch.no_grad():
        ref = m.forward_packed(px, grids)
        out64 = m.forward_packed(px.double(), grids)  # pixel_values cast to the parameter dtype
        assert out64.dtype == torch.float32 and torch.equal(out64, ref)
        mb = m.to(torch.bfloat16)
        outb = mb.forward_packed(px, grids)
    assert outb.dtype == torch.bfloat16
    assert (outb.float() - ref).abs().max().item() < 0.25 * ref.abs().max().item()


def test_varlen_backend_falls_back_to_sdpa(tower, monkeypatch):
    """attn_backend="varlen" off CUDA is plain SDPA; a varlen kernel that raises is caught and SDPA used."""
    import engine.model.vision as vision

    px, grids = _pixels([(4, 6), (2, 2), (4, 6)])
    with torch.no_grad():
        ref = tower.forward_packed(px, grids)
        tower.attn_backend = "varlen"
        try:
            assert torch.equal(tower.forward_packed(px, grids), ref)  # CPU fp32: varlen not eligible

            def broken(*args, **kwargs):
                raise RuntimeError("no flash kernel here")

            monkeypatch.setattr(vision, "_varlen_attn", lambda: broken)
            monkeypatch.setattr(vision.MoonVitPretrainedModel, "_use_varlen", lambda self, x: True)
            monkeypatch.setattr(vision.MoonVitPretrainedModel, "_varlen_broken", False)
            assert torch.equal(tower.forward_packed(px, grids), ref)
            assert vision.MoonVitPretrainedModel._varlen_broken
        finally:
            tower.attn_backend = "sdpa"


def test_cudnn_first_sdpa_same_result_and_falls_back(tower, monkeypatch):
    """The "cudnn" backend's cuDNN-first priority list changes the kernel choice, not the result (forced here on
    CPU, where the list ends in math); an error inside falls back to plain SDPA and is remembered."""
    import engine.model.vision as vision

    px, grids = _pixels([(4, 6), (2, 2)])
    with torch.no_grad():
        ref = tower.forward_packed(px, grids)
        monkeypatch.setattr(vision.MoonVitPretrainedModel, "_cudnn_first", lambda self, x: True)
        monkeypatch.setattr(vision.MoonVitPretrainedModel, "_cudnn_broken", False)
        assert torch.equal(tower.forward_packed(px, grids), ref)
        real = vision.MoonVitEncoder.forward
        calls = []

        def flaky(self, *args):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("cuDNN: no execution plan")
            return real(self, *args)

        monkeypatch.setattr(vision.MoonVitEncoder, "forward", flaky)
        assert torch.equal(tower.forward_packed(px, grids), ref)
        assert vision.MoonVitPretrainedModel._cudnn_broken and len(calls) == 2


# ----------------------------------------------------------------------------------------------------------------
# components against direct references


def test_rope_against_naive_complex_reference():
    head_dim, theta = 16, 10000.0
    grids = [(3, 5), (2, 2)]
    n = sum(h * w for h, w in grids)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, head_dim, generator=g)
    cos, sin = rope_cos_sin(grids, head_dim, theta)
    got = apply_rope_2d(x, cos, sin)

    ref = torch.empty_like(x)
    t = 0
    for h, w in grids:
        for y in range(h):
            for xx in range(w):
                for head in range(4):
                    for pair in range(head_dim // 2):
                        i = pair // 2
                        freq = theta ** (-(4 * i) / head_dim)
                        pos = xx if pair % 2 == 0 else y  # even pair <- column, odd pair <- row
                        z = complex(x[t, head, 2 * pair].item(), x[t, head, 2 * pair + 1].item())
                        r = z * complex(math.cos(pos * freq), math.sin(pos * freq))
                        ref[t, head, 2 * pair], ref[t, head, 2 * pair + 1] = r.real, r.imag
                t += 1
    assert (got - ref).abs().max().item() <= 1e-5
    # image-local positions: the first token of every image is unrotated
    assert torch.equal(got[0], x[0]) and torch.equal(got[15], x[15])


def _bicubic_matrix(out_size: int, in_size: int, a: float = -0.75) -> torch.Tensor:
    """Rows = output pixels; PyTorch's bicubic with align_corners=False and clamped borders, in float64."""
    def k(d):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0

    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    scale = in_size / out_size
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5
        x0 = math.floor(src)
        t = src - x0
        for tap in range(-1, 3):
            m[o, min(max(x0 + tap, 0), in_size - 1)] += k(t - tap)
    return m


def test_rotate_qk_equals_rope_on_q_and_k():
    """q and k rotated in one pass equal ``apply_rope_2d`` on each (CPU path bit for bit; the complex form the CUDA
    path uses agrees to float32 rounding)."""
    from engine.model.vision import rotate_qk

    grids = [(4, 6), (2, 2)]
    n = sum(h * w for h, w in grids)
    cos, sin = rope_cos_sin(grids, 16, 10000.0)
    qkv = torch.randn(n, 3, 4, 16, generator=torch.Generator().manual_seed(4))
    q, k = rotate_qk(qkv, cos, sin)
    assert q.is_contiguous() and k.is_contiguous()
    assert torch.equal(q, apply_rope_2d(qkv[:, 0], cos, sin)) and torch.equal(k, apply_rope_2d(qkv[:, 1], cos, sin))
    pairs = torch.view_as_complex(qkv[:, :2].transpose(0, 1).contiguous().unflatten(-1, (-1, 2)))
    complex_form = torch.view_as_real(pairs * torch.complex(cos, sin).unsqueeze(-2)).flatten(-2)
    assert (complex_form[0] - q).abs().max().item() <= 1e-5 and (complex_form[1] - k).abs().max().item() <= 1e-5


def test_pos_emb_interpolation(tower):
    pe = tower.patch_embed.pos_emb
    wt = pe.weight.detach()
    # identity size: used as is, and the resize path is exactly the identity too (what the official code runs)
    assert torch.equal(pe.interpolated(8, 8), wt.flatten(0, 1))
    assert torch.equal(pe.interpolated(8, 8, force_resize=True), wt.flatten(0, 1))
    for h, w in [(2, 2), (4, 22), (8, 10), (6, 4), (2, 14)]:
        ref = torch.einsum("yi,ijc,xj->yxc", _bicubic_matrix(h, 8), wt.double(), _bicubic_matrix(w, 8))
        got = pe.interpolated(h, w)
        assert got.shape == (h * w, 64)
        assert (got.double() - ref.reshape(h * w, 64)).abs().max().item() <= 1e-5, (h, w)


def test_merge_order():
    idx = merge_gather_index([(2, 4), (4, 2)], (2, 2))
    # image 0 (2x4): blocks (0,0),(0,1); image 1 at offset 8 (4x2): blocks (0,0),(1,0)
    assert idx.view(-1, 4).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


# ----------------------------------------------------------------------------------------------------------------
# independent reference: dense attention over all packed images with an explicit block mask


def _reference_tower(m: MoonVitPretrainedModel, px: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
    sd = {k: v.detach().double() for k, v in m.state_dict().items()}
    c, heads = 64, 4
    d = c // heads
    n = px.shape[0]
    # patch embedding as a linear map of the (C, kh, kw)-flattened patch
    x = px.double().reshape(n, -1) @ sd["patch_embed.proj.weight"].reshape(c, -1).T + sd["patch_embed.proj.bias"]
    # pos-emb: always resize (as the official forward does), float64
    table = sd["patch_embed.pos_emb.weight"].permute(2, 0, 1)[None]
    x = x + torch.cat([F.interpolate(table, size=hw, mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
                       .reshape(-1, c) for hw in grids])
    # official-style precomputed 512 x 512 complex table, sliced per image
    dim_range = torch.arange(0, d, 4)[: d // 4].double()
    freqs = 1.0 / (10000 ** (dim_range / d))
    flat = torch.arange(512 * 512).double()
    xs, ys = flat % 512, flat // 512
    cis = torch.stack([torch.polar(torch.ones(512 * 512, d // 4, dtype=torch.float64), torch.outer(xs, freqs)),
                       torch.polar(torch.ones(512 * 512, d // 4, dtype=torch.float64), torch.outer(ys, freqs))],
                      dim=-1).reshape(512, 512, d // 2)
    freqs_cis = torch.cat([cis[:h, :w].reshape(-1, d // 2) for h, w in grids])[:, None, :]
    mask = torch.zeros(n, n, dtype=torch.bool)
    cu = 0
    for h, w in grids:
        mask[cu:cu + h * w, cu:cu + h * w] = True
        cu += h * w

    def ln(t, p, eps=1e-5):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + eps) * sd[p + ".weight"] + sd[p + ".bias"]

    def lin(t, p):
        return t @ sd[p + ".weight"].T + sd[p + ".bias"]

    for b in range(2):
        p = f"encoder.blocks.{b}."
        hdn = ln(x, p + "norm0")
        q, k, v = lin(hdn, p + "wqkv").reshape(n, 3, heads, d).unbind(1)
        q, k = (torch.view_as_real(torch.view_as_complex(t.reshape(n, heads, d // 2, 2).contiguous()) * freqs_cis)
                .reshape(n, heads, d) for t in (q, k))
        logits = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        logits = logits.masked_fill(~mask, float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v).reshape(n, c)
        x = x + lin(attn, p + "wo")
        hdn = lin(ln(x, p + "norm1"), p + "mlp.fc0")
        hdn = 0.5 * hdn * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hdn + 0.044715 * hdn**3)))
        x = x + lin(hdn, p + "mlp.fc1")
    x = ln(x, "encoder.final_layernorm")
    outs, cu = [], 0
    for h, w in grids:
        seq = x[cu:cu + h * w].reshape(h // 2, 2, w // 2, 2, c).permute(0, 2, 1, 3, 4).reshape(-1, 4, c)
        outs.append(seq)
        cu += h * w
    return outs


def _reference_projector(p: KimiVLMultiModalProjector, feats: torch.Tensor) -> torch.Tensor:
    sd = {k: v.detach().double() for k, v in p.state_dict().items()}
    f = feats.double()
    mu = f.mean(-1, keepdim=True)
    var = ((f - mu) ** 2).mean(-1, keepdim=True)
    f = (f - mu) / torch.sqrt(var + 1e-5) * sd["pre_norm.weight"] + sd["pre_norm.bias"]  # per 64-wide sub-token
    h = f.reshape(f.shape[0], -1) @ sd["linear_1.weight"].T + sd["linear_1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h @ sd["linear_2.weight"].T + sd["linear_2.bias"]


def test_module_equals_dense_mask_reference(tower, projector):
    grids = [(4, 6), (8, 8), (2, 2), (4, 22), (6, 4)]
    px, gt = _pixels(grids, seed=7)
    with torch.no_grad():
        got = tower(px, gt)
        ref = _reference_tower(tower, px, grids)
        for a, b in zip(got, ref):
            assert (a.double() - b).abs().max().item() <= 1e-5
        proj = projector(got)
        proj_ref = _reference_projector(projector, torch.cat(ref))
    assert (proj.double() - proj_ref).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# transformers' Kimi-K2.5 vision tower (MoonViT3d) with t = 1


def _to_k25(sd: dict[str, torch.Tensor], k25_cfg) -> dict[str, torch.Tensor]:
    """Official MoonViT names -> transformers Kimi_K25VisionModel names, with transformers' own conversion ops
    (``conversion_mapping["kimi_k25"]``: Chunk(dim=0) of wqkv, then PermuteForRope on q/k)."""
    from transformers.core_model_loading import PermuteForRope

    perm = PermuteForRope(subconfig_key=None)
    out = {
        "patch_embed.proj.weight": sd["patch_embed.proj.weight"],
        "patch_embed.proj.bias": sd["patch_embed.proj.bias"],
        "patch_embed.pos_emb.position_embeddings": sd["patch_embed.pos_emb.weight"],
        "final_layernorm.weight": sd["encoder.final_layernorm.weight"],
        "final_layernorm.bias": sd["encoder.final_layernorm.bias"],
    }
    for i in range(k25_cfg.num_hidden_layers):
        s, t = f"encoder.blocks.{i}.", f"layers.{i}."
        for suf in ("weight", "bias"):
            out[t + f"norm1.{suf}"] = sd[s + f"norm0.{suf}"]
            out[t + f"norm2.{suf}"] = sd[s + f"norm1.{suf}"]
            out[t + f"mlp.fc1.{suf}"] = sd[s + f"mlp.fc0.{suf}"]
            out[t + f"mlp.fc2.{suf}"] = sd[s + f"mlp.fc1.{suf}"]
            out[t + f"attn.proj.{suf}"] = sd[s + f"wo.{suf}"]
            q, k, v = sd[s + f"wqkv.{suf}"].chunk(3, dim=0)
            out[t + f"attn.q_proj.{suf}"] = perm._permute_for_rope(q, k25_cfg)
            out[t + f"attn.k_proj.{suf}"] = perm._permute_for_rope(k, k25_cfg)
            out[t + f"attn.v_proj.{suf}"] = v
    return out


def test_parity_with_transformers_kimi_k25_vision_tower(cfg, tower, projector):
    k25 = pytest.importorskip("transformers.models.kimi_k25.modeling_kimi_k25")
    from transformers.core_model_loading import PermuteForRope
    from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25VisionConfig

    vc = cfg.vision_config
    kcfg = Kimi_K25VisionConfig(
        patch_size=vc.patch_size, pos_emb_height=vc.init_pos_emb_height, pos_emb_width=vc.init_pos_emb_width,
        num_attention_heads=vc.num_attention_heads, num_hidden_layers=vc.num_hidden_layers,
        hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size, hidden_act="gelu_pytorch_tanh",
        merge_kernel_size=list(vc.merge_kernel_size), rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
    )
    kcfg._attn_implementation = "sdpa"
    ref = k25.Kimi_K25VisionModel(kcfg).eval()
    sd = tower.state_dict()
    mapped = _to_k25(sd, kcfg)
    ref.load_state_dict(mapped, strict=True)

    # and back: the inverse permutation restores the official fused wqkv
    inv = PermuteForRope(subconfig_key=None, inverse=True)
    for i in range(vc.num_hidden_layers):
        t = f"layers.{i}.attn."
        fused = torch.cat([inv._permute_for_rope(mapped[t + "q_proj.weight"], kcfg),
                           inv._permute_for_rope(mapped[t + "k_proj.weight"], kcfg), mapped[t + "v_proj.weight"]])
        assert torch.equal(fused, sd[f"encoder.blocks.{i}.wqkv.weight"])

    grids = [(4, 6), (8, 8), (8, 10), (4, 22), (2, 2), (6, 4)]
    px, gt = _pixels(grids, seed=11)
    thw = torch.cat([torch.ones(len(grids), 1, dtype=torch.long), gt], dim=1)
    with torch.no_grad():
        ours = tower.forward_packed(px, gt)
        theirs = ref(px, thw).pooler_output  # (sum merged, kh*kw, C), same merge order
        assert theirs.shape == ours.shape
        assert (ours - theirs).abs().max().item() <= 1e-5

        # projector: Kimi_K25MultimodalProjection (pre_norm on each C-wide sub-token, exact GELU) with renamed keys
        from types import SimpleNamespace

        pcfg = SimpleNamespace(vision_config=kcfg, projection_hidden_size=vc.hidden_size,
                               projection_layer_norm_eps=1e-5, text_config=SimpleNamespace(hidden_size=64))
        kproj = k25.Kimi_K25MultimodalProjection(pcfg).eval()
        psd = projector.state_dict()
        kproj.load_state_dict({"pre_norm.weight": psd["pre_norm.weight"], "pre_norm.bias": psd["pre_norm.bias"],
                               "in_proj.weight": psd["linear_1.weight"], "in_proj.bias": psd["linear_1.bias"],
                               "out_proj.weight": psd["linear_2.weight"], "out_proj.bias": psd["linear_2.bias"]})
        a = projector(ours)
        b = kproj(theirs).reshape(a.shape)
    assert (a - b).abs().max().item() <= 1e-5
