"""Kimi-VL tokenizer and chat template, without ``trust_remote_code``.

Loads the *official* tokenizer files of ``moonshotai/Kimi-VL-A3B-Instruct`` / ``-Thinking`` /
``-Thinking-2506`` (``tiktoken.model`` + ``tokenizer_config.json`` [+ ``chat_template.jinja``]) into a
``tiktoken.Encoding`` built the way the official remote class ``tokenization_moonshot.TikTokenTokenizer``
builds it.  The tiny test tokenizer (:mod:`engine.tiny_tokenizer`) goes through exactly the same code.

Facts and where they come from (re-typed from others' code; no code copied):

* ``tiktoken.model``: one ``<base64 token> <rank>`` line per mergeable token (``tiktoken.load.load_tiktoken_bpe``
  format); ``num_base_tokens = len(ranks)`` (163584 for the real checkpoints).  We parse the file ourselves
  because ``load_tiktoken_bpe`` caches *local* files too, keyed by path, under ``$TMPDIR/data-gym-cache``
  (tiktoken 0.14 ``read_file_cached``) - a tokenizer rewritten at the same path would load stale ranks.
* Special tokens: ids ``num_base_tokens .. num_base_tokens + 255``; id ``i`` is named from
  ``tokenizer_config.json["added_tokens_decoder"][str(i)]["content"]`` and defaults to
  ``<|reserved_token_{i}|>`` (absolute id).  Source: ``TikTokenTokenizer.__init__`` in the Moonshot wrappers -
  Moonlight-line ``tokenization_moonshot.py`` (copy: zxgx/mode-pd ``modepd/model/moonshotai/tokenization_moonshot.py``),
  K2-line ``tokenization_kimi.py`` copies.  NOTE: the Moonlight and Kimi-Linear copies reserve ``256 + 2`` ids
  (``range(n, n + 258)``), the K2 copies exactly 256; the Kimi-VL vocab is 163840 = 163584 + 256, so we
  reserve 256 (the two extra Moonlight ids lie outside the model's embedding table anyway).
* ``pat_str``: the 8-alternative Kimi pattern below (identical in every Moonlight / Kimi-VL / K2 copy); it uses
  character-class intersection ``&&`` (tiktoken's fancy-regex and Python ``regex`` V1 support it).
* ``encode``: text is cut into 400 000-char chunks (``TIKTOKEN_MAX_ENCODE_CHARS``), each chunk into pieces with
  no run of more than 25 000 consecutive whitespace / non-whitespace chars (``MAX_NO_WHITESPACES_CHARS``,
  by ``str.isspace``); each piece is encoded with ``allowed_special="all"`` (or ``disallowed_special=()`` when
  special tokens are not allowed).  **No BOS/EOS is added** (the wrapper's ``encode`` never adds them, and it
  does not override ``build_inputs_with_special_tokens``).  ``decode`` is ``tiktoken.Encoding.decode``
  (UTF-8 with ``errors="replace"``).
* BOS/EOS names default to ``[BOS]`` / ``[EOS]`` (wrapper defaults; overridable by ``bos_token`` /
  ``eos_token`` in ``tokenizer_config.json``).  Generation stops at ``<|im_end|>`` (spec §4.4) and ``[EOS]``.
* ``convert_ids_to_tokens`` uses the GPT-2 ``bytes_to_unicode`` byte->char table, as the wrapper's ``decoder``.
* Chat template: :data:`KIMI_VL_CHAT_TEMPLATE` - the official Kimi-VL Jinja template as reproduced (labelled
  "the official Kimi-VL chat template format") in a copy of vllm-project/vllm
  ``vllm/model_executor/models/opencua.py`` (OpenCUA reuses the Kimi-VL tokenizer); the same structure is in a
  llama-cpp-python ``KimiVLChatHandler`` copy.  Its rendering rules agree with spec §4.4,
  sgl-project/sglang ``conversation.py`` "kimi-vl" template citing ``Kimi-VL-A3B-Instruct/.../chat_template.jinja``,
  hiyouga/LLaMA-Factory ``src/llamafactory/data/template.py`` ``kimi_vl``: default system
  ``You are a helpful assistant``, stop word ``<|im_end|>``, thought words ``◁think▷`` / ``◁/think▷``).
* Thinking history: the official HF demo (copy: zsxkib/cog-kimi-vl-a3b-thinking ``kimi_vl/serve/inference.py``)
  re-templates earlier assistant turns as ``content.strip().split("◁/think▷")[-1]``.

Prompt safety (ours; the official ``apply_chat_template(tokenize=True)`` differs here): message text - user,
assistant, system, document / OCR / tool text - is *data*.  A conversation is rendered into
:class:`PromptSegment` s (template output vs message text) and only the template's own output may produce
special tokens; message text is encoded with special tokens disallowed, so ``<|im_end|>`` typed by a user or
found in a contract is ordinary text (several text tokens), never the control token.  The Jinja template is
rendered with unguessable placeholders in place of message text and split at them afterwards.

Our own conventions (Kimi-VL published none):

* ``video`` content items ``{"type": "video", "video" | "frames": [frame, ...] | VideoFrames, "timestamps": [...]?}``
  (a container with ``.frames`` / ``.timestamps``, like ``engine.processor.VideoFrames``, is unpacked) expand to
  one image block per frame (Moonshot's advice: feed video as frames, Kimi-VL issue #24).  If ``timestamps`` is given, each
  frame is preceded by a plain-text timestamp: strings verbatim, numbers as ``[{t:.1f}s]``.  The expansion happens
  *before* templating (into text + image items), so the Jinja and Python renderings stay identical.
"""

