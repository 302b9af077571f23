"""Write a tiny random-weight Kimi-VL checkpoint in the official file format.

The files are what an official snapshot holds (config.json, preprocessor_config.json, sharded safetensors
with an index, tiktoken.model, tokenizer_config.json), so the tiny model goes through exactly the loading code
a real checkpoint uses. Tensor names and shapes are generated here from the official naming scheme
(spec §3), independently of our module tree, so loading them is a real test of the loader's key mapping.

Dimensions are tiny but exercise every path: packed multi-image MoonViT, 2x2 merge, dense first layer,
MoE layers with shared experts, group-limited top-k (n_group > 1) with a correction bias, YaRN; the
``q_lora`` variant adds q_a_proj / q_a_layernorm / q_b_proj.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from engine.config import parse_config


Variant = Literal["main", "q_lora", "a3b_routing"]
NUM_BASE_TOKENS = 768  # + 256 special slots = vocab 1024
MEDIA_PAD_OFFSET = 21  # <|media_pad|> is special slot 21 (163605 - 163584 in the official vocabulary)


def tiny_config(variant: Variant = "main") -> dict[str, Any]:
    """config.json content for the tiny model, structured like the official file."""
    text: dict[str, Any] = {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": NUM_BASE_TOKENS + 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.446,
        "n_group": 4,
        "topk_group": 2,
        "hidden_act": "silu",
        "rope_theta": 800000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": NUM_BASE_TOKENS,
        "eos_token_id": NUM_BASE_TOKENS + 2,
        "pad_token_id": NUM_BASE_TOKENS + 255,
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "ep_size": 1,
        "initializer_range": 0.02,
        "num_nextn_predict_layers": 0,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }
    if variant == "q_lora":
        text["q_lora_rank"] = 16
    elif variant == "a3b_routing":
        text.update(n_group=1, topk_group=1, n_shared_experts=2, rope_scaling=None)
    vision = {
        "model_type": "moonvit",
        "patch_size": 14,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "init_pos_emb_height": 8,
        "init_pos_emb_width": 8,
        "merge_kernel_size": [2, 2],
        "torch_dtype": "bfloat16",
    }
    return {
        "architectures": ["KimiVLForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_kimi_vl.KimiVLConfig",
            "AutoModel": "modeling_kimi_vl.KimiVLForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_kimi_vl.KimiVLForConditionalGeneration",
        },
        "model_type": "kimi_vl",
        "media_placeholder_token_id": NUM_BASE_TOKENS + MEDIA_PAD_OFFSET,
        "ignore_index": -100,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.50.3",
        "vision_config": vision,
        "text_config": text,
    }


def tiny_preprocessor_config() -> dict[str, Any]:
    return {
        "auto_map": {
            "AutoImageProcessor": "image_processing_kimi_vl.KimiVLImageProcessor",
            "AutoProcessor": "processing_kimi_vl.KimiVLProcessor",
        },
        "image_processor_type": "KimiVLImageProcessor",
        "processor_class": "KimiVLProcessor",
        "patch_size": 14,
        "merge_kernel_size": [2, 2],
        "pad_input": True,
        "in_token_limit": 64,
        "num_pooled_tokens": 1024,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }


def official_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape an official Kimi-VL checkpoint with this config holds (spec §3)."""
    cfg = parse_config(config)
    v, t = cfg.vision_config, cfg.text_config
    shapes: dict[str, tuple[int, ...]] = {}
    vt = "vision_tower."
    c, p = v.hidden_size, v.patch_size
    shapes[vt + "patch_embed.proj.weight"] = (c, 3, p, p)
    shapes[vt + "patch_embed.proj.bias"] = (c,)
    shapes[vt + "patch_embed.pos_emb.weight"] = (v.init_pos_emb_height, v.init_pos_emb_width, c)
    for i in range(v.num_hidden_layers):
        b = f"{vt}encoder.blocks.{i}."
        for norm in ("norm0", "norm1"):
            shapes[b + norm + ".weight"] = shapes[b + norm + ".bias"] = (c,)
        shapes[b + "wqkv.weight"], shapes[b + "wqkv.bias"] = (3 * c, c), (3 * c,)
        shapes[b + "wo.weight"], shapes[b + "wo.bias"] = (c, c), (c,)
        shapes[b + "mlp.fc0.weight"], shapes[b + "mlp.fc0.bias"] = (v.intermediate_size, c), (v.intermediate_size,)
        shapes[b + "mlp.fc1.weight"], shapes[b + "mlp.fc1.bias"] = (c, v.intermediate_size), (c,)
    shapes[vt + "encoder.final_layernorm.weight"] = shapes[vt + "encoder.final_layernorm.bias"] = (c,)

    merged = cfg.projector_input_size
    mp = "multi_modal_projector."
    shapes[mp + "pre_norm.weight"] = shapes[mp + "pre_norm.bias"] = (c,)
    shapes[mp + "linear_1.weight"], shapes[mp + "linear_1.bias"] = (merged, merged), (merged,)
    shapes[mp + "linear_2.weight"], shapes[mp + "linear_2.bias"] = (t.hidden_size, merged), (t.hidden_size,)

    lm = "language_model."
    d, h = t.hidden_size, t.num_attention_heads
    shapes[lm + "model.embed_tokens.weight"] = (t.vocab_size, d)
    for i in range(t.num_hidden_layers):
        b = f"{lm}model.layers.{i}."
        shapes[b + "input_layernorm.weight"] = shapes[b + "post_attention_layernorm.weight"] = (d,)
        a = b + "self_attn."
        if t.q_lora_rank is None:
            shapes[a + "q_proj.weight"] = (h * t.qk_head_dim, d)
        else:
            shapes[a + "q_a_proj.weight"] = (t.q_lora_rank, d)
            shapes[a + "q_a_layernorm.weight"] = (t.q_lora_rank,)
            shapes[a + "q_b_proj.weight"] = (h * t.qk_head_dim, t.q_lora_rank)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (t.kv_lora_rank + t.qk_rope_head_dim, d)
        shapes[a + "kv_a_layernorm.weight"] = (t.kv_lora_rank,)
        shapes[a + "kv_b_proj.weight"] = (h * (t.qk_nope_head_dim + t.v_head_dim), t.kv_lora_rank)
        shapes[a + "o_proj.weight"] = (d, h * t.v_head_dim)
        m = b + "mlp."
        if t.is_moe_layer(i):
            assert t.n_routed_experts is not None
            shapes[m + "gate.weight"] = (t.n_routed_experts, d)
            shapes[m + "gate.e_score_correction_bias"] = (t.n_routed_experts,)
            for e in range(t.n_routed_experts):
                shapes[f"{m}experts.{e}.gate_proj.weight"] = (t.moe_intermediate_size, d)
                shapes[f"{m}experts.{e}.up_proj.weight"] = (t.moe_intermediate_size, d)
                shapes[f"{m}experts.{e}.down_proj.weight"] = (d, t.moe_intermediate_size)
            if t.n_shared_experts:
                width = t.moe_intermediate_size * t.n_shared_experts
                shapes[m + "shared_experts.gate_proj.weight"] = (width, d)
                shapes[m + "shared_experts.up_proj.weight"] = (width, d)
                shapes[m + "shared_experts.down_proj.weight"] = (d, width)
        else:
            shapes[m + "gate_proj.weight"] = shapes[m + "up_proj.weight"] = (t.intermediate_size, d)
            shapes[m + "down_proj.weight"] = (d, t.intermediate_size)
    shapes[lm + "model.norm.weight"] = (d,)
    if not t.tie_word_embeddings:
        shapes[lm + "lm_head.weight"] = (t.vocab_size, d)
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Values with O(1) activations so parity checks compare meaningful numbers, not near-zero noise."""
    if name.endswith("e_score_correction_bias"):
        return torch.rand(shape, generator=gen) * 0.1  # >= 0: official 0.0 and -inf group fills agree
    if "norm" in name and name.endswith(".weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    if name.endswith("pos_emb.weight"):
        return 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def write_tiny_checkpoint(
    directory: str | Path,
    seed: int = 0,
    variant: Variant = "main",
    dtype: torch.dtype = torch.bfloat16,
    num_shards: int = 2,
) -> Path:
    """Write the tiny checkpoint into ``directory`` (created if needed) and return its path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(variant)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(tiny_preprocessor_config(), indent=2) + "\n")
    from engine.tiny_tokenizer import write_tiny_tokenizer

    write_tiny_tokenizer(out, num_base_tokens=NUM_BASE_TOKENS)

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in official_tensor_shapes(config).items():
        values = _random_tensor(name, shape, gen)
        # DeepSeek-style checkpoints keep the router correction bias in fp32.
        tensors[name] = values if name.endswith("e_score_correction_bias") else values.to(dtype)
    names = list(tensors)
    per_shard = math.ceil(len(names) / num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(num_shards):
        fname = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[k * per_shard : (k + 1) * per_shard]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
