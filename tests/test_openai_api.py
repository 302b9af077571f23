"""connectors.openai_messages (request schema, conversion to GenerateRequest) and serve_app.openai_api (response /
chunk / error builders), checked against the openai SDK's own types and client (no Ray, no model)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.shared import ErrorObject
from PIL import Image
from pydantic import BaseModel, ValidationError

from engine.processor import collect_media as processor_media
from engine.runtime.request import Delta, GenerateRequest, TokenLogprob, Usage
from engine.tokenizer import normalize_messages
from connectors.limits import Limits
from connectors.media import MediaError
from connectors.openai_messages import ChatCompletionRequest, RequestError, _allocate, to_generate_request
from serve_app.openai_api import (
    SSE_DONE,
    ChunkStream,
    chunk,
    completion_response,
    error_body,
    error_from_exception,
    format_logprobs,
    map_finish_reason,
    models_response,
    new_request_id,
    sse_event,
    usage_chunk,
)
from tests.media_helpers import MediaServer, colour_frames, data_url, png_bytes

LIMITS = Limits()
PRIVATE_OK = Limits(allow_private_urls=True)


@pytest.fixture(scope="module")
def server() -> Iterator[MediaServer]:
    s = MediaServer()
    yield s
    s.close()


def parse(body: dict[str, Any]) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "kimi-vl", **body})


def convert(body: dict[str, Any], limits: Limits = LIMITS, **kw: Any) -> GenerateRequest:
    return asyncio.run(to_generate_request(parse(body), limits, "chatcmpl-test", **kw))


def user(*parts: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def image(url: str, detail: str | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"url": url}
    if detail:
        ref["detail"] = detail
    return {"type": "image_url", "image_url": ref}


def assert_no_extra(obj: Any, allowed: frozenset[str] = frozenset()) -> None:
    """No field of ``obj`` (an openai model, recursively) came from outside the SDK's schema, except
    ``allowed`` names - proves our keys are exactly OpenAI's."""
    if isinstance(obj, BaseModel):
        extra = set((obj.model_extra or {}).keys()) - allowed
        assert not extra, f"{type(obj).__name__} has unexpected keys {extra}"
        for name in type(obj).model_fields:
            assert_no_extra(getattr(obj, name), allowed)
    elif isinstance(obj, (list, tuple)):
        for it in obj:
            assert_no_extra(it, allowed)


# ----------------------------------------------------------------------------------------------------------
# request schema
# ----------------------------------------------------------------------------------------------------------
def test_unknown_fields_are_tolerated() -> None:
    req = parse({"messages": [{"role": "user", "content": "hi", "name": "bob", "whatever": 1}], "user": "u-1",
                 "metadata": {"a": "b"}, "store": False, "service_tier": "auto", "parallel_tool_calls": False,
                 "n": 1, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert req.user == "u-1" and req.n == 1


@pytest.mark.parametrize(
    ("body", "param_prefix"),
    [
        ({"n": 2}, "n"),
        ({"top_logprobs": 3}, None),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages"),
        ({"messages": [user({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})]}, "messages"),
        ({"messages": [{"role": "system", "content": [image("data:image/png;base64,AAAA")]}]}, "messages"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}, "messages"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"messages": [user({"type": "video", "video": {"frames": ["a", "b"], "timestamps": [0.0]}})]}, "messages"),
    ],
)
def test_invalid_requests_are_422(body: dict[str, Any], param_prefix: str | None) -> None:
    full = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(full)
    status, err = error_from_exception(info.value)
    assert status == 422
    ErrorObject.model_validate(err["error"])
    assert err["error"]["type"] == "invalid_request_error"
    if param_prefix:
        assert err["error"]["param"].startswith(param_prefix)


# ----------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------
def test_text_only_and_roles() -> None:
    g = convert({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "the user greets"},
        {"role": "assistant", "content": None},
        {"role": "system", "content": [text("a"), text("b")]},
        user(text("and?")),
    ]})
    assert g.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "assistant", "content": ""},
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": [{"type": "text", "text": "and?"}]},
    ]
    assert g.request_id == "chatcmpl-test" and g.json_schema is None and g.logprobs is None
    normalize_messages(g.messages)  # the tokenizer accepts them