from __future__ import annotations

import codecs
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import tiktoken
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "KimiTokenizer",
    "StreamDecoder",
    "ChatTemplateError",
    "PromptSegment",
    "Message",
    "TextItem",
    "ImageItem",
    "ImageUrlItem",
    "VideoItem",
    "normalize_messages",
    "collect_media",
    "split_thinking",
    "THINK_START",
    "THINK_END",
    "DEFAULT_SYSTEM_PROMPT",
    "KIMI_PAT_STR",
    "KIMI_VL_CHAT_TEMPLATE",
    "NUM_RESERVED_SPECIAL_TOKENS",
    "MEDIA_BLOCK",
]

NUM_RESERVED_SPECIAL_TOKENS = 256
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

KIMI_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# The official Kimi-VL chat template (every newline sits next to a ``-`` whitespace-control marker, so the
# rendering contains no newlines of its own).
KIMI_VL_CHAT_TEMPLATE = """{%- for message in messages -%}
  {%- if loop.first and messages[0]['role'] != 'system' -%}
    {{'<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>'}}
  {%- endif -%}
  {%- if message['role'] == 'system' -%}
    {{'<|im_system|>'}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {{'<|im_user|>'}}
  {%- endif -%}
  {%- if message['role'] == 'assistant' -%}
    {{'<|im_assistant|>'}}
  {%- endif -%}
  {{- message['role'] -}}
  {{'<|im_middle|>'}}
  {%- if message['content'] is string -%}
    {{- message['content'] + '<|im_end|>' -}}
  {%- else -%}
    {%- for content in message['content'] -%}
      {%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}
        {{'<|media_start|>image<|media_content|><|media_pad|><|media_end|>'}}
      {%- else -%}
        {{content['text']}}
      {%- endif -%}
    {%- endfor -%}
    {{'<|im_end|>'}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{'<|im_assistant|>assistant<|im_middle|>'}}
{%- endif -%}"""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"
THINK_START = "\u25c1think\u25b7"  # ◁think▷ (plain text, not a special token)
THINK_END = "\u25c1/think\u25b7"  # ◁/think▷
MEDIA_BLOCK = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"

_ROLE_MARKERS = {"system": "<|im_system|>", "user": "<|im_user|>", "assistant": "<|im_assistant|>"}
_IM_MIDDLE = "<|im_middle|>"
_IM_END = "<|im_end|>"
_CONTENT_TYPES = ("text", "image", "image_url", "video")


