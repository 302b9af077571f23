"""A remote desktop over HTTP: ``desktop_host_app`` serves any executor, ``HttpExecutor`` talks to it.

Why: the agent runs next to the model (Ray), the desktop runs elsewhere (a VM with Xvfb). The host re-checks every
action against its own screen (it must not trust its caller) and answers errors in one JSON shape, which the client
maps back onto ``ActionRejected`` (nothing happened) and ``ExecutorError`` (the desktop is unusable).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
from typing import Annotated, Any

import httpx
from fastapi import Body, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, TypeAdapter

from connectors.desktop.actions import ScreenAction, Wait
from connectors.desktop.base import ActionOutcome, ActionRejected, Executor, ExecutorError, Observation, Screenshot

_ACTION = TypeAdapter(ScreenAction)


class _Unauthorized(Exception):
    pass


class ScreenSize(BaseModel):
    width: int
    height: int


class ObservationWire(BaseModel):
    """``Observation`` on the wire: the PNG as base64."""

    png_base64: str
    width: int
    height: int
    window_title: str | None = None
    accessibility_text: str | None = None
    taken_s: float = 0.0

    @classmethod
    def from_observation(cls, obs: Observation) -> "ObservationWire":
        return cls(png_base64=base64.b64encode(obs.screenshot.png).decode("ascii"), width=obs.screenshot.width,
                   height=obs.screenshot.height, window_title=obs.window_title,
                   accessibility_text=obs.accessibility_text, taken_s=obs.taken_s)

    def to_observation(self) -> Observation:
        return Observation(screenshot=Screenshot(png=base64.b64decode(self.png_base64), width=self.width,
                                                 height=self.height),
                           window_title=self.window_title, accessibility_text=self.accessibility_text,
                           taken_s=self.taken_s)


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers)


def desktop_host_app(executor: Executor, token: str | None = None) -> FastAPI:
    """The host: ``/healthz`` open, every ``/v1`` route behind ``Authorization: Bearer <token>`` when set."""

    expected = token.encode() if token else None

    async def require_token(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise _Unauthorized()

    app = FastAPI(title="kimiray desktop host", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_request: Request, _exc: _Unauthorized):
        return _error(401, "unauthorized", "missing or wrong bearer token")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        return _error(422, "invalid_request", "the request body is not a valid action",
                      details=[{k: e.get(k) for k in ("type", "loc", "msg")} for e in jsonable_encoder(exc.errors())])

    @app.exception_handler(ActionRejected)
    async def _rejected(_request: Request, exc: ActionRejected):
        return _error(400, "action_rejected", str(exc))

    @app.exception_handler(ExecutorError)
    async def _failed(_request: Request, exc: ExecutorError):
        return _error(502, "executor_error", str(exc))

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/v1/screen", dependencies=[Depends(require_token)])
    async def screen() -> ScreenSize:
        width, height = await executor.screen_size()
        return ScreenSize(width=width, height=height)

    @app.post("/v1/observe", dependencies=[Depends(require_token)])
    async def observe() -> ObservationWire:
        return ObservationWire.from_observation(await executor.observe())

    @app.post("/v1/execute", dependencies=[Depends(require_token)])
    async def execute(action: Annotated[ScreenAction, Body()]) -> ActionOutcome:
        return await executor.execute(action)

    return app


class HttpExecutor:
    """The client side of ``desktop_host_app``; one ``httpx.AsyncClient`` per event loop."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._size: tuple[int, int] | None = None

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # a client is tied to the loop that opened it
            self._client = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self.timeout_s)
            self._loop = loop
        return self._client

    async def _call(self, method: str, path: str, *, json: Any = None, timeout_s: float | None = None) -> Any:
        try:
            resp = await self._http().request(method, path, json=json, timeout=timeout_s or self.timeout_s)
        except httpx.TimeoutException as exc:
            raise ExecutorError(f"desktop host {self.url} timed out on {path}: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise ExecutorError(f"desktop host {self.url} unreachable on {path}: {exc!r}") from exc
        if resp.status_code == 200:
            return resp.json()
        message = _error_message(resp)
        if resp.status_code in (400, 422):  # the host executed nothing
            raise ActionRejected(message)
        raise ExecutorError(f"desktop host {self.url} answered {resp.status_code} on {path}: {message}")

    async def observe(self) -> Observation:
        return ObservationWire.model_validate(await self._call("POST", "/v1/observe")).to_observation()

    async def screen_size(self) -> tuple[int, int]:
        if self._size is None:
            size = ScreenSize.model_validate(await self._call("GET", "/v1/screen"))
            self._size = (size.width, size.height)
        return self._size

    async def execute(self, action: ScreenAction) -> ActionOutcome:
        timeout = self.timeout_s + (action.seconds if isinstance(action, Wait) else 0.0)
        body = _ACTION.dump_python(action, mode="json")
        return ActionOutcome.model_validate(await self._call("POST", "/v1/execute", json=body, timeout_s=timeout))

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except RuntimeError:  # opened on a loop that is gone: nothing left to flush
                pass


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:300]
