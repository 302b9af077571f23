"""Where an agent's input file comes from: inline base64, an uploaded blob, or a public URL (fetched under the
service's SSRF rules and ``limits``, ``ctx.limits``). Shared by the document and video agents."""

from __future__ import annotations

import base64
import binascii
import urllib.parse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agents.base import AgentContext, AgentError, InputRejected, SubmissionCheck
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


# Leading bytes of file types people hand over by mistake, for messages that say what the file is instead.
_SIGNATURES = ((b"%PDF-", "a PDF"), (b"PK\x03\x04", "a ZIP archive (e.g. a Word .docx or Excel .xlsx)"),
               (b"\xd0\xcf\x11\xe0", "an old Office document (.doc/.xls)"), (b"\x89PNG", "a PNG image"),
               (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"), (b"{\\rtf", "an RTF document"))


def file_kind(head: bytes) -> str | None:
    """What a file is by its first bytes, for the types in ``_SIGNATURES``; None when unknown."""
    if not head:
        return "empty"
    if b"%PDF-" in head[:1024]:  # the PDF spec lets the header start anywhere in the first KiB
        return "a PDF"
    return next((kind for magic, kind in _SIGNATURES if head.startswith(magic)), None)


def data_url_problem(url: str) -> str | None:
    """Why ``url`` is not a well-formed ``data:`` URL (``data:<type>[;base64],<payload>``), or None. Syntax only:
    whether the payload is an image the service can decode is the model server's check."""
    head, sep, payload = url.strip().partition(",")
    if not head.lower().startswith("data:") or not sep:
        return "malformed data URL (expected data:<type>;base64,<payload>)"
    if not payload.strip():
        return "data URL has no payload"
    if any(p.strip().lower() == "base64" for p in head[len("data:"):].split(";")[1:]):
        compact = "".join(payload.split())
        if "%" in compact:
            compact = urllib.parse.unquote(compact)
        compact = compact.translate(str.maketrans("-_", "+/"))  # base64url is accepted too
        try:
            base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            return "data URL has an invalid base64 payload"
    return None


def media_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a media reference (only ``data:`` and ``http(s)`` URLs are), or None."""
    if url.strip().lower().startswith("data:"):
        return data_url_problem(url)
    if not url.strip().lower().startswith(("http://", "https://")):
        return f"{url[:40]!r}: only data: and http(s) URLs are accepted"
    return None


def _part_urls(part: dict) -> list[str]:
    kind = part.get("type")
    if kind in ("image_url", "video_url"):
        ref = part.get(kind)
        return [ref.get("url") if isinstance(ref, dict) else ref]
    if kind == "video":
        video = part.get("video")
        frames = video.get("frames") if isinstance(video, dict) else video
        return [(f.get("image_url", f) or {}).get("url") if isinstance(f, dict) else f for f in frames or []]
    return []


def check_message_media(messages: list[dict]) -> None:
    """``ValueError`` naming the first media URL of OpenAI-format ``messages`` that cannot work (a malformed
    ``data:`` URL, a scheme other than data/http(s)): refused at submission, not when the task runs."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            for url in _part_urls(part) if isinstance(part, dict) else []:
                problem = media_url_problem(url) if isinstance(url, str) else "not a URL string"
                if problem:
                    raise ValueError(f"messages[{i}].content[{j}]: {problem}")


def one_source(file: FileInput | None, url: str | None, blob: str | None) -> None:
    given = [name for name, value in (("file", file), ("url", url), ("blob", blob)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of file, url or blob (got {', '.join(given) or 'none'})")


async def source_head(check: SubmissionCheck, file: FileInput | None, blob: str | None) -> tuple[bytes, str] | None:
    """At submission: the first KiB of an inline file or an uploaded blob, and the input field it came from;
    None for a URL (fetched only when the task runs). A blob the caller has not uploaded is refused here."""
    if file is not None:
        return file.bytes()[:1024], "file.data"
    if blob is not None:
        data = await check.blob(blob)
        if data is None:
            raise InputRejected(f"blob {blob} not found (upload the file with POST /v1/files first)", "blob")
        return data[:1024], "blob"
    return None


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
