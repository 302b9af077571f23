"""The stream's way across the Ray handle (connectors.delta_wire, ModelServer.generate, RayBackend) keeps the
content and order exact: text, reasoning, token ids, logprobs, finish, usage and errors mid-stream, whether the
caller keeps up (one delta per item, no waiting) or lags (deltas merged per item). The Ray hop is played by a
handle that pickles every item, as Ray does; the real app path is tests/test_serve.py."""

from __future__ import annotations

import asyncio
import json
import pickle
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from connectors.backend import RayBackend
from connectors.delta_wire import coalesce, merge, pack, pack_batch, unpack, unpack_batch
from engine.runtime.engine import EngineDeadError
from engine.runtime.request import Delta, GenerateRequest, TokenLogprob, Usage
from serve_app.config import AppConfig
from serve_app.ingress import create_app, install_state
from serve_app.model_server import ModelServer
from tests.runtime_helpers import play_script

KEY = "sk-wire-test"
USAGE = Usage(prompt_tokens=11, completion_tokens=6, cached_tokens=2)


def _lp(token: int) -> TokenLogprob:
    return TokenLogprob(token_id=token, logprob=-0.25 * token, top=[(token, -0.25 * token), (token + 1, -3.0)],
                        token_bytes=f"t{token}".encode(), top_bytes=[f"t{token}".encode(), b"\xff"])


def _script(logprobs: bool = False) -> list[Delta]:
    """Reasoning, then content (with a multi-byte character split over deltas), then the finish."""
    parts = [("", "think "), ("", "more"), ("Hé", ""), ("llo ", ""), ("wörld", ""), ("!", "")]
    out = [Delta(request_id="r", text=t, reasoning_text=r, token_ids=[i + 1],
                 logprobs=[_lp(i + 1)] if logprobs else None) for i, (t, r) in enumerate(parts)]
    out.append(Delta(request_id="r", finish_reason="stop", usage=USAGE))
    return out


def _content(deltas: list[Delta]) -> tuple:
    return ("".join(d.text for d in deltas), "".join(d.reasoning_text for d in deltas),
            [t for d in deltas for t in d.token_ids],
            [lp.model_dump() for d in deltas for lp in d.logprobs or []],
            deltas[-1].finish_reason, deltas[-1].usage, deltas[-1].error)


# ------------------------------------------------------------------------------------------------ the format
def test_pack_unpack_round_trip_is_exact_and_pickles_as_builtins() -> None:
    for delta in [*_script(logprobs=True), Delta(request_id="r", finish_reason="error", error="boom")]:
        wire = pickle.loads(pickle.dumps(pack(delta)))
        assert unpack(wire).model_dump() == delta.model_dump()
        assert b"pydantic" not in pickle.dumps(pack(delta)) and b"Delta" not in pickle.dumps(pack(delta))
    # an older replica's item (a Delta or its dict) still reads
    delta = _script()[2]
    assert unpack(delta) is delta and unpack(delta.model_dump()).model_dump() == delta.model_dump()
    assert [d.model_dump() for d in unpack_batch(delta)] == [delta.model_dump()]


@pytest.mark.parametrize("logprobs", [False, True])
def test_merge_keeps_content_and_order(logprobs: bool) -> None:
    script = _script(logprobs)
    merged = merge(script)
    assert _content(merged) == _content(script)
    # reasoning before content may share a delta (a chunk shows reasoning first): one item, nothing reordered
    assert [(d.text, d.reasoning_text) for d in merged] == [("Héllo wörld!", "think more")]
    assert merged[-1].finish_reason == "stop" and merged[-1].usage == USAGE
    # content followed by reasoning is never merged into one (a chunk shows reasoning first)
    mixed = [Delta(request_id="r", text="a"), Delta(request_id="r", reasoning_text="b"),
             Delta(request_id="r", finish_reason="stop")]
    assert [(d.text, d.reasoning_text) for d in merge(mixed)] == [("a", ""), ("", "b")]
    # nothing after a finish is folded into it
    assert len(merge([Delta(request_id="r", finish_reason="stop"), Delta(request_id="r", text="x")])) == 2
    assert [unpack(x).model_dump() for x in pack_batch(script)] == [d.model_dump() for d in merged]


# ------------------------------------------------------------------------------------------------ coalescing
def _source(script: list[Any], closed: list[str]) -> AsyncIterator[Delta]:
    return play_script(script, lambda: closed.append("closed"))


def test_coalesce_sends_each_delta_at_once_when_the_consumer_keeps_up() -> None:
    script = _script()
    paced: list[Any] = [x for d in script for x in (0.01, d)]

    async def main() -> list[tuple[list[Delta], float]]:
        loop = asyncio.get_running_loop()
        got = []
        async for batch in coalesce(_source(paced, [])):
            got.append((batch, loop.time()))
        return got

    got = asyncio.run(main())
    assert [len(b) for b, _ in got] == [1] * len(script)  # one item per delta: nothing waits to be merged
    assert [b[0] for b, _ in got] == script


