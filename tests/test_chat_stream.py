"""The OpenAI chat stream's endings, through the real ingress app in-process with a scripted backend: a finished
answer ends with [DONE]; every failure mid-stream ends with one OpenAI error event and no [DONE]; the engine
stream is closed however the stream ends. (Disconnects against the real engine: tests/test_serve.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from openai.types.chat import ChatCompletionChunk

from engine.runtime.engine import EngineDeadError
from engine.runtime.request import Delta, GenerateRequest, Usage
from serve_app.config import AppConfig
from serve_app.ingress import create_app, install_state
from tests.runtime_helpers import play_script

KEY = "sk-stream-test"
USAGE = Usage(prompt_tokens=7, completion_tokens=3)


class ScriptedBackend:
    """Plays a script: Deltas are yielded, numbers are pauses (seconds), exceptions are raised."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.closed = 0

    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        return play_script(self.script, self._close)

    def _close(self) -> None:
        self.closed += 1

    async def complete(self, request: GenerateRequest) -> list[Delta]:
        return [d async for d in self.generate(request)]

    async def stats(self) -> dict[str, Any]:
        return {}

    async def ready(self) -> bool:
        return True


def _delta(text: str = "", **kw: Any) -> Delta:
    return Delta(request_id="r", text=text, **kw)


def _stream(script: list[Any], monkeypatch: pytest.MonkeyPatch, *, timeout_s: float = 30.0,
            include_usage: bool = True) -> tuple[list[Any], ScriptedBackend]:
    """POSTs a streamed chat request; returns its events (parsed JSON, or the string "[DONE]") and the backend."""
    monkeypatch.setenv("KIMIRAY_API_KEYS", KEY)
    app = create_app()
    backend = ScriptedBackend(script)
    install_state(app, AppConfig.model_validate({"request_timeout_s": timeout_s}), backend)  # type: ignore[arg-type]
    body = {"model": "kimi-vl", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": include_usage}}

    async def main() -> list[Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kimiray.test") as client:
            async with client.stream("POST", "/v1/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {KEY}"}) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = [line async for line in response.aiter_lines()]
        data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert all(not line or line.startswith("data: ") for line in lines), lines
        return [d if d == "[DONE]" else json.loads(d) for d in data]

    return asyncio.run(main()), backend


def _text(events: list[Any]) -> str:
    return "".join((e["choices"][0]["delta"].get("content") or "") for e in events
                   if isinstance(e, dict) and e.get("choices"))


def test_finished_answer_ends_with_done_and_is_wire_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    script = [_delta("Hel"), _delta("lo", reasoning_text=""), _delta("", finish_reason="stop", usage=USAGE)]
    events, backend = _stream(script, monkeypatch)
    assert events[-1] == "[DONE]" and backend.closed == 1
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]  # the openai package's own type
    assert chunks[0].choices[0].delta.role == "assistant"
    assert _text(events) == "Hello"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("failure, status_code", [
    (_delta("", finish_reason="error", error="the sampler blew up"), "generation_failed"),
    (_delta("", finish_reason="cancelled"), "cancelled"),
    (RuntimeError("boom"), "internal_error"),
    (EngineDeadError("engine thread died"), "unavailable"),
    (None, "internal_error"),  # the engine stream just ends, without a finish reason
])
def test_failure_mid_stream_ends_with_an_error_event_and_no_done(monkeypatch: pytest.MonkeyPatch,
                                                                  failure: Any, status_code: str) -> None:
    script = [_delta("Hel"), _delta("lo")] + ([failure] if failure is not None else [])
    events, backend = _stream(script, monkeypatch)
    assert "[DONE]" not in events
    assert _text(events) == "Hello"  # what was generated before the failure was delivered
    last = events[-1]
    assert set(last) == {"error"} and last["error"]["code"] == status_code and last["error"]["message"]
    assert not any(isinstance(e, dict) and e.get("choices") and e["choices"][0].get("finish_reason")
                   for e in events)  # no finish chunk pretending the answer is complete
    assert backend.closed == 1


def test_deadline_mid_stream_is_an_error_event(monkeypatch: pytest.MonkeyPatch) -> None:
    script = [_delta("Hel"), 5.0, _delta("", finish_reason="stop", usage=USAGE)]
    events, backend = _stream(script, monkeypatch, timeout_s=0.3)
    assert "[DONE]" not in events and events[-1]["error"]["code"] == "timeout"
    assert backend.closed == 1  # the engine stream was closed: the request is aborted


def test_openai_client_raises_on_the_error_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """The official client turns our error event into an exception instead of a quietly short answer."""
    import openai

    monkeypatch.setenv("KIMIRAY_API_KEYS", KEY)
    app = create_app()
    backend = ScriptedBackend([_delta("Hel"), _delta("", finish_reason="error", error="bad")])
    install_state(app, AppConfig.model_validate({}), backend)  # type: ignore[arg-type]

    async def main() -> str:
        client = openai.AsyncOpenAI(api_key=KEY, base_url="http://kimiray.test/v1", max_retries=0,
                                    http_client=_openai_http_client(app))
        got = []
        stream = await client.chat.completions.create(model="kimi-vl", stream=True,
                                                      messages=[{"role": "user", "content": "hi"}])
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        return "".join(got)

    with pytest.raises(openai.APIError, match="bad"):
        asyncio.run(main())


def _openai_http_client(app: Any) -> Any:
    """An async HTTP client for the openai package (httpx2 for openai>=3, else httpx) served by ``app``."""
    import openai

    if int(openai.__version__.split(".")[0]) >= 3:
        import httpx2

        return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