def test_every_part_type(server: MediaServer) -> None:
    frames = colour_frames(3)
    g = convert({"messages": [user(
        text("look:"),
        image(data_url(png_bytes((10, 20, 30))), detail="high"),
        image(server.url("/img.png?c=1,2,3")),
        {"type": "video", "video": {"frames": frames, "fps": 2}},
        {"type": "video", "video": [{"url": frames[0]}]},
        text("what changed?"),
    )]}, PRIVATE_OK)
    content = g.messages[0]["content"]
    assert [it["type"] for it in content] == ["text", "image", "image", "video", "video", "text"]
    assert isinstance(content[1]["image"], Image.Image) and content[1]["image"].getpixel((0, 0)) == (10, 20, 30)
    assert content[2]["image"].getpixel((0, 0)) == (1, 2, 3)
    assert len(content[3]["video"]) == 3 and content[3]["timestamps"] == [0.0, 0.5, 1.0]
    assert all(isinstance(f, Image.Image) for f in content[3]["video"])
    assert "timestamps" not in content[4]
    # what the engine's tokenizer and processor will see: 2 images + 4 frames, in order
    normalized = normalize_messages(g.messages)
    assert sum(1 for it in normalized[0]["content"] if it["type"] == "image") == 6
    media = processor_media(g.messages)
    assert len(media) == 6 and [m.is_video_frame for m in media] == [False, False, True, True, True, True]


def test_sampling_fields_and_defaults() -> None:
    base = {"messages": [{"role": "user", "content": "hi"}]}
    g = convert(base)
    assert (g.temperature, g.top_p, g.top_k, g.max_tokens) == (0.0, 1.0, 0, LIMITS.max_tokens_cap)
    g = convert(base, defaults={"temperature": 0.2, "max_tokens": 512, "top_p": 0.9})
    assert (g.temperature, g.top_p, g.max_tokens) == (0.2, 0.9, 512)
    g = convert({**base, "temperature": 0.7, "top_p": 0.5, "top_k": -1, "min_p": 0.05, "repetition_penalty": 1.1,
                 "presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": 7, "stop": "END",
                 "logprobs": True, "top_logprobs": 3, "max_tokens": 64},
                defaults={"temperature": 0.2}, session_id="s-1")
    assert (g.temperature, g.top_p, g.top_k, g.min_p, g.repetition_penalty) == (0.7, 0.5, 0, 0.05, 1.1)
    assert (g.presence_penalty, g.frequency_penalty, g.seed) == (0.5, -0.5, 7)
    assert g.stop == ["END"] and g.logprobs == 3 and g.max_tokens == 64 and g.session_id == "s-1"
    g = convert({**base, "logprobs": True, "stop": ["", "x"], "top_k": 40})
    assert g.logprobs == 0 and g.stop == ["x"] and g.top_k == 40


def test_max_tokens_cap() -> None:
    limits = Limits(max_tokens_cap=100)
    base = {"messages": [{"role": "user", "content": "hi"}]}
    assert convert(base, limits).max_tokens == 100
    assert convert(base, limits, defaults={"max_tokens": 5000}).max_tokens == 100  # a default is clamped
    assert convert({**base, "max_tokens": 100}, limits).max_tokens == 100
    assert convert({**base, "max_tokens": 1000, "max_completion_tokens": 10}, limits).max_tokens == 10
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(RequestError) as info:
            convert({**base, field: 101}, limits)
        assert (info.value.status_code, info.value.code, info.value.param) == (422, "max_tokens_too_large", field)
        status, body = error_from_exception(info.value)
        assert status == 422 and body["error"]["code"] == "max_tokens_too_large"


def test_response_formats() -> None:
    base = {"messages": [{"role": "user", "content": "hi"}]}
    assert convert({**base, "response_format": {"type": "text"}}).json_schema is None
    assert convert({**base, "response_format": {"type": "json_object"}}).json_schema == {"type": "object"}
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    g = convert({**base, "response_format": {"type": "json_schema",
                                             "json_schema": {"name": "count", "schema": schema, "strict": True}}})
    assert g.json_schema == schema
    g = convert({**base, "response_format": {"type": "json_schema", "json_schema": {"name": "any"}}})
    assert g.json_schema == {"type": "object"}


def test_too_many_images_is_checked_before_fetching() -> None:
    limits = Limits(max_images_per_request=2)
    # URLs that would be refused if fetched: the count must be what fails
    parts = [image("http://10.0.0.1/a.png") for _ in range(3)]
    with pytest.raises(MediaError) as info:
        convert({"messages": [user(*parts)]}, limits)
    assert (info.value.status_code, info.value.code) == (413, "too_many_images")
    # images across messages count together
    with pytest.raises(MediaError):
        convert({"messages": [user(parts[0]), user(parts[1]), user(parts[2])]}, limits)
    with pytest.raises(MediaError) as info:
        convert({"messages": [user(image(data_url(png_bytes())))]}, Limits(max_images_per_request=0))
    assert info.value.code == "too_many_images"


