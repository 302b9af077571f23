"""Load an official Kimi-VL checkpoint directory (or Hugging Face id) into our modules.

Why this shape:
- Parameters are created on the ``meta`` device and only materialised at their final device/dtype, then
  filled tensor by tensor from memory-mapped safetensors, so RAM never holds two copies of the weights.
- Loading is strict: every expected tensor must be present with its official shape; missing, unexpected or
  misshaped tensors are reported together, each by name.
- Official per-expert keys are copied into the stacked expert tensors (``ExpertBank.checkpoint_slices``).
- ``quantization="fp8"`` (:func:`quantize_model_`) runs after the bf16 weights are read: the decoder's linear
  layers become ``Fp8Linear`` and the expert banks fp8, each tensor replaced (and its bf16 copy freed) in turn.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from engine.config import KimiVLConfig, load_config
from engine.kernels.fp8 import Fp8Linear, quantize_rows
from engine.model.decoder import DeepseekV3Attention, DeepseekV3MLP, DeepseekV3MoE, ExpertBank, MoEGate
from engine.model.kimi_vl import KimiVLForConditionalGeneration

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Keys some exporters leave behind that carry no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")
SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_LISTED = 50


class CheckpointError(ValueError):
    """The checkpoint's files do not match what the model needs; the message names each offending tensor."""


@dataclass
class KimiVLBundle:
    """What ``load`` returns: the model plus the processor and tokenizer read from the same directory."""

    model: KimiVLForConditionalGeneration
    processor: Any
    tokenizer: Any
    config: KimiVLConfig
    path: Path


@dataclass(frozen=True)
class _Target:
    tensor: torch.Tensor
    index: int | None  # expert slot inside a stacked tensor, else None


def resolve_dtype(dtype: str | torch.dtype | None, config: KimiVLConfig, device: torch.device) -> torch.dtype:
    """None -> the checkpoint's dtype on accelerators, float32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if dtype is None:
        if device.type == "cpu":
            return torch.float32
        dtype = config.torch_dtype or "bfloat16"
    name = str(dtype).removeprefix("torch.")
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: choose one of {', '.join(SUPPORTED_DTYPES)}")
    return SUPPORTED_DTYPES[name]


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on ``meta`` while buffers (RoPE tables) are computed normally on CPU."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_empty_model(config: KimiVLConfig, device: torch.device, dtype: torch.dtype) -> KimiVLForConditionalGeneration:
    """Model with uninitialised parameters at (device, dtype). Router weights and correction biases stay fp32:
    the official router computes in fp32 anyway, so keeping them there saves a cast per layer and step."""
    with _parameters_on_meta():
        model = KimiVLForConditionalGeneration(config)
    keep_fp32 = {id(p) for m in model.modules() if isinstance(m, MoEGate) for p in m.parameters(recurse=False)}
    materialised: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in materialised:
                target_dtype = torch.float32 if id(param) in keep_fp32 else dtype
                materialised[id(param)] = nn.Parameter(
                    torch.empty(param.shape, dtype=target_dtype, device=device), requires_grad=False
                )
            module._parameters[name] = materialised[id(param)]
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)
    for module in model.modules():  # merged layouts, made before loading: weights load into their views
        if isinstance(module, DeepseekV3Attention):
            module.fuse_qkv_()
        elif isinstance(module, (DeepseekV3MLP, ExpertBank)):
            module.fuse_gate_up_()
    return model.eval()


def checkpoint_targets(model: nn.Module) -> dict[str, _Target]:
    """Official checkpoint key -> where its values go in ``model``."""
    targets: dict[str, _Target] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, ExpertBank):
            for key, (param_name, expert) in module.checkpoint_slices().items():
                targets[dot + key] = _Target(getattr(module, param_name), expert)
            continue
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied weights: only the first name is in the checkpoint
                continue
            seen.add(id(param))
            targets[dot + name] = _Target(param, None)
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                targets[dot + name] = _Target(buf, None)
    return targets


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file, from the shard index when there is one."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
        files = {name: path / fname for name, fname in weight_map.items()}
        missing_files = sorted({str(f.name) for f in files.values() if not f.exists()})
        if missing_files:
            raise CheckpointError(f"shard files listed in {INDEX_FILE} are missing: {', '.join(missing_files)}")
        return files
    single = path / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"no {INDEX_FILE} or {SINGLE_FILE} in {path}")
    with _open_safetensors(single) as f:
        return {name: single for name in f.keys()}


@contextlib.contextmanager
def _open_safetensors(file: Path) -> Iterator[Any]:
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for truncated / corrupt headers
        raise CheckpointError(f"cannot read {file.name}: {exc} (truncated or corrupt safetensors file?)") from None
    with handle as f:
        yield f


def _format(kind: str, names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    more = f" … and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return f"{kind} ({len(names)}): {shown}{more}"


def load_weights(model: nn.Module, path: Path) -> None:
    """Fill every parameter of ``model`` from the checkpoint at ``path``; strict on names and shapes."""
    targets = checkpoint_targets(model)
    files = _weight_files(path)
    present = {k for k in files if not k.endswith(IGNORED_SUFFIXES)}
    missing = sorted(set(targets) - present)
    unexpected = sorted(present - set(targets))
    problems = []
    if missing:
        problems.append(_format("missing tensors", missing))
    if unexpected:
        problems.append(_format("unexpected tensors", unexpected))

    by_file: dict[Path, list[str]] = {}
    for key in sorted(set(targets) & present):
        by_file.setdefault(files[key], []).append(key)
    wrong_shape: list[str] = []
    for file, keys in by_file.items():
        with _open_safetensors(file) as f:
            available = set(f.keys())
            for key in keys:
                if key not in available:
                    problems.append(f"{key} is listed in {INDEX_FILE} for {file.name} but not stored there")
                    continue
                target = targets[key]
                dest = target.tensor if target.index is None else target.tensor[target.index]
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(dest.shape):
                    wrong_shape.append(f"{key} has shape {shape}, expected {tuple(dest.shape)}")
                    continue
                if problems or wrong_shape:
                    continue  # keep scanning shapes to report everything at once, but skip the copy
                try:
                    tensor = f.get_tensor(key)
                except Exception as exc:
                    raise CheckpointError(f"cannot read tensor {key} from {file.name}: {exc}") from None
                if not (tensor.is_floating_point() or tensor.dtype == torch.bool):
                    raise CheckpointError(f"{key} has non-floating dtype {tensor.dtype}")
                with torch.no_grad():
                    dest.copy_(tensor)
    if wrong_shape:
        problems.append(_format("wrongly shaped tensors", wrong_shape))
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model: " + "; ".join(problems))


QUANTIZATIONS = ("none", "fp8")
_ATTENTION_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def _to_fp8(parent: nn.Module, name: str) -> None:
    child = getattr(parent, name, None)
    if isinstance(child, nn.Linear):
        setattr(parent, name, Fp8Linear.from_linear(child))


def _quantize_attention(attn: DeepseekV3Attention) -> None:
    """The fused q/kv layout (``fuse_qkv_``) is kept: the merged matrix is quantised once (per-row scales make
    that identical to quantising each part) and both layers' weights and scales are row views of it."""
    merged = attn.fused_qkv_weight
    if merged is not None:
        q, s = quantize_rows(merged.detach())
        n = attn.q_proj.out_features
        attn.q_proj = Fp8Linear(q[:n], s[:n])
        attn.kv_a_proj_with_mqa = Fp8Linear(q[n:], s[n:])
        attn._qkv_weight, attn._qkv_scale = q, s
    for name in _ATTENTION_LINEARS:
        _to_fp8(attn, name)


