"""The operator's ``limits`` (ray_config.yaml) reach the tasks: agents fetch and check media under the service's
``Limits`` (``ctx.limits``), not under built-in defaults. Real embedded store, real loopback HTTP server, a
scripted model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agents.registry import build_registry
from agents.runner import RunnerOptions, TaskRunner
from agents.worker import limits_from_config
from connectors.limits import Limits
from connectors.stores import open_stores
from connectors.stores.base import TaskSubmission
from serve_app.config import AppConfig
from serve_app.task_runner import runner_options
from tests.media_helpers import MediaServer, data_url, png_bytes
from tests.scripted_models import ScriptedModel

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server() -> Iterator[MediaServer]:
    s = MediaServer()
    yield s
    s.close()


def run_chat_task(store_dir: Path, limits: Limits | None, messages: list[dict]) -> tuple[object, ScriptedModel]:
    """Submit one ``chat`` task and run it on a TaskRunner configured with ``limits`` (None: the defaults)."""

    async def main():
        stores = open_stores(f"sqlite:///{store_dir}")
        model = ScriptedModel(["seen"])
        options = RunnerOptions() if limits is None else RunnerOptions(limits=limits)
        runner = TaskRunner(stores, build_registry([]), model, options)
        try:
            await stores.tasks.submit("k1", TaskSubmission(type="chat", input={"messages": messages}))
            return await runner.run_once(), model
        finally:
            await stores.close()

    return asyncio.run(main())


def image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "what is this?"}]}]


def test_operator_allowing_private_urls_reaches_the_task(server: MediaServer, tmp_path: Path) -> None:
    url = server.url("/img.png?c=0,255,0")
    # the default refuses a loopback URL (SSRF rule) ...
    refused, model = run_chat_task(tmp_path / "a", None, image_message(url))
    assert refused.status == "failed" and refused.error.code == "url_not_allowed"
    assert model.requests == [] and server.paths.count("/img.png?c=0,255,0") == 0
    # ... an operator who allows private URLs (an intranet deployment) gets the image fetched inside the task
    operator = runner_options(AppConfig.model_validate({"limits": {"allow_private_urls": True}}))
    done, model = run_chat_task(tmp_path / "b", operator.limits, image_message(url))
    assert done.status == "succeeded", done.error
    assert server.paths.count("/img.png?c=0,255,0") == 1
    image = model.requests[0].messages[-1]["content"][0]["image"]
    assert image.getpixel((0, 0)) == (0, 255, 0)


def test_operator_tighter_image_cap_reaches_the_task(tmp_path: Path) -> None:
    two_images = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                                               {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}]
    done, _ = run_chat_task(tmp_path / "a", None, two_images)
    assert done.status == "succeeded"
    refused, model = run_chat_task(tmp_path / "b", Limits(max_images_per_request=1), two_images)
    assert refused.status == "failed" and refused.error.code == "too_many_images"
    assert "over the limit of 1" in refused.error.message and model.requests == []


def test_worker_reads_the_limits_of_the_serve_config(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "ray_config.yaml").read_text())
    config["applications"][0]["args"]["limits"]["allow_private_urls"] = True
    config["applications"][0]["args"]["limits"]["max_video_frames"] = 7
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    limits = limits_from_config(str(path))
    assert limits.allow_private_urls is True and limits.max_video_frames == 7
    assert limits_from_config(None) == Limits()
