"""Count prompt tokens exactly as the engine does, and cut long inputs into chunks that fit the context window.

Why here and not in the engine: agents must know *before* a model call whether it fits (a 128K-token contract
or an hour of video frames does not), and must cut such inputs deterministically so that a resumed job gets
the same chunks again. Counting reuses the engine's own pieces - the tokenizer's chat template, the processor's
media collection and ``num_image_tokens`` - but never builds pixel tensors: an image's token count follows from
its size alone, which is read from the file header.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from engine.processor import (
    ImageInputError,
    KimiVLProcessor,
    ProcessorError,
    collect_media,
    load_image,
    num_image_tokens,
)

__all__ = [
    "TokenCounter",
    "ContextBudget",
    "ContextOverflow",
    "PieceTooLarge",
    "Piece",
    "Chunk",
    "ContextPlanner",
    "split_text",
    "image_size",
    "media_digest",
]

_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # transposes / 90-degree rotations swap width and height


# ------------------------------------------------------------------------------------------------ errors


class ContextOverflow(ValueError):
    """A prompt (or one piece of content) would not fit the context window.

    ``tokens``: what it needs; ``limit``: the most it may have.
    """

    def __init__(self, message: str, *, tokens: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.tokens = tokens
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:  # keep the fields across pickling (Ray ships errors between workers)
        return (self.__class__, (str(self),), dict(self.__dict__))


class PieceTooLarge(ContextOverflow):
    """One piece that cannot be split (an image, a single video frame) is larger than a whole chunk."""

    def __init__(self, message: str, *, piece_id: str = "", tokens: int = 0, limit: int = 0) -> None:
        super().__init__(message, tokens=tokens, limit=limit)
        self.piece_id = piece_id


# ------------------------------------------------------------------------------------------ image sizes


def _oriented(im: Image.Image) -> tuple[int, int]:
    """Size after ``ImageOps.exif_transpose`` (which ``load_image`` applies), without decoding pixels."""
    w, h = im.size
    try:
        # PNG's getexif() decodes the whole image when the header held no EXIF; the base class only reads
        # what the header gave (an eXIf chunk after the pixel data is the one case this misses).
        exif = Image.Image.getexif(im) if im.format == "PNG" else im.getexif()
        orientation = exif.get(_EXIF_ORIENTATION, 1)
    except Exception:  # the processor ignores malformed EXIF too
        orientation = 1
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def _lazy_open(source: Any) -> Image.Image | None:
    """Open encoded bytes / a file / a data URL reading only the header; None for anything else."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)))
    if isinstance(source, str):
        text = source.strip()
        low = text[:16].lower()
        if low.startswith("data:"):
            from engine.processor import _decode_data_url  # the processor's own parser, so both agree

            return Image.open(io.BytesIO(_decode_data_url(text)))
        if low.startswith(("http://", "https://")):
            return None
        if low.startswith("file://"):
            from urllib.parse import unquote, urlparse

            source = unquote(urlparse(text).path)
    if isinstance(source, (str, os.PathLike)):
        return Image.open(Path(source))
    return None


