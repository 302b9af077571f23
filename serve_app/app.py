"""The Ray Serve application: ``Ingress`` (FastAPI) -> ``ModelServer`` replicas, and ``TaskRunner`` replicas
that run agents against the same model.

``serve run ray_config.yaml`` imports ``serve_app.app:build_app`` and passes the config's ``args``.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from connectors.backend import RayBackend
from serve_app.config import AppConfig
from serve_app.ingress import app as fastapi_app
from serve_app.model_server import ModelServer
from serve_app.state import install_state
from serve_app.store_guard import check_shared_stores, ray_alive_nodes
from serve_app.task_runner import TaskRunnerDeployment


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5})
@serve.ingress(fastapi_app)
class Ingress:
    def __init__(self, model_server: Any, config: dict[str, Any], task_runner: Any = None) -> None:
        # binding the TaskRunner makes Serve deploy the runners; each new task wakes one of them
        self.task_runner = task_runner
        app_config = AppConfig.model_validate(config)
        check_shared_stores(app_config.tasks, ray_alive_nodes())  # the cluster may have grown since build_app
        install_state(None, app_config, RayBackend(model_server),
                      wake_runner=None if task_runner is None else lambda: task_runner.wake.remote())


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder for ``serve run`` / ``serve deploy`` (``args`` = the config file's ``args``)."""
    config = AppConfig.model_validate(args or {})
    check_shared_stores(config.tasks, ray_alive_nodes())  # refuse a multi-node cluster on per-node SQLite
    payload = config.model_dump()
    model = ModelServer.bind(payload)
    return Ingress.bind(model, payload, TaskRunnerDeployment.bind(model, payload))