def test_video_frame_budget_is_shared() -> None:
    assert _allocate([6, 2], 4) == [3, 1]
    assert _allocate([2, 2], 8) == [2, 2]
    assert _allocate([10, 10, 10], 4) in ([2, 1, 1], [1, 2, 1], [1, 1, 2])
    assert _allocate([100, 1, 1], 3) == [1, 1, 1]
    limits = Limits(max_video_frames=4)
    g = convert({"messages": [user({"type": "video", "video": {"frames": colour_frames(6)}},
                                   {"type": "video", "video": {"frames": colour_frames(2)}})]}, limits)
    assert [len(it["video"]) for it in g.messages[0]["content"]] == [3, 1]
    # more videos than frames allowed: refused before fetching
    with pytest.raises(MediaError) as info:
        convert({"messages": [user(*[{"type": "video", "video": ["http://10.0.0.1/f.png"]}] * 5)]}, limits)
    assert (info.value.status_code, info.value.code) == (413, "too_many_video_frames")


def test_media_errors_carry_the_part_path() -> None:
    with pytest.raises(MediaError) as info:
        convert({"messages": [{"role": "user", "content": "hi"},
                              user(text("x"), image("data:image/png;base64,!!!!"))]})
    err = info.value
    assert (err.status_code, err.code, err.param) == (400, "invalid_base64", "messages[1].content[1].image_url.url")
    status, body = error_from_exception(err)
    assert status == 400 and body["error"]["param"] == "messages[1].content[1].image_url.url"
    with pytest.raises(MediaError) as info:
        convert({"messages": [user({"type": "video", "video": {"frames": ["http://127.0.0.1/f.png"]}})]})
    assert info.value.code == "url_not_allowed" and info.value.param == "messages[0].content[0].video"


def test_ssrf_through_the_api(server: MediaServer) -> None:
    for url in (server.url("/img.png"), "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd"):
        with pytest.raises(MediaError) as info:
            convert({"messages": [user(image(url))]})
        assert info.value.code == "url_not_allowed"


def test_video_url_part_that_is_not_a_video_names_the_part() -> None:
    junk = data_url(b"definitely not a video" * 10, "video/mp4")
    with pytest.raises(MediaError) as info:
        convert({"messages": [user(text("look"), {"type": "video_url", "video_url": {"url": junk}})]})
    assert (info.value.status_code, info.value.code) == (415, "unsupported_video_format")
    assert info.value.param == "messages[0].content[1].video_url.url"


# ----------------------------------------------------------------------------------------------------------
# responses, checked with the openai SDK types
# ----------------------------------------------------------------------------------------------------------
def token_bytes(token_id: int) -> bytes:
    return {1: b"Hel", 2: b"lo", 3: b"\xe4\xbd", 4: b"!"}[token_id]


LOGPROBS = [TokenLogprob(token_id=1, logprob=-0.1, top=[(1, -0.1), (2, -2.5)]),
            TokenLogprob(token_id=3, logprob=-1.0, top=[])]


def test_completion_response_round_trip() -> None:
    rid = new_request_id()
    body = completion_response(rid, "kimi-vl", "Hello!", "thinking about it", "stop",
                               Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=4),
                               LOGPROBS, created=1700000000, token_bytes=token_bytes)
    parsed = ChatCompletion.model_validate(json.loads(json.dumps(body)))
    assert_no_extra(parsed, allowed=frozenset({"reasoning_content"}))
    assert parsed.id == rid and rid.startswith("chatcmpl-") and parsed.object == "chat.completion"
    choice = parsed.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant" and choice.message.content == "Hello!"
    assert choice.message.model_extra == {"reasoning_content": "thinking about it"}
    assert parsed.usage.total_tokens == 15 and parsed.usage.prompt_tokens_details.cached_tokens == 4
    lp = choice.logprobs.content
    assert [t.token for t in lp] == ["Hel", "\ufffd"] and lp[1].bytes == [0xE4, 0xBD]
    assert [(t.token, t.logprob) for t in lp[0].top_logprobs] == [("Hel", -0.1), ("lo", -2.5)]
    # no reasoning, no logprobs, length
    body = completion_response(rid, "kimi-vl", "x", None, "length", {"prompt_tokens": 1, "completion_tokens": 2})
    parsed = ChatCompletion.model_validate(body)
    assert_no_extra(parsed)
    assert parsed.choices[0].logprobs is None and parsed.choices[0].finish_reason == "length"
    assert "reasoning_content" not in body["choices"][0]["message"]
    body = completion_response(rid, "kimi-vl", "x", "", "stop", None)  # non-Thinking model: no empty key, no usage
    assert "reasoning_content" not in body["choices"][0]["message"] and "usage" not in body
    assert_no_extra(ChatCompletion.model_validate(body))


