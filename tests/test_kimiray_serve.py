"""`kimiray serve ray_config.yaml`: validates, deploys, prints "ready at URL", serves, stops on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from ray.serve.schema import ServeDeploySchema

from tests.serve_harness import SAFE_ENV, free_port

REPO = Path(__file__).resolve().parents[1]


def test_ray_config_is_a_valid_serve_config() -> None:
    raw = yaml.safe_load((REPO / "ray_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "serve_app.app:build_app"
    deployments = {d.name: d for d in app.deployments}
    model = deployments["ModelServer"]
    assert model.max_queued_requests and model.max_ongoing_requests and model.autoscaling_config
    assert model.ray_actor_options.num_gpus == 0  # CPU replicas for the tiny checkpoint; 1 per GPU on clusters
    from serve_app.config import AppConfig

    AppConfig.model_validate(app.args)  # the args parse into the app's own config


def test_refuses_public_bind_without_keys(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "ray_config.yaml").read_text())
    raw["http_options"]["host"] = "0.0.0.0"
    raw["applications"][0]["args"]["host"] = "0.0.0.0"
    config = tmp_path / "public.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIMIRAY_API_KEYS")} | SAFE_ENV
    proc = subprocess.run([sys.executable, "-m", "kimiray.cli", "serve", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "KIMIRAY_API_KEYS" in (proc.stdout + proc.stderr)


def test_kimiray_serve_runs_the_config(tmp_path: Path) -> None:
    port = free_port()
    raw = yaml.safe_load((REPO / "ray_config.yaml").read_text())
    raw["http_options"]["port"] = port
    raw["applications"][0]["runtime_env"]["env_vars"].update(SAFE_ENV | {"KIMIRAY_HOME": str(tmp_path / "home")})
    config = tmp_path / "ray_config.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = os.environ | SAFE_ENV | {"KIMIRAY_HOME": str(tmp_path / "home"), "KIMIRAY_API_KEYS": "sk-cli",
                                   "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kimiray.cli", "serve", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "ready at" in line:
                break
        assert any(f"ready at http://127.0.0.1:{port}/v1" in line for line in lines), "".join(lines)
        assert f"console: http://127.0.0.1:{port}/ui/" in proc.stdout.readline()
        console = httpx.get(f"http://127.0.0.1:{port}/ui/")  # static files, served without a key
        assert console.status_code == 200 and "script-src 'self'" in console.headers["content-security-policy"]
        headers = {"Authorization": "Bearer sk-cli"}
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers=headers, timeout=60,
                           json={"model": "kimi-vl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        rest = proc.stdout.read()
        assert "shutting down" in rest and "graceful_shutdown failed" not in rest, rest  # a clean exit reads clean
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _descendants(pid: int) -> dict[int, str]:
    """{pid: command name} of every process below ``pid`` (Linux /proc), e.g. the GCS and raylet it started."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
        names[int(entry.name)] = name
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = names.get(child, "")
        todo.extend(children.get(child, []))
    return found


def test_kimiray_serve_exits_when_its_cluster_dies(tmp_path: Path) -> None:
    """Kill the GCS and raylet of the cluster `kimiray serve` started: it says so and exits non-zero."""
    port = free_port()
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "hello", "route_prefix": "/", "import_path": "tests.tiny_serve_app:app",
                          "runtime_env": {"env_vars": {"PYTHONPATH": str(REPO)}}}]}))
    env = os.environ | SAFE_ENV | {"KIMIRAY_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1",
                                   "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "kimiray.cli", "serve", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    started: dict[int, str] = {}
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not any("ready at" in line for line in lines):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
        assert any("ready at" in line for line in lines), "".join(lines)
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text == "hello"
        started = _descendants(proc.pid)
        cluster = {pid: name for pid, name in started.items() if name in ("gcs_server", "raylet")}
        assert sorted(cluster.values()) == ["gcs_server", "raylet"], started
        for pid in cluster:
            os.kill(pid, signal.SIGKILL)
        code = proc.wait(timeout=90)
        rest = proc.stdout.read()
        assert code == 3, "".join(lines) + rest
        assert "the Ray cluster under this service died" in rest and f"127.0.0.1:{port}" in rest, rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in started:  # whatever Ray left behind (workers of the killed raylet), ours by PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
