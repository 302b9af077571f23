"""Move large inline media of chat messages into the blob store, and back.

Why: session messages are stored as JSON rows / Redis list entries and read back whole; a few inline
screenshots or a video as base64 would make every read of the session megabytes. Media over a size threshold
is stored once, content-addressed, in the :class:`BlobStore` of the session's owner and the message keeps a
small ``blob_ref`` part. Small media stays inline (one round trip fewer), as a base64 ``data:`` URL when it
came as bytes, so the stored message is always JSON.

Where media is looked for (anything else is copied unchanged, http(s) URLs and paths included):

* ``{"type": "image_url", "image_url": {"url": <data URL>} | <data URL>}``                  kind ``image``
* ``{"type": "image", "image": <bytes | data URL | PIL image>}``                            kind ``image``
* ``{"type": "video_url", "video_url": {"url": <data URL>} | <data URL>}``                  kind ``video``
* ``{"type": "video", "video": <bytes | data URL>}`` (a video file)                          kind ``video``
* ``{"type": "video", "video" | "frames": [frame, ...] | {"frames": [...], ...}}``: each frame (bytes, data
  URL or PIL image) is handled like an image *in place* inside the frames list; the part keeps its shape
* ``{"type": "file", "file": <bytes | data URL> | {"file_data": <data URL | base64>, "filename"?}}``  ``file``
* bytes anywhere else in a message (e.g. a tool result) are handled like a ``file``, in place.

:func:`externalize` replaces a whole part over the threshold by::

    {"type": "blob_ref", "ref": <sha256 hex>, "content_type": str, "kind": "image"|"video"|"file",
     "size": int, "extra": {<the part's other keys, e.g. "detail", "filename", "fps">}?}

and a frame (or stray bytes) over the threshold by the same dict without ``extra``.

:func:`resolve` turns parts back into (``extra`` keys merged in)::

    kind image -> {"type": "image", "image": <bytes>}
    kind video -> {"type": "video", "video": <bytes of the file>, "content_type": str}
                  (a video *file*: decode / sample it to frames before giving it to the engine)
    kind file  -> {"type": "file", "file": <bytes>, "content_type": str}

and a nested ``blob_ref`` (a frame, stray bytes) into its bytes. A ref whose blob is gone raises
:class:`~connectors.stores.base.NotFound`.
"""

from __future__ import annotations

import base64
import binascii
import io
import sys
import urllib.parse
from typing import Any

from connectors.stores.base import BlobRef, BlobStore, NotFound

__all__ = ["externalize", "resolve", "sniff_content_type", "parse_data_url", "to_data_url"]

_MEDIA_PART_KEYS = {"image_url": "image", "image": "image", "video_url": "video", "video": "video", "file": "file"}

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"BM", 0, "image/bmp"),
    (b"%PDF-", 0, "application/pdf"),
    (b"\x1aE\xdf\xa3", 0, "video/webm"),
    (b"ftyp", 4, "video/mp4"),
)


