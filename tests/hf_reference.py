"""Build transformers' DeepseekV3ForCausalLM from the ``language_model.*`` tensors of a Kimi-VL checkpoint.

Used only by tests: the weights go through transformers' own ``from_pretrained`` (which converts the official
per-expert keys itself), so the comparison does not depend on our loader's mapping.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def export_language_model(checkpoint: Path, out: Path) -> Path:
    """Write a plain DeepSeek-V3 checkpoint (config.json + model.safetensors) holding the decoder."""
    config = json.loads((checkpoint / "config.json").read_text())
    text = dict(config["text_config"])
    text["model_type"] = "deepseek_v3"
    text["architectures"] = ["DeepseekV3ForCausalLM"]
    text["rope_interleave"] = True
    text.pop("torch_dtype", None)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name, fname in index.items():
        if name.startswith("language_model."):
            with safe_open(str(checkpoint / fname), framework="pt") as f:
                tensors[name.removeprefix("language_model.")] = f.get_tensor(name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(text))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def load_hf_decoder(checkpoint: Path, workdir: Path, dtype: torch.dtype = torch.float32):
    from transformers import DeepseekV3ForCausalLM

    exported = export_language_model(checkpoint, workdir)
    model = DeepseekV3ForCausalLM.from_pretrained(str(exported), dtype=dtype, attn_implementation="eager")
    return model.eval()
