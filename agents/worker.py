"""``kimiray worker``: a TaskRunner as a plain process, outside Ray Serve.

For running agents next to a desktop (the OS agent's X display), on a machine without Ray, or for scaling
runners by hand: it leases from the same store as the service (``--stores redis://...``) and calls either an
in-process engine (``--model``) or no model at all (``--model none``: agents that need one fail clearly).
SIGTERM/SIGINT hand the running tasks back to the queue before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

from connectors.backend import LocalBackend
from connectors.limits import Limits
from connectors.model_client import BackendModelClient, ModelError, ModelReply
from connectors.paths import tiny_checkpoint_dir


class NoModel:
    async def generate(self, request: Any) -> ModelReply:
        raise ModelError("this worker runs without a model (--model none)")


def limits_from_config(path: str | None) -> Limits:
    """The input limits a worker enforces: ``args.limits`` of the first application in a Serve config
    (ray_config.yaml), so tasks run here follow the same URL and size rules as the service's; none: defaults."""
    if path is None:
        return Limits()
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    apps = raw.get("applications") if isinstance(raw, dict) else None
    args = (apps[0].get("args") or {}) if apps else raw
    return Limits.model_validate(args.get("limits") or {})


async def run_worker(args: argparse.Namespace) -> int:
    from agents.registry import build_registry
    from agents.runner import RunnerOptions, TaskRunner
    from connectors.stores import open_stores, stores_url_from_env

    # a runner's writes wait longer for replicas than a client's (which gets a 503 instead): a failover must not
    # fail the task whose progress write fell into it; half a lease still leaves the heartbeat time to recover
    stores = open_stores(args.stores or stores_url_from_env(), min_replica_acks=args.min_replica_acks,
                         replica_ack_timeout_s=max(2.0, args.lease_s / 2))
    registry = build_registry(args.agent_module or [])
    if args.model == "none":
        model: Any = NoModel()
    else:
        import torch

        from engine.runtime.engine import AsyncEngine

        path = str(tiny_checkpoint_dir()) if args.model in (None, "tiny") else args.model
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = BackendModelClient(LocalBackend(AsyncEngine.from_pretrained(path, device=device)))
    model_path = None if args.model in (None, "tiny", "none") else args.model
    options = RunnerOptions(concurrency=args.concurrency, lease_s=args.lease_s, model_path=model_path,
                            limits=limits_from_config(args.config))
    runner = TaskRunner(stores, registry, model, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"[kimiray worker] {runner.worker_id}: agents {registry.types()}, store {stores.url}", flush=True)
    try:
        await runner.run_forever(stop)
    finally:
        await stores.close()
    print(f"[kimiray worker] stopped after {runner.completed} tasks", flush=True)
    return 0


def add_worker_command(subparsers: Any) -> None:
    worker = subparsers.add_parser("worker", help="run a TaskRunner in this process (leases from the store)")
    worker.add_argument("--stores", help="redis://…, redis+sentinel://h1:26379,h2:26379/service or sqlite:///dir "
                        "(default: $KIMIRAY_STORES_URL, $REDIS_URL, else the embedded store)")
    worker.add_argument("--min-replica-acks", type=int, default=None,
                        help="replicas that must confirm each task transition (Redis WAIT); default: 1 with "
                        "a Sentinel URL, else 0")
    worker.add_argument("--agent-module", action="append", help="extra module that registers agents (repeatable)")
    worker.add_argument("--model", default="tiny", help="checkpoint dir or HF id, 'tiny', or 'none'")
    worker.add_argument("--concurrency", type=int, default=2)
    worker.add_argument("--lease-s", type=float, default=30.0)
    worker.add_argument("--config", help="a Serve config (ray_config.yaml) whose args.limits the tasks follow "
                        "(URL rules, media sizes); default: the built-in limits")
    worker.set_defaults(func=lambda a: asyncio.run(run_worker(a)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(prog="kimiray-worker")
    add_worker_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["worker", *(argv or [])]) if argv is not None else parser.parse_args()
    return int(args.func(args))


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