def test_format_logprobs_without_tokenizer() -> None:
    out = format_logprobs(LOGPROBS)
    assert out[0]["token"] == "token_id:1" and out[0]["bytes"] is None
    assert format_logprobs(None) is None


def test_chunks_round_trip() -> None:
    rid = new_request_id()
    first = chunk(rid, "kimi-vl", 1700000000, role="assistant", content="", include_usage=True)
    mid = chunk(rid, "kimi-vl", 1700000000, content="Hel", logprobs=LOGPROBS[:1], token_bytes=token_bytes)
    think = chunk(rid, "kimi-vl", 1700000000, reasoning="hmm")
    last = chunk(rid, "kimi-vl", 1700000000, finish_reason="stop")
    use = usage_chunk(rid, "kimi-vl", 1700000000, Usage(prompt_tokens=3, completion_tokens=2))
    for body in (first, mid, think, last, use):
        parsed = ChatCompletionChunk.model_validate(json.loads(json.dumps(body)))
        assert_no_extra(parsed, allowed=frozenset({"reasoning_content"}))
        assert parsed.object == "chat.completion.chunk" and parsed.id == rid
    assert ChatCompletionChunk.model_validate(first).choices[0].delta.role == "assistant"
    assert "usage" in first and first["usage"] is None and "usage" not in mid
    assert ChatCompletionChunk.model_validate(think).choices[0].delta.model_extra == {"reasoning_content": "hmm"}
    assert ChatCompletionChunk.model_validate(last).choices[0].finish_reason == "stop"
    parsed = ChatCompletionChunk.model_validate(use)
    assert parsed.choices == [] and parsed.usage.total_tokens == 5
    assert chunk(rid, "kimi-vl", 1700000000, usage=Usage(prompt_tokens=3, completion_tokens=2)) == use


def stream_deltas() -> list[Delta]:
    return [
        Delta(request_id="r", reasoning_text="let me see"),
        Delta(request_id="r", reasoning_text=" more", text="He", logprobs=LOGPROBS[:1]),
        Delta(request_id="r", text="llo", logprobs=LOGPROBS[1:]),
        Delta(request_id="r", text="!", finish_reason="length",
              usage=Usage(prompt_tokens=7, completion_tokens=4, cached_tokens=2)),
    ]