def image_size(source: Any, *, max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` of an image as :func:`engine.processor.load_image` would return it, read cheaply.

    Anything unusual (remote URLs, corrupt or oversize data, odd arrays) goes through ``load_image`` itself, so
    the counter raises exactly the processor's :class:`ImageInputError` (it checks sizes before decoding).
    """
    size: tuple[int, int] | None = None
    if isinstance(source, Image.Image):
        size = _oriented(source)
    elif isinstance(source, np.ndarray):
        if source.ndim == 2 or (source.ndim == 3 and 1 <= source.shape[-1] <= 4):
            size = (int(source.shape[1]), int(source.shape[0]))
    else:
        try:
            im = _lazy_open(source)
        except Exception:  # unreadable: let load_image produce its precise error
            im = None
        if im is not None:
            with im:
                size = _oriented(im)
    if size is None or size[0] <= 0 or size[1] <= 0 or (max_pixels is not None and size[0] * size[1] > max_pixels):
        size = load_image(source, max_pixels=max_pixels).size  # raises the processor's error, or decodes
    return size


def media_digest(obj: Any) -> str:
    """Stable sha256 of a media source's *content* (not its identity), for fingerprints."""
    h = hashlib.sha256()
    if isinstance(obj, Image.Image):
        h.update(f"pil:{obj.mode}:{obj.size}".encode())
        h.update(obj.tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(f"np:{obj.dtype.str}:{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        h.update(b"bytes:")
        h.update(bytes(obj))
    elif isinstance(obj, (str, os.PathLike)):
        path = Path(obj) if not str(obj).startswith("data:") else None
        if path is not None and len(str(obj)) < 4096 and path.is_file():
            h.update(b"file:")
            h.update(path.read_bytes())
        else:
            h.update(b"str:")
            h.update(str(obj).encode())
    elif isinstance(obj, dict):  # e.g. image_url {"url": ...}
        h.update(b"dict:")
        for k in sorted(obj):
            h.update(k.encode())
            h.update(media_digest(obj[k]).encode())
    else:
        h.update(f"other:{type(obj).__qualname__}:{obj!r}".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ counting


class TokenCounter:
    """Exact prompt-token counts for chat messages, equal to ``processor(messages).input_ids.shape[-1]``.

    Text goes through the real chat template and tokenizer; each image / video frame adds the processor's
    ``num_image_tokens`` for its size (minus the one ``<|media_pad|>`` the template already rendered).
    """

    def __init__(self, tokenizer: Any, processor: KimiVLProcessor) -> None:
        self.tokenizer = tokenizer
        self.processor = processor
        self._pad = int(tokenizer.media_pad_id)
        self._empty_user: int | None = None

    @classmethod
    def from_bundle(cls, bundle: Any) -> "TokenCounter":
        return cls(bundle.tokenizer, bundle.processor)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **processor_kwargs: Any) -> "TokenCounter":
        """Tokenizer + processor settings of a checkpoint directory (or HF id); the weights are never read."""
        from engine.tokenizer import KimiTokenizer

        root = Path(path).expanduser()
        if not root.is_dir():
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(str(path), allow_patterns=["*.json", "tiktoken.model", "*.jinja"]))
        tokenizer = KimiTokenizer.from_pretrained(root)
        return cls(tokenizer, KimiVLProcessor.from_pretrained(root, tokenizer, **processor_kwargs))

    # -- pieces -------------------------------------------------------------------------------------------
    def count_text(self, text: str) -> int:
        """Tokens of ``text`` on its own, as message text (special-token strings are plain text, as in the engine)."""
        return len(self.tokenizer.encode(text, allow_special=False))

    def count_image(self, width: int, height: int, *, video_frame: bool = False) -> int:
        """``<|media_pad|>`` tokens of one ``width`` x ``height`` image (the media block adds a few more)."""
        limit = self.processor.video_in_token_limit if video_frame else None
        return num_image_tokens(int(width), int(height), self.processor.cfg, in_token_limit=limit)

    def image_tokens(self, source: Any, *, video_frame: bool = False) -> int:
        """``count_image`` of an image source (PIL / bytes / path / data URL / array), size read from its header."""
        w, h = image_size(source, max_pixels=self.processor.max_pixels)
        return self.count_image(w, h, video_frame=video_frame)

    # -- whole prompts ------------------------------------------------------------------------------------
    def count_messages(self, messages: Sequence[Any], add_generation_prompt: bool = True) -> int:
        """Prompt tokens of a whole chat, the same number the engine's processor produces."""
        messages = list(messages)
        media = collect_media(messages)
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
        pads = ids.count(self._pad)
        if pads != len(media):
            raise ProcessorError(
                f"the rendered prompt has {pads} media placeholders but the messages carry {len(media)} images/frames"
            )
        extra = 0
        for k, m in enumerate(media):
            try:
                extra += self.image_tokens(m.source, video_frame=m.is_video_frame) - 1
            except ImageInputError as exc:
                raise ImageInputError(f"image #{k}: {exc}") from None
        return len(ids) + extra

    def count_parts(self, parts: list[dict[str, Any]]) -> int:
        """Tokens that content ``parts`` add to a user message (exact when the parts stand alone)."""
        if self._empty_user is None:
            self._empty_user = self.count_messages([{"role": "user", "content": []}], add_generation_prompt=False)
        full = self.count_messages([{"role": "user", "content": parts}], add_generation_prompt=False)
        return full - self._empty_user


# -------------------------------------------------------------------------------------------------- budget


class ContextBudget(BaseModel):
    """How many prompt tokens a call may use: the window minus room for the answer and a safety margin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    context_window: int = Field(131072, gt=0)
    output_reserve: int = Field(4096, ge=0)
    safety_margin: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _room_left(self) -> "ContextBudget":
        if self.output_reserve + self.safety_margin >= self.context_window:
            raise ValueError(
                f"output_reserve ({self.output_reserve}) + safety_margin ({self.safety_margin}) must be smaller "
                f"than context_window ({self.context_window})"
            )
        return self

    @property
    def available(self) -> int:
        """Prompt tokens a call may use when it asks for ``output_reserve`` new tokens."""
        return self.context_window - self.output_reserve - self.safety_margin

    def prompt_limit(self, max_tokens: int | None = None) -> int:
        """Prompt tokens allowed for a call generating up to ``max_tokens`` (default ``output_reserve``)."""
        reserve = self.output_reserve if max_tokens is None else int(max_tokens)
        return self.context_window - reserve - self.safety_margin


# ------------------------------------------------------------------------------------------ pieces, chunks


class Piece(BaseModel):
    """One ordered unit of content: a paragraph, a page's text, a page image, a run of video frames.

    ``boundary`` is the strength of the break *before* this piece (0 = mid-text, 1 = new paragraph,
    2 = new section / page, higher = stronger); chunks prefer to end right before a strong one.
    ``label`` (e.g. ``"[page 3]"``) is rendered on its own line before the content and repeated on every part
    of a split piece; ``meta`` is for the caller (page number, timestamps) and is part of the fingerprint.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    id: str = Field(min_length=1)
    kind: Literal["text", "image", "frames"] = "text"
    text: str | None = None
    image: Any = None
    frames: list[Any] | None = None
    timestamps: list[float | str] | None = None
    label: str | None = None
    boundary: int = Field(0, ge=0)
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _content_matches_kind(self) -> "Piece":
        if self.kind == "text" and self.text is None:
            raise ValueError(f"text piece {self.id!r} needs 'text'")
        if self.kind == "image" and self.image is None:
            raise ValueError(f"image piece {self.id!r} needs 'image'")
        if self.kind == "frames":
            if not self.frames:
                raise ValueError(f"frames piece {self.id!r} needs a non-empty 'frames' list")
            if self.timestamps is not None and len(self.timestamps) != len(self.frames):
                raise ValueError(f"frames piece {self.id!r}: {len(self.timestamps)} timestamps for "
                                 f"{len(self.frames)} frames")
        return self

    def parts(self) -> list[dict[str, Any]]:
        """Chat content parts of this piece (the engine's message format)."""
        out: list[dict[str, Any]] = []
        if self.label:
            out.append({"type": "text", "text": f"{self.label}\n"})
        if self.kind == "text":
            out.append({"type": "text", "text": self.text})
        elif self.kind == "image":
            out.append({"type": "image", "image": self.image})
        else:
            item: dict[str, Any] = {"type": "video", "video": list(self.frames or [])}
            if self.timestamps is not None:
                item["timestamps"] = list(self.timestamps)
            out.append(item)
        return out

    def digest(self) -> str:
        """sha256 of everything that reaches the model (plus ``meta``)."""
        body = {
            "id": self.id,
            "kind": self.kind,
            "text": self.text,
            "label": self.label,
            "image": media_digest(self.image) if self.image is not None else None,
            "frames": [media_digest(f) for f in self.frames] if self.frames else None,
            "timestamps": self.timestamps,
            "meta": self.meta,
        }
        return _sha256_json(body)


def _json_default(obj: Any) -> Any:
    return media_digest(obj)


def _sha256_json(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def _messages_digest(messages: Sequence[Any]) -> str:
    """Digest of fixed prefix / suffix messages (instructions, schema): changing them changes every chunk."""
    plain = []
    for m in messages:
        m = m.model_dump() if isinstance(m, BaseModel) else m
        plain.append(m)
    return _sha256_json(plain)


class Chunk(BaseModel):
    """One model call's worth of pieces.

    ``token_count`` is the exact prompt size of :meth:`messages` (prefix + chunk + suffix + generation prompt).
    The first ``overlap`` pieces repeat the end of the previous chunk. ``fingerprint`` is a sha256 of the
    chunk's content and of the prefix/suffix it was planned with, so a resumed job can tell it is unchanged.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    index: int
    piece_ids: list[str]
    overlap: int = 0
    token_count: int
    fingerprint: str
    joiner: str = "\n\n"
    pieces: list[Piece] = Field(default_factory=list, exclude=True, repr=False)

    _prefix: list[Any] = PrivateAttr(default_factory=list)
    _suffix: list[Any] = PrivateAttr(default_factory=list)

    @property
    def new_piece_ids(self) -> list[str]:
        """Pieces this chunk is the first to cover (without the overlap)."""
        return self.piece_ids[self.overlap:]

    def content(self) -> list[dict[str, Any]]:
        """Content parts of the chunk's user message: the pieces, separated by ``joiner``."""
        return _chunk_parts(self.pieces, self.joiner)

    def messages(self, prefix: Sequence[Any] | None = None, suffix: Sequence[Any] | None = None) -> list[Any]:
        """``prefix + [user message with the chunk] + suffix``; by default the prefix/suffix used by ``plan``.

        Passing a different (larger) prefix or suffix can make the call overflow: check it with the planner.
        """
        pre = list(self._prefix if prefix is None else prefix)
        suf = list(self._suffix if suffix is None else suffix)
        return [*pre, {"role": "user", "content": self.content()}, *suf]


def _chunk_parts(pieces: Sequence[Piece], joiner: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for k, piece in enumerate(pieces):
        if k and joiner:
            parts.append({"type": "text", "text": joiner})
        parts.extend(piece.parts())
    return parts


# ---------------------------------------------------------------------------------------------- text split

# Cut points, strongest first; each cut keeps its separator on the left, so "".join(parts) == text.
_SPLIT_LEVELS = (
    re.compile(r"\n[ \t]*\n+"),  # paragraphs
    re.compile(r"\n"),  # lines
    re.compile(r"(?<=[.!?;:\u3002\uff01\uff1f\uff1b])\s+"),  # sentences
    re.compile(r"\s+"),  # words
)


def _cut(text: str, pattern: re.Pattern[str]) -> list[str]:
    ends = [m.end() for m in pattern.finditer(text) if 0 < m.end() < len(text)]
    bounds = [0, *ends, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _hard_split(text: str, limit: int, count: Callable[[str], int]) -> list[tuple[str, int]]:
    """Longest prefixes that fit ``limit`` tokens, by binary search on characters (text with no spaces)."""
    out: list[tuple[str, int]] = []
    while text:
        n = count(text)
        if n <= limit:
            out.append((text, n))
            break
        lo, hi = 1, len(text)  # find the largest k with count(text[:k]) <= limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(text[:mid]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        out.append((text[:lo], count(text[:lo])))
        text = text[lo:]
    return out


def _segments(text: str, level: int, limit: int, count: Callable[[str], int]) -> list[tuple[str, int]]:
    n = count(text)
    if n <= limit:
        return [(text, n)]
    if level == len(_SPLIT_LEVELS):
        return _hard_split(text, limit, count)
    segs = _cut(text, _SPLIT_LEVELS[level])
    if len(segs) == 1:
        return _segments(text, level + 1, limit, count)
    out: list[tuple[str, int]] = []
    for seg in segs:
        out.extend(_segments(seg, level + 1, limit, count))
    return out


def split_text(text: str, max_tokens: int, count: Callable[[str], int]) -> list[str]:
    """Cut ``text`` into parts of at most ``max_tokens`` tokens each (``count`` measures a string).

    Cuts fall at paragraph ends if possible, else line ends, sentence ends, spaces, and only as a last resort
    inside a word. Parts are packed greedily and ``"".join(parts) == text``.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    segs = _segments(text, 0, max_tokens, count)
    parts: list[str] = []
    i = 0
    while i < len(segs):
        j, total = i, 0
        while j < len(segs) and total + segs[j][1] <= max_tokens:
            total += segs[j][1]
            j += 1
        j = max(j, i + 1)
        part = "".join(s for s, _ in segs[i:j])
        while j - i > 1 and count(part) > max_tokens:  # BPE across a seam can cost more than the sum
            j -= 1
            part = "".join(s for s, _ in segs[i:j])
        parts.append(part)
        i = j
    return parts


# ------------------------------------------------------------------------------------------------- planner


class ContextPlanner:
    """Checks single calls against a :class:`ContextBudget` and plans chunked calls over long content.

    ``joiner`` separates pieces inside a chunk. ``min_fill``: a chunk ends at the strongest boundary found
    once it holds at least this fraction of the room it could hold (latest such boundary on ties).
    """

    def __init__(
        self, counter: TokenCounter, budget: ContextBudget | None = None, *, joiner: str = "\n\n",
        min_fill: float = 0.5,
    ) -> None:
        if not 0.0 <= min_fill <= 1.0:
            raise ValueError("min_fill must be within [0, 1]")
        self.counter = counter
        self.budget = budget or ContextBudget()
        self.joiner = joiner
        self.min_fill = min_fill

    # -- single calls -------------------------------------------------------------------------------------
    def count(self, messages: Sequence[Any]) -> int:
        return self.counter.count_messages(messages)

    def fits(self, messages: Sequence[Any], max_tokens: int | None = None) -> bool:
        return self.count(messages) <= self.budget.prompt_limit(max_tokens)

    def check(self, messages: Sequence[Any], max_tokens: int | None = None) -> int:
        """Prompt tokens of ``messages``; raises :class:`ContextOverflow` if the call would overflow."""
        tokens = self.count(messages)
        limit = self.budget.prompt_limit(max_tokens)
        if tokens > limit:
            reserve = self.budget.output_reserve if max_tokens is None else max_tokens
            raise ContextOverflow(
                f"prompt has {tokens} tokens but at most {limit} fit: context window "
                f"{self.budget.context_window} - max_tokens {reserve} - safety margin {self.budget.safety_margin}",
                tokens=tokens, limit=limit,
            )
        return tokens

    # -- chunked calls ------------------------------------------------------------------------------------
    def plan(
        self,
        pieces: Iterable[Piece | dict[str, Any]],
        *,
        prefix_messages: Sequence[Any],
        suffix_messages: Sequence[Any] = (),
        overlap_tokens: int = 0,
        split_tokens: int | None = None,
    ) -> list[Chunk]:
        """Ordered ``pieces`` -> chunks whose ``messages()`` each fit ``budget.available`` prompt tokens.

        The chunk's content is one user message between ``prefix_messages`` and ``suffix_messages``.
        ``overlap_tokens``: the trailing pieces of chunk k worth up to that many tokens open chunk k+1 again.
        Text pieces larger than a chunk (or than ``split_tokens`` if given) are split into parts
        ``<id>#<n>`` of at most ``split_tokens`` tokens (default: ``overlap_tokens`` if set, else a quarter of
        a chunk), so overlap can still repeat a part; frames pieces are split into runs of frames likewise.
        An image (or one frame) larger than a chunk raises :class:`PieceTooLarge`.
        """
        if overlap_tokens < 0:
            raise ValueError("overlap_tokens must be >= 0")
        pieces = [p if isinstance(p, Piece) else Piece.model_validate(p) for p in pieces]
        seen: set[str] = set()
        for p in pieces:
            if p.id in seen:
                raise ValueError(f"duplicate piece id {p.id!r}")
            seen.add(p.id)
        prefix, suffix = list(prefix_messages), list(suffix_messages)

        available = self.budget.available
        fixed = self.counter.count_messages([*prefix, {"role": "user", "content": []}, *suffix])
        room = available - fixed
        if room <= 0:
            raise ContextOverflow(
                f"the prefix and suffix messages alone use {fixed} of the {available} available tokens",
                tokens=fixed, limit=available,
            )
        part_tokens = split_tokens or (overlap_tokens if overlap_tokens > 0 else max(1, room // 4))
        part_tokens = max(1, min(part_tokens, room))
        threshold = room if split_tokens is None else min(split_tokens, room)

        units: list[Piece] = []
        costs: list[int] = []
        for piece in pieces:
            for unit, cost in self._units(piece, threshold, part_tokens, room):
                units.append(unit)
                costs.append(cost)
        if not units:
            return []

        ctx = _messages_digest([*prefix, {"joiner": self.joiner}, *suffix])
        joiner_cost = self.counter.count_text(self.joiner) if self.joiner else 0
        return self._pack(units, costs, joiner_cost, room, available, overlap_tokens, prefix, suffix, ctx)

    def _units(self, piece: Piece, threshold: int, part_tokens: int, room: int) -> list[tuple[Piece, int]]:
        """The piece, or its parts if it is too large, each with its token cost."""
        try:
            cost = self.counter.count_parts(piece.parts())
        except ImageInputError as exc:
            raise ImageInputError(f"piece {piece.id!r}: {exc}") from None
        if cost <= threshold:
            return [(piece, cost)]
        if piece.kind == "image":
            raise PieceTooLarge(
                f"image piece {piece.id!r} needs {cost} tokens but a chunk has room for {room} "
                "(shrink the image or the prefix/suffix, or raise the budget)",
                piece_id=piece.id, tokens=cost, limit=room,
            )
        if piece.kind == "frames":
            return self._split_frames(piece, part_tokens, room)
        return self._split_text_piece(piece, part_tokens, room)

    def _split_text_piece(self, piece: Piece, part_tokens: int, room: int) -> list[tuple[Piece, int]]:
        label_cost = self.counter.count_text(f"{piece.label}\n") if piece.label else 0
        limit = part_tokens - label_cost
        for _ in range(4):  # parts are measured exactly; shrink the target if a seam cost more
            if limit < 1:
                break
            texts = split_text(piece.text or "", limit, self.counter.count_text)
            parts = [
                piece.model_copy(update={
                    "id": f"{piece.id}#{k}",
                    "text": t,
                    "boundary": piece.boundary if k == 0 else 0,
                    "meta": {**piece.meta, "source_id": piece.id, "part": k, "parts": len(texts)},
                })
                for k, t in enumerate(texts)
            ]
            costs = [self.counter.count_parts(p.parts()) for p in parts]
            excess = max(costs) - part_tokens
            if excess <= 0:
                return list(zip(parts, costs))
            limit -= excess
        raise PieceTooLarge(
            f"text piece {piece.id!r} cannot be split into parts of {part_tokens} tokens (its label is too long?)",
            piece_id=piece.id, tokens=label_cost, limit=room,
        )

    def _split_frames(self, piece: Piece, part_tokens: int, room: int) -> list[tuple[Piece, int]]:
        """Runs of consecutive frames of at most ``part_tokens`` tokens (one frame may use a whole chunk)."""
        frames = list(piece.frames or [])
        stamps = list(piece.timestamps) if piece.timestamps is not None else None
        label_cost = self.counter.count_text(f"{piece.label}\n") if piece.label else 0
        frame_costs = [
            self.counter.count_parts(self._frames_part(piece.model_copy(update={"label": None}), frames, stamps,
                                                       i, i + 1, 0).parts())
            for i in range(len(frames))
        ]
        out: list[tuple[Piece, int]] = []
        a = 0
        while a < len(frames):
            b, total = a, label_cost
            while b < len(frames) and (b == a or total + frame_costs[b] <= part_tokens):
                total += frame_costs[b]
                b += 1
            while True:  # exact check of the run; drop frames from its end if a seam cost more
                part = self._frames_part(piece, frames, stamps, a, b, len(out))
                cost = self.counter.count_parts(part.parts())
                if cost <= (part_tokens if b - a > 1 else room):
                    break
                if b - a == 1:
                    raise PieceTooLarge(
                        f"frame {a} of piece {piece.id!r} needs {cost} tokens but a chunk has room for {room}",
                        piece_id=piece.id, tokens=cost, limit=room,
                    )
                b -= 1
            out.append((part, cost))
            a = b
        n = len(out)
        return [(p.model_copy(update={"meta": {**p.meta, "parts": n}}), c) for p, c in out]

    @staticmethod
    def _frames_part(piece: Piece, frames: list[Any], stamps: list[Any] | None, a: int, b: int, k: int) -> Piece:
        return piece.model_copy(update={
            "id": f"{piece.id}#{k}",
            "frames": frames[a:b],
            "timestamps": stamps[a:b] if stamps is not None else None,
            "boundary": piece.boundary if k == 0 else 0,
            "meta": {**piece.meta, "source_id": piece.id, "part": k, "frame_range": [a, b]},
        })

    def _pack(
        self, units: list[Piece], costs: list[int], joiner_cost: int, room: int, available: int,
        overlap_tokens: int, prefix: list[Any], suffix: list[Any], ctx: str,
    ) -> list[Chunk]:
        n = len(units)
        cum = [0]
        for c in costs:
            cum.append(cum[-1] + c)

        def fill(a: int, b: int) -> int:  # estimated content tokens of units[a:b]
            return cum[b] - cum[a] + joiner_cost * max(0, b - a - 1)

        digests = [u.digest() for u in units]
        chunks: list[Chunk] = []
        start, ostart = 0, 0  # first new unit; first unit including the overlap
        while start < n:
            end = start
            while end < n and fill(ostart, end + 1) <= room:
                end += 1
            if end == start:  # the overlap leaves no room for the next unit: shorten the overlap
                if ostart < start:
                    ostart += 1
                    continue
                raise PieceTooLarge(  # only reachable through a custom split_tokens larger than a chunk
                    f"piece {units[start].id!r} needs {costs[start]} tokens but a chunk has room for {room}",
                    piece_id=units[start].id, tokens=costs[start], limit=room,
                )
            cut = self._choose_cut(units, start, end, ostart, fill, room)

            while True:  # verify exactly; seams between pieces can tokenize differently from the estimate
                chunk_units = units[ostart:cut]
                messages = [*prefix, {"role": "user", "content": _chunk_parts(chunk_units, self.joiner)}, *suffix]
                tokens = self.counter.count_messages(messages)
                if tokens <= available:
                    break
                if cut - start > 1:
                    cut -= 1
                elif ostart < start:
                    ostart += 1
                else:
                    raise PieceTooLarge(
                        f"piece {units[start].id!r} does not fit a chunk ({tokens} > {available} tokens)",
                        piece_id=units[start].id, tokens=tokens, limit=available,
                    )

            fingerprint = _sha256_json({"v": 1, "context": ctx, "pieces": digests[ostart:cut]})
            chunk = Chunk(
                index=len(chunks),
                piece_ids=[u.id for u in chunk_units],
                overlap=start - ostart,
                token_count=tokens,
                fingerprint=fingerprint,
                joiner=self.joiner,
                pieces=chunk_units,
            )
            chunk._prefix, chunk._suffix = list(prefix), list(suffix)
            chunks.append(chunk)

            # the next chunk re-opens with this chunk's trailing units worth <= overlap_tokens
            next_ostart = cut
            while overlap_tokens and next_ostart > start and fill(next_ostart - 1, cut) <= overlap_tokens:
                next_ostart -= 1
            start, ostart = cut, next_ostart
        return chunks

    def _choose_cut(
        self, units: list[Piece], start: int, end: int, ostart: int, fill: Callable[[int, int], int], room: int,
    ) -> int:
        """End of the chunk (exclusive): ``end`` if everything left fits, else the strongest boundary."""
        n = len(units)
        if end == n:
            return n
        floor = self.min_fill * room
        best, best_strength = end, -1
        for c in range(start + 1, end + 1):  # cutting before units[c]
            if fill(ostart, c) < floor:
                continue
            strength = units[c].boundary
            if strength >= best_strength:
                best, best_strength = c, strength
        return best
