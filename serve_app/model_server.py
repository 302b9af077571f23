"""ModelServer: one AsyncEngine per replica (one replica per GPU, or a CPU replica for the tiny checkpoint)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from connectors.delta_wire import coalesce, merge, pack_batch
from connectors.paths import tiny_checkpoint_dir
from connectors.sim_engine import SimEngine, is_simulated_model
from engine.runtime.request import Delta, GenerateRequest
from serve_app.config import AppConfig
from serve_app.metrics import ServeMetrics
from serve_app.routing import SessionAffinityRouter

log = logging.getLogger("kimiray.model_server")

# A replica whose engine has work but made no step for this long is wedged: the health check fails and
# Serve replaces the replica.
WEDGED_AFTER_S = 120.0


def _seconds_since_process_start() -> float | None:
    """Wall time since this process started (Linux ``/proc``), or None where that is not available."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - ticks / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError):
        return None


@serve.deployment(
    name="ModelServer",
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=2,
    graceful_shutdown_timeout_s=120,
    # A session's requests go to the replica holding its prefix cache (serve_app.routing).
    request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter),
)
class ModelServer:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = AppConfig.model_validate(config)
        if is_simulated_model(cfg.model.model):  # capacity planning only: asked for by name, never a default
            self.engine = SimEngine.from_model(cfg.model.model or "")
            self.name = cfg.model.served_name
            self.metrics = ServeMetrics(model=self.name)
            log.warning("ModelServer runs a SIMULATED model (%s): no weights, filler tokens, H100-measured step "
                        "times; for capacity planning only", cfg.model.model)
            return
        import torch

        from engine.runtime.engine import AsyncEngine

        path = cfg.model.model or str(tiny_checkpoint_dir())
        device = cfg.model.device or ("cuda" if torch.cuda.is_available() else "cpu")
        started = time.monotonic()
        self.engine = AsyncEngine.from_pretrained(path, device=device, dtype=cfg.model.dtype, **cfg.model.engine)
        self.name = cfg.model.served_name
        self.metrics = ServeMetrics(model=self.name)
        self.startup = {"load_s": round(time.monotonic() - started, 2),
                        "process_start_to_ready_s": _seconds_since_process_start()}
        log.info("ModelServer loaded %s on %s in %.1fs", path, device, time.monotonic() - started)

    async def generate(self, request: GenerateRequest | dict[str, Any]) -> AsyncIterator[list[tuple]]:
        """The stream, one Ray item per batch of deltas that were ready together (one delta when the caller keeps
        up), as plain tuples (``connectors.delta_wire``: ``RayBackend`` turns them back into ``Delta`` s)."""
        async for batch in coalesce(self._measured(request)):
            yield pack_batch(batch)

    async def complete(self, request: GenerateRequest | dict[str, Any]) -> list[Delta]:
        """The whole generation in one reply: a non-streaming HTTP request then costs one Ray round trip instead
        of one per token. Cancelling the call (client gone) cancels the generation. The deltas come merged
        (``delta_wire.merge``: same text, tokens and logprobs in order, usually one ``Delta``)."""
        return merge([delta async for delta in self._measured(request)])

    async def _measured(self, request: GenerateRequest | dict[str, Any]) -> AsyncIterator[Delta]:
        """The engine's deltas; a request that finishes normally records its decode rate (tokens after the first
        delta / time from the first delta to the last) in ``generation_tokens_per_second``."""
        first_at, first_tokens = None, 0
        async for delta in self.engine.generate(request):
            now = time.monotonic()
            if first_at is None:
                first_at, first_tokens = now, len(delta.token_ids)
            elif delta.finish_reason in ("stop", "length") and delta.usage is not None and now > first_at:
                decoded = delta.usage.completion_tokens - first_tokens
                if decoded > 0:
                    self.metrics.generation_rate(decoded / (now - first_at))
            yield delta

    async def stats(self) -> dict[str, Any]:
        """The engine's statistics and this replica's cold start (``startup``: checkpoint load, and process start
        to ready: what a replacement replica costs)."""
        return {**self.engine.stats(), "startup": getattr(self, "startup", None)}

    async def ready(self) -> bool:
        return self.engine.alive

    async def node_id(self) -> str:
        """The Ray node this replica runs on (placement checks in multi-node tests and ops tooling)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    async def replica_id(self, request: GenerateRequest | dict[str, Any] | None = None) -> str:
        """This replica's unique id, the one the session router hashes. ``request`` is ignored here; the router
        reads its ``session_id``, so a caller can ask which replica a session goes to (affinity checks, ops)."""
        return serve.get_replica_context().replica_id.unique_id

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it. It also exports
        the engine's gauges (running / waiting sequences, cache usage, cache hit ratios) to Ray's metrics: the one
        place they are set, so each replica reports its own engine once per period."""
        stats = self.engine.stats()
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.engine_stats(stats)
        if not stats["alive"]:
            raise RuntimeError("engine thread is not running")
        busy = stats["running"] + stats["waiting"] > 0
        if busy and stats["seconds_since_step"] > WEDGED_AFTER_S:
            raise RuntimeError(f"engine wedged: no step for {stats['seconds_since_step']:.0f}s with work queued")

    async def __del__(self) -> None:
        # Serve has already stopped routing new requests and waited for in-flight ones (graceful shutdown);
        # stop the engine thread cleanly.
        await self.engine.shutdown(drain=True)
