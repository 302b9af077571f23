"""Strict loading of official-format checkpoints: every problem is an error that names the tensor or file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.loader import CheckpointError, checkpoint_targets, load_model, resolve_dtype
from engine.config import ConfigError, parse_config
from engine.tiny import official_tensor_shapes, tiny_config


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shard_of(checkpoint: Path, key: str) -> Path:
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    return checkpoint / index[key]


def _rewrite_shard(shard: Path, edit) -> None:
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_official_key_set_is_exactly_what_the_model_expects(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint, dtype=torch.float32)
    expected = official_tensor_shapes(tiny_config())
    assert set(checkpoint_targets(model)) == set(expected)


def test_loaded_values_equal_file_values(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint, dtype=torch.float32)
    key = "language_model.model.layers.2.mlp.experts.5.down_proj.weight"
    with safe_open(str(_shard_of(tiny_checkpoint, key)), framework="pt") as f:
        stored = f.get_tensor(key).float()
    assert torch.equal(model.language_model.model.layers[2].mlp.experts.down_proj[5], stored)
    bias_key = "language_model.model.layers.1.mlp.gate.e_score_correction_bias"
    gate = model.language_model.model.layers[1].mlp.gate
    assert gate.e_score_correction_bias.dtype == torch.float32
    with safe_open(str(_shard_of(tiny_checkpoint, bias_key)), framework="pt") as f:
        assert torch.equal(gate.e_score_correction_bias, f.get_tensor(bias_key))
    assert all(not p.is_meta for p in model.parameters())


def test_bf16_load_keeps_router_bias_fp32(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint, dtype="bfloat16")
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16
    assert model.language_model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.language_model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_missing_tensor_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    key = "language_model.model.layers.1.self_attn.kv_b_proj.weight"
    _rewrite_shard(_shard_of(ckpt, key), lambda t: t.pop(key))
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][key]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): " + key.replace(".", r"\.")):
        load_model(ckpt)


def test_unexpected_and_wrong_shape_are_all_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    extra = "language_model.model.layers.0.mlp.experts.0.gate_proj.weight"
    bad = "vision_tower.encoder.blocks.1.wqkv.weight"
    shard = _shard_of(ckpt, bad)

    def edit(tensors):
        tensors[bad] = torch.zeros(5, 5, dtype=torch.bfloat16)
        tensors[extra] = torch.zeros(2, 2, dtype=torch.bfloat16)

    _rewrite_shard(shard, edit)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][extra] = shard.name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as info:
        load_model(ckpt)
    message = str(info.value)
    assert f"unexpected tensors (1): {extra}" in message
    assert f"{bad} has shape (5, 5), expected (192, 64)" in message


def test_stray_rotary_keys_are_ignored(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    key = "language_model.model.layers.0.self_attn.rotary_emb.inv_freq"
    shard = _shard_of(ckpt, "language_model.lm_head.weight")
    _rewrite_shard(shard, lambda t: t.__setitem__(key, torch.ones(4)))
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][key] = shard.name
    index_path.write_text(json.dumps(index))
    load_model(ckpt)


def test_truncated_shard_is_a_clear_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    shard = _shard_of(ckpt, "language_model.lm_head.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(ckpt)


def test_missing_shard_file_and_empty_dir(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    shard = _shard_of(ckpt, "language_model.lm_head.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(ckpt)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        load_model(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "not-there")


def test_single_file_checkpoint_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    index_path = ckpt / "model.safetensors.index.json"
    files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    merged = {}
    for name in files:
        merged.update(load_file(str(ckpt / name)))
        (ckpt / name).unlink()
    index_path.unlink()
    save_file(merged, str(ckpt / "model.safetensors"))
    reference = load_model(tiny_checkpoint, dtype=torch.float32)
    single = load_model(ckpt, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(reference(ids), single(ids))


@pytest.mark.parametrize("dtype", ["int8", "float64", torch.int32, "bf16x"])
def test_wrong_dtype_request(dtype, tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model(tiny_checkpoint, dtype=dtype)


def test_dtype_defaults() -> None:
    cfg = parse_config(tiny_config())
    assert resolve_dtype(None, cfg, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, cfg, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", cfg, torch.device("cpu")) == torch.float16


def test_bad_config_in_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    raw = json.loads((ckpt / "config.json").read_text())
    del raw["text_config"]["qk_rope_head_dim"]
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="text_config.qk_rope_head_dim"):
        load_model(ckpt)


def test_load_bundle_has_model_processor_tokenizer(tiny_bundle) -> None:
    assert tiny_bundle.tokenizer.media_pad_id == tiny_bundle.config.media_placeholder_token_id
    assert tiny_bundle.tokenizer.vocab_size == tiny_bundle.config.text_config.vocab_size
    assert tiny_bundle.processor is not None
