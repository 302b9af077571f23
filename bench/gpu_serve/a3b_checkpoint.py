"""Write the full-size Kimi-VL-A3B with random bf16 weights as a checkpoint in the official format.

This is the model hook of the GPU serving runs: ``model: <this directory>`` in the app's config (or
``AsyncEngine.from_pretrained(<dir>)``) and the replica loads it through exactly the code a downloaded checkpoint
goes through (``engine.loader``: safetensors shards + index, config.json, tokenizer, preprocessor). Nothing in the
serving code knows the weights are random, and a replica's cold start is a real one (32.8 GB read and copied to
the GPU). Values follow ``bench.a3b.random_a3b_model`` (unit-RMS activations, non-degenerate routing); the
tokenizer and configs are ``bench.a3b.write_a3b_files``'s.

Usage (GPU machine, ~33 GB of disk):  python bench/gpu_serve/a3b_checkpoint.py DIR [--layers N] [--device cuda]
A directory that already holds a complete checkpoint (its index is written last) is reused as is.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.a3b import A3B_CONFIG, write_a3b_files  # noqa: E402
from engine.tiny import official_tensor_shapes  # noqa: E402

INDEX = "model.safetensors.index.json"


def _a3b_raw_config(layers: int | None) -> dict:
    raw = copy.deepcopy(A3B_CONFIG)
    if layers is not None:
        raw["text_config"]["num_hidden_layers"] = layers
        raw["vision_config"]["num_hidden_layers"] = layers
    return raw


@torch.no_grad()
def _random(name: str, shape: tuple[int, ...], gen: torch.Generator, device: str) -> torch.Tensor:
    """The init of ``bench.a3b.random_a3b_model``, by checkpoint name (router bias kept fp32, as DeepSeek's)."""
    if name.endswith("e_score_correction_bias"):
        return torch.rand(shape, generator=gen, device=device) * 0.1
    if ("norm" in name and name.endswith("weight")):
        return torch.ones(shape, device=device, dtype=torch.bfloat16)
    if name.endswith("bias"):
        return torch.zeros(shape, device=device, dtype=torch.bfloat16)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:]) if len(shape) == 4 else shape[-1]
        if name.endswith("embed_tokens.weight"):
            fan_in = 1
        elif name.endswith("pos_emb.weight"):
            fan_in = 10_000
        values = torch.randn(shape, generator=gen, device=device) / math.sqrt(fan_in)
    else:
        values = torch.randn(shape, generator=gen, device=device) * 0.02
    return values.to(torch.bfloat16)


def write_a3b_checkpoint(directory: str | Path, *, layers: int | None = None, device: str = "cuda",
                         shard_bytes: int = 4 * 2**30, seed: int = 0) -> Path:
    """Write (or reuse) the random A3B checkpoint in ``directory``; returns its path."""
    from safetensors.torch import save_file

    out = Path(directory)
    if (out / INDEX).exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_a3b_files(out)
    raw = _a3b_raw_config(layers)
    (out / "config.json").write_text(json.dumps(raw))
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = official_tensor_shapes(raw)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for k, names in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {n: _random(n, shapes[n], gen, device).cpu() for n in names}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers in both towers (smoke runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the random values are drawn (cuda is ~100x faster)")
    args = parser.parse_args()
    started = time.monotonic()
    path = write_a3b_checkpoint(args.directory, layers=args.layers, device=args.device)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"[a3b] checkpoint at {path}: {size / 1e9:.1f} GB in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    main()
