"""Start a real local Ray + Serve with the kimiray app (tiny checkpoint) for integration tests."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from connectors.ports import free_port

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


REPO = str(Path(__file__).resolve().parents[1])
SHARED_CPUS = 4


def ray_env() -> dict[str, str]:
    """SAFE_ENV plus Serve's fast path (serve_app.fast_path), as ``kimiray serve`` starts Ray: the tests run the
    serving path users get. ``KIMIRAY_SERVE_FAST_PATH=0`` runs them on Serve's defaults."""
    from serve_app.fast_path import fast_path_env

    return {**SAFE_ENV, **fast_path_env(os.environ)}


@contextmanager
def patched_env(**values: str) -> Iterator[None]:
    """Set environment variables for the block and restore the previous values (or their absence) after it."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# The session's shared local Ray (and Serve on top of it), started on first use by the modules that can share
# it and stopped once at the end of the session (tests/conftest.py). Per-module settings (API keys, KIMIRAY_HOME)
# travel in each deployment's runtime_env, so modules don't see each other's state.
_shared: dict[str, Any] = {}


def shared_ray() -> Any:
    """The shared local Ray (``ray`` module), started if it is not running."""
    import ray

    if not _shared:
        if ray.is_initialized():  # someone else's Ray in this process: never take it over
            raise RuntimeError("a Ray not started by tests.serve_harness is running in this process")
        base = ray_env()
        env = {**base, "PYTHONPATH": REPO}  # workers import tests.* and serve_app by name
        with patched_env(**base):
            ray.init(include_dashboard=False, num_cpus=SHARED_CPUS, _node_ip_address="127.0.0.1",
                     runtime_env={"env_vars": env})
        _shared["ray"] = True
    return ray


def shared_serve_port() -> int:
    """Serve on the shared Ray, listening on a loopback port (started once)."""
    from ray import serve

    shared_ray()
    if "port" not in _shared:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _shared["port"] = port
    return _shared["port"]


def stop_shared_ray() -> None:
    """Stop the shared Serve and Ray if they run (a module that needs its own cluster calls this first)."""
    if not _shared:
        return
    import ray
    from ray import serve

    try:
        if "port" in _shared:
            serve.shutdown()
    finally:
        _shared.clear()
        ray.shutdown()


def _with_env(deployment: Any, env: dict[str, str], options: dict[str, Any]) -> Any:
    """``deployment.options(**options)`` whose actors also get ``env`` (merged into its ray_actor_options)."""
    actor_options = {**(deployment.ray_actor_options or {}), **options.get("ray_actor_options", {})}
    runtime_env = dict(actor_options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    actor_options["runtime_env"] = runtime_env
    return deployment.options(**{**options, "ray_actor_options": actor_options})


@contextmanager
def running_service(home: Path, api_keys: str, args: dict[str, Any] | None = None,
                    deployment_options: dict[str, dict[str, Any]] | None = None,
                    with_runner: bool = False, *, shared: bool = True) -> Iterator[str]:
    """Yields the base URL of the kimiray Serve app on loopback.

    ``shared``: deploy on the session's shared Ray + Serve and delete only the app afterwards (saves a Ray and
    Serve start and stop per module); False: a Ray of its own, shut down afterwards (tests that kill processes
    or need a fresh cluster; the shared one is stopped first, and restarts on next use)."""
    import ray
    from ray import serve

    from connectors.paths import tiny_checkpoint_dir
    from serve_app.app import Ingress, ModelServer, TaskRunnerDeployment
    from serve_app.config import AppConfig

    module_env = {"KIMIRAY_HOME": str(home), "KIMIRAY_API_KEYS": api_keys}
    base = SAFE_ENV if shared else ray_env()  # a Ray of its own starts here with the fast path's settings
    with patched_env(**base, **module_env):
        tiny_checkpoint_dir()  # write it once here, not racing in replicas
        if shared:
            port = shared_serve_port()
        else:
            stop_shared_ray()
            port = free_port()
            env_vars = {**base, **module_env, "PYTHONPATH": REPO}  # replicas import tests.agents_for_tests
            ray.init(include_dashboard=False, num_cpus=SHARED_CPUS, _node_ip_address="127.0.0.1",
                     runtime_env={"env_vars": env_vars})
        try:
            if not shared:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
            config = AppConfig.model_validate(args or {}).model_dump()
            options = deployment_options or {}
            model = _with_env(ModelServer, module_env, options.get("ModelServer", {})).bind(config)
            runner = (_with_env(TaskRunnerDeployment, module_env, options.get("TaskRunner", {})).bind(model, config)
                      if with_runner else None)
            app = _with_env(Ingress, module_env, options.get("Ingress", {})).bind(model, config, runner)
            serve.run(app, name="kimiray", route_prefix="/")
            yield f"http://127.0.0.1:{port}"
        finally:
            if shared:  # the module's apps go (kimiray and any stand-ins it added); Ray and Serve stay
                for name in list(serve.status().applications):
                    serve.delete(name)
            else:
                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
