"""OpenAI Responses API with the official ``openai`` client, unchanged, against the real ingress + task runner and
the tiny engine: chains through the session store (across a service restart), background runs as tasks,
streaming events in order, JSON schema through guided decoding, delete, refusals of unsupported fields."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from tests.task_server import task_server
from tests.test_openai_batch import tiny_png

KEY_A, KEY_B = "sk-test-resp-alpha-01", "sk-test-resp-bravo-02"


def client(url: str, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path):
    from engine.runtime.engine import AsyncEngine

    return AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def stores_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resp-stores")


@pytest.fixture(scope="module")
def server(engine: Any, stores_dir: Path):
    with task_server(f"sqlite:///{stores_dir}", f"{KEY_A},{KEY_B}", engine=engine) as url:
        yield url


def test_create_text_and_image_input_with_usage(server: str) -> None:
    c = client(server)
    r = c.responses.create(model="kimi-vl", input="Say hello.", max_output_tokens=4,
                           extra_headers={"x-session-id": "conversation-42"})
    assert r.object == "response" and r.id.startswith("resp_") and r.status in ("completed", "incomplete")
    assert isinstance(r.output_text, str) and r.usage.output_tokens <= 4 and r.usage.input_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    image = c.responses.create(model="kimi-vl", max_output_tokens=2, instructions="Be brief.", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Say hello."},
                                     {"type": "input_image", "image_url": tiny_png((200, 10, 10))}]}])
    assert image.usage.input_tokens > r.usage.input_tokens  # the image's tokens went through the vision tower
    items = c.responses.input_items.list(image.id, order="asc").data
    assert [i.type for i in items] == ["message"] and items[0].role == "user"
    assert [p.type for p in items[0].content] == ["input_text", "input_image"]
    assert items[0].content[1].image_url.startswith("data:image/png;base64,")
    assert c.responses.retrieve(image.id).instructions == "Be brief."


def test_three_turn_chain_survives_a_service_restart(engine: Any, stores_dir: Path) -> None:
    with task_server(f"sqlite:///{stores_dir}", f"{KEY_A},{KEY_B}", engine=engine) as url:
        c = client(url)
        first = c.responses.create(model="kimi-vl", input="My name is Ada.", max_output_tokens=3)
        second = c.responses.create(model="kimi-vl", input="What is my name?", max_output_tokens=3,
                                    previous_response_id=first.id)
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    with task_server(f"sqlite:///{stores_dir}", f"{KEY_A},{KEY_B}", engine=engine) as url:  # a new service
        c = client(url)
        assert c.responses.retrieve(first.id).output_text == first.output_text
        third = c.responses.create(model="kimi-vl", input="And again?", max_output_tokens=3,
                                   previous_response_id=second.id)
        assert third.previous_response_id == second.id
        assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
        items = c.responses.input_items.list(third.id).data
        assert len(items) == 1 and items[0].content[0].text == "And again?"
        with pytest.raises(openai.NotFoundError):  # another key can neither read nor continue it
            client(url, KEY_B).responses.retrieve(third.id)
        with pytest.raises(openai.NotFoundError):
            client(url, KEY_B).responses.create(model="kimi-vl", input="x", previous_response_id=third.id)


def test_background_response_runs_as_a_task_and_is_polled(server: str) -> None:
    c = client(server)
    first = c.responses.create(model="kimi-vl", input="Remember: blue.", max_output_tokens=2)
    r = c.responses.create(model="kimi-vl", input="Which colour?", background=True, max_output_tokens=3,
                           previous_response_id=first.id)
    assert r.status == "queued" and r.background is True
    deadline = time.monotonic() + 60
    while r.status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, r
        time.sleep(0.05)
        r = c.responses.retrieve(r.id)
    assert r.status in ("completed", "incomplete") and r.usage.output_tokens <= 3
    assert r.usage.input_tokens > first.usage.input_tokens  # the chain's history was part of the prompt
    # a background response can be streamed after the fact: the whole event sequence, resumable
    events = list(c.responses.retrieve(r.id, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed",
                                                                        "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text
    live = list(c.responses.create(model="kimi-vl", input="Stream it.", background=True, stream=True,
                                   max_output_tokens=2))  # created now, the rest when its task ends
    assert live[0].type == "response.created" and live[-1].type in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in live] == list(range(len(live)))
    assert c.responses.retrieve(live[-1].response.id).output_text == live[-1].response.output_text
    with pytest.raises(openai.BadRequestError):  # only background responses can be cancelled
        c.responses.cancel(first.id)
    done = c.responses.cancel(r.id)  # already ended: unchanged
    assert done.status == r.status


def test_streaming_events_come_in_order(server: str) -> None:
    c = client(server)
    events = list(c.responses.create(model="kimi-vl", input="Count.", max_output_tokens=6, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    message = [t for t in types if not t.startswith("response.reasoning")
               and t not in ("response.created", "response.in_progress")]
    deltas = [t for t in message if t == "response.output_text.delta"]
    assert message[:2] == ["response.output_item.added", "response.content_part.added"]
    assert message[2:2 + len(deltas)] == deltas
    assert message[2 + len(deltas):] == ["response.output_text.done", "response.content_part.done",
                                         "response.output_item.done", types[-1]]
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text and final.usage.output_tokens <= 6
    assert c.responses.retrieve(final.id).output_text == text  # stored like a plain one


def test_json_schema_output_through_guided_decoding(server: str) -> None:
    schema = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "blue"]},
                                                "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["color", "n"], "additionalProperties": False}
    r = client(server).responses.create(
        model="kimi-vl", input="Pick a colour and a digit.", max_output_tokens=64,
        text={"format": {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}})
    value = json.loads(r.output_text)
    assert value["color"] in ("red", "blue") and 0 <= value["n"] <= 9 and set(value) == {"color", "n"}
    assert r.text.format.type == "json_schema"


def test_delete_and_unsupported_fields(server: str) -> None:
    c = client(server)
    r = c.responses.create(model="kimi-vl", input="Hi.", max_output_tokens=2)
    c.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="kimi-vl", input="Again.", previous_response_id=r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.delete(r.id)
    unstored = c.responses.create(model="kimi-vl", input="Hi.", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model="kimi-vl", input="Find it.", tools=[{"type": "file_search",
                                                                      "vector_store_ids": ["vs_1"]}])
    assert "tools" in err.value.message and "file_search" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model="kimi-vl", input="Hi.", extra_body={"conversation": "conv_1", "prompt": {}})
    assert "conversation" in err.value.message and "prompt" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model="kimi-vl", input=[{"role": "user", "content": [
            {"type": "input_file", "file_id": "file-1"}]}])
    assert "input_file" in err.value.message and err.value.body["param"] == "input[0].content[0].type"


def test_cancel_a_queued_background_response(tmp_path: Path) -> None:
    with task_server(f"sqlite:///{tmp_path}", KEY_A, run_tasks=False) as url:  # no runner: it stays queued
        c = client(url)
        r = c.responses.create(model="kimi-vl", input="Later.", background=True, max_output_tokens=2)
        assert c.responses.retrieve(r.id).status == "queued"
        assert c.responses.cancel(r.id).status == "cancelled"
        assert c.responses.retrieve(r.id).status == "cancelled"
        with pytest.raises(openai.BadRequestError):  # background needs store
            c.responses.create(model="kimi-vl", input="x", background=True, store=False)


class ThinkingEngine:
    """A scripted engine with the AsyncEngine's ``generate`` shape: reasoning deltas, then text (a Thinking
    model); a prompt containing FAIL ends in an engine error."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def generate(self, request: Any):
        from engine.runtime.request import Delta, Usage

        self.requests.append(request)
        rid = request.request_id
        if "FAIL" in json.dumps(request.messages, default=str):
            yield Delta(request_id=rid, text="par")
            yield Delta(request_id=rid, finish_reason="error", error="engine exploded")
            return
        for piece in ("Let me", " think."):
            yield Delta(request_id=rid, reasoning_text=piece)
        yield Delta(request_id=rid, text="Hello")
        yield Delta(request_id=rid, text=" world", finish_reason="stop",
                    usage=Usage(prompt_tokens=12, completion_tokens=6))

    def stats(self) -> dict[str, Any]:
        return {}


