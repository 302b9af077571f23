"""``kimiray serve``: run ray_config.yaml the way ``serve run`` does, with progress and a "ready at URL" line.

While serving it watches the Ray cluster (its GCS, and the raylet it started): when the cluster dies the port is
closed for good, so it says so and exits non-zero (a supervisor such as systemd restarts it) instead of
sitting there silently."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

SAFE_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0"}
EXIT_CLUSTER_DIED = 3
WATCH_EVERY_S = 2.0


def _load_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"kimiray serve: cannot read {path}: {exc}") from None
    if not isinstance(config, dict) or "applications" not in config:
        raise SystemExit(f"kimiray serve: {path} is not a Ray Serve config (no 'applications')")
    return config


def _check_keys(config: dict[str, Any]) -> None:
    """Refuse to expose an unauthenticated service beyond loopback, before anything starts."""
    from serve_app.auth import AuthConfigError, check_bind_allowed, load_api_keys
    from serve_app.config import AppConfig

    host = (config.get("http_options") or {}).get("host", "127.0.0.1")
    for app in config["applications"]:
        app_config = AppConfig.model_validate(app.get("args") or {})
        if app_config.host != host:
            raise SystemExit(
                f"kimiray serve: application {app.get('name')!r} has args.host={app_config.host!r} but "
                f"http_options.host={host!r}; set both to the same address"
            )
        try:
            check_bind_allowed(host, bool(load_api_keys(app_config.auth)))
        except AuthConfigError as exc:
            raise SystemExit(f"kimiray serve: {exc}") from None


def run_serve(config_path: str, address: str | None = None, timeout_s: float = 900.0) -> int:
    import ray
    from ray import serve

    from kimiray.ray_lifecycle import cluster_problem, gcs_address, local_raylet_pid, raylet_alive, stop_serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    from serve_app.fast_path import apply_fast_path, uses_haproxy

    for key, value in SAFE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if address is None:  # Ray starts here: its processes inherit the fast path's settings
        added = apply_fast_path()
        if added:
            print(f"[kimiray] Serve fast path: {', '.join(f'{k}={v}' for k, v in sorted(added.items()))} "
                  f"(KIMIRAY_SERVE_FAST_PATH=0 for Serve's defaults)", flush=True)
    elif not uses_haproxy():
        print("[kimiray] note: the cluster's Serve settings are those its `ray start` had; for the fast path start "
              "its nodes with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1 (docs/architecture.md)", flush=True)
    path = Path(config_path)
    raw = _load_config(path)
    _check_keys(raw)
    schema = ServeDeploySchema.model_validate(raw)
    print(f"[kimiray] starting Ray ({'local' if not address else address}) …", flush=True)
    started = time.monotonic()
    ray.init(address=address, include_dashboard=False, namespace="serve",
             runtime_env={"working_dir": None} if address else None)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location
    )
    client.deploy_apps(schema, _blocking=False)
    print(f"[kimiray] deploying {len(schema.applications)} application(s) from {path} …", flush=True)
    last = ""
    while True:
        status = serve.status()
        apps = status.applications
        line = ", ".join(f"{name}: {app.status}" for name, app in apps.items()) or "waiting for controller"
        if line != last:
            print(f"[kimiray] {line} ({time.monotonic() - started:.0f}s)", flush=True)
            last = line
        states = [str(app.status) for app in apps.values()]
        if apps and all(s.endswith("RUNNING") for s in states):
            break
        failed = [f"{n}: {a.message}" for n, a in apps.items() if str(a.status).endswith(("DEPLOY_FAILED", "UNHEALTHY"))]
        if failed:
            print("[kimiray] deployment failed:\n  " + "\n  ".join(failed), file=sys.stderr, flush=True)
            stop_serve(list(apps), owns_ray=address is None)
            return 1
        if time.monotonic() - started > timeout_s:
            print("[kimiray] timed out waiting for the application", file=sys.stderr, flush=True)
            return 1
        time.sleep(1.0)
    http = schema.http_options
    print(f"[kimiray] ready at http://{http.host}:{http.port}/v1 (docs: http://{http.host}:{http.port}/docs)",
          flush=True)
    print(f"[kimiray] console: http://{http.host}:{http.port}/ui/ (sign in with an API key)", flush=True)

    stop = {"now": False}

    def on_signal(signum, frame):  # noqa: ARG001
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    gcs, raylet = gcs_address(), (local_raylet_pid() if address is None else None)
    next_check = time.monotonic() + WATCH_EVERY_S
    while not stop["now"]:
        time.sleep(0.5)
        if time.monotonic() < next_check:
            continue
        next_check = time.monotonic() + WATCH_EVERY_S
        problem = cluster_problem(gcs) or (None if raylet_alive(raylet) else f"the raylet (pid {raylet}) exited")
        if problem:
            print(f"[kimiray] the Ray cluster under this service died: {problem}; "
                  f"http://{http.host}:{http.port} is down. Exiting.", file=sys.stderr, flush=True)
            return EXIT_CLUSTER_DIED
    print("[kimiray] shutting down (draining in-flight requests) …", flush=True)
    stop_serve([app.name for app in schema.applications], owns_ray=address is None)
    return 0
