"""The ingress's state and the errors its routes raise, shared by the chat routes (``serve_app.ingress``) and the
task / session routes (``serve_app.tasks_api``) without either importing the other.

Routes reach the state through :func:`app_state`, a FastAPI dependency, so the same app runs behind Ray Serve
(``RayBackend``) and in-process for tests and benchmarks (``LocalBackend``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request

from connectors.backend import Backend
from serve_app.auth import ApiKeyAuth, KeyLimiter, RateLimited, check_bind_allowed, load_api_keys
from serve_app.config import AppConfig
from serve_app.metrics import ServeMetrics
from serve_app.task_service import TaskService


class ApiError(Exception):
    """An error with its HTTP status and OpenAI-style body."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.param = status, code, message, headers or {}, param


def rate_limited(exc: RateLimited, message: str) -> ApiError:
    """The 429 for a refused per-key limiter, with Retry-After in whole seconds (at least 1)."""
    return ApiError(429, "rate_limited", message, {"Retry-After": str(max(1, int(exc.retry_after_s + 0.999)))})


def _limiters(config: AppConfig) -> tuple[Any, Any]:
    """(requests, creations) limiters: in Redis, shared by every Ingress replica, when the stores are on Redis
    (``serve_app.cluster_limits``); in this process for the embedded store (one machine)."""
    from connectors.stores import stores_url_from_env
    from connectors.stores.sentinel import is_sentinel_url

    auth = config.auth
    url = config.tasks.stores_url or stores_url_from_env()
    if url is None or not (url.startswith(("redis://", "rediss://", "unix://")) or is_sentinel_url(url)):
        return (KeyLimiter(auth.requests_per_minute, auth.max_concurrent_per_key),
                KeyLimiter(auth.creates_per_minute, auth.max_concurrent_per_key))
    from connectors.stores.redis_store import connect
    from serve_app.cluster_limits import ClusterLimiter

    redis = connect(url, retries=1)  # a limiter must not stall requests for long while Redis is away
    slot_ttl = config.request_timeout_s + 60
    return (ClusterLimiter(redis, "req", auth.requests_per_minute, auth.max_concurrent_per_key, slot_ttl_s=slot_ttl),
            ClusterLimiter(redis, "create", auth.creates_per_minute, None))


class IngressState:
    """What the routes use: config, backend, auth, per-key limiters (requests; stored creations), metrics."""

    def __init__(self, config: AppConfig, backend: Backend, task_service: Any = None,
                 wake_runner: Callable[[], None] | None = None) -> None:
        self.config = config
        self.backend = backend
        self._task_service = task_service
        self._wake_runner = wake_runner
        self.auth = ApiKeyAuth(load_api_keys(config.auth), config.auth)
        check_bind_allowed(config.host, self.auth.enabled)  # no keys -> loopback only, or refuse to start
        self.limiter, self.create_limiter = _limiters(config)
        self.metrics = ServeMetrics(model=config.model.served_name)

    def tasks(self) -> TaskService:
        """The task/session service, opened on first use (a chat-only deployment never touches a store)."""
        if self._task_service is None:
            self._task_service = TaskService(self.config.tasks, on_submitted=self._wake_runner)
        return self._task_service


# Ray Serve runs the user constructor before it attaches its own copy of the FastAPI app, so a replica keeps
# its state here; in-process apps (tests, benchmarks) keep theirs on ``app.state.kimiray``.
_replica_state: IngressState | None = None


def install_state(app: FastAPI | None, config: AppConfig, backend: Backend, task_service: Any = None,
                  wake_runner: Callable[[], None] | None = None) -> IngressState:
    """Attach state to ``app`` (in-process use) or, with ``app=None``, to this replica process."""
    global _replica_state
    state = IngressState(config, backend, task_service, wake_runner)
    if app is None:
        _replica_state = state
    else:
        app.state.kimiray = state
    return state


def app_state(request: Request) -> IngressState:
    """The app's state; a FastAPI dependency (``Depends(app_state)``) for routes, called directly by middleware."""
    state = getattr(request.app.state, "kimiray", None) or _replica_state
    if state is None:
        raise ApiError(503, "starting", "the service is starting", {"Retry-After": "2"})
    return state