def test_reasoning_items_and_a_failed_stream_with_a_thinking_model(tmp_path: Path) -> None:
    engine = ThinkingEngine()
    with task_server(f"sqlite:///{tmp_path}", KEY_A, engine=engine, run_tasks=False) as url:
        c = client(url)
        r = c.responses.create(model="kimi-vl", input="Hi", previous_response_id=None)
        assert [item.type for item in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == "Let me think." and r.output_text == "Hello world"
        assert r.usage.input_tokens == 12 and r.usage.output_tokens == 6 and r.usage.total_tokens == 18
        events = list(c.responses.create(model="kimi-vl", input="Hi", stream=True,
                                         extra_headers={"x-session-id": "conv-7"}))
        assert [e.type for e in events] == [
            "response.created", "response.in_progress",
            "response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.delta",
            "response.reasoning_text.done", "response.output_item.done",
            "response.output_item.added", "response.content_part.added", "response.output_text.delta",
            "response.output_text.delta", "response.output_text.done", "response.content_part.done",
            "response.output_item.done", "response.completed"]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert events[2].output_index == 0 and events[7].output_index == 1 and events[9].output_index == 1
        assert events[-1].response.output[0].type == "reasoning" and events[-1].response.output_text == "Hello world"
        assert engine.requests[-1].session_id == "conv-7"  # the routing header reached the model request
        second = c.responses.create(model="kimi-vl", input="Again", previous_response_id=r.id)
        assert engine.requests[-1].session_id == r.id  # a chain routes by its first response's id
        assert [m["role"] for m in engine.requests[-1].messages] == ["user", "assistant", "user"]
        assert engine.requests[-1].messages[1]["content"] == "Hello world"  # earlier reasoning is not re-sent
        c.responses.create(model="kimi-vl", input="Third", previous_response_id=second.id)
        assert engine.requests[-1].session_id == r.id
        c.chat.completions.create(model="kimi-vl", messages=[{"role": "user", "content": "Hi"}],
                                  extra_headers={"x-session-id": "chat-9"})
        assert engine.requests[-1].session_id == "chat-9"  # the header on chat completions: routing only
        failed = list(c.responses.create(model="kimi-vl", input="FAIL now", stream=True))
        assert failed[-1].type == "response.failed" and failed[-1].response.status == "failed"
        assert failed[-1].response.error.message == "engine exploded"
        with pytest.raises(openai.InternalServerError):
            c.responses.create(model="kimi-vl", input="FAIL again")
