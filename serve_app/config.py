"""Settings of the serving application, parsed from ray_config.yaml ``args`` (or built in code)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    """Input limits; anything over them is a 4xx with a JSON body naming the limit."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(32 * 2**20, ge=1024)
    max_images_per_request: int = Field(16, ge=0)
    max_image_pixels: int = Field(36_000_000, ge=1)
    max_image_bytes: int = Field(20 * 2**20, ge=1)
    max_video_frames: int = Field(64, ge=1)
    max_video_seconds: float = Field(600.0, gt=0)
    max_tokens_cap: int = Field(32768, ge=1)
    url_fetch_timeout_s: float = Field(10.0, gt=0)
    allow_private_urls: bool = False  # loopback, private, link-local and metadata addresses are refused unless set


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys_env: str = "KIMIRAY_API_KEYS"  # comma-separated keys
    keys_file_env: str = "KIMIRAY_API_KEYS_FILE"  # a file with one key per line
    requests_per_minute: int = Field(600, ge=1, description="per key")
    max_concurrent_per_key: int = Field(64, ge=1)


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="checkpoint dir or HF id; None = the tiny checkpoint")
    served_name: str = "kimi-vl"
    device: str | None = None  # None: cuda when the replica has a GPU, else cpu
    dtype: str | None = None
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineOptions fields")


class AppConfig(BaseModel):
    """Everything ``build_app`` needs; every field has a default so ``serve run`` works bare on one CPU."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    limits: Limits = Field(default_factory=Limits)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    request_timeout_s: float = Field(300.0, gt=0)
    host: str = "127.0.0.1"
