"""Refuse to run a cluster on a private store.

Why: with no ``tasks.stores_url`` every process opens the embedded SQLite store under its own node's disk, so on
more than one node a task accepted by an Ingress on one node is invisible to a TaskRunner on another, sessions
split across nodes and a lost node loses them, silently. The guard makes that a start-up error instead. An
operator who really has a shared directory (NFS, one machine simulating a cluster) names it explicitly with
``sqlite:///shared/dir``; Redis (``redis://``, ``redis+sentinel://``) is always shared.
"""

from __future__ import annotations

from connectors.stores import stores_url_from_env
from serve_app.config import TasksConfig

__all__ = ["PrivateStoreOnCluster", "check_shared_stores", "ray_alive_nodes"]


class PrivateStoreOnCluster(RuntimeError):
    """The Ray cluster has several nodes but the stores are each node's own embedded SQLite."""


def check_shared_stores(tasks: TasksConfig, alive_nodes: int) -> None:
    """Raise :class:`PrivateStoreOnCluster` when ``alive_nodes`` > 1 and the stores resolve to the embedded
    default (no URL, no ``$KIMIRAY_STORES_URL`` / ``$REDIS_URL``, or ``embedded``)."""
    url = tasks.stores_url or stores_url_from_env()
    if alive_nodes <= 1 or (url is not None and url != "embedded"):
        return
    raise PrivateStoreOnCluster(
        f"refusing to start: this Ray cluster has {alive_nodes} nodes but tasks.stores_url is not set, so every "
        "node would keep tasks and sessions in its own embedded SQLite store (a task accepted on one node would "
        "be invisible to runners on another, and lost with its node). Set tasks.stores_url (or "
        "$KIMIRAY_STORES_URL) to redis://HOST:6379/0 or, for Redis HA, "
        "redis+sentinel://S1:26379,S2:26379,S3:26379/SERVICE; or name a directory every node shares with "
        "sqlite:///shared/dir.")


def ray_alive_nodes() -> int:
    """Alive nodes of the Ray cluster this process is connected to (1 when Ray is not initialised)."""
    import ray

    if not ray.is_initialized():
        return 1
    return sum(1 for node in ray.nodes() if node.get("Alive"))
