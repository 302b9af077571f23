"""The OpenAI Chat Completions request: its schema and its conversion to the engine's ``GenerateRequest``.

Shared by the HTTP ingress (``/v1/chat/completions``, ``serve_app.openai_api`` builds the responses) and the
``chat`` task (``agents.chat``), so both accept exactly the same messages under the same limits.

Request (:class:`ChatCompletionRequest`, pydantic v2; unknown fields such as ``user``, ``metadata``, ``store``
are ignored):

* roles ``system`` (``developer`` is taken as system), ``user``, ``assistant``; ``tool`` / ``function`` roles,
  ``tools`` / ``functions`` and assistant ``tool_calls`` are refused (422): the server has no tool calling.
* content: a string or a list of parts. User parts: ``{"type": "text"}``, ``{"type": "image_url",
  "image_url": {"url", "detail"?}}`` (``detail`` is accepted and ignored), ``{"type": "video", "video":
  {"frames": [url | {"url": url}, ...], "fps"?: number, "timestamps"?: [seconds]}}`` (``video`` may be the bare
  frame list), ``{"type": "video_url", "video_url": {"url"}}``. System / assistant parts: text only. An
  assistant's ``reasoning_content`` is dropped (earlier reasoning is not re-templated, as in the official demo).
* ``n`` must be 1 (422). ``top_logprobs`` needs ``logprobs: true`` (422). A non-empty ``logit_bias`` is refused
  (422) rather than silently ignored.
* ``max_completion_tokens`` wins over ``max_tokens``; over ``limits.max_tokens_cap`` -> 422
  ``max_tokens_too_large``; absent -> ``defaults["max_tokens"]`` if given, else ``limits.max_tokens_cap``
  (the engine still stops at the context length).
* Sampling fields left out (None) take ``defaults`` (e.g. the model card's recommended temperature), else the
  engine's defaults (greedy). Extensions: ``top_k`` (``-1`` = off, as in vLLM), ``min_p``,
  ``repetition_penalty``. ``stop``: a string or up to 16 strings; empty strings are dropped.
* ``response_format``: ``text`` -> none; ``json_object`` -> schema ``{"type": "object"}``; ``json_schema`` ->
  its ``schema`` (``{"type": "object"}`` when absent); ``strict`` is accepted and ignored (guided decoding is
  always strict).

Media limits (see connectors.media for fetch safety): images (``image_url`` parts) count against
``limits.max_images_per_request`` (413 ``too_many_images``); video frames count separately against
``limits.max_video_frames`` for the whole request: when the videos together carry more frames, each video is
sampled down to its share (proportional to its frame count, at least 1; a ``video_url`` counts as
``max_video_frames``); more videos than ``max_video_frames`` -> 413 ``too_many_video_frames``. Everything is
counted before anything is fetched; media parts are loaded concurrently (at most 8 parts at a time, and each
video at most 8 frames at a time) and the first failure cancels the rest.

Engine messages produced: ``{"role", "content": str | [{"type": "text", "text"}, {"type": "image", "image":
PIL.Image}, {"type": "video", "video": [PIL.Image, ...], "timestamps"?: [float]}]}`` (the tokenizer's format).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from connectors.errors import ClientInputError
from connectors.limits import Limits
from connectors.media import FETCH_CONCURRENCY, MediaError, _bounded_gather, load_image_part, load_video_part
from engine.runtime.request import GenerateRequest

MAX_STOP_STRINGS = 16


class RequestError(ClientInputError):
    """A request that is well-formed JSON but cannot be served as asked (status 4xx, OpenAI error code)."""

    default_status = 422
    default_code = "invalid_request"


# ----------------------------------------------------------------------------------------------------------
# Request schema
# ----------------------------------------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str = Field(min_length=1)
    detail: str | None = None  # "auto" | "low" | "high": accepted, ignored


class ImageUrlPart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v


class VideoSpec(_Model):
    frames: list[str] = Field(min_length=1)
    fps: float | None = Field(None, gt=0, allow_inf_nan=False)
    timestamps: list[float] | None = None

    @field_validator("frames", mode="before")
    @classmethod
    def _frame_refs(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            return v
        out = []
        for f in v:
            if isinstance(f, dict):
                ref = f.get("image_url", f)
                f = ref.get("url") if isinstance(ref, dict) else ref
            out.append(f)
        return out

    @model_validator(mode="after")
    def _lengths(self) -> "VideoSpec":
        if self.timestamps is not None and len(self.timestamps) != len(self.frames):
            raise ValueError(f"{len(self.timestamps)} timestamps for {len(self.frames)} frames")
        return self


class VideoPart(_Model):
    type: Literal["video"]
    video: VideoSpec

    @field_validator("video", mode="before")
    @classmethod
    def _bare_list(cls, v: Any) -> Any:
        return {"frames": v} if isinstance(v, (list, tuple)) else v


class VideoURL(_Model):
    url: str = Field(min_length=1)


class VideoUrlPart(_Model):
    type: Literal["video_url"]
    video_url: VideoURL

    @field_validator("video_url", mode="before")
    @classmethod
    def _bare_url(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v


UserPart = Annotated[Union[TextPart, ImageUrlPart, VideoPart, VideoUrlPart], Field(discriminator="type")]


class SystemMessage(_Model):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Model):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None  # accepted, not templated
    tool_calls: list[Any] | None = None
    name: str | None = None

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("tool calls are not supported by this server")
        return v


ChatMessage = Annotated[Union[SystemMessage, UserMessage, AssistantMessage], Field(discriminator="role")]


class JsonSchemaFormat(_Model):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
        return self


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM names)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = Field(False, description="extension: keep generating past the end-of-turn token")
    session_id: str | None = Field(None, min_length=1, max_length=200, description=(
        "extension: continue this session (POST /v1/sessions): its stored messages are prepended, and the new "
        "messages and the reply are appended to it"))

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [s for s in ([v] if isinstance(v, str) else v) if s]
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return stops

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("tool / function calling is not supported by this server")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# ----------------------------------------------------------------------------------------------------------
# Conversion to the engine
# ----------------------------------------------------------------------------------------------------------
def _allocate(counts: Sequence[int], cap: int) -> list[int]:
    """Split ``cap`` frames over videos of ``counts`` frames: all of them when they fit, else proportional
    shares (largest remainder), each at least 1 and at most its count."""
    if sum(counts) <= cap:
        return list(counts)
    total = sum(counts)
    raw = [c * cap / total for c in counts]
    share = [max(1, min(c, int(r))) for c, r in zip(counts, raw)]
    order = sorted(range(len(counts)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    while sum(share) < cap:
        progressed = False
        for i in order:
            if sum(share) >= cap:
                break
            if share[i] < counts[i]:
                share[i] += 1
                progressed = True
        if not progressed:
            break
    while sum(share) > cap:  # the at-least-1 floor may overshoot
        i = max(range(len(share)), key=lambda j: share[j])
        share[i] -= 1
    return share


def _text_of(content: str | list[TextPart] | None) -> str | list[dict[str, Any]]:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": p.text} for p in content]


async def to_generate_request(
    req: ChatCompletionRequest,
    limits: Limits,
    request_id: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    session_id: str | None = None,
    trusted_origins: Collection[str] = (),
) -> GenerateRequest:
    """Validate ``req`` against ``limits``, load its media (connectors.media) and build the engine request.

    ``defaults``: values for fields the client left out (``max_tokens``, ``temperature``, ``top_p``, ``top_k``,
    ``min_p``, ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``). Raises
    :class:`RequestError` (422) and :class:`MediaError` (400/413/415/422, ``param`` set to the part's path).
    """
    defaults = dict(defaults or {})

    # max tokens
    if req.max_completion_tokens is not None:
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    elif req.max_tokens is not None:
        max_tokens, param = req.max_tokens, "max_tokens"
    else:
        max_tokens, param = min(int(defaults.get("max_tokens", limits.max_tokens_cap)), limits.max_tokens_cap), None
    if max_tokens > limits.max_tokens_cap:
        raise RequestError(f"{param} = {max_tokens} is over this server's limit of {limits.max_tokens_cap}",
                           code="max_tokens_too_large", param=param)

    # count media before fetching anything
    image_parts: list[tuple[int, int, ImageUrlPart]] = []
    video_parts: list[tuple[int, int, VideoPart | VideoUrlPart]] = []
    for i, msg in enumerate(req.messages):
        if isinstance(msg, UserMessage) and not isinstance(msg.content, str):
            for j, part in enumerate(msg.content):
                if isinstance(part, ImageUrlPart):
                    image_parts.append((i, j, part))
                elif isinstance(part, (VideoPart, VideoUrlPart)):
                    video_parts.append((i, j, part))
    if len(image_parts) > limits.max_images_per_request:
        raise MediaError(f"{len(image_parts)} images in the request, over the limit of {limits.max_images_per_request}",
                         status_code=413, code="too_many_images", param="messages")
    if len(video_parts) > limits.max_video_frames:
        raise MediaError(f"{len(video_parts)} videos need at least one frame each, over the limit of "
                         f"{limits.max_video_frames} video frames per request", status_code=413,
                         code="too_many_video_frames", param="messages")
    counts = [len(p.video.frames) if isinstance(p, VideoPart) else limits.max_video_frames for _, _, p in video_parts]
    budgets = _allocate(counts, limits.max_video_frames)

    def where(i: int, j: int, suffix: str) -> str:
        return f"messages[{i}].content[{j}].{suffix}"

    def with_param(param: str, coro_factory: Callable[[], Any]) -> Callable[[], Any]:
        async def run() -> Any:
            try:
                return await coro_factory()
            except MediaError as exc:
                exc.param = exc.param or param
                raise
        return run

    jobs: list[Callable[[], Any]] = []
    keys: list[tuple[int, int]] = []
    for i, j, part in image_parts:
        url = part.image_url.url
        jobs.append(with_param(where(i, j, "image_url.url"),
                               lambda url=url: load_image_part(url, limits, trusted_origins=trusted_origins)))
        keys.append((i, j))
    for (i, j, part), budget in zip(video_parts, budgets):
        suffix = "video" if isinstance(part, VideoPart) else "video_url.url"
        jobs.append(with_param(where(i, j, suffix),
                               lambda part=part, budget=budget: load_video_part(
                                   part, limits, max_frames=budget, trusted_origins=trusted_origins)))
        keys.append((i, j))
    # videos fetch their own frames concurrently; keep the outer fan-out small so the total stays bounded
    loaded = dict(zip(keys, await _bounded_gather(jobs, FETCH_CONCURRENCY)))

    messages: list[dict[str, Any]] = []
    for i, msg in enumerate(req.messages):
        if isinstance(msg, SystemMessage):
            messages.append({"role": "system", "content": _text_of(msg.content)})
        elif isinstance(msg, AssistantMessage):
            messages.append({"role": "assistant", "content": _text_of(msg.content)})
        elif isinstance(msg.content, str):
            messages.append({"role": "user", "content": msg.content})
        else:
            items: list[dict[str, Any]] = []
            for j, part in enumerate(msg.content):
                if isinstance(part, TextPart):
                    items.append({"type": "text", "text": part.text})
                elif isinstance(part, ImageUrlPart):
                    items.append({"type": "image", "image": loaded[(i, j)]})
                else:
                    frames = loaded[(i, j)]
                    item: dict[str, Any] = {"type": "video", "video": list(frames.frames)}
                    if frames.timestamps is not None:
                        item["timestamps"] = list(frames.timestamps)
                    items.append(item)
            messages.append({"role": "user", "content": items})

    json_schema: dict[str, Any] | None = None
    if req.response_format is not None:
        if req.response_format.type == "json_object":
            json_schema = {"type": "object"}
        elif req.response_format.type == "json_schema":
            spec = req.response_format.json_schema
            json_schema = dict(spec.schema_) if spec is not None and spec.schema_ is not None else {"type": "object"}

    fields: dict[str, Any] = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        value = getattr(req, name)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            fields[name] = value
    if fields.get("top_k") == -1:
        fields["top_k"] = 0

    try:
        return GenerateRequest(
            messages=messages,
            max_tokens=max_tokens,
            stop=req.stop or [],
            seed=req.seed,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            json_schema=json_schema,
            session_id=session_id,
            request_id=request_id,
            ignore_eos=req.ignore_eos,
            **fields,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ())) or None
        raise RequestError(f"{param}: {err.get('msg')}" if param else str(err.get("msg")), param=param) from None
