"""An in-process kimiray HTTP server (uvicorn in a thread) with the real ingress app, a task runner loop and
any model client - for REST and SDK tests that need no Ray."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import httpx

from tests.serve_harness import free_port


@contextmanager
def task_server(stores_url: str, api_keys: str, *, engine: Any = None, model_client: Any = None,
                agent_modules: tuple[str, ...] = ("tests.agents_for_tests",), lease_s: float = 5.0,
                run_tasks: bool = True, tasks_args: dict[str, Any] | None = None,
                app_args: dict[str, Any] | None = None) -> Iterator[str]:
    """Yields the base URL. ``engine``: an AsyncEngine for chat routes and agents (else ``model_client`` only).
    ``app_args``: other AppConfig fields (``limits``, ``auth``, ``request_timeout_s``)."""
    import uvicorn

    from agents.runner import RunnerOptions, TaskRunner
    from connectors.model_client import BackendModelClient
    from connectors.backend import LocalBackend
    from serve_app.config import AppConfig
    from serve_app.ingress import create_app, install_state
    from serve_app.task_service import TaskService

    os.environ["KIMIRAY_API_KEYS"] = api_keys
    tasks = {"stores_url": stores_url, "agent_modules": list(agent_modules), "lease_s": lease_s,
             "sse_keepalive_s": 1.0, **(tasks_args or {})}
    config = AppConfig.model_validate({**(app_args or {}), "tasks": tasks})
    port = free_port()
    app = create_app()
    backend = LocalBackend(engine) if engine is not None else None
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        service = TaskService(config.tasks)
        install_state(app, config, backend, service)  # type: ignore[arg-type]
        client = model_client or BackendModelClient(backend)
        concurrency = (tasks_args or {}).get("runner_concurrency", 2)  # TasksConfig's own default is for Serve
        runner = TaskRunner(service.stores, service.registry, client,
                            RunnerOptions(lease_s=lease_s, concurrency=concurrency))
        stop = asyncio.Event()
        state["stop"], state["loop"] = stop, asyncio.get_running_loop()
        runner_task = asyncio.create_task(runner.run_forever(stop)) if run_tasks else None
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               lifespan="off"))
        state["server"] = server
        serve = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        ready.set()
        await stop.wait()
        server.should_exit = True
        await serve
        if runner_task is not None:
            await runner_task
        await service.close()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("test server did not start")
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)


def wait_for_status(url: str, key: str, task_id: str, statuses: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(f"{url}/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}).json()
        if body.get("status") in statuses:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} still {body.get('status')} after {timeout}s: {body}")
        time.sleep(0.05)