def test_coalesce_batches_what_piles_up_while_the_consumer_lags() -> None:
    script = _script()
    closed: list[str] = []

    async def main() -> list[list[Delta]]:
        batches = []
        async for batch in coalesce(_source([script[0], 0.01, *script[1:]], closed)):
            batches.append(batch)
            await asyncio.sleep(0.05)  # a slow consumer: the rest arrives meanwhile
        return batches

    batches = asyncio.run(main())
    assert [len(b) for b in batches] == [1, len(script) - 1]
    assert [d for b in batches for d in b] == script
    assert closed == ["closed"]


def test_coalesce_raises_a_mid_stream_error_after_the_deltas_before_it() -> None:
    script = _script()

    async def main() -> tuple[list[Delta], BaseException | None]:
        got: list[Delta] = []
        try:
            async for batch in coalesce(_source([*script[:3], EngineDeadError("engine stopped")], [])):
                got += batch
        except EngineDeadError as exc:
            return got, exc
        return got, None

    got, error = asyncio.run(main())
    assert got == script[:3] and isinstance(error, EngineDeadError)


def test_closing_the_coalesced_stream_closes_the_source() -> None:
    """The caller went away: the engine stream is closed (AsyncEngine aborts the request there)."""
    closed: list[str] = []

    async def main() -> None:
        stream = coalesce(_source([_script()[0], 10.0, _script()[1]], closed))
        assert len(await anext(stream)) == 1
        await stream.aclose()
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert closed == ["closed"]


# ------------------------------------------------------------------------------------------------ end to end
class _Metrics:
    def generation_rate(self, rate: float) -> None:
        pass


class ScriptedEngine:
    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.closed: list[str] = []

    def generate(self, request: Any) -> AsyncIterator[Delta]:
        return _source(self.script, self.closed)


class PicklingHandle:
    """A DeploymentHandle stand-in over a real ModelServer instance: every item is pickled as Ray would, and the
    caller reads items ``lag_s`` apart (a busy ingress)."""

    def __init__(self, server: Any, lag_s: float = 0.0) -> None:
        self.server, self.lag_s, self.items = server, lag_s, 0
        self.generate = self._Method(self._generate)
        self.complete = self._Method(self._complete)

    class _Method:
        def __init__(self, fn: Any) -> None:
            self.remote = fn

    def options(self, stream: bool = False) -> "PicklingHandle":
        return self

    def _generate(self, request: GenerateRequest) -> Any:
        outer = self

        class Response:
            def __init__(self) -> None:
                self.stream = outer.server.generate(request)

            def __aiter__(self) -> "Response":
                return self

            async def __anext__(self) -> Any:
                if outer.lag_s:
                    await asyncio.sleep(outer.lag_s)
                item = await anext(self.stream)
                outer.items += 1
                return pickle.loads(pickle.dumps(item))

            def cancel(self) -> None:
                asyncio.ensure_future(self.stream.aclose())

        return Response()

    async def _complete(self, request: GenerateRequest) -> Any:
        return pickle.loads(pickle.dumps(await self.server.complete(request)))


class _ModelServer(ModelServer.func_or_class):  # type: ignore[misc,name-defined]
    def __del__(self) -> None:  # the real one awaits the engine's shutdown; there is no engine thread here
        pass


def _model_server(script: list[Any]) -> tuple[Any, ScriptedEngine]:
    server = object.__new__(_ModelServer)
    server.engine = ScriptedEngine(script)
    server.metrics = _Metrics()
    server.name = "kimi-vl"
    return server, server.engine


def _sse(backend: Any, monkeypatch: pytest.MonkeyPatch, *, stream: bool = True, logprobs: bool = False) -> Any:
    monkeypatch.setenv("KIMIRAY_API_KEYS", KEY)
    app = create_app()
    install_state(app, AppConfig(), backend)  # type: ignore[arg-type]
    body: dict[str, Any] = {"model": "kimi-vl", "messages": [{"role": "user", "content": "hi"}], "stream": stream,
                            "stream_options": {"include_usage": True} if stream else None}
    if logprobs:
        body.update(logprobs=True, top_logprobs=1)

    async def main() -> Any:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kimiray.test") as c:
            if not stream:
                r = await c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
                return r.json()
            async with c.stream("POST", "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {KEY}"}) as r:
                assert r.status_code == 200
                lines = [line async for line in r.aiter_lines()]
        return [d if d == "[DONE]" else json.loads(d) for d in
                (line.removeprefix("data: ") for line in lines if line.startswith("data: "))]

    return asyncio.run(main())


def _reassemble(events: list[Any]) -> dict[str, Any]:
    text = reasoning = ""
    logprobs: list[Any] = []
    finish = usage = error = None
    for e in events:
        if e == "[DONE]":
            continue
        if "error" in e:
            error = e["error"]
            continue
        if e.get("usage"):
            usage = e["usage"]
        for choice in e["choices"]:
            text += choice["delta"].get("content") or ""
            reasoning += choice["delta"].get("reasoning_content") or ""
            logprobs += (choice.get("logprobs") or {}).get("content") or []
            finish = choice["finish_reason"] or finish
    return {"text": text, "reasoning": reasoning, "logprobs": logprobs, "finish": finish, "usage": usage,
            "error": error, "done": events[-1] == "[DONE]"}