class ChatTemplateError(ValueError):
    """A conversation that cannot be rendered (unknown role / content type, malformed item)."""


# ----------------------------------------------------------------------------------------------------------
# Message schema (pydantic at the boundary)
# ----------------------------------------------------------------------------------------------------------
class TextItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"] = "text"
    text: str


class ImageItem(BaseModel):
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)
    type: Literal["image"] = "image"
    image: Any = None


class ImageUrlItem(BaseModel):
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)
    type: Literal["image_url"] = "image_url"
    image_url: Any


class VideoItem(BaseModel):
    """OUR convention (Kimi-VL has no video path): frames rendered as consecutive image blocks."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)
    type: Literal["video"] = "video"
    video: list[Any] = Field(validation_alias=AliasChoices("video", "frames"), min_length=1)
    timestamps: list[float | str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unpack_frame_container(cls, data: Any) -> Any:
        """Accept a frames container (e.g. ``engine.processor.VideoFrames``: ``.frames`` + ``.timestamps``)."""
        if isinstance(data, dict):
            key = "video" if "video" in data else "frames" if "frames" in data else None
            v = data.get(key) if key else None
            if v is not None and not isinstance(v, (list, tuple)) and hasattr(v, "frames"):
                data = {**data, key: list(v.frames)}
                if data.get("timestamps") is None and getattr(v, "timestamps", None) is not None:
                    data["timestamps"] = list(v.timestamps)
        return data

    @model_validator(mode="after")
    def _lengths_match(self) -> "VideoItem":
        if self.timestamps is not None and len(self.timestamps) != len(self.video):
            raise ValueError(f"got {len(self.timestamps)} timestamps for {len(self.video)} frames")
        return self


ContentItem = TextItem | ImageItem | ImageUrlItem | VideoItem
_ITEM_MODELS: dict[str, type[BaseModel]] = {
    "text": TextItem,
    "image": ImageItem,
    "image_url": ImageUrlItem,
    "video": VideoItem,
}


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentItem]

    @field_validator("content", mode="before")
    @classmethod
    def _items_to_models(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [_parse_item(it, None, j) for j, it in enumerate(v)]
        return v


def _as_dict(obj: Any, where: str) -> dict:
    if isinstance(obj, BaseModel):
        return obj.model_dump()
    if isinstance(obj, dict):
        return obj
    raise ChatTemplateError(f"{where}: expected a dict or pydantic model, got {type(obj).__name__}")


def _parse_item(item: Any, mi: int | None, j: int) -> BaseModel:
    where = f"messages[{mi}].content[{j}]" if mi is not None else f"content[{j}]"
    if isinstance(item, tuple(_ITEM_MODELS.values())):
        return item
    d = _as_dict(item, where)
    typ = d.get("type")
    if typ is None:  # duck-typing like the official template: an 'image' / 'image_url' key means an image
        typ = next((k for k in ("image", "image_url", "video", "text") if k in d), None)
        if typ is None:
            raise ChatTemplateError(f"{where}: content item has no 'type' (keys: {sorted(d)})")
    if typ not in _ITEM_MODELS:
        raise ChatTemplateError(
            f"{where}: unknown content type {typ!r} (expected one of {', '.join(_CONTENT_TYPES)})"
        )
    try:
        return _ITEM_MODELS[typ].model_validate({**d, "type": typ})
    except ValidationError as e:
        raise ChatTemplateError(f"{where}: invalid {typ!r} item: {_short(e)}") from None


def _short(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'item'}: {err['msg']}" for err in e.errors())


def _parse_message(msg: Any, i: int) -> Message:
    where = f"messages[{i}]"
    if isinstance(msg, Message):
        return msg
    d = _as_dict(msg, where)
    if "role" not in d:
        raise ChatTemplateError(f"{where}: missing 'role'")
    if d["role"] not in _ROLE_MARKERS:
        raise ChatTemplateError(f"{where}: unknown role {d['role']!r} (expected system, user or assistant)")
    if "content" not in d:
        raise ChatTemplateError(f"{where}: missing 'content'")
    content = d["content"]
    if isinstance(content, (list, tuple)):
        content = [_parse_item(it, i, j) for j, it in enumerate(content)]
    elif not isinstance(content, str):
        raise ChatTemplateError(
            f"{where}: content must be a string or a list of items, got {type(content).__name__}"
        )
    try:
        return Message.model_validate({**d, "content": content})
    except ValidationError as e:
        raise ChatTemplateError(f"{where}: {_short(e)}") from None


def _format_timestamp(t: float | str) -> str:
    return t if isinstance(t, str) else f"[{float(t):.1f}s]"


def _item_to_dicts(item: BaseModel) -> list[dict]:
    """Normalized plain-dict items; videos are expanded into (timestamp text +) one image item per frame."""
    if isinstance(item, TextItem):
        return [{"type": "text", "text": item.text}]
    if isinstance(item, VideoItem):
        out: list[dict] = []
        for k, frame in enumerate(item.video):
            if item.timestamps is not None:
                out.append({"type": "text", "text": _format_timestamp(item.timestamps[k])})
            out.append({"type": "image", "image": frame})
        return out
    return [item.model_dump()]


def _strip_reasoning(content: str | list[dict]) -> str | list[dict]:
    """The official demo's rule: keep what follows the last ◁/think▷ of ``content.strip()``."""
    if isinstance(content, str):
        return content.strip().split(THINK_END)[-1]
    last = max((k for k, it in enumerate(content) if it["type"] == "text" and THINK_END in it["text"]), default=None)
    if last is None:
        return content
    out = [it for k, it in enumerate(content) if k > last or it["type"] != "text"]
    kept = {"type": "text", "text": content[last]["text"].split(THINK_END)[-1]}
    pos = sum(1 for k, it in enumerate(content) if k < last and it["type"] != "text")
    out.insert(pos, kept)
    return out


