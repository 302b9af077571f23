"""kimiray.langchain.ChatKimiVL against the real Serve app (local Ray, tiny random-weight checkpoint), plus a few
offline checks of message conversion, tool refusal and retries (httpx2.MockTransport: the openai client's httpx)."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx2
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from PIL import Image
from pydantic import BaseModel, Field

from kimiray.langchain import ChatKimiVL, KimiVLAPIError, KimiVLConnectionError, convert_message
from tests.serve_harness import running_service

KEY = "sk-lc-test"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    args = {"request_timeout_s": 60, "model": {"engine": {"cache_tokens": 16384}}}
    with running_service(tmp_path_factory.mktemp("home"), KEY, args) as url:
        yield f"{url}/v1"


def _llm(base_url: str, **kw) -> ChatKimiVL:
    kw.setdefault("api_key", KEY)
    kw.setdefault("timeout", 120)
    return ChatKimiVL(base_url=base_url, **kw)


def _png_b64(seed: int = 0, size=(84, 56)) -> str:
    image = Image.new("RGB", size, (seed * 40 % 255, 120, 200))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _counts(usage) -> tuple[int, int, int]:
    """Token counts without cache details (a repeated prompt hits the prefix cache)."""
    return usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)


PERSON_SCHEMA = {
    "title": "person",
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


# ------------------------------------------------------------------------------------------------------------
# Against the running service
# ------------------------------------------------------------------------------------------------------------
def test_invoke_text(service) -> None:
    llm = _llm(service, temperature=0, max_tokens=8)
    reply = llm.invoke([SystemMessage("You are terse."), HumanMessage("Hello there")])
    assert isinstance(reply, AIMessage) and isinstance(reply.content, str)
    usage = reply.usage_metadata
    assert usage["input_tokens"] > 5 and 1 <= usage["output_tokens"] <= 8
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    assert reply.response_metadata["model_name"] == "kimi-vl"
    assert reply.response_metadata["id"].startswith("chatcmpl-")
    assert reply.response_metadata["model_provider"] == "kimiray"


def test_invoke_with_image_both_formats(service) -> None:
    llm = _llm(service, temperature=0, max_tokens=6)
    b64 = _png_b64(1)
    text_only = llm.invoke([HumanMessage("What is in the image?")])
    openai_part = llm.invoke([HumanMessage(content=[
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
        {"type": "text", "text": "What is in the image?"}])])
    standard_block = llm.invoke([HumanMessage(content=[
        {"type": "image", "base64": b64, "mime_type": "image/png"},
        {"type": "text", "text": "What is in the image?"}])])
    # the image's placeholder tokens are counted, and both spellings reach the model as the same prompt
    assert openai_part.usage_metadata["input_tokens"] > text_only.usage_metadata["input_tokens"] + 4
    assert standard_block.usage_metadata["input_tokens"] == openai_part.usage_metadata["input_tokens"]
    assert standard_block.content == openai_part.content  # greedy


def test_stream_matches_invoke(service) -> None:
    llm = _llm(service, temperature=0, max_tokens=12)
    prompt = [HumanMessage("Stream please")]
    whole = llm.invoke(prompt)
    chunks = list(llm.stream(prompt))
    assert "".join(c.content for c in chunks) == whole.content
    assert chunks[-1].chunk_position == "last"
    with_usage = [c for c in chunks if c.usage_metadata]
    assert len(with_usage) == 1 and _counts(with_usage[0].usage_metadata) == _counts(whole.usage_metadata)
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert merged.content == whole.content and merged.usage_metadata["output_tokens"] == whole.usage_metadata["output_tokens"]
    assert merged.response_metadata["finish_reason"] == whole.response_metadata["finish_reason"]
    assert merged.response_metadata["model_provider"] == "kimiray"


def test_ainvoke_and_astream(service) -> None:
    llm = _llm(service, temperature=0, max_tokens=10)
    sync_reply = llm.invoke("Async hello")

    async def main():
        reply = await llm.ainvoke("Async hello")
        chunks = [c async for c in llm.astream("Async hello")]
        return reply, chunks

    reply, chunks = asyncio.run(main())
    assert reply.content == sync_reply.content
    assert _counts(reply.usage_metadata) == _counts(sync_reply.usage_metadata)
    assert "".join(c.content for c in chunks) == reply.content
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert _counts(merged.usage_metadata) == _counts(reply.usage_metadata)


def test_structured_output_pydantic(service) -> None:
    llm = _llm(service, temperature=1.0, seed=7, max_tokens=200)
    person = llm.with_structured_output(Person).invoke("Give me a person.")
    assert isinstance(person, Person) and len(person.name) <= 8 and 0 <= person.age <= 120
    raw = llm.with_structured_output(Person, include_raw=True).invoke("Give me a person.")
    assert raw["parsing_error"] is None and isinstance(raw["raw"], AIMessage)
    assert raw["parsed"] == person  # same seed, same answer
    assert Person.model_validate_json(raw["raw"].content) == person


def test_structured_output_dict_schema(service) -> None:
    llm = _llm(service, temperature=1.0, seed=11, max_tokens=200)
    value = llm.with_structured_output(PERSON_SCHEMA).invoke("Give me a person.")
    assert isinstance(value, dict) and set(value) == {"name", "age"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 120

    async def main():
        return await llm.with_structured_output(PERSON_SCHEMA).ainvoke("Give me a person.")

    assert asyncio.run(main()) == value


def test_errors(service) -> None:
    bad = _llm(service, api_key="sk-wrong", max_tokens=4)
    with pytest.raises(KimiVLAPIError) as info:
        bad.invoke("hi")
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert "sk-wrong" not in str(info.value)
    with pytest.raises(KimiVLAPIError) as info:
        list(bad.stream("hi"))
    assert info.value.status_code == 401

    async def main():
        await bad.ainvoke("hi")

    with pytest.raises(KimiVLAPIError) as info:
        asyncio.run(main())
    assert info.value.status_code == 401
    with pytest.raises(KimiVLAPIError) as info:
        _llm(service, max_tokens=10**6).invoke("hi")
    assert info.value.status_code == 422 and info.value.code == "max_tokens_too_large" and info.value.message
    with pytest.raises(KimiVLAPIError) as info:  # no key at all: no Authorization header, the server says so
        ChatKimiVL(base_url=service, api_key=None, max_tokens=4).invoke("hi")
    assert info.value.status_code == 401


def test_tools_refused(service) -> None:
    llm = _llm(service, max_tokens=4)

    def get_weather(city: str) -> str:
        """Weather in a city."""
        return "sunny"

    with pytest.raises(ValueError, match="no tool calling"):
        llm.bind_tools([get_weather])
    with pytest.raises(ValueError, match="no tool calling"):
        llm.invoke("hi", tool_choice="auto")
    with pytest.raises(ValueError, match="no tool calling"):
        llm.with_structured_output(Person, method="function_calling")
    with pytest.raises(ValueError, match="no tool calling"):
        llm.invoke([HumanMessage("hi"), AIMessage("", tool_calls=[{"name": "get_weather", "args": {}, "id": "1"}])])


# ------------------------------------------------------------------------------------------------------------
# Offline
# ------------------------------------------------------------------------------------------------------------
def test_message_conversion() -> None:
    msg = HumanMessage(content=[
        "plain",
        {"type": "image_url", "image_url": "https://example.com/a.png"},
        {"type": "image", "url": "https://example.com/b.png"},
        {"type": "image", "source_type": "base64", "data": "AAAA", "mime_type": "image/jpeg"},
        {"type": "video", "video": {"frames": ["https://example.com/f0.png"], "fps": 1}},
    ])
    parts = convert_message(msg)["content"]
    assert parts[0] == {"type": "text", "text": "plain"}
    assert [p["image_url"]["url"] for p in parts[1:4]] == [
        "https://example.com/a.png", "https://example.com/b.png", "data:image/jpeg;base64,AAAA"]
    assert parts[4]["video"]["frames"] == ["https://example.com/f0.png"]
    ai = AIMessage(content=[{"type": "reasoning", "reasoning": "hidden"}, {"type": "text", "text": "shown"}])
    assert convert_message(ai) == {"role": "assistant", "content": "shown"}
    with pytest.raises(ValueError):
        convert_message(ToolMessage(content="x", tool_call_id="1"))
    with pytest.raises(ValueError):
        convert_message(HumanMessage(content=[{"type": "image", "file_id": "file-1"}]))


def test_retries_honour_retry_after_and_are_bounded() -> None:
    calls: list[float] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        if len(calls) < 3:
            return httpx2.Response(503, headers={"Retry-After": "0"},
                                  json={"error": {"message": "busy", "type": "service_unavailable_error",
                                                  "param": None, "code": "overloaded"}})
        body = json.loads(request.content)
        assert body["top_k"] == 5 and body["model"] == "kimi-vl"
        return httpx2.Response(200, json={
            "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "kimi-vl",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok", "reasoning_content": "r"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    transport = httpx2.MockTransport(handler)
    llm = ChatKimiVL(api_key="k", http_client=httpx2.Client(transport=transport), extra_body={"top_k": 5},
                     max_retries=2)
    reply = llm.invoke("hi")
    assert reply.content == "ok" and reply.additional_kwargs["reasoning_content"] == "r" and len(calls) == 3

    calls.clear()
    llm = ChatKimiVL(api_key="k", http_client=httpx2.Client(transport=transport), max_retries=1)
    with pytest.raises(KimiVLAPIError) as info:
        llm.invoke("hi")
    assert info.value.status_code == 503 and info.value.code == "overloaded" and len(calls) == 2

    refused: list[int] = []

    def refuse(request: httpx2.Request) -> httpx2.Response:
        refused.append(1)
        raise httpx2.ConnectError("refused", request=request)

    llm = ChatKimiVL(http_client=httpx2.Client(transport=httpx2.MockTransport(refuse)), max_retries=1)
    with pytest.raises(KimiVLConnectionError):
        llm.invoke("hi")
    assert len(refused) == 2


def test_stream_reasoning_and_cut_stream() -> None:
    """reasoning_content deltas reach the chunks; an error event mid-stream raises, and so does a stream that
    stops without a finish reason (no silent truncation)."""
    def sse(*events: dict) -> bytes:
        return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)

    def delta(**d) -> dict:
        return {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "kimi-vl",
                "choices": [{"index": 0, "delta": d, "finish_reason": None}]}

    finish = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "kimi-vl",
              "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    bodies = {
        "ok": sse(delta(role="assistant", content=""), delta(reasoning_content="think"), delta(content="A"),
                  finish) + b"data: [DONE]\n\n",
        "error": sse(delta(role="assistant", content=""), delta(content="A"),
                     {"error": {"message": "boom", "type": "server_error", "param": None,
                                "code": "generation_failed"}}),
        "cut": sse(delta(role="assistant", content=""), delta(content="A")),
    }

    def handler(request: httpx2.Request) -> httpx2.Response:
        which = json.loads(request.content)["messages"][0]["content"]
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=bodies[which])

    llm = ChatKimiVL(api_key="k", http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    chunks = list(llm.stream("ok"))
    assert "".join(c.content for c in chunks) == "A"
    assert [c.additional_kwargs.get("reasoning_content") for c in chunks if c.additional_kwargs] == ["think"]
    with pytest.raises(openai.APIError, match="boom"):
        list(llm.stream("error"))
    with pytest.raises(KimiVLAPIError, match="before the answer finished"):
        list(llm.stream("cut"))
