"""The full-size Kimi-VL-A3B architecture (spec §1) with random weights, built directly on the GPU.

Benchmarks use this instead of a download: same shapes and dtypes as the official checkpoint, values random.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from engine.config import KimiVLConfig, parse_config
from engine.loader import build_empty_model

A3B_CONFIG: dict[str, Any] = {
    "model_type": "kimi_vl",
    "architectures": ["KimiVLForConditionalGeneration"],
    "media_placeholder_token_id": 163605,
    "torch_dtype": "bfloat16",
    "vision_config": {
        "model_type": "moonvit", "patch_size": 14, "hidden_size": 1152, "num_hidden_layers": 27,
        "num_attention_heads": 16, "intermediate_size": 4304, "init_pos_emb_height": 64,
        "init_pos_emb_width": 64, "merge_kernel_size": [2, 2],
    },
    "text_config": {
        "model_type": "deepseek_v3", "vocab_size": 163840, "hidden_size": 2048, "intermediate_size": 11264,
        "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64, "num_experts_per_tok": 6,
        "n_shared_experts": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.446, "n_group": 1,
        "topk_group": 1, "hidden_act": "silu", "rope_theta": 800000.0, "rope_scaling": None,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "attention_bias": False,
        "tie_word_embeddings": False, "bos_token_id": 163584, "eos_token_id": 163585,
    },
}


def a3b_config(layers: int | None = None) -> KimiVLConfig:
    """The A3B config; ``layers`` shrinks both towers (smoke runs on small machines)."""
    raw = copy.deepcopy(A3B_CONFIG)
    if layers is not None:
        raw["text_config"]["num_hidden_layers"] = layers
        raw["vision_config"]["num_hidden_layers"] = layers
    return parse_config(raw)


@torch.no_grad()
def random_a3b_model(
    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0, layers: int | None = None
):
    """Random weights scaled like a trained model (unit-RMS activations), so routing is not degenerate."""
    torch.manual_seed(seed)
    model = build_empty_model(a3b_config(layers), torch.device(device), dtype)
    for name, param in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            param.uniform_(0, 0.1)
        elif "norm" in name and name.endswith("weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        elif param.dim() >= 2:
            fan_in = param.shape[-1] if param.dim() != 4 else math.prod(param.shape[1:])
            if name.endswith("pos_emb.weight") or name.endswith("embed_tokens.weight"):
                fan_in = 1 if "embed_tokens" in name else 1e4
            param.normal_(0, 1 / math.sqrt(fan_in))
            if param.dtype == torch.float32:  # the router, kept fp32 by the loader: values a bf16 checkpoint holds
                param.copy_(param.to(torch.bfloat16).float())
        else:
            param.normal_(0, 0.02)
    return model


def write_a3b_files(directory) -> None:
    """config.json, preprocessor_config.json and a tokenizer in the official format with the full 163,840-id
    vocabulary (256 byte tokens + distinct 3-byte tokens + the 256 special slots), so the engine runs unchanged
    on the random A3B model: the processor, chat template and detokenizer all see real-sized ids."""
    import base64
    import json
    from pathlib import Path

    from engine.tiny import tiny_preprocessor_config
    from engine.tiny_tokenizer import write_tiny_tokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(A3B_CONFIG))
    pre = tiny_preprocessor_config()
    pre["in_token_limit"] = 4096
    (out / "preprocessor_config.json").write_text(json.dumps(pre))
    small = 768
    write_tiny_tokenizer(out, num_base_tokens=small)
    base = A3B_CONFIG["text_config"]["vocab_size"] - 256
    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    rank = 256
    for a in range(256):
        for b in range(256):
            for c in range(256):
                if rank == base:
                    break
                lines.append(f"{base64.b64encode(bytes([a, b, c])).decode()} {rank}")
                rank += 1
            if rank == base:
                break
        if rank == base:
            break
    (out / "tiktoken.model").write_text("\n".join(lines) + "\n")
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(int(k) - small + base): v for k, v in config["added_tokens_decoder"].items()
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def a3b_bundle(directory, device: str = "cuda", layers: int | None = None):
    """A KimiVLBundle around the random A3B model, with processor and tokenizer loaded from ``directory``."""
    from pathlib import Path

    from engine.loader import KimiVLBundle
    from engine.processor import KimiVLProcessor
    from engine.tokenizer import KimiTokenizer

    write_a3b_files(directory)
    tokenizer = KimiTokenizer.from_pretrained(directory)
    processor = KimiVLProcessor.from_pretrained(directory, tokenizer)
    model = random_a3b_model(device, layers=layers)
    return KimiVLBundle(model=model, processor=processor, tokenizer=tokenizer, config=model.config, path=Path(directory))
