"""The contract task's input, checked at submission (bad input is a 422, not a failed task)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.sources import FileInput, one_source
from pipelines.document.cuad import resolve_categories, user_schema_fields


class ContractInput(BaseModel):
    """One of ``file`` (inline base64), ``url`` (public http(s)) or ``blob`` (a ref from ``POST /v1/files``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    file: FileInput | None = None
    url: str | None = Field(None, max_length=4000, pattern=r"^https?://")
    blob: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="extract these fields instead "
                                                "of CUAD's categories (a JSON schema object with properties)")
    categories: list[str] | None = Field(None, min_length=1, description="a subset of CUAD categories (keys or names)")
    password: str | None = Field(None, max_length=500)
    unverified: Literal["mark", "drop"] = Field("mark", description="values whose quote is not found on the cited "
                                                "page: kept and marked unverified, or dropped")
    max_pages: int = Field(500, ge=1, le=10_000)
    truncate: bool = Field(False, description="over max_pages: read the first max_pages instead of failing")
    chunk_tokens: int | None = Field(None, ge=256, description="cap on a chunk's document tokens")
    overlap_tokens: int = Field(200, ge=0, le=8192)
    max_items_per_chunk: int = Field(16, ge=1, le=100)
    max_value_chars: int = Field(300, ge=10, le=4000)
    max_quote_chars: int = Field(400, ge=20, le=4000)
    max_output_tokens: int = Field(2048, ge=16, le=32768)

    @model_validator(mode="after")
    def _one_source(self) -> "ContractInput":
        one_source(self.file, self.url, self.blob)
        return self

    @field_validator("json_schema")
    @classmethod
    def _usable_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            user_schema_fields(value)  # raises ValueError naming the problem
        return value

    @field_validator("categories")
    @classmethod
    def _known_categories(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            resolve_categories(value)
        return value
