"""TaskRunner deployment: each replica runs a ``agents.runner.TaskRunner`` loop against the shared TaskStore.

Scale runners independently of model replicas (agents spend most of their time waiting on the model, PDF
parsing or a desktop). A replica that dies stops heartbeating; its tasks go to another replica once their lease
expires. A replica being shut down (scale-down, redeploy) hands its running tasks back at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from agents.runner import RunnerOptions, TaskRunner
from connectors.backend import RayBackend
from connectors.model_client import BackendModelClient
from serve_app.config import AppConfig
from serve_app.store_guard import check_shared_stores, ray_alive_nodes
from serve_app.task_service import TaskService

log = logging.getLogger("kimiray.task_runner")


def runner_options(app_config: AppConfig) -> RunnerOptions:
    """The runner's settings from the application's config; ``limits`` goes to every agent as ``ctx.limits``."""
    cfg = app_config.tasks
    return RunnerOptions(concurrency=cfg.runner_concurrency, lease_s=cfg.lease_s, session_ttl_s=cfg.session_ttl_s,
                         model_path=app_config.model.model, limits=app_config.limits)


@serve.deployment(
    name="TaskRunner",
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
    ray_actor_options={"num_cpus": 0.5},  # agents mostly wait on the model; ray_config.yaml may override
)
class TaskRunnerDeployment:
    def __init__(self, model_server: Any, config: dict[str, Any]) -> None:
        app_config = AppConfig.model_validate(config)
        cfg = app_config.tasks
        check_shared_stores(cfg, ray_alive_nodes())
        # the same stores and agents the ingress validates against; the runner's writes wait up to half a lease for
        # replicas (a client would get a 503; a task whose progress write falls into a failover must not fail)
        service = TaskService(cfg.model_copy(update={
            "replica_ack_timeout_s": max(cfg.replica_ack_timeout_s, cfg.lease_s / 2)}))
        self.stores, registry = service.stores, service.registry
        self.runner = TaskRunner(self.stores, registry, BackendModelClient(RayBackend(model_server)),
                                 runner_options(app_config))
        self._stop = asyncio.Event()
        # Serve runs the constructor inside the replica's event loop: the loop runs beside request handling.
        self._loop_task = asyncio.get_running_loop().create_task(self.runner.run_forever(self._stop))
        log.info("TaskRunner %s: agents %s, store %s", self.runner.worker_id, registry.types(), self.stores.url)

    async def stats(self) -> dict[str, Any]:
        return self.runner.stats()

    async def wake(self) -> None:
        """A task was submitted (the Ingress calls this, fire and forget): lease now, not at the next idle poll."""
        self.runner.wake()

    async def check_health(self) -> None:
        if self._loop_task.done():
            exc = self._loop_task.exception() if not self._loop_task.cancelled() else None
            raise RuntimeError(f"task runner loop ended: {exc!r}")

    async def __del__(self) -> None:
        self._stop.set()
        try:
            await asyncio.wait_for(self._loop_task, timeout=20)
        except Exception:  # noqa: BLE001 - shutting down; leases expire anyway
            pass
        await self.stores.close()