def test_chunk_stream() -> None:
    s = ChunkStream("chatcmpl-x", "kimi-vl", include_usage=True, logprobs=True, token_bytes=token_bytes)
    chunks = [c for d in stream_deltas() for c in s.feed(d)]
    parsed = [ChatCompletionChunk.model_validate(json.loads(json.dumps(c))) for c in chunks]
    for p in parsed:
        assert_no_extra(p, allowed=frozenset({"reasoning_content"}))
    assert parsed[0].choices[0].delta.role == "assistant"
    assert sum(1 for p in parsed if p.choices and p.choices[0].delta.role) == 1
    content = "".join(p.choices[0].delta.content or "" for p in parsed if p.choices)
    reasoning = "".join((p.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for p in parsed if p.choices)
    assert content == "Hello!" and reasoning == "let me see more"
    assert [p.choices[0].finish_reason for p in parsed if p.choices][-1] == "length"
    assert all(p.choices[0].finish_reason is None for p in parsed[:-2])
    assert parsed[-1].choices == [] and parsed[-1].usage.prompt_tokens_details.cached_tokens == 2
    lps = [t.token for p in parsed if p.choices and p.choices[0].logprobs for t in p.choices[0].logprobs.content]
    assert lps == ["Hel", "\ufffd"]
    assert s.finish_reason == "length" and s.failed is None
    # without include_usage / logprobs: no usage chunk, no usage keys, no logprobs
    s = ChunkStream("chatcmpl-x", "kimi-vl")
    chunks = [c for d in stream_deltas() for c in s.feed(d)]
    assert all("usage" not in c and c["choices"] and "logprobs" not in c["choices"][0] for c in chunks)


def test_chunk_stream_error_is_left_to_the_caller() -> None:
    s = ChunkStream("chatcmpl-x", "kimi-vl", include_usage=True)
    out = s.feed(Delta(request_id="r", text="par", finish_reason="error", error="boom"))
    assert [c["choices"][0]["delta"] for c in out] == [{"role": "assistant", "content": ""}, {"content": "par"}]
    assert s.failed == "error" and s.error == "boom" and s.finish_reason is None
    assert map_finish_reason("cancelled") is None and map_finish_reason("stop") == "stop"


def test_models_and_errors() -> None:
    body = models_response(["kimi-vl", "kimi-vl-thinking"], created=1)
    assert body["object"] == "list"
    assert [Model.model_validate(m).id for m in body["data"]] == ["kimi-vl", "kimi-vl-thinking"]
    for m in body["data"]:
        assert_no_extra(Model.model_validate(m))
    for status, typ in ((400, "invalid_request_error"), (401, "authentication_error"), (413, "invalid_request_error"),
                        (429, "rate_limit_error"), (500, "server_error"), (502, "server_error")):
        err = error_body(status, "some_code", "msg", "messages[0]")
        assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
        parsed = ErrorObject.model_validate(err["error"])
        assert parsed.type == typ and parsed.code == "some_code" and parsed.param == "messages[0]"
    status, body = error_from_exception(RuntimeError("secret detail"))
    assert status == 500 and "secret" not in body["error"]["message"]


def test_sse_encoding() -> None:
    ev = sse_event({"a": "é"})
    assert ev.startswith("data: ") and ev.endswith("\n\n") and json.loads(ev[6:]) == {"a": "é"}
    assert SSE_DONE == "data: [DONE]\n\n"


# ----------------------------------------------------------------------------------------------------------
# the real openai client against our builders (httpx MockTransport)
# ----------------------------------------------------------------------------------------------------------
def mock_client(handler) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-test", base_url="http://kimiray.test/v1", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def test_openai_client_round_trip() -> None:
    seen: list[ChatCompletionRequest] = []

    def handler(request: httpx.Request) -> httpx.Response:
        req = ChatCompletionRequest.model_validate_json(request.content)
        seen.append(req)
        g = asyncio.run(to_generate_request(req, LIMITS, "chatcmpl-sdk"))
        assert g.max_tokens == 20 and g.json_schema == {"type": "object"}
        if req.stream:
            s = ChunkStream("chatcmpl-sdk", req.model, include_usage=req.include_usage, logprobs=bool(req.logprobs),
                            token_bytes=token_bytes)
            events = [sse_event(c) for d in stream_deltas() for c in s.feed(d)] + [SSE_DONE]
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content="".join(events).encode())
        body = completion_response("chatcmpl-sdk", req.model, "Hello!", "hmm", "stop",
                                   Usage(prompt_tokens=3, completion_tokens=2), LOGPROBS, token_bytes=token_bytes)
        return httpx.Response(200, json=body)

    client = mock_client(handler)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                         {"type": "image_url", "image_url": {"url": data_url(png_bytes()), "detail": "low"}}]}]
    resp = client.chat.completions.create(model="kimi-vl", messages=msgs, max_tokens=20, user="u",
                                          response_format={"type": "json_object"}, logprobs=True, top_logprobs=2)
    assert resp.choices[0].message.content == "Hello!" and resp.usage.total_tokens == 5
    assert resp.choices[0].message.model_extra["reasoning_content"] == "hmm"
    assert resp.choices[0].logprobs.content[0].top_logprobs[1].token == "lo"

    stream = client.chat.completions.create(model="kimi-vl", messages=msgs, max_completion_tokens=20, stream=True,
                                            stream_options={"include_usage": True},
                                            response_format={"type": "json_object"})
    got = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Hello!"
    assert got[-1].usage.completion_tokens == 4
    assert seen[1].stream and seen[1].include_usage


def test_openai_client_sees_our_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        try:
            asyncio.run(to_generate_request(ChatCompletionRequest.model_validate_json(request.content),
                                            Limits(max_images_per_request=0), "chatcmpl-e"))
        except Exception as exc:  # noqa: BLE001 - what the ingress does
            status, body = error_from_exception(exc)
            return httpx.Response(status, json=body)
        raise AssertionError("expected an error")

    client = mock_client(handler)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="kimi-vl", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}])
    err = info.value
    assert err.status_code == 413 and err.code == "too_many_images" and err.type == "invalid_request_error"
    assert err.param == "messages"
