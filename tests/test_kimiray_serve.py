"""`kimiray serve ray_config.yaml`: validates, deploys, prints "ready at URL", serves, stops on SIGTERM."""

from __future__ import annotations

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
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
