"""Where an agent's input file comes from: inline base64, an uploaded blob, or a public URL (fetched under the
service's SSRF rules and ``limits``, ``ctx.limits``). Shared by the document and video agents."""

from __future__ import annotations

import base64
import binascii

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agents.base import AgentContext, AgentError
from connectors.errors import ClientInputError
from connectors.media import fetch_url


class FileInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("input", max_length=500)
    data: str = Field(..., description="the file's bytes, base64")
    content_type: str | None = None

    @field_validator("data")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("file.data must be base64") from None
        return value

    def bytes(self) -> bytes:
        return base64.b64decode(self.data)


def one_source(file: FileInput | None, url: str | None, blob: str | None) -> None:
    given = [name for name, value in (("file", file), ("url", url), ("blob", blob)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of file, url or blob (got {', '.join(given) or 'none'})")


async def load_source(ctx: AgentContext, file: FileInput | None, url: str | None, blob: str | None, *,
                      max_bytes: int, what: str, default_name: str) -> tuple[bytes, str]:
    """The input's bytes and a file name for outputs."""
    if file is not None:
        data = file.bytes()
        if len(data) > max_bytes:
            raise AgentError(f"the {what} is {len(data)} bytes, over the limit of {max_bytes}", code="too_large")
        return data, file.name
    if blob is not None:
        data = await ctx.blobs.get(ctx.owner, blob)
        if data is None:
            raise AgentError(f"blob {blob} not found (upload it with POST /v1/files)", code="blob_not_found")
        return data, default_name
    try:
        data = await fetch_url(url or "", ctx.limits, max_bytes=max_bytes, what=what)
    except ClientInputError as exc:
        raise AgentError(exc.message, code=exc.code) from None
    return data, (url or default_name).rstrip("/").rsplit("/", 1)[-1].split("?")[0] or default_name
