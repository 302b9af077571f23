from __future__ import annotations

import copy
import json

import pytest

from engine.config import ConfigError, load_config, parse_config
from engine.tiny import tiny_config


def test_tiny_config_parses_and_keeps_unknown_fields() -> None:
    raw = tiny_config()
    raw["some_future_field"] = {"x": 1}
    raw["text_config"]["another_new_knob"] = True
    cfg = parse_config(raw)
    assert cfg.text_config.yarn is not None and cfg.text_config.yarn.factor == 4.0
    assert cfg.vision_config.merge_kernel_size == (2, 2)
    assert [cfg.text_config.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert cfg.projector_input_size == 256


@pytest.mark.parametrize(
    ("section", "field"),
    [("text_config", "kv_lora_rank"), ("text_config", "hidden_size"), ("vision_config", "patch_size")],
)
def test_missing_field_is_named(section: str, field: str) -> None:
    raw = copy.deepcopy(tiny_config())
    del raw[section][field]
    with pytest.raises(ConfigError, match=rf"{section}\.{field}: Field required"):
        parse_config(raw)


def test_wrongly_typed_fields_are_all_named() -> None:
    raw = copy.deepcopy(tiny_config())
    raw["text_config"]["num_hidden_layers"] = "3"
    raw["vision_config"]["merge_kernel_size"] = [2, 2, 2]
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    message = str(info.value)
    assert "text_config.num_hidden_layers" in message
    assert "vision_config.merge_kernel_size" in message


def test_unsupported_rope_scaling_and_bad_json(tmp_path) -> None:
    raw = copy.deepcopy(tiny_config())
    raw["text_config"]["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    with pytest.raises(ConfigError, match="rope_scaling"):
        parse_config(raw)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nowhere")


def test_a3b_values_parse() -> None:
    """The A3B decoder config (spec §1.3) with rope_scaling null parses and has no YaRN."""
    raw = copy.deepcopy(tiny_config())
    raw["text_config"].update(
        vocab_size=163840, hidden_size=2048, num_hidden_layers=27, num_attention_heads=16, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, intermediate_size=11264,
        moe_intermediate_size=1408, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
        n_group=1, topk_group=1, rope_scaling=None, max_position_embeddings=131072,
    )
    raw["media_placeholder_token_id"] = 163605
    cfg = parse_config(json.dumps(raw))
    assert cfg.text_config.yarn is None and cfg.text_config.qk_head_dim == 192
