"""The simulated model (``sim:h100``) behind the real Serve app: only when named, and it says so in /v1/models."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.serve_harness import running_service

pytestmark = pytest.mark.integration
KEY = "sk-sim-serve-0001"
H = {"Authorization": f"Bearer {KEY}"}


def test_sim_model_serves_chat_and_is_labelled(tmp_path: Path) -> None:
    args = {"model": {"model": "sim:h100"}, "tasks": {"stores_url": f"sqlite:///{tmp_path / 'stores'}"}}
    with running_service(tmp_path / "home", KEY, args) as url, httpx.Client(base_url=url, headers=H,
                                                                            timeout=60) as http:
        models = http.get("/v1/models").json()["data"]
        assert models[0]["simulated"] is True and "SIMULATED" in models[0]["owned_by"]
        reply = http.post("/v1/chat/completions", json={"model": "kimi-vl", "max_tokens": 7,
                                                        "messages": [{"role": "user", "content": "hello"}]})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] == 7 and body["choices"][0]["finish_reason"] == "length"
        stats = http.get("/v1/stats").json()
        assert stats["simulated"] is True and stats["profile"] == "h100"


def test_a_real_model_is_not_marked_simulated(tmp_path: Path) -> None:
    from serve_app.config import AppConfig

    assert AppConfig().model.model is None  # the default is the real engine (tiny checkpoint), never the sim