def sniff_content_type(data: bytes, default: str = "application/octet-stream") -> str:
    """A media type from the first bytes (enough for the formats agents pass around)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, offset, ctype in _MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return ctype
    return default


def parse_data_url(url: str) -> tuple[str, bytes] | None:
    """``(media_type, payload)`` of a ``data:`` URL, ``None`` if ``url`` is not one (or is malformed)."""
    if not isinstance(url, str) or not url[:5].lower() == "data:":
        return None
    head, sep, payload = url.partition(",")
    if not sep:
        return None
    params = [p.strip() for p in head[5:].split(";")]
    media_type = params[0].lower()
    if any(p.lower() == "base64" for p in params[1:]):
        compact = "".join(payload.split())
        if "%" in compact:
            compact = urllib.parse.unquote(compact)
        compact = compact.translate(str.maketrans("-_", "+/"))
        compact += "=" * (-len(compact) % 4)
        try:
            return media_type, base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            return None
    return media_type, urllib.parse.unquote_to_bytes(payload)


def to_data_url(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def _pil_to_png(obj: Any) -> bytes | None:
    """PNG bytes of a PIL image (only checked when PIL is already imported: nothing else can make one)."""
    pil = sys.modules.get("PIL.Image")
    if pil is None or not isinstance(obj, pil.Image):
        return None
    buf = io.BytesIO()
    obj.save(buf, format="PNG")
    return buf.getvalue()


class _Externalizer:
    """One call of :func:`externalize`: the blob store, the owner, the threshold and the refs written."""

    def __init__(self, blobs: BlobStore, owner: str, threshold: int) -> None:
        self.blobs, self.owner, self.threshold = blobs, owner, threshold
        self.refs: dict[str, BlobRef] = {}

    def _raw(self, value: Any, default_type: str) -> tuple[bytes, str, bool] | None:
        """``(payload, content_type, was_data_url)`` when ``value`` is inline media, else ``None``."""
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            return data, sniff_content_type(data, default_type), False
        if isinstance(value, str):
            parsed = parse_data_url(value)
            if parsed is None:
                return None
            ctype, data = parsed
            return data, ctype or sniff_content_type(data, default_type), True
        png = _pil_to_png(value)
        if png is not None:
            return png, "image/png", False
        return None

    async def _store(self, data: bytes, ctype: str, kind: str) -> dict[str, Any]:
        ref = await self.blobs.put(self.owner, data, ctype)
        self.refs.setdefault(ref.ref, ref)
        return {"type": "blob_ref", "ref": ref.ref, "content_type": ctype, "kind": kind, "size": len(data)}

    async def value(self, value: Any, kind: str, default_type: str) -> tuple[Any, bool]:
        """A media value -> (stored form, externalized?). Small bytes become a data URL; small data URLs and
        anything that is not inline media are returned as they are."""
        raw = self._raw(value, default_type)
        if raw is None:
            return await self.generic(value), False
        data, ctype, was_url = raw
        if len(data) > self.threshold:
            return await self._store(data, ctype, kind), True
        return (value if was_url else to_data_url(data, ctype)), False

    async def generic(self, value: Any) -> Any:
        """Deep copy that externalizes stray bytes (as ``file``) so the result is JSON."""
        if isinstance(value, dict):
            return {k: await self.generic(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [await self.generic(v) for v in value]
        if isinstance(value, (bytes, bytearray, memoryview)):
            return (await self.value(value, "file", "application/octet-stream"))[0]
        if hasattr(value, "model_dump") and callable(value.model_dump):
            return await self.generic(value.model_dump())
        png = _pil_to_png(value)
        if png is not None:
            return (await self.value(png, "image", "image/png"))[0]
        return value

    async def frames(self, frames: Any) -> list[Any]:
        return [(await self.value(f, "image", "image/png"))[0] for f in frames]

    async def part(self, part: Any) -> Any:
        if hasattr(part, "model_dump") and callable(part.model_dump):
            part = part.model_dump()
        if not isinstance(part, dict):
            return await self.generic(part)
        ptype = part.get("type") or next((k for k in _MEDIA_PART_KEYS if k in part), None)
        if ptype not in _MEDIA_PART_KEYS:
            return await self.generic(part)
        kind = _MEDIA_PART_KEYS[ptype]
        key = ptype if ptype in part else ("frames" if ptype == "video" and "frames" in part else None)
        if key is None:
            return await self.generic(part)
        rest = {k: v for k, v in part.items() if k not in (key, "type")}
        value = part[key]

        if ptype == "video" and not isinstance(value, (str, bytes, bytearray, memoryview)):
            if hasattr(value, "frames") and not isinstance(value, dict):  # engine.processor.VideoFrames
                ts = getattr(value, "timestamps", None)
                value = {"frames": list(value.frames), **({"timestamps": list(ts)} if ts is not None else {})}
            if isinstance(value, (list, tuple)):
                return {"type": "video", **await self.generic(rest), key: await self.frames(value)}
            if isinstance(value, dict) and isinstance(value.get("frames"), (list, tuple)):
                inner = await self.generic({k: v for k, v in value.items() if k != "frames"})
                frames = await self.frames(value["frames"])
                return {"type": "video", **await self.generic(rest), key: {**inner, "frames": frames}}
            if not (isinstance(value, dict) and "url" in value):  # {"url": ...} is handled below
                return await self.generic(part)

        # where the payload sits: the value itself, value["url"] (image_url / video_url) or value["file_data"]
        inner_key = None
        if isinstance(value, dict):
            inner_key = "url" if "url" in value else "file_data" if ptype == "file" and "file_data" in value else None
            if inner_key is None:
                return await self.generic(part)
            payload = value[inner_key]
            if inner_key == "file_data" and isinstance(payload, str) and parse_data_url(payload) is None:
                try:  # OpenAI file parts carry bare base64
                    payload = base64.b64decode(payload, validate=True)
                except (binascii.Error, ValueError):
                    return await self.generic(part)
        else:
            payload = value
        default_type = {"image": "image/png", "video": "video/mp4"}.get(kind, "application/octet-stream")
        stored, moved = await self.value(payload, kind, default_type)
        if moved:
            extra = await self.generic(rest)
            if isinstance(value, dict):
                extra.update(await self.generic({k: v for k, v in value.items() if k != inner_key}))
            return {**stored, **({"extra": extra} if extra else {})}
        if isinstance(value, dict):
            if inner_key == "file_data" and isinstance(stored, str) and payload is not value[inner_key]:
                stored = value[inner_key]  # small bare base64: keep it as the client sent it
            return {"type": ptype, **await self.generic(rest), key: {**await self.generic(value), inner_key: stored}}
        return {"type": ptype, **await self.generic(rest), key: stored}


async def externalize(
    messages: list[dict[str, Any]], blobs: BlobStore, owner: str, threshold: int
) -> tuple[list[dict[str, Any]], list[BlobRef]]:
    """A JSON-ready copy of ``messages`` with media over ``threshold`` bytes moved to ``blobs`` (see module
    docstring for the shapes), and the refs written (each once). ``messages`` is not modified."""
    ex = _Externalizer(blobs, owner, threshold)
    out: list[dict[str, Any]] = []
    for msg in messages:
        if hasattr(msg, "model_dump") and callable(msg.model_dump):
            msg = msg.model_dump()
        copy = {k: await ex.generic(v) for k, v in msg.items() if k != "content"}
        if "content" in msg:
            content = msg["content"]
            if isinstance(content, (list, tuple)):
                copy["content"] = [await ex.part(p) for p in content]
            else:
                copy["content"] = await ex.generic(content)
        out.append(copy)
    return out, list(ex.refs.values())


def _is_ref(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") == "blob_ref" and isinstance(value.get("ref"), str)


async def _load(ref: dict[str, Any], blobs: BlobStore, owner: str) -> bytes:
    data = await blobs.get(owner, ref["ref"])
    if data is None:
        raise NotFound(f"blob {ref['ref']} is gone")
    return data


async def _resolve_nested(value: Any, blobs: BlobStore, owner: str) -> Any:
    if _is_ref(value):
        return await _load(value, blobs, owner)
    if isinstance(value, dict):
        return {k: await _resolve_nested(v, blobs, owner) for k, v in value.items()}
    if isinstance(value, list):
        return [await _resolve_nested(v, blobs, owner) for v in value]
    return value


async def _resolve_part(part: Any, blobs: BlobStore, owner: str) -> Any:
    if not _is_ref(part):
        return await _resolve_nested(part, blobs, owner)
    data = await _load(part, blobs, owner)
    kind = part.get("kind", "file")
    ctype = part.get("content_type", "application/octet-stream")
    extra = part.get("extra") or {}
    if kind == "image":
        return {**extra, "type": "image", "image": data}
    if kind == "video":
        return {**extra, "type": "video", "video": data, "content_type": ctype}
    return {**extra, "type": "file", "file": data, "content_type": ctype}


async def resolve(messages: list[dict[str, Any]], blobs: BlobStore, owner: str) -> list[dict[str, Any]]:
    """The reverse of :func:`externalize`: ``blob_ref`` parts become media parts with bytes (module docstring)."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        copy = dict(msg)
        content = msg.get("content")
        if isinstance(content, list):
            copy["content"] = [await _resolve_part(p, blobs, owner) for p in content]
        elif content is not None:
            copy["content"] = await _resolve_nested(content, blobs, owner)
        out.append(copy)
    return out
