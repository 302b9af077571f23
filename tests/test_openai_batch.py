"""OpenAI Batch API with the official ``openai`` client, unchanged, against the real ingress + task runner and the
tiny engine (embedded store; Redis and killed runners in the durability test)."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from tests.task_server import task_server

KEY_A, KEY_B = "sk-test-batch-alpha-01", "sk-test-batch-bravo-02"


def tiny_png(color: tuple[int, int, int]) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (28, 28), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def batch_lines(n: int, *, max_tokens: int = 2, images_every: int = 4, ignore_eos: bool = False) -> list[dict]:
    lines = []
    for i in range(n):
        content: Any = f"line {i}: say something"
        if images_every and i % images_every == 0:
            content = [{"type": "image_url", "image_url": {"url": tiny_png((i % 255, 40, 90))}},
                       {"type": "text", "text": f"line {i}: describe the image"}]
        body = {"model": "kimi-vl", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        if ignore_eos:
            body["ignore_eos"] = True
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return lines


def jsonl(lines: list[dict]) -> bytes:
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


def client(url: str, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def wait_batch(c: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 120,
               until: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = c.batches.retrieve(batch_id)
        if batch.status in statuses or (until is not None and until(batch)):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.05)


def read_lines(c: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in c.files.content(file_id).text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    from engine.runtime.engine import AsyncEngine

    engine = AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32)
    stores = tmp_path_factory.mktemp("stores")
    with task_server(f"sqlite:///{stores}", f"{KEY_A},{KEY_B}", engine=engine) as url:
        yield url


def test_200_line_batch_with_images_every_custom_id_once(server: str) -> None:
    c = client(server)
    lines = batch_lines(200)
    upload = c.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    assert upload.object == "file" and upload.purpose == "batch" and upload.bytes == len(jsonl(lines))
    assert c.files.retrieve(upload.id).filename == "requests.jsonl"
    batch = c.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                             metadata={"job": "nightly"})
    assert batch.object == "batch" and batch.status in ("validating", "in_progress") and batch.id.startswith("batch_")
    done = wait_batch(c, batch.id, ("completed", "failed", "cancelled", "expired"))
    assert done.status == "completed", done
    assert done.request_counts.total == 200 and done.request_counts.completed == 200
    assert done.request_counts.failed == 0 and done.error_file_id is None
    assert done.metadata == {"job": "nightly"} and done.completed_at and done.in_progress_at
    out = read_lines(c, done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(line["custom_id"] for line in lines)
    for line in out:
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 2
        assert isinstance(body["choices"][0]["message"]["content"], str)
    image_prompt = next(line for line in out if line["custom_id"] == "req-0")["response"]["body"]["usage"]
    text_prompt = next(line for line in out if line["custom_id"] == "req-1")["response"]["body"]["usage"]
    assert image_prompt["prompt_tokens"] > text_prompt["prompt_tokens"]  # the image went through the vision tower
    assert done.id in [b.id for b in c.batches.list(limit=100)]
    # another key sees none of it
    other = client(server, KEY_B)
    for call in (lambda: other.batches.retrieve(batch.id), lambda: other.files.retrieve(upload.id),
                 lambda: other.files.content(done.output_file_id), lambda: other.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [b.id for b in other.batches.list()]


def test_malformed_line_is_a_400_naming_the_line(server: str) -> None:
    c = client(server)
    lines = [json.dumps(line) for line in batch_lines(5, images_every=0)]
    lines[2] = '{"custom_id": "req-2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": '
    with pytest.raises(openai.BadRequestError) as err:
        c.files.create(file=("bad.jsonl", "\n".join(lines).encode()), purpose="batch")
    assert "line 3" in err.value.message and "not valid JSON" in err.value.message
    dup = batch_lines(3, images_every=0)
    dup[2]["custom_id"] = "req-0"
    with pytest.raises(openai.BadRequestError) as err:
        c.files.create(file=("dup.jsonl", jsonl(dup)), purpose="batch")
    assert "line 3" in err.value.message and "more than once" in err.value.message
    wrong = batch_lines(2, images_every=0)
    wrong[1]["url"] = "/v1/embeddings"
    with pytest.raises(openai.BadRequestError) as err:
        c.files.create(file=("url.jsonl", jsonl(wrong)), purpose="batch")
    assert "line 2" in err.value.message and "/v1/embeddings" in err.value.message
    bad_body = batch_lines(2, images_every=0)
    bad_body[0]["body"]["temperature"] = 9
    with pytest.raises(openai.BadRequestError) as err:
        c.files.create(file=("body.jsonl", jsonl(bad_body)), purpose="batch")
    assert "line 1" in err.value.message and "temperature" in err.value.message
    with pytest.raises(openai.NotFoundError):
        c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.APIStatusError) as err:
        c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="1h")
    assert err.value.status_code in (400, 422)


def test_cancel_mid_way_keeps_finished_lines_and_reports_the_rest(server: str) -> None:
    c = client(server)
    lines = batch_lines(400, max_tokens=24, images_every=0, ignore_eos=True)
    upload = c.files.create(file=("slow.jsonl", jsonl(lines)), purpose="batch")
    batch = c.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_batch(c, batch.id, ("completed",), until=lambda b: b.request_counts.completed > 0)
    cancelling = c.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_batch(c, batch.id, ("cancelled", "completed"))
    assert done.status == "cancelled" and done.cancelled_at
    ok, bad = read_lines(c, done.output_file_id), read_lines(c, done.error_file_id)
    assert 0 < len(ok) < 400 and len(ok) == done.request_counts.completed
    ids = [line["custom_id"] for line in ok + bad]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # each exactly once
    assert all(line["error"]["code"] == "batch_cancelled" for line in bad)


def test_runner_killed_mid_batch_and_redis_restart_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """Redis store, runners as real worker processes: SIGKILL the runner once lines are checkpointed, SIGKILL and
    restart redis-server, then a second runner finishes: every custom_id once, checkpointed lines not re-run."""
    import asyncio
    import os
    import signal
    import subprocess
    import sys

    from connectors.stores import open_stores
    from tests.redis_harness import redis_server

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "RAY_USAGE_STATS_ENABLED": "0", "KIMIRAY_HOME": str(tmp_path)}

    def start_worker(url: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "agents.worker", "--stores", url, "--model", "tiny",
                                 "--concurrency", "2", "--lease-s", "2"], cwd=str(repo), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def checkpointed(url: str, task_id: str) -> dict[str, Any]:
        stores = open_stores(url)
        try:
            record = await stores.tasks.get(task_id, None)
            if record is None or record.session_id is None:
                return {}
            partials = await stores.sessions.partials(record.session_id, None)
            return {k: v for k, v in partials.items() if k.startswith("r.")}
        finally:
            await stores.close()

    lines = batch_lines(200, max_tokens=24, ignore_eos=True)
    workers: list[subprocess.Popen] = []
    with redis_server(tmp_path / "redis") as redis, \
            task_server(redis.url, KEY_A, run_tasks=False) as url:
        try:
            c = client(url)
            upload = c.files.create(file=("r.jsonl", jsonl(lines)), purpose="batch")
            batch = c.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
            task_id = "task_" + batch.id.removeprefix("batch_")
            workers.append(start_worker(redis.url))
            deadline = time.monotonic() + 180
            before: dict[str, Any] = {}
            while not before:
                assert time.monotonic() < deadline, "the first runner checkpointed nothing"
                time.sleep(0.05)
                before = asyncio.run(checkpointed(redis.url, task_id))
            workers[0].send_signal(signal.SIGKILL)  # no release, no goodbye
            workers[0].wait()
            before = asyncio.run(checkpointed(redis.url, task_id))
            assert 0 < len(before) < 200, len(before)
            redis.stop(kill=True)  # appendfsync always: what was acknowledged survives
            redis.start()
            assert c.batches.retrieve(batch.id).status in ("in_progress", "validating")
            workers.append(start_worker(redis.url))
            done = wait_batch(c, batch.id, ("completed", "failed", "cancelled", "expired"), timeout=240)
            assert done.status == "completed", done
            assert done.request_counts.completed == 200 and done.request_counts.total == 200
            out = read_lines(c, done.output_file_id)
            assert sorted(line["custom_id"] for line in out) == sorted(line["custom_id"] for line in lines)
            by_id = {line["custom_id"]: line for line in out}
            for key, line in before.items():  # checkpointed before the kill: written as stored, not run again
                assert by_id[lines[int(key[2:])]["custom_id"]] == line
            task = asyncio.run(_task(redis.url, task_id))
            assert task.attempts >= 2
        finally:
            for proc in workers:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


async def _task(url: str, task_id: str) -> Any:
    from connectors.stores import open_stores

    stores = open_stores(url)
    try:
        return await stores.tasks.get(task_id, None)
    finally:
        await stores.close()


def test_sdk_helpers_and_cli_batch_submit(server: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kimiray import batch_cli
    from kimiray.client import Client
    from kimiray.errors import InvalidRequestError

    with Client(server, KEY_A) as kc:
        upload = kc.batch_file([{"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 2}
                                for i in range(5)])
        assert upload["purpose"] == "batch"
        seen: list[str] = []
        batch = kc.wait_batch(kc.create_batch(upload["id"])["id"], timeout=60, poll_s=0.05,
                              on_progress=lambda b: seen.append(b["status"]))
        assert batch["status"] == "completed" and seen[-1] == "completed"
        assert sorted(kc.batch_results(batch)) == [f"request-{i}" for i in range(5)]
        with pytest.raises(InvalidRequestError) as err:
            kc.batch_file(b'{"custom_id": "a"}\n')
        assert "line 1" in str(err.value)
    source = tmp_path / "nightly.jsonl"
    source.write_bytes(jsonl(batch_lines(6, images_every=3)))
    code = batch_cli.main(["batch", "submit", str(source), "--url", server, "--api-key", KEY_A, "--poll", "0.05",
                           "--metadata", "job=cli"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["status"] == "completed" and report["request_counts"]["completed"] == 6
    written = [json.loads(line) for line in (tmp_path / "nightly.output.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] for line in written) == [f"req-{i}" for i in range(6)]


def test_expired_completion_window_reports_every_line_as_batch_expired(server: str) -> None:
    """A batch whose 24 h window has passed (submitted as its task with an old ``created_at``) runs nothing and
    ends ``expired``, with every custom_id in the error file."""
    import httpx

    c = client(server)
    lines = batch_lines(3, images_every=0)
    upload = c.files.create(file=("late.jsonl", jsonl(lines)), purpose="batch")
    task = httpx.post(f"{server}/v1/tasks", headers={"Authorization": f"Bearer {KEY_A}"}, json={
        "type": "openai_batch", "input": {"input_file_id": upload.id, "created_at": time.time() - 25 * 3600}}).json()
    batch_id = "batch_" + task["id"].removeprefix("task_")
    done = wait_batch(c, batch_id, ("expired", "completed", "failed", "cancelled"))
    assert done.status == "expired" and done.expired_at and done.output_file_id is None
    bad = read_lines(c, done.error_file_id)
    assert sorted(line["custom_id"] for line in bad) == ["req-0", "req-1", "req-2"]
    assert {line["error"]["code"] for line in bad} == {"batch_expired"}
