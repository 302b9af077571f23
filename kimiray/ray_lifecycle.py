"""Stopping the Serve applications this process deployed, and noticing when the Ray cluster under it died.

Why not ``serve.shutdown()``: it asks the Serve controller to shut down and then waits on a call that only ends
when the controller kills itself; Ray retries that call (the controller's methods retry forever) and logs
``Task ServeController.graceful_shutdown failed ... killed by ray.kill`` on every normal exit. Deleting our
applications (``serve.delete`` drains their replicas: in-flight requests finish, task runners hand their leases
back) and then shutting down the Ray we started ourselves ends the same way, without that noise.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

log = logging.getLogger("kimiray")


def stop_serve(app_names: list[str] | None = None, *, owns_ray: bool = True) -> None:
    """Delete ``app_names`` (default: every application) and, if this process started Ray, shut Ray down.

    On a cluster this process only connected to (``owns_ray=False``), Serve itself is shut down too, as
    ``serve run`` does, and the connection is closed."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        names = app_names if app_names is not None else list(serve.status().applications)
        for name in names:
            serve.delete(name)  # blocks until the app's replicas are gone (graceful: they drain)
        if not owns_ray:
            serve.shutdown()
    finally:
        ray.shutdown()


def gcs_address() -> str | None:
    """``host:port`` of the GCS of the cluster this driver is connected to (None when not connected)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - older Ray: no such attribute; the caller falls back to Serve status
        return None


def cluster_problem(gcs: str | None, timeout_s: float = 2.0) -> str | None:
    """Why the cluster looks dead (its GCS refuses connections, or Serve cannot be asked), or None if alive.

    A TCP connect to the GCS is cheap and never blocks for long; Ray's own client calls to a dead GCS can hang
    for minutes, which is exactly what a watchdog must not do."""
    if gcs:
        host, _, port = gcs.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
                return None
        except OSError as exc:
            return f"the Ray cluster's GCS at {gcs} is unreachable ({exc.strerror or exc})"
    return None


def raylet_alive(pid: int | None) -> bool:
    """Whether this machine's raylet process (when we know its PID) still runs."""
    if not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_raylet_pid() -> int | None:
    """The PID of the raylet of the local node this driver started (None when unknown)."""
    try:
        import ray

        node: Any = ray._private.worker._global_node  # noqa: SLF001 - the only place Ray keeps it
        info = node.all_processes.get("raylet") if node is not None else None
        return info[0].process.pid if info else None
    except Exception:  # noqa: BLE001 - best effort: the GCS check still runs
        return None
