"""Prometheus metrics of the serving app, through ``ray.util.metrics``.

Every method of :class:`ServeMetrics` is a no-op until Ray is initialised in the process (a driver after
``ray.init`` or any Ray worker, Serve replicas included): the Ray metric objects are created lazily on the first
call that finds ``ray.is_initialized()``, and ``ray`` is not even imported before that, so unit code runs without
Ray. Recording never raises: a failure is logged once per metric and the request carries on.

Names (Ray's exporter adds the ``ray_`` prefix, and ``_total`` to counters)::

    kimiray_requests                   counter    route, status, model, key_id   (the only metric with key_id)
    kimiray_request_latency_seconds    histogram  route, status, model
    kimiray_prompt_tokens              counter    model
    kimiray_completion_tokens          counter    model
    kimiray_generation_tokens_per_second histogram model                      (one observation per request)
    kimiray_kv_cache_usage             gauge      model, replica               (fraction 0..1)
    kimiray_engine_running             gauge      model, replica
    kimiray_engine_waiting             gauge      model, replica
    kimiray_prefix_cache_hit_ratio     gauge      model, replica               (cumulative hits / queries)
    kimiray_vision_cache_hits          gauge      model, replica               (cumulative count)
    kimiray_vision_cache_hit_ratio     gauge      model, replica
    kimiray_engine_preemptions         gauge      model, replica               (cumulative count)
    kimiray_engine_alive               gauge      model, replica               (1/0)

Who records what: the Ingress records requests, latency and tokens; each ModelServer replica records the decode
rate of every request that finishes (tokens after the first delta / time from first to last delta) and sets the
engine gauges from its health check (every 10 s), so every replica's engine is exported once, under its own
``replica`` tag. ``kimiray_engine_waiting`` is the replica's queue depth.

``status`` is the class ("2xx", "4xx", ...); ``route`` should be a route template, and when ``routes`` is given
anything outside it is recorded as "other", so scanners can't grow the label set. Gauges carry ``replica`` (the
Serve replica id, "driver" outside a replica) so replicas on one node don't overwrite each other's values.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterable, Mapping

logger = logging.getLogger(__name__)

__all__ = ["ServeMetrics", "status_class", "LATENCY_BOUNDARIES_S", "RATE_BOUNDARIES"]

LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
RATE_BOUNDARIES = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0]

_REQ_TAGS = ("route", "status", "model", "key_id")
_LAT_TAGS = ("route", "status", "model")
_MODEL_TAGS = ("model",)
_GAUGE_TAGS = ("model", "replica")

# name -> (kind, description, tag keys[, boundaries])
_SPECS: dict[str, tuple] = {
    "requests": ("counter", "HTTP requests by route, status class, model and API key id", _REQ_TAGS),
    "request_latency_seconds": ("histogram", "HTTP request latency in seconds", _LAT_TAGS, LATENCY_BOUNDARIES_S),
    "prompt_tokens": ("counter", "Prompt tokens processed", _MODEL_TAGS),
    "completion_tokens": ("counter", "Completion tokens generated", _MODEL_TAGS),
    "generation_tokens_per_second": ("histogram", "Per-request decode rate in tokens per second", _MODEL_TAGS,
                                     RATE_BOUNDARIES),
    "kv_cache_usage": ("gauge", "Fraction of KV cache blocks in use", _GAUGE_TAGS),
    "engine_running": ("gauge", "Sequences running in the engine", _GAUGE_TAGS),
    "engine_waiting": ("gauge", "Sequences waiting in the engine scheduler", _GAUGE_TAGS),
    "prefix_cache_hit_ratio": ("gauge", "Prefix cache hit blocks / queried blocks (since start)", _GAUGE_TAGS),
    "vision_cache_hits": ("gauge", "Vision encoder cache hits (since start)", _GAUGE_TAGS),
    "vision_cache_hit_ratio": ("gauge", "Vision encoder cache hits / lookups (since start)", _GAUGE_TAGS),
    "engine_preemptions": ("gauge", "Sequences preempted by the scheduler (since start)", _GAUGE_TAGS),
    "engine_alive": ("gauge", "1 while the engine loop is alive, else 0", _GAUGE_TAGS),
}


def status_class(status: int | str) -> str:
    """200 -> "2xx"; anything that is not an HTTP status -> "unknown"."""
    try:
        code = int(status)
    except (TypeError, ValueError):
        return "unknown"
    return f"{code // 100}xx" if 100 <= code <= 599 else "unknown"


def _ray_ready() -> bool:
    import sys

    ray = sys.modules.get("ray")  # not imported -> certainly not initialised; don't pay the import
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized())
    except Exception:  # pragma: no cover - a broken ray install
        return False


def _replica_tag() -> str:
    import sys

    serve = sys.modules.get("ray.serve")  # a replica has it imported; elsewhere don't pay for importing it
    if serve is None:
        return "driver"
    try:
        return str(serve.get_replica_context().replica_tag)
    except Exception:  # RayServeException outside a replica
        return "driver"


class ServeMetrics:
    """Thin, never-raising wrappers on Ray metrics; no-ops without Ray (see the module doc)."""

    def __init__(self, model: str = "kimi-vl", *, routes: Iterable[str] | None = None, prefix: str = "kimiray_",
                 enabled: bool | None = None) -> None:
        """``enabled``: None = whenever Ray is initialised; False = always no-op; True = create the metrics
        even without Ray (they then record into the process but are exported by nobody)."""
        self.model = str(model)
        self.prefix = prefix
        self.routes = frozenset(routes) if routes is not None else None
        self._enabled = enabled
        self._metrics: dict[str, Any] | None = None
        self._replica = "driver"
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    # -- plumbing -----------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether calls record anything (creates the Ray metrics the first time it turns true)."""
        return self._get() is not None

    def _get(self) -> dict[str, Any] | None:
        if self._metrics is not None:
            return self._metrics
        if self._enabled is False or (self._enabled is None and not _ray_ready()):
            return None
        with self._lock:
            if self._metrics is None:
                try:
                    self._metrics = self._create()
                except Exception as e:  # never break serving over metrics
                    logger.warning("kimiray metrics disabled: cannot create Ray metrics: %s", e)
                    self._enabled = False
                    return None
        return self._metrics

    def _create(self) -> dict[str, Any]:
        from ray.util.metrics import Counter, Gauge, Histogram

        self._replica = _replica_tag()
        out: dict[str, Any] = {}
        for name, spec in _SPECS.items():
            kind, desc, tags = spec[0], spec[1], spec[2]
            full = self.prefix + name
            if kind == "counter":
                out[name] = Counter(full, description=desc, tag_keys=tags)
            elif kind == "histogram":
                out[name] = Histogram(full, description=desc, boundaries=list(spec[3]), tag_keys=tags)
            else:
                out[name] = Gauge(full, description=desc, tag_keys=tags)
        return out

    def _record(self, name: str, method: str, value: float, tags: dict[str, str]) -> None:
        m = self._get()
        if m is None:
            return
        try:
            getattr(m[name], method)(value, tags=tags)
        except Exception as e:
            if name not in self._warned:
                self._warned.add(name)
                logger.warning("kimiray metric %s%s not recorded: %s", self.prefix, name, e)

    def _route(self, route: str) -> str:
        route = str(route or "unknown")
        if self.routes is not None and route not in self.routes:
            return "other"
        return route[:128]

    def _gauge(self, name: str, value: Any) -> None:
        if value is None:
            return
        try:
            v = float(value)
        except (TypeError, ValueError):
            return
        self._record(name, "set", v, {"model": self.model, "replica": self._replica})

    # -- API ------------------------------------------------------------------------------------------------

    def request(self, route: str, status: int | str, key_id: str | None, latency_s: float | None) -> None:
        """One finished HTTP request (count + latency). ``key_id`` is a KeyIdentity.key_id, never a key."""
        if self._get() is None:
            return
        route, cls = self._route(route), status_class(status)
        self._record("requests", "inc", 1.0, {"route": route, "status": cls, "model": self.model,
                                                "key_id": str(key_id) if key_id else "none"})
        if latency_s is not None and latency_s >= 0:
            self._record("request_latency_seconds", "observe", float(latency_s),
                         {"route": route, "status": cls, "model": self.model})

    def tokens(self, prompt: int, completion: int) -> None:
        """Tokens of one request (zeros are skipped: Ray counters only take positive increments)."""
        if self._get() is None:
            return
        if prompt and prompt > 0:
            self._record("prompt_tokens", "inc", float(prompt), {"model": self.model})
        if completion and completion > 0:
            self._record("completion_tokens", "inc", float(completion), {"model": self.model})

    def generation_rate(self, tokens_per_s: float) -> None:
        """Decode rate of one request, observed into a histogram."""
        if tokens_per_s is not None and tokens_per_s >= 0:
            self._record("generation_tokens_per_second", "observe", float(tokens_per_s), {"model": self.model})

    def engine_stats(self, stats: Mapping[str, Any]) -> None:
        """Set the gauges from ``AsyncEngine.stats()``; missing keys are skipped."""
        if self._get() is None or not stats:
            return
        self._gauge("engine_running", stats.get("running"))
        self._gauge("engine_waiting", stats.get("waiting"))
        self._gauge("kv_cache_usage", stats.get("cache_usage"))
        hits, queries = stats.get("prefix_cache_hit_blocks"), stats.get("prefix_cache_query_blocks")
        if hits is not None and queries:
            self._gauge("prefix_cache_hit_ratio", hits / queries)
        v_hits, v_miss = stats.get("vision_cache_hits"), stats.get("vision_cache_misses")
        self._gauge("vision_cache_hits", v_hits)
        if v_hits is not None and v_miss is not None and (v_hits + v_miss) > 0:
            self._gauge("vision_cache_hit_ratio", v_hits / (v_hits + v_miss))
        self._gauge("engine_preemptions", stats.get("preemptions"))
        if "alive" in stats:
            self._gauge("engine_alive", 1.0 if stats["alive"] else 0.0)

    def __repr__(self) -> str:
        return f"ServeMetrics(model={self.model!r}, active={self._metrics is not None})"
