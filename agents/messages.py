"""Engine-format chat messages <-> what a session stores.

The engine takes PIL images; a session stores JSON plus blobs. ``storable`` turns every in-memory image (PIL,
numpy) into PNG bytes so the SessionStore can move it to the blob store (``connectors.stores.media``); messages
read back with ``resolve_media=True`` carry bytes, which the processor accepts as they are.
"""

from __future__ import annotations

import io
from typing import Any


def _png(image: Any) -> bytes:
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        image = Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _is_image_object(value: Any) -> bool:
    from PIL import Image

    if isinstance(value, Image.Image):
        return True
    return type(value).__name__ == "ndarray"


def storable(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy of ``messages`` where images and video frames are bytes (PNG) instead of objects."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(dict(msg))
            continue
        parts: list[Any] = []
        for part in content:
            if not isinstance(part, dict):
                parts.append(part)
                continue
            part = dict(part)
            if part.get("type") == "image" and _is_image_object(part.get("image")):
                part["image"] = _png(part["image"])
            elif part.get("type") == "video":
                key = "frames" if "frames" in part else "video"
                frames = part.get(key)
                if hasattr(frames, "frames"):
                    if getattr(frames, "timestamps", None) is not None and "timestamps" not in part:
                        part["timestamps"] = list(frames.timestamps)
                    frames = frames.frames
                part.pop("frames", None)
                part["video"] = [_png(f) if _is_image_object(f) else f for f in (frames or [])]
            parts.append(part)
        out.append({**msg, "content": parts})
    return out


async def session_growth(sessions: Any, session_id: str, owner: str | None, usage: Any) -> int:
    """Tokens a turn added to a session: the whole conversation's size now (prompt + reply) minus what the session
    already counted."""
    if usage is None:
        return 0
    session = await sessions.get(session_id, owner)
    before = session.token_count if session is not None else 0
    return max(0, usage.prompt_tokens + usage.completion_tokens - before)


def text_of(messages: list[dict[str, Any]]) -> str:
    """All text of ``messages`` (for logs and summaries)."""
    chunks: list[str] = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            chunks.append(content)
        elif isinstance(content, list):
            chunks.extend(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "\n".join(c for c in chunks if c)
