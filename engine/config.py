"""Typed view of an official Kimi-VL ``config.json`` and ``preprocessor_config.json``.

The official files are written by ``save_pretrained`` of the remote ``KimiVLConfig``; we parse them with
pydantic in strict JSON mode so a missing or wrongly typed field the model needs is an error that names it,
while unknown fields (``auto_map``, training-only knobs, newer additions) are kept and ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class ConfigError(ValueError):
    """A checkpoint's config file is missing, unreadable, or lacks / mistypes a field the model needs."""


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True, protected_namespaces=())


class VisionConfig(_Tolerant):
    """MoonViT settings (``vision_config``). Constants fixed in the official code are class attributes."""

    model_type: str = "moonvit"
    patch_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    init_pos_emb_height: int
    init_pos_emb_width: int
    merge_kernel_size: tuple[int, int] = (2, 2)

    # Hard-coded in the official MoonViT (not config fields).
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_max_grid: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @model_validator(mode="after")
    def _check(self) -> "VisionConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("vision_config.hidden_size must be divisible by num_attention_heads")
        if self.head_dim % 4:
            raise ValueError("vision_config head_dim must be divisible by 4 (2-D RoPE uses 4 dims per frequency)")
        return self


class YarnScaling(_Tolerant):
    """DeepSeek-style YaRN parameters (``rope_scaling`` with type/rope_type ``yarn``)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


class TextConfig(_Tolerant):
    """DeepSeek-V3 decoder settings (``text_config``)."""

    model_type: str = "deepseek_v3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int | None
    num_experts_per_tok: int | None
    n_shared_experts: int | None
    first_k_dense_replace: int
    moe_layer_freq: int = 1
    topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = "noaux_tc"
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    norm_topk_prob: bool
    routed_scaling_factor: float
    n_group: int | None = 1
    topk_group: int | None = 1
    hidden_act: Literal["silu"] = "silu"
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int
    rms_norm_eps: float
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> YarnScaling | None:
        """The YaRN parameters when the config asks for YaRN, else None (plain RoPE)."""
        if not self.rope_scaling:
            return None
        kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
        if kind in (None, "default"):
            return None
        if kind != "yarn":
            raise ConfigError(f"text_config.rope_scaling: unsupported type {kind!r} (supported: yarn)")
        try:
            return YarnScaling.model_validate_json(json.dumps(self.rope_scaling))
        except ValidationError as exc:
            raise ConfigError(_describe(exc, "text_config.rope_scaling")) from None

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: MoE iff experts exist, past the dense prefix, and on the layer frequency."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @model_validator(mode="after")
    def _check(self) -> "TextConfig":
        if self.n_routed_experts is not None:
            if not self.num_experts_per_tok:
                raise ValueError("text_config.num_experts_per_tok is required when n_routed_experts is set")
            groups = self.n_group or 1
            if self.n_routed_experts % groups:
                raise ValueError("text_config.n_routed_experts must be divisible by n_group")
            if (self.topk_group or 1) > groups:
                raise ValueError("text_config.topk_group must not exceed n_group")
        if self.qk_rope_head_dim % 2:
            raise ValueError("text_config.qk_rope_head_dim must be even")
        self.yarn  # validate rope_scaling eagerly
        return self


class KimiVLConfig(_Tolerant):
    """Top level of an official Kimi-VL ``config.json`` (``model_type: kimi_vl``)."""

    model_type: str = "kimi_vl"
    vision_config: VisionConfig
    text_config: TextConfig
    media_placeholder_token_id: int = 163605
    ignore_index: int = -100
    pad_token_id: int | None = 0
    torch_dtype: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "KimiVLConfig":
        if self.model_type != "kimi_vl":
            raise ValueError(f"model_type must be 'kimi_vl', got {self.model_type!r}")
        if not 0 <= self.media_placeholder_token_id < self.text_config.vocab_size:
            raise ValueError("media_placeholder_token_id must be inside text_config.vocab_size")
        return self

    @property
    def projector_input_size(self) -> int:
        kh, kw = self.vision_config.merge_kernel_size
        return self.vision_config.hidden_size * kh * kw


class ProcessorConfig(_Tolerant):
    """``preprocessor_config.json`` of ``KimiVLImageProcessor``."""

    patch_size: int = 14
    merge_kernel_size: tuple[int, int] = (2, 2)
    in_token_limit: int = 4096
    pad_input: bool = True
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _describe(exc: ValidationError, prefix: str) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        problems.append(f"{where}: {err['msg']}")
    return "invalid config: " + "; ".join(problems)


def _read_json(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not readable JSON: {exc}") from None
    return text


def parse_config(text_or_dict: str | dict[str, Any]) -> KimiVLConfig:
    """Parse config.json content; errors name every offending field (e.g. ``text_config.hidden_size``)."""
    text = text_or_dict if isinstance(text_or_dict, str) else json.dumps(text_or_dict)
    try:
        return KimiVLConfig.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, "")) from None


def load_config(checkpoint_dir: str | Path) -> KimiVLConfig:
    path = Path(checkpoint_dir) / "config.json"
    return parse_config(_read_json(path))


def load_processor_config(checkpoint_dir: str | Path) -> ProcessorConfig:
    """Read preprocessor_config.json; a checkpoint without one gets the Instruct defaults."""
    path = Path(checkpoint_dir) / "preprocessor_config.json"
    if not path.exists():
        return ProcessorConfig()
    try:
        return ProcessorConfig.model_validate_json(_read_json(path))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, "preprocessor_config")) from None