def normalize_messages(
    messages: Iterable[Any],
    *,
    strip_thinking_history: bool = False,
    add_generation_prompt: bool = True,
) -> list[dict]:
    """Validate ``messages`` (dicts or pydantic models) and return plain dicts ready for templating.

    List content becomes ``[{"type": "text", "text": ...}, {"type": "image", "image": ...}, ...]`` with videos
    expanded (see module docstring).  With ``strip_thinking_history``, every assistant turn except a trailing one
    that is being continued (last message while ``add_generation_prompt`` is False) keeps only its final answer.
    Raises :class:`ChatTemplateError` with the offending index on bad input.
    """
    if isinstance(messages, (str, bytes, dict)) or isinstance(messages, BaseModel):
        raise ChatTemplateError("messages must be a list of messages")
    parsed = [_parse_message(m, i) for i, m in enumerate(messages)]
    out: list[dict] = []
    for i, m in enumerate(parsed):
        if isinstance(m.content, str):
            content: str | list[dict] = m.content
        else:
            content = [d for it in m.content for d in _item_to_dicts(it)]
        is_continued = i == len(parsed) - 1 and not add_generation_prompt
        if strip_thinking_history and m.role == "assistant" and not is_continued:
            content = _strip_reasoning(content)
        out.append({"role": m.role, "content": content})
    return out


def collect_media(messages: Iterable[Any]) -> list[Any]:
    """Images (and video frames) in template order - the order the processor must feed them to the model."""
    media = []
    for m in normalize_messages(messages):
        if isinstance(m["content"], list):
            for it in m["content"]:
                if it["type"] == "image":
                    media.append(it.get("image"))
                elif it["type"] == "image_url":
                    media.append(it.get("image_url"))
    return media


