"""The Ray Serve application: ``Ingress`` (FastAPI) -> ``ModelServer`` replicas.

``serve run ray_config.yaml`` imports ``serve_app.app:build_app`` and passes the config's ``args``.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from serve_app.backend import RayBackend
from serve_app.config import AppConfig
from serve_app.ingress import app as fastapi_app
from serve_app.ingress import install_state
from serve_app.model_server import ModelServer


@serve.deployment(name="Ingress")
@serve.ingress(fastapi_app)
class Ingress:
    def __init__(self, model_server: Any, config: dict[str, Any]) -> None:
        install_state(None, AppConfig.model_validate(config), RayBackend(model_server))


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder for ``serve run`` / ``serve deploy`` (``args`` = the config file's ``args``)."""
    config = AppConfig.model_validate(args or {})
    payload = config.model_dump()
    return Ingress.bind(ModelServer.bind(payload), payload)
