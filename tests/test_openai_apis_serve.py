"""The OpenAI Batch and Responses APIs on the real service (local Ray + Serve, tiny checkpoint, a TaskRunner
deployment, the embedded store), with the official ``openai`` client; the Responses chain is continued after the
whole service was shut down and started again on the same store."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from tests.serve_harness import running_service
from tests.test_openai_batch import batch_lines, jsonl, read_lines, wait_batch

pytestmark = pytest.mark.timeout(600)
KEY = "sk-openai-apis-serve-01"
ARGS = {"tasks": {"lease_s": 5.0, "runner_concurrency": 2}}


def test_batch_and_a_response_chain_across_a_service_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    lines = batch_lines(24, max_tokens=2, images_every=3)
    with running_service(home, KEY, ARGS, with_runner=True) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=2, timeout=120)
        upload = c.files.create(file=("serve.jsonl", jsonl(lines)), purpose="batch")
        batch = c.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        first = c.responses.create(model="kimi-vl", input="My name is Ada.", max_output_tokens=3,
                                   extra_headers={"x-session-id": "ada"})
        second = c.responses.create(model="kimi-vl", input="What is my name?", max_output_tokens=3,
                                    previous_response_id=first.id, background=True)
        deadline = time.monotonic() + 180
        while second.status in ("queued", "in_progress"):
            assert time.monotonic() < deadline, second
            time.sleep(0.2)
            second = c.responses.retrieve(second.id)
        assert second.status in ("completed", "incomplete")
        assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
        done = wait_batch(c, batch.id, ("completed", "failed", "cancelled", "expired"), timeout=300)
        assert done.status == "completed" and done.request_counts.completed == 24, done
        out = read_lines(c, done.output_file_id)
        assert sorted(line["custom_id"] for line in out) == sorted(line["custom_id"] for line in lines)
    with running_service(home, KEY, ARGS, with_runner=True) as url:  # a new Ray, new replicas, the same store
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=2, timeout=120)
        assert c.responses.retrieve(second.id).output_text == second.output_text
        third = c.responses.create(model="kimi-vl", input="Once more?", max_output_tokens=3,
                                   previous_response_id=second.id)
        assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
        assert c.batches.retrieve(batch.id).status == "completed"
        assert len(read_lines(c, done.output_file_id)) == 24