def split_thinking(text: str) -> tuple[str, str]:
    """Split a Thinking-model output into ``(reasoning, answer)`` (both stripped).

    ``◁think▷ R ◁/think▷ A`` -> ``(R, A)`` (split at the last ◁/think▷).  Without ◁/think▷: text starting with
    ◁think▷ is unfinished reasoning -> ``(R, "")``; anything else is a plain answer -> ``("", text)``.
    """
    if THINK_END in text:
        reasoning, _, answer = text.rpartition(THINK_END)
        reasoning = reasoning.strip()
        if reasoning.startswith(THINK_START):
            reasoning = reasoning[len(THINK_START):]
        return reasoning.strip(), answer.strip()
    stripped = text.lstrip()
    if stripped.startswith(THINK_START):
        return stripped[len(THINK_START):].strip(), ""
    return "", text.strip()


@dataclass(frozen=True)
class PromptSegment:
    """A piece of a rendered prompt.  ``trusted``: written by the chat template, so the special-token strings in
    it are control tokens; otherwise message text, always encoded as plain text."""

    text: str
    trusted: bool


def _render_python_segments(messages: list[dict], add_generation_prompt: bool) -> list[PromptSegment]:
    """The official template's output, written in Python (the fallback when a checkpoint ships no template)."""
    segs: list[PromptSegment] = []

    def template(text: str) -> None:
        segs.append(PromptSegment(text, True))

    for i, m in enumerate(messages):
        if i == 0 and m["role"] != "system":
            template(f"<|im_system|>system{_IM_MIDDLE}{DEFAULT_SYSTEM_PROMPT}{_IM_END}")
        template(f"{_ROLE_MARKERS[m['role']]}{m['role']}{_IM_MIDDLE}")
        content = m["content"]
        if isinstance(content, str):
            segs.append(PromptSegment(content, False))
        else:
            for it in content:
                if it["type"] in ("image", "image_url"):
                    template(MEDIA_BLOCK)
                else:
                    segs.append(PromptSegment(it["text"], False))
        template(_IM_END)
    if add_generation_prompt:
        template(f"<|im_assistant|>assistant{_IM_MIDDLE}")
    return segs


def _render_python(messages: list[dict], add_generation_prompt: bool) -> str:
    return "".join(s.text for s in _render_python_segments(messages, add_generation_prompt))


# ----------------------------------------------------------------------------------------------------------
# Byte helpers
# ----------------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable char table (printable Latin-1 maps to itself)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_ENCODER = _bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}
_RUN_RE = re.compile(r"\s+|\S+")  # Python's \s for str patterns == str.isspace


def _split_long_runs(s: str, limit: int) -> list[str]:
    """Cut ``s`` so that no piece has a run of more than ``limit`` consecutive (non-)whitespace chars.

    Same cut points as the official wrapper's ``_split_whitespaces_or_nonwhitespaces``: inside a run, a cut
    falls every ``limit`` chars counted from the run's start.
    """
    if len(s) <= limit:
        return [s]
    cuts = []
    for m in _RUN_RE.finditer(s):
        cuts.extend(range(m.start() + limit, m.end(), limit))
    if not cuts:
        return [s]
    bounds = [0, *cuts, len(s)]
    return [s[a:b] for a, b in zip(bounds, bounds[1:])]


