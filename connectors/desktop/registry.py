"""The desktops an operator configured, by name.

Why: a REST user names a desktop (``"local"``, ``"vm-3"``); the service opens only what ``KIMIRAY_DESKTOPS``
lists, so users can never point it at arbitrary displays or URLs. Tokens stay in the environment: a spec names
the variable, and the secret is read only when the executor is opened.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Annotated, Literal, Union
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from connectors.desktop.base import Executor

DESKTOPS_ENV = "KIMIRAY_DESKTOPS"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_DISPLAY = r"^:\d+(\.\d+)?$"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class X11DesktopSpec(_Spec):
    kind: Literal["x11"] = "x11"
    display: str = Field(..., pattern=_DISPLAY, description="a local X display, e.g. ':0'")


class HttpDesktopSpec(_Spec):
    kind: Literal["http"] = "http"
    url: str = Field(..., description="base URL of a ``kimiray desktop-host``")
    token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                  description="environment variable holding the host's bearer token")
    timeout_s: float = Field(30.0, gt=0, le=600)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"expected an http(s) URL, got {value!r}")
        return value.rstrip("/")


class ReplayDesktopSpec(_Spec):
    kind: Literal["replay"] = "replay"
    path: str = Field(..., min_length=1, description="a RecordedTrajectory JSON file")
    strict: bool = False


DesktopSpec = Annotated[Union[X11DesktopSpec, HttpDesktopSpec, ReplayDesktopSpec], Field(discriminator="kind")]
_DESKTOPS = TypeAdapter(dict[Annotated[str, Field(pattern=_NAME)], DesktopSpec])


def desktops_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, DesktopSpec]:
    """``KIMIRAY_DESKTOPS`` (JSON ``{name: spec}``) when set; else ``{"local": x11 $DISPLAY}`` when DISPLAY is a
    local display; else ``{}``. ``ValueError`` says what is wrong with a bad ``KIMIRAY_DESKTOPS``."""
    raw = environ.get(DESKTOPS_ENV, "").strip()
    if not raw:
        display = environ.get("DISPLAY", "").strip()
        try:
            return {"local": X11DesktopSpec(display=display)} if display else {}
        except ValidationError:  # e.g. "localhost:10.0" (ssh forwarding): not a local display, not offered
            return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{DESKTOPS_ENV} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{DESKTOPS_ENV} must be a JSON object {{name: spec}}, got {type(data).__name__}")
    try:
        return _DESKTOPS.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{DESKTOPS_ENV} has an invalid desktop spec: {problems}") from None


def open_executor(spec: DesktopSpec, environ: Mapping[str, str] = os.environ) -> Executor:
    """The executor for one configured desktop."""
    if isinstance(spec, X11DesktopSpec):
        from connectors.desktop.x11 import X11Executor

        return X11Executor(spec.display)
    if isinstance(spec, HttpDesktopSpec):
        from connectors.desktop.http import HttpExecutor

        token = None
        if spec.token_env is not None:
            token = environ.get(spec.token_env) or None
            if token is None:
                raise ValueError(f"desktop token variable {spec.token_env} is not set")
        return HttpExecutor(spec.url, token=token, timeout_s=spec.timeout_s)
    if isinstance(spec, ReplayDesktopSpec):
        from connectors.desktop.replay import ReplayExecutor

        return ReplayExecutor(spec.path, strict=spec.strict)
    raise TypeError(f"unknown desktop spec {spec!r}")
