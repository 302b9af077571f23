"""OpenAI-compatible HTTP ingress (FastAPI, served by Ray Serve through ``serve.ingress``).

Every route reads its collaborators from the app's state (``serve_app.state``: backend, config, auth, limiter,
metrics), so the same app runs behind Ray Serve (``RayBackend``) and in-process for tests and benchmarks
(``LocalBackend``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from connectors.errors import ClientInputError
from connectors.sim_engine import is_simulated_model
from engine.runtime.request import Delta, GenerateRequest
from serve_app import openai_api
from serve_app.auth import AuthError, RateLimited, peer_allowed_without_keys
from serve_app.batches import router as batches_router
from serve_app.chat_stream import chat_events, chat_stream_response
from serve_app.config import AppConfig
from serve_app.files_api import router as files_router
from serve_app.console_api import router as console_api_router
from serve_app.console_ui import is_console_path
from serve_app.console_ui import router as console_router
from serve_app.openapi_spec import install_openapi
from serve_app.responses import router as responses_router
from serve_app.state import ApiError, IngressState, rate_limited
from serve_app.state import app_state as _state
from serve_app.state import install_state as install_state  # re-exported: serve_app.app and tests install here
from serve_app.tasks_api import remember_turn, session_history
from serve_app.tasks_api import router as tasks_router

log = logging.getLogger("kimiray.ingress")
PUBLIC_ROUTES = {"/healthz", "/readyz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}


def classify(exc: BaseException) -> ApiError:
    """Map an exception from validation, media loading or the engine to an HTTP error."""
    from engine.runtime.engine import EngineDeadError, EngineOverloadedError, RequestTooLongError

    try:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    except ImportError:  # pragma: no cover - ray is a dependency of serve_app
        BackPressureError = DeploymentUnavailableError = ()  # type: ignore[assignment,misc]
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (EngineOverloadedError, BackPressureError)):
        return ApiError(503, "overloaded", "the model is at capacity; retry shortly", {"Retry-After": "1"})
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    if isinstance(exc, (EngineDeadError, DeploymentUnavailableError, ActorDiedError, ActorUnavailableError)):
        return ApiError(503, "unavailable", "the model is not available right now", {"Retry-After": "5"})
    if isinstance(exc, ClientInputError):
        return ApiError(exc.status_code, exc.code, exc.message, param=exc.param)
    from connectors.stores.base import NotFound, StoreError

    if isinstance(exc, NotFound):  # deleted between the route's check and its write
        return ApiError(404, "not_found", "not found")
    from connectors.stores.redis_store import NotReplicated

    if isinstance(exc, NotReplicated):  # applied on the primary only: never report it as accepted
        log.warning("write not replicated: %s", exc)
        return ApiError(503, "not_replicated", "the write could not be confirmed on a replica in time; retry "
                        "shortly (with the same Idempotency-Key for a task)", {"Retry-After": "2"})
    if isinstance(exc, StoreError):  # Redis restarting or unreachable: transient, and no store details leak
        log.warning("store error: %s", exc)
        return ApiError(503, "store_unavailable", "the task store is not available right now; retry shortly",
                        {"Retry-After": "2"})
    if isinstance(exc, RequestTooLongError):
        return ApiError(400, "context_length_exceeded", str(exc))
    if isinstance(exc, (ValidationError, ValueError)):
        return ApiError(400, "invalid_request", str(exc))
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return ApiError(504, "timeout", "the request took longer than the server's timeout")
    log.exception("unexpected error", exc_info=exc)
    return ApiError(500, "internal_error", "internal error")


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(
        openai_api.error_body(err.status, err.code, err.message, err.param), status_code=err.status,
        headers=err.headers
    )


def create_app() -> FastAPI:
    app = FastAPI(
        title="kimiray",
        description="Kimi-VL served on Ray: OpenAI-compatible chat completions with images, video frames, "
        "streaming and JSON-schema output.",
        version="0.1.0",
    )

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        path = request.url.path
        key_id = "-"
        state: IngressState | None = None
        try:
            state = _state(request)
            if not state.auth.enabled and not peer_allowed_without_keys(request.client and request.client.host):
                raise ApiError(403, "remote_without_keys", "this service has no API keys and answers only callers "
                               "on its own machine")
            if path not in PUBLIC_ROUTES and not is_console_path(path):
                try:
                    identity = state.auth.authenticate(request.headers.get("authorization"))
                except AuthError as exc:
                    raise ApiError(exc.status, exc.code, "a valid API key is required (Authorization: Bearer …)",
                                   exc.headers)  # 401: WWW-Authenticate: Bearer (RFC 6750)
                key_id = identity.key_id
                request.state.key_id = key_id
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > state.config.limits.max_body_bytes:
                raise ApiError(413, "body_too_large", f"request body over {state.config.limits.max_body_bytes} bytes")
            response = await call_next(request)
        except ApiError as err:
            response = error_response(err)
        except Exception as exc:  # a route's unexpected failure is still a JSON error, never Starlette's text 500
            response = error_response(classify(exc))
        if state is not None:
            # the route template, never the raw path: task ids or a scanner's paths would grow the label set
            # (and the Ingress's memory) without bound
            route = getattr(request.scope.get("route"), "path", None) or "unmatched"
            state.metrics.request(route, response.status_code, key_id, time.perf_counter() - started)
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()
        )
        return error_response(ApiError(422, "invalid_request", problems or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return error_response(ApiError(exc.status_code, "http_error", str(exc.detail)))

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(ClientInputError)
    async def on_client_input_error(request: Request, exc: ClientInputError):
        return error_response(classify(exc))

    app.include_router(tasks_router)
    app.include_router(files_router)
    app.include_router(batches_router)
    app.include_router(responses_router)
    app.include_router(console_api_router)
    app.include_router(console_router)
    install_openapi(app, PUBLIC_ROUTES)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness of the ingress itself (no auth)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz(request: Request):
        """Ready when a model replica answers (no auth)."""
        if await _state(request).backend.ready():
            return {"status": "ready"}
        return JSONResponse({"status": "not ready"}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/v1/models", tags=["openai"])
    async def models(request: Request) -> dict[str, Any]:
        config = _state(request).config
        body = openai_api.models_response([config.model.served_name])
        if is_simulated_model(config.model.model):  # say it loudly: its replies are filler (connectors.sim_engine)
            for entry in body["data"]:
                entry["simulated"] = True
                entry["owned_by"] = f"kimiray ({config.model.model}, SIMULATED)"
        return body

    @app.get("/v1/stats", tags=["ops"])
    async def stats(request: Request) -> dict[str, Any]:
        """Engine statistics of one model replica: queue depth, cache usage, prefix- and vision-cache hits. (The
        gauges in Ray's metrics come from each ModelServer's health check, not from here.)"""
        return await _state(request).backend.stats()

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(request: Request, body: openai_api.ChatCompletionRequest):
        state = _state(request)
        config: AppConfig = state.config
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        key_id = getattr(request.state, "key_id", "-")
        try:
            slot = await state.limiter.admit(key_id)
            await slot.__aenter__()
        except RateLimited as exc:
            raise rate_limited(exc, "too many requests for this API key") from None
        released = False
        handed_off = False  # once a StreamingResponse exists, its generator releases the slot

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                await slot.__aexit__(None, None, None)

        try:
            try:
                generate_request = await asyncio.wait_for(
                    openai_api.to_generate_request(body, config.limits, request_id), config.limits.url_fetch_timeout_s * 2
                )
            except Exception as exc:
                raise classify(exc) from None
            remember = None
            routing = request.headers.get("x-session-id")  # the LLM-router convention: affinity only, no memory
            if routing and body.session_id is None and 0 < len(routing) <= 200:
                generate_request = generate_request.model_copy(update={"session_id": routing})
            if body.session_id is not None:
                generate_request, remember = await _continue_session(state, key_id, body.session_id,
                                                                     generate_request)
            deadline = time.monotonic() + config.request_timeout_s
            if body.stream:
                stream = state.backend.generate(generate_request)
                try:
                    first = await asyncio.wait_for(stream.__anext__(), config.request_timeout_s)
                except StopAsyncIteration:
                    raise ApiError(500, "internal_error", "the model returned no output") from None
                except Exception as exc:
                    await stream.aclose()
                    raise classify(exc) from None

                async def on_finish(text: str, final: Delta) -> None:
                    _count_tokens(state, final)
                    if remember is not None:
                        await remember(text, final.usage)

                events = chat_events(
                    request_id=request_id, model=body.model or config.model.served_name, first=first,
                    deltas=stream, deadline=deadline, logprobs=bool(body.logprobs),
                    include_usage=bool(body.stream_options and body.stream_options.include_usage),
                    classify=classify, on_finish=on_finish, release=release)
                handed_off = True
                return chat_stream_response(events, request_id)
            try:
                # one round trip for the whole generation (a stream would cost one per token)
                deltas = await asyncio.wait_for(state.backend.complete(generate_request), config.request_timeout_s)
            except Exception as exc:
                raise classify(exc) from None
            if not deltas:
                raise ApiError(500, "internal_error", "the model returned no output")
            final = deltas[-1]
            if final.finish_reason == "error":
                raise ApiError(500, "generation_failed", final.error or "generation failed")
            _count_tokens(state, final)
            text = "".join(d.text for d in deltas)
            response = openai_api.completion_response(
                request_id=request_id, model=body.model or config.model.served_name,
                text=text, reasoning="".join(d.reasoning_text for d in deltas),
                finish_reason=final.finish_reason, usage=final.usage,
                logprobs=[lp for d in deltas for lp in (d.logprobs or [])] if body.logprobs else None,
            )
            if remember is not None:
                await remember(text, final.usage)
                response["session_id"] = body.session_id
            return JSONResponse(response, headers={"X-Request-Id": request_id})
        finally:
            if not handed_off:
                await release()

    return app





async def _continue_session(state: IngressState, owner: str, session_id: str, request: GenerateRequest):
    """Prepend the session's messages; return the request and a coroutine that stores this turn."""
    service = state.tasks()
    try:
        history = await session_history(service, owner, session_id)
    except Exception as exc:
        raise classify(exc) from None
    new_messages = list(request.messages or [])
    request = request.model_copy(update={"messages": history + new_messages, "session_id": session_id})

    async def remember(text: str, usage: Any) -> None:
        await remember_turn(service, owner, session_id, new_messages, text, usage)

    return request, remember


def _count_tokens(state: Any, final: Delta) -> None:
    if final.usage is not None:
        state.metrics.tokens(final.usage.prompt_tokens, final.usage.completion_tokens)


# The module-level app that Ray Serve wraps; ``serve_app.app`` attaches its state in the Ingress replica.
app = create_app()