def _load_ranks(path: Path) -> dict[bytes, int]:
    import base64

    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}:{lineno}: bad tiktoken.model line {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
    return ranks


def _token_content(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    raise ValueError(f"cannot read a token name from {v!r}")


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------
class KimiTokenizer:
    """Kimi-VL tokenizer: official ``tiktoken.model`` + ``tokenizer_config.json`` through ``tiktoken``."""

    TIKTOKEN_MAX_ENCODE_CHARS = TIKTOKEN_MAX_ENCODE_CHARS
    MAX_NO_WHITESPACES_CHARS = MAX_NO_WHITESPACES_CHARS

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        tokenizer_config: dict | None = None,
        chat_template: str | None = None,
        name: str = "kimi",
    ) -> None:
        cfg = dict(tokenizer_config or {})
        self.config = cfg
        self.num_base_tokens = len(mergeable_ranks)
        named: dict[int, str] = {}
        for k, v in (cfg.get("added_tokens_decoder") or {}).items():
            named[int(k)] = _token_content(v)
        n = self.num_base_tokens
        special: dict[str, int] = {}
        for i in range(n, n + NUM_RESERVED_SPECIAL_TOKENS):
            tok = named.get(i, f"<|reserved_token_{i}|>")
            if tok in special:
                raise ValueError(f"special token {tok!r} is named twice (ids {special[tok]} and {i})")
            special[tok] = i
        self._special = special
        self._special_by_id = {i: t for t, i in special.items()}
        self.encoding = tiktoken.Encoding(
            name=name, pat_str=KIMI_PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=special
        )
        self._bos_name = _token_content(cfg.get("bos_token") or "[BOS]")
        self._eos_name = _token_content(cfg.get("eos_token") or "[EOS]")
        tmpl = chat_template if chat_template is not None else cfg.get("chat_template")
        if isinstance(tmpl, list):  # HF's multi-template form [{"name": ..., "template": ...}]
            tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
        self.chat_template: str | None = tmpl
        self._jinja = None
        self._special_re: re.Pattern[str] | None = None

    # -- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "KimiTokenizer":
        """Load from a checkpoint directory holding ``tiktoken.model`` and ``tokenizer_config.json``.

        The Jinja chat template comes from ``chat_template.jinja`` if present, else from
        ``tokenizer_config.json["chat_template"]``; ``None`` if neither (Python rendering is used anyway).
        """
        d = Path(path)
        model_file = d / "tiktoken.model"
        cfg_file = d / "tokenizer_config.json"
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file} not found (is {d} a Kimi-VL checkpoint directory?)")
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found (is {d} a Kimi-VL checkpoint directory?)")
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        jinja_file = d / "chat_template.jinja"
        tmpl = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None
        return cls(_load_ranks(model_file), cfg, chat_template=tmpl, name=d.name or "kimi")

    # -- vocabulary ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def token_to_id(self, token: str) -> int:
        """Id of a special token, found by name."""
        try:
            return self._special[token]
        except KeyError:
            raise KeyError(f"special token {token!r} is not in this tokenizer's special-token table") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_by_id

    bos_id = property(lambda self: self.token_to_id(self._bos_name))
    eos_id = property(lambda self: self.token_to_id(self._eos_name))
    im_end_id = property(lambda self: self.token_to_id("<|im_end|>"))
    im_user_id = property(lambda self: self.token_to_id("<|im_user|>"))
    im_assistant_id = property(lambda self: self.token_to_id("<|im_assistant|>"))
    im_system_id = property(lambda self: self.token_to_id("<|im_system|>"))
    im_middle_id = property(lambda self: self.token_to_id("<|im_middle|>"))
    media_start_id = property(lambda self: self.token_to_id("<|media_start|>"))
    media_content_id = property(lambda self: self.token_to_id("<|media_content|>"))
    media_end_id = property(lambda self: self.token_to_id("<|media_end|>"))
    media_pad_id = property(lambda self: self.token_to_id("<|media_pad|>"))

    @property
    def pad_id(self) -> int | None:
        name = _token_content(self.config.get("pad_token") or "[PAD]")
        return self._special.get(name)

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops at ``<|im_end|>`` (end of the assistant turn) or ``[EOS]``."""
        return [self.im_end_id, self.eos_id]

    # -- encode / decode ----------------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Encode like the official wrapper: no BOS; special-token strings become ids when allowed."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        ids: list[int] = []
        step = self.TIKTOKEN_MAX_ENCODE_CHARS
        for start in range(0, len(text), step):
            for piece in _split_long_runs(text[start:start + step], self.MAX_NO_WHITESPACES_CHARS):
                if allow_special:
                    ids.extend(self.encoding.encode(piece, allowed_special="all"))
                else:
                    ids.extend(self.encoding.encode(piece, disallowed_special=()))
        return ids

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        out = []
        n = self.vocab_size
        for t in ids:
            t = int(t)
            if not 0 <= t < n:
                raise ValueError(f"token id {t} out of range [0, {n})")
            out.append(t)
        return out

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [t for t in ids if t not in self._special_by_id]
        return self.encoding.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        (t,) = self._check_ids([token_id])
        return self.encoding.decode_single_token_bytes(t)

    def convert_ids_to_tokens(self, ids: Sequence[int] | int) -> list[str] | str:
        """Byte-level token strings (GPT-2 byte->char mapping), as the official wrapper's ``decoder``."""
        single = isinstance(ids, int)
        toks = [
            "".join(_BYTE_ENCODER[b] for b in self.encoding.decode_single_token_bytes(t))
            for t in self._check_ids([ids] if single else ids)
        ]
        return toks[0] if single else toks

    def convert_tokens_to_ids(self, tokens: Sequence[str] | str) -> list[int] | int:
        single = isinstance(tokens, str)
        out = []
        for tok in [tokens] if single else tokens:
            if tok in self._special:
                out.append(self._special[tok])
                continue
            try:
                raw = bytes(_BYTE_DECODER[c] for c in tok)
                out.append(self.encoding.encode_single_token(raw))
            except KeyError:
                raise KeyError(f"{tok!r} is not a token of this vocabulary") from None
        return out[0] if single else out

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat template ------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Iterable[Any],
        add_generation_prompt: bool = True,
        *,
        strip_thinking_history: bool = False,
        use_jinja: bool | None = None,
    ) -> str:
        """Render a conversation exactly like the official Kimi-VL chat template (as one display string).

        ``messages``: dicts or pydantic models with ``role`` in system/user/assistant and ``content`` a string or
        a list of text / image / image_url / video items.  ``strip_thinking_history`` drops ◁think▷ reasoning
        from earlier assistant turns like the official demo (default off = exact template).  ``use_jinja``:
        ``None`` (default) renders with the checkpoint's own Jinja template when it ships one, else with our
        Python renderer; ``True`` / ``False`` force one.  Do not ``encode`` this string with special tokens
        allowed: :meth:`encode_chat` keeps message text plain.
        """
        segments = self.render_chat_segments(
            messages, add_generation_prompt, strip_thinking_history=strip_thinking_history, use_jinja=use_jinja
        )
        return "".join(s.text for s in segments)

    def render_chat_segments(
        self,
        messages: Iterable[Any],
        add_generation_prompt: bool = True,
        *,
        strip_thinking_history: bool = False,
        use_jinja: bool | None = None,
    ) -> list[PromptSegment]:
        """The rendered conversation as template output (trusted) and message text (plain) segments."""
        norm = normalize_messages(
            messages, strip_thinking_history=strip_thinking_history, add_generation_prompt=add_generation_prompt
        )
        if use_jinja is None:
            use_jinja = self.chat_template is not None
        if use_jinja:
            return self._render_jinja_segments(norm, add_generation_prompt)
        return _render_python_segments(norm, add_generation_prompt)

    def render_jinja(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render already-normalized messages with the checkpoint's Jinja template (as transformers does)."""
        if self.chat_template is None:
            raise ChatTemplateError("this checkpoint has no chat_template (tokenizer_config.json / chat_template.jinja)")
        if self._jinja is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise ChatTemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._jinja = env.from_string(self.chat_template)
        return self._jinja.render(messages=messages, add_generation_prompt=add_generation_prompt)

    def _render_jinja_segments(self, messages: list[dict], add_generation_prompt: bool) -> list[PromptSegment]:
        """Jinja rendering with each message text replaced by a placeholder, split back into segments.

        A placeholder holds a fresh random nonce (checked absent from every text), so no text can forge one;
        the template must copy each placeholder exactly once and unchanged (the official templates do).
        """
        texts: list[str] = []
        nonce = secrets.token_hex(16)
        while any(nonce in t for t in _message_texts(messages)):  # 2^-128 per text; never loops in practice
            nonce = secrets.token_hex(16)

        def hold(text: str) -> str:
            texts.append(text)
            return f"\x00{nonce}:{len(texts) - 1}\x00"

        held = []
        for m in messages:
            content = m["content"]
            if isinstance(content, str):
                content = hold(content)
            else:
                content = [{**it, "text": hold(it["text"])} if it["type"] == "text" else it for it in content]
            held.append({**m, "content": content})
        rendered = self.render_jinja(held, add_generation_prompt)
        parts = re.split(f"\x00{nonce}:(\\d+)\x00", rendered)
        segments: list[PromptSegment] = []
        seen: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                seen.append(int(part))
                segments.append(PromptSegment(texts[int(part)], False))
            elif part:
                segments.append(PromptSegment(part, True))
        if sorted(seen) != list(range(len(texts))):
            raise ChatTemplateError(
                "the checkpoint's chat template drops, repeats or rewrites message text, so it cannot be rendered "
                "with message text kept apart from its markers; use the built-in renderer (use_jinja=False)"
            )
        return segments

    def encode_segments(self, segments: Iterable[PromptSegment]) -> list[int]:
        """Token ids of a rendered prompt: special-token strings become ids only inside trusted segments.

        Adjacent text (of either kind) is encoded as one run, so a prompt without special-token strings in its
        message text gets exactly the ids of ``encode(rendered, allow_special=True)``.
        """
        ids: list[int] = []
        run: list[str] = []
        special = self._special_pattern()
        for seg in segments:
            if not seg.trusted:
                run.append(seg.text)
                continue
            for k, piece in enumerate(special.split(seg.text)):
                if k % 2 == 0:
                    run.append(piece)
                    continue
                ids.extend(self.encode("".join(run), allow_special=False))
                run.clear()
                ids.append(self._special[piece])
        ids.extend(self.encode("".join(run), allow_special=False))
        return ids

    def _special_pattern(self) -> "re.Pattern[str]":
        if self._special_re is None:
            names = sorted(self._special, key=len, reverse=True)  # longest first: no name shadows a longer one
            self._special_re = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")
        return self._special_re

    def encode_chat(
        self,
        messages: Iterable[Any],
        add_generation_prompt: bool = True,
        *,
        strip_thinking_history: bool = False,
        use_jinja: bool | None = None,
    ) -> list[int]:
        """Token ids of a conversation: the template's markers are special tokens, message text is always plain
        text (``<|im_end|>`` inside a user message is encoded as the characters ``<|im_end|>``)."""
        return self.encode_segments(
            self.render_chat_segments(
                messages, add_generation_prompt, strip_thinking_history=strip_thinking_history, use_jinja=use_jinja
            )
        )


def _message_texts(messages: list[dict]) -> Iterator[str]:
    for m in messages:
        if isinstance(m["content"], str):
            yield m["content"]
        else:
            yield from (it["text"] for it in m["content"] if it["type"] == "text")


# ----------------------------------------------------------------------------------------------------------
# Incremental detokenizer
# ----------------------------------------------------------------------------------------------------------
class StreamDecoder:
    """Feed token ids one at a time; get back only complete text.

    Bytes of an incomplete UTF-8 sequence are held back until the rest arrives (so a character split across
    tokens never shows up as U+FFFD).  Bytes that can never form a valid character are replaced with U+FFFD,
    exactly as a one-shot ``tokenizer.decode`` would; :meth:`flush` releases whatever is left at the end, so
    ``"".join(feed(t) for t in ids) + flush() == tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: KimiTokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        if self.skip_special_tokens and self.tokenizer.is_special(int(token_id)):
            return ""
        return self._dec.decode(self.tokenizer.token_bytes(token_id), final=False)

    def feed_many(self, ids: Iterable[int]) -> str:
        return "".join(self.feed(t) for t in ids)

    def flush(self) -> str:
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

    @property
    def pending(self) -> bool:
        """True while an incomplete UTF-8 sequence is being held back."""
        return bool(self._dec.getstate()[0])

    def reset(self) -> None:
        self._dec.reset()
