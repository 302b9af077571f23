"""The runtime's boundary types: what a caller sends (``GenerateRequest``) and what it streams back (``Delta``)."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FinishReason = Literal["stop", "length", "cancelled", "error"]


class SamplingParams(BaseModel):
    """Per-request sampling settings; defaults are greedy."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20, description="top-N logprobs per generated token")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GenerateRequest(BaseModel):
    """One generation. ``messages`` are chat messages in the tokenizer's format (text, images, video frames)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    messages: list[Any] | None = Field(None, min_length=1)
    prompt_token_ids: list[int] | None = Field(
        None, min_length=1, description="an already tokenized prompt (text only), instead of messages"
    )
    max_tokens: int = Field(256, ge=1)
    fit_max_tokens: bool = Field(False, description=(
        "max_tokens is only an upper bound: lowered to what the context window (and the KV cache) leaves after "
        "the prompt. For callers that set no output length (OpenAI's absent max_tokens); an explicit length "
        "that does not fit stays an error"))
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    json_schema: dict[str, Any] | None = None
    session_id: str | None = None
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    add_generation_prompt: bool = True

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @model_validator(mode="after")
    def _one_prompt(self) -> "GenerateRequest":
        if (self.messages is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of messages or prompt_token_ids")
        return self

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, logprobs=self.logprobs,
        )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TokenLogprob(BaseModel):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = Field(default_factory=list)
    # the tokens' bytes, filled by the engine (which has the tokenizer) so API layers can show real tokens
    token_bytes: bytes | None = None
    top_bytes: list[bytes] | None = None


class Delta(BaseModel):
    """One streamed piece of a generation. The last one has ``finish_reason`` and ``usage`` set."""

    request_id: str
    text: str = ""
    reasoning_text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None