def _quantize_mlp(mlp: DeepseekV3MLP) -> None:
    """As :func:`_quantize_attention` for the merged gate/up layout (``fuse_gate_up_``)."""
    merged = mlp.gate_up_weight
    if merged is not None:
        q, s = quantize_rows(merged.detach())
        n = mlp.gate_proj.out_features
        mlp.gate_proj, mlp.up_proj = Fp8Linear(q[:n], s[:n]), Fp8Linear(q[n:], s[n:])
        mlp._gate_up, mlp._gate_up_scale = q, s
    for name in ("gate_proj", "up_proj", "down_proj"):
        _to_fp8(mlp, name)


@torch.no_grad()
def quantize_model_(model: KimiVLForConditionalGeneration, quantization: str | None) -> None:
    """Quantise the loaded decoder in place: every attention projection, the dense MLPs and shared experts,
    the routed expert banks and an untied lm_head become fp8 with per-output-row scales; embeddings, norms,
    the router and the vision tower keep their dtype. Idempotent; ``None``/"none" does nothing."""
    if quantization in (None, "none") or getattr(model, "quantization", None) == quantization:
        return
    if quantization != "fp8":
        raise ValueError(f"unsupported quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    lm = model.language_model
    for layer in lm.model.layers:
        _quantize_attention(layer.self_attn)
        mlp = layer.mlp
        if isinstance(mlp, DeepseekV3MoE):
            mlp.experts.quantize_fp8_()
            mlp = getattr(mlp, "shared_experts", None)
        if mlp is not None:
            _quantize_mlp(mlp)
    if lm.lm_head.weight is not lm.model.embed_tokens.weight:  # a tied head stays with the embedding's dtype
        _to_fp8(lm, "lm_head")
    model.quantization = quantization
    if model.device.type == "cuda":
        torch.cuda.empty_cache()  # the freed bf16 weights go back to the pool the KV cache is sized from


def resolve_checkpoint(path_or_id: str | os.PathLike[str]) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id fetched (or found in the HF cache)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.startswith((".", "/")) or text.count("/") != 1:
        raise CheckpointError(f"checkpoint directory {text} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise CheckpointError(f"{text} is not a local directory and huggingface_hub is not installed") from None
    patterns = ["*.json", "*.safetensors", "tiktoken.model", "*.jinja"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as exc:
        raise CheckpointError(f"could not fetch {text} from the Hugging Face Hub: {exc}") from None


def load_model(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> KimiVLForConditionalGeneration:
    root = resolve_checkpoint(path)
    return _load_model(root, load_config(root), device, dtype)


def _load_model(
    root: Path, config: KimiVLConfig, device: str | torch.device, dtype: str | torch.dtype | None
) -> KimiVLForConditionalGeneration:
    device = torch.device(device)
    model = build_empty_model(config, device, resolve_dtype(dtype, config, device))
    load_weights(model, root)
    return model


def load(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
    quantization: str | None = None,
) -> KimiVLBundle:
    """Model, processor and tokenizer from one checkpoint directory or HF id (``quantization``: see
    :func:`quantize_model_`)."""
    from engine.processor import KimiVLProcessor
    from engine.tokenizer import KimiTokenizer

    root = resolve_checkpoint(path)
    config = load_config(root)
    tokenizer = KimiTokenizer.from_pretrained(root)
    processor = KimiVLProcessor.from_pretrained(root, tokenizer)
    model = _load_model(root, config, device, dtype)
    quantize_model_(model, quantization)
    return KimiVLBundle(model=model, processor=processor, tokenizer=tokenizer, config=config, path=root)
