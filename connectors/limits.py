"""Input limits of the service (``limits`` in ray_config.yaml): what one request or task may bring in.

They live here, below the agents and the serving app, because media fetching (``connectors.media``), the OpenAI
message conversion (``connectors.openai_messages``) and the agents all enforce them; the service passes its
configured ``Limits`` down (``AgentContext.limits``) so an operator's settings reach every task.
"""

from __future__ import annotations

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
