"""Start a real local Ray + Serve with the kimiray app (tiny checkpoint) for integration tests."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

SAFE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "RAY_DEDUP_LOGS": "0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_service(home: Path, api_keys: str, args: dict[str, Any] | None = None,
                    deployment_options: dict[str, dict[str, Any]] | None = None,
                    with_runner: bool = False) -> Iterator[str]:
    """Yields the base URL of a Serve app on loopback; Ray and Serve are shut down afterwards."""
    import ray
    from ray import serve

    os.environ.update(SAFE_ENV)
    os.environ["KIMIRAY_HOME"] = str(home)
    os.environ["KIMIRAY_API_KEYS"] = api_keys
    from connectors.paths import tiny_checkpoint_dir

    tiny_checkpoint_dir()  # write it once here, not racing in replicas
    port = free_port()
    env_vars = {k: os.environ[k] for k in (*SAFE_ENV, "KIMIRAY_HOME", "KIMIRAY_API_KEYS")}
    env_vars["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # replicas import tests.agents_for_tests
    ray.init(include_dashboard=False, num_cpus=4, _node_ip_address="127.0.0.1", runtime_env={"env_vars": env_vars})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        from serve_app.app import Ingress, ModelServer, TaskRunnerDeployment
        from serve_app.config import AppConfig

        config = AppConfig.model_validate(args or {}).model_dump()
        options = deployment_options or {}
        model = ModelServer.options(**options.get("ModelServer", {})).bind(config)
        runner = (TaskRunnerDeployment.options(**options.get("TaskRunner", {})).bind(model, config)
                  if with_runner else None)
        app = Ingress.options(**options.get("Ingress", {})).bind(model, config, runner)
        serve.run(app, name="kimiray", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