@pytest.mark.parametrize("lag_s", [0.0, 0.03])
@pytest.mark.parametrize("logprobs", [False, True])
def test_served_stream_is_exact_through_the_handle(monkeypatch: pytest.MonkeyPatch, lag_s: float,
                                                    logprobs: bool) -> None:
    script = _script(logprobs)
    paced = [x for d in script for x in (0.005, d)]
    direct = _reassemble(_sse(_DirectBackend(script), monkeypatch, logprobs=logprobs))
    handle = PicklingHandle(_model_server(paced)[0], lag_s)
    served = _reassemble(_sse(RayBackend(handle), monkeypatch, logprobs=logprobs))
    assert served == direct
    assert served["text"] == "Héllo wörld!" and served["reasoning"] == "think more" and served["done"]
    assert served["usage"]["completion_tokens"] == 6 and served["finish"] == "stop"
    assert len(served["logprobs"]) == (6 if logprobs else 0)
    if lag_s:  # a lagging caller got the deltas merged: fewer Ray items than deltas
        assert handle.items < len(script)
    else:
        assert handle.items == len(script)


def test_error_mid_stream_through_the_handle_ends_with_one_error_event(monkeypatch: pytest.MonkeyPatch) -> None:
    script = _script()
    server, engine = _model_server([*script[:4], 0.01, EngineDeadError("engine stopped")])
    events = _sse(RayBackend(PicklingHandle(server)), monkeypatch)
    got = _reassemble(events)
    assert got["text"] == "Héllo " and got["reasoning"] == "think more" and not got["done"]
    assert got["error"]["code"] == "unavailable" and events[-1]["error"]
    assert engine.closed == ["closed"]


def test_non_streaming_through_the_handle_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    script = _script(logprobs=True)
    direct = _sse(_DirectBackend(script), monkeypatch, stream=False, logprobs=True)
    served = _sse(RayBackend(PicklingHandle(_model_server(script)[0])), monkeypatch, stream=False, logprobs=True)
    for body in (direct, served):
        body.pop("id"), body.pop("created")
    assert served == direct
    assert served["choices"][0]["message"]["content"] == "Héllo wörld!"


class _DirectBackend:
    """The reference: the same deltas straight into the ingress, one by one, as LocalBackend gives them."""

    def __init__(self, script: list[Delta]) -> None:
        self.script = script

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        for delta in self.script:
            yield delta

    async def complete(self, request: GenerateRequest) -> list[Delta]:
        return list(self.script)

    async def stats(self) -> dict[str, Any]:
        return {}

    async def ready(self) -> bool:
        return True


@pytest.mark.parametrize("include_usage", [False, True])
def test_chunk_templates_are_byte_exact(include_usage: bool) -> None:
    """The per-token fast path of the SSE encoder writes exactly what building + encoding each chunk writes."""
    from serve_app import openai_api
    from serve_app.chat_stream import ChunkTemplates, sse_data

    def render(**fields: Any) -> bytes:
        return sse_data(openai_api.chunk('chatcmpl-"x"', 'kimi "vl"', 1700000000, include_usage=include_usage,
                                         **fields))

    fast = ChunkTemplates(render)
    texts = ["a", "Hé", " wörld\n", '"quoted" \\ back', "\x00\x1f\u2028", "🙂", "</script><b>", "kimiray-content"]
    for content in ["", *texts]:
        for reasoning in ["", *texts[:4]]:
            if not content and not reasoning:
                continue
            slow = render(content=content or None, reasoning=reasoning or None)
            assert fast(content, reasoning) == slow, (content, reasoning)


class _PacedBackend(_DirectBackend):
    def __init__(self, script: list[Delta], pause_s: float) -> None:
        super().__init__(script)
        self.pause_s = pause_s

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        for delta in self.script:
            await asyncio.sleep(self.pause_s)
            yield delta


def test_the_ingress_merges_only_what_piles_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deltas that arrive while the previous event is being written leave as one event; paced ones one each."""
    script = _script()
    content_events = lambda events: [e for e in events if e != "[DONE]" and e.get("choices")  # noqa: E731
                                     and (e["choices"][0]["delta"].get("content")
                                          or e["choices"][0]["delta"].get("reasoning_content"))]
    paced = _sse(_PacedBackend(script, 0.02), monkeypatch)
    burst = _sse(_DirectBackend(script), monkeypatch)
    assert _reassemble(paced) == _reassemble(burst) == _reassemble(_sse(_PacedBackend(script, 0.0), monkeypatch))
    assert len(content_events(paced)) == 6  # one per token: nothing waited to be merged
    assert len(content_events(burst)) < 6  # all but the first were there at once
