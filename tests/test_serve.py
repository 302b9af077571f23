"""The Serve application end to end: real local Ray, real HTTP, the official openai client, tiny checkpoint."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI
from PIL import Image

from tests.serve_harness import running_service

KEY = "sk-test-kimiray-123"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    args = {
        "request_timeout_s": 60,
        "model": {"engine": {"cache_tokens": 16384, "max_waiting": 64}},
        "auth": {"requests_per_minute": 100000, "max_concurrent_per_key": 64},
        # embedded SQLite store under KIMIRAY_HOME, shared by the Ingress and TaskRunner processes
        "tasks": {"agent_modules": ["tests.agents_for_tests"], "lease_s": 3.0, "runner_concurrency": 4},
    }
    options = {"ModelServer": {"max_ongoing_requests": 64, "max_queued_requests": 64}}
    with running_service(tmp_path_factory.mktemp("home"), f"{KEY},sk-other", args, options,
                         with_runner=True) as url:
        yield url


def _client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _png_data_url(seed: int = 0, size=(84, 56)) -> str:
    image = Image.new("RGB", size, (seed * 40 % 255, 120, 200))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_health_ready_models_docs(service) -> None:
    assert httpx.get(f"{service}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{service}/readyz").status_code == 200
    assert httpx.get(f"{service}/openapi.json").status_code == 200
    models = _client(service).models.list()
    assert [m.id for m in models.data] == ["kimi-vl"]


def test_chat_round_trip(service) -> None:
    reply = _client(service).chat.completions.create(
        model="kimi-vl", messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0,
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 5
    again = _client(service).chat.completions.create(
        model="kimi-vl", messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0,
    )
    assert again.choices[0].message.content == reply.choices[0].message.content  # greedy is deterministic


def test_streaming_with_usage_chunk(service) -> None:
    stream = _client(service).chat.completions.create(
        model="kimi-vl", messages=[{"role": "user", "content": "Stream please"}], max_tokens=10,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_image_message(service) -> None:
    reply = _client(service).chat.completions.create(
        model="kimi-vl", max_tokens=6,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png_data_url(1)}},
            {"type": "text", "text": "What is in the image?"}]}],
    )
    assert reply.usage.prompt_tokens > 10  # the image's placeholder tokens are counted


def test_json_schema_response_format(service) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = _client(service).chat.completions.create(
        model="kimi-vl", max_tokens=200, temperature=1.0, seed=3,
        messages=[{"role": "user", "content": "Give me a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int) and 0 <= value["age"] <= 120
    obj = _client(service).chat.completions.create(
        model="kimi-vl", max_tokens=200, temperature=1.0, seed=4,
        messages=[{"role": "user", "content": "Any JSON object."}], response_format={"type": "json_object"},
    )
    content = obj.choices[0].message.content
    assert content.startswith("{")
    if obj.choices[0].finish_reason == "stop":  # free-form strings may run past max_tokens with random weights
        assert isinstance(json.loads(content), dict)


def test_logprobs_show_real_tokens(service) -> None:
    reply = _client(service).chat.completions.create(
        model="kimi-vl", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(not c.token.startswith("token_id:") and c.bytes for c in content)
    assert "".join(bytes(c.bytes).decode("utf-8", "replace") for c in content).startswith(
        reply.choices[0].message.content[:1]
    )


def test_32_parallel_requests(service) -> None:
    client = AsyncOpenAI(base_url=f"{service}/v1", api_key=KEY, max_retries=0, timeout=300)

    async def one(i: int):
        return await client.chat.completions.create(
            model="kimi-vl", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=5,
        )

    async def main():
        return await asyncio.gather(*(one(i) for i in range(32)))

    replies = asyncio.run(main())
    assert len(replies) == 32 and all(r.choices[0].finish_reason in ("stop", "length") for r in replies)


def test_auth_errors(service) -> None:
    assert httpx.get(f"{service}/v1/models").status_code == 401
    bad = httpx.get(f"{service}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    assert "wrong" not in bad.text
    other = httpx.get(f"{service}/v1/models", headers={"Authorization": "Bearer sk-other"})
    assert other.status_code == 200


def test_bad_input_is_4xx_json(service) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    cases = [
        ({"model": "kimi-vl"}, 422),  # no messages
        ({"model": "kimi-vl", "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, 422),
        ({"model": "kimi-vl", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90LWFuLWltYWdl"}}]}]}, 415),
        ({"model": "kimi-vl", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]}]}, 400),
        ({"model": "kimi-vl", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 422),
    ]
    for body, status in cases:
        response = httpx.post(f"{service}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["message"]
    huge = httpx.post(f"{service}/v1/chat/completions", content=b"x" * (33 * 2**20),
                      headers=headers | {"Content-Type": "application/json"}, timeout=60)
    assert huge.status_code == 413


def test_disconnect_cancels_generation(service) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "kimi-vl", "messages": [{"role": "user", "content": "long one"}], "max_tokens": 3000,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{service}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        for i, _line in enumerate(r.iter_lines()):
            if i > 6:
                break  # leave mid-stream
    deadline = time.time() + 30
    while time.time() < deadline:
        stats = httpx.get(f"{service}/v1/stats", headers=headers).json()
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["cache_usage"] == 0:
            break
        time.sleep(0.2)
    assert stats["running"] == 0 and stats["cache_usage"] == 0, stats


def test_video_frames_and_video_url(service) -> None:
    from tests.media_helpers import make_video

    frames = {"type": "video", "video": {"frames": [_png_data_url(k) for k in range(3)], "fps": 1.0}}
    clip = {"type": "video_url",
            "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(make_video(2.0)).decode()}}
    for part in (frames, clip):
        reply = _client(service).chat.completions.create(
            model="kimi-vl", max_tokens=4,
            messages=[{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}],
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens > 20  # several frames' placeholders


def test_tasks_run_on_the_task_runner_through_the_model_service(service) -> None:
    import kimiray

    with kimiray.Client(service, api_key=KEY, timeout=60) as client:
        chat = client.submit("chat", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png_data_url(3)}},
            {"type": "text", "text": "What colour is this?"}]}], "max_tokens": 5})
        turn = client.submit("customer_service", {"message": "My invoice is wrong", "images": [_png_data_url(4)]})
        done = client.wait(chat.id, timeout=120)
        assert done.status == "succeeded" and done.result["prompt_tokens"] > 10
        answered = client.wait(turn.id, timeout=120)
        assert answered.result["turn"] == 1 and answered.result["session_id"] == answered.session_id
        follow = client.submit("customer_service", {"message": "Any update?"},
                               options={"session_id": answered.session_id})
        assert client.wait(follow.id, timeout=120).result["turn"] == 2
        events = list(client.stream_events(turn.id))
        assert [e.id for e in events] == list(range(1, len(events) + 1))
        assert events[-1].data["status"] == "succeeded"
        with kimiray.Client(service, api_key="sk-other") as other:
            with pytest.raises(kimiray.NotFoundError):
                other.get(chat.id)


def test_a_killed_task_runner_replica_loses_no_task(service) -> None:
    """SIGKILL-equivalent (ray.kill, no graceful shutdown) of the TaskRunner replica mid-task: Serve starts a new
    replica, the lease expires, and the task runs again to success - once."""
    import ray

    import kimiray

    with kimiray.Client(service, api_key=KEY, timeout=60) as client:
        task = client.submit("sleepy", {"steps": 40, "step_s": 0.1, "tag": "survivor"})
        deadline = time.monotonic() + 60
        while client.get(task.id).status != "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        runners = [a for a in ray.util.list_named_actors(all_namespaces=True)
                   if "#TaskRunner#" in a["name"]]
        assert len(runners) == 1
        ray.kill(ray.get_actor(runners[0]["name"], namespace=runners[0]["namespace"]), no_restart=True)
        done = client.wait(task.id, timeout=180)
        assert done.status == "succeeded" and done.attempts == 2 and done.result["tag"] == "survivor"
        ends = [e for e in client.stream_events(task.id) if e.data.get("status") == "succeeded"]
        assert len(ends) == 1


def test_contract_and_video_agents_through_the_ray_service(service) -> None:
    """The document and video agents on the real deployments: ingress -> TaskRunner -> ModelServer (tiny)."""
    import kimiray
    from pipelines.document.synthetic import make_contract
    from pipelines.video.synthetic import make_video

    contract = make_contract(pages=6, seed=5, scanned_pages=[], table_page=None)
    clip = make_video(None, seconds=8, fps=4, size=(160, 120))
    with kimiray.Client(service, api_key=KEY, timeout=60) as client:
        doc = client.submit("contract_extraction", {
            "blob": client.upload_file(contract.pdf), "categories": ["Governing Law"], "max_items_per_chunk": 1,
            "max_value_chars": 16, "max_quote_chars": 40, "max_output_tokens": 96})
        video = client.submit("video_analysis", {
            "blob": client.upload_file(clip.data, content_type="video/mp4"), "kind": "summarize",
            "max_frames": 8, "max_side": 160, "max_output_tokens": 96, "max_observations": 2,
            "max_text_chars": 30})
        done_doc = client.wait(doc.id, timeout=300)
        assert done_doc.status == "succeeded" and done_doc.result["page_count"] == 6
        assert client.download_artifact(doc.id, "annotated_pdf").startswith(b"%PDF-")
        done_video = client.wait(video.id, timeout=300)
        assert done_video.status == "succeeded" and done_video.result["frames_sampled"] >= 1
        assert client.download_artifact(video.id, "contact_sheet").startswith(b"\x89PNG")


def test_os_agent_replays_a_recorded_desktop_through_the_ray_service(service) -> None:
    """The OS agent on the real deployments with a recorded trajectory as its desktop (no display needed in the
    replicas): JSON action mode on the tiny model, every step recorded, a report at the end."""
    import kimiray
    from agents.os_agent.synthetic_ui import _draw_screen
    from connectors.desktop.replay import RecordedStep, RecordedTrajectory

    import random

    rng = random.Random(3)
    steps = []
    for i in range(3):
        shot = _draw_screen(rng, (320, 200), f"s{i}.png", i, 2, 1, 1)[0]
        buf = io.BytesIO()
        shot.save(buf, format="PNG")
        steps.append(RecordedStep(png=buf.getvalue(), width=320, height=200, window_title="Recorded app",
                                  action={"kind": "click", "x": 10 + i, "y": 20}))
    trajectory = RecordedTrajectory(steps=steps).model_dump_json().encode()
    with kimiray.Client(service, api_key=KEY, timeout=60) as client:
        task = client.submit("os_agent", {"goal": "Press the Save button.", "replay": client.upload_file(trajectory),
                                          "action_format": "json", "max_steps": 3, "max_output_tokens": 160,
                                          "settle_s": 0, "max_consecutive_failures": 3})
        done = client.wait(task.id, timeout=300)
        assert done.status == "succeeded", done.error
        result = done.result
        assert result["outcome"] in {"done", "failed", "max_steps", "step_failures"}
        assert [s["index"] for s in result["trajectory"]] == list(range(result["steps"]))
        assert all(s["screen_width"] == 320 for s in result["trajectory"] if s["status"] != "error")
        assert b"<img" in client.download_artifact(task.id, "report")
