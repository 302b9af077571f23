"""The published OpenAPI document, made to tell the truth about what the ingress answers.

FastAPI's generated spec knows only the happy path: it documents 422 as ``{"detail": [...]}`` (our handlers answer
OpenAI-style ``{"error": {...}}``), no other error status, no API-key security, JSON for the streaming and file
routes, and no body for ``POST /v1/files``. Clients generated from it, and schema fuzzers checking responses
against it, would be misled; :func:`install_openapi` patches those points once, when the spec is first built.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

SECURITY_SCHEME = "ApiKey"


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="OpenAI error type, follows the status (e.g. invalid_request_error)")
    param: str | None = Field(None, description="where in the request the problem is, when known")
    code: str | None = Field(None, description="a short machine-readable reason, e.g. not_found, rate_limited")


class ErrorBody(BaseModel):
    """Every error the service answers (4xx and 5xx) has this shape."""

    error: ErrorDetail


class ProbeStatus(BaseModel):
    status: str


_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


# Errors any authenticated operation can answer: the key check and the body limit run before every route, a store
# or model outage is a 503, and the ranges cover route-specific refusals (404, 409, 415, 429, 504, ...).
_AUTHENTICATED_ERRORS = {
    "401": _error("missing or invalid API key"),
    "413": _error("request body over limits.max_body_bytes"),
    "422": _error("the request does not match the schema"),
    "4XX": _error("the request was refused; see error.code"),
    "5XX": _error("the service failed or is unavailable (503 comes with Retry-After)"),
}

_SSE = {"text/event-stream": {"schema": {"type": "string"}}}
_BINARY = {"schema": {"type": "string", "format": "binary"}}

# Routes whose success answer is not one JSON document (keyed by method and path template).
_MEDIA_TYPES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/chat/completions"): {"application/json": {"schema": {"type": "object"}}, **_SSE},
    ("get", "/v1/tasks/{task_id}/events"): _SSE,
    ("get", "/v1/tasks/{task_id}/artifacts/{name}"): {"*/*": _BINARY},
    ("post", "/v1/responses"): {"application/json": {"schema": {"type": "object"}}, **_SSE},
    ("get", "/v1/responses/{response_id}"): {"application/json": {"schema": {"type": "object"}}, **_SSE},
    ("get", "/v1/files/{file_id}/content"): {"*/*": _BINARY},
}

# Routes that read the raw request body themselves, so FastAPI cannot see it.
_RAW_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/files"): {"required": True, "description": "the file's bytes, any content type (a task blob); or "
                            "multipart/form-data with `file` and `purpose` (the OpenAI Files API: "
                            "`purpose=batch` JSONL is checked line by line)",
                            "content": {"multipart/form-data": {"schema": {
                                "type": "object", "required": ["file", "purpose"], "properties": {
                                    "file": {"type": "string", "format": "binary"},
                                    "purpose": {"type": "string", "enum": ["batch", "user_data", "vision",
                                                                           "assistants", "fine-tune", "evals"]}}}},
                                        "application/octet-stream": _BINARY, "*/*": _BINARY}},
}


def _components(spec: dict[str, Any]) -> dict[str, Any]:
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorBody, ProbeStatus):
        generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(generated.pop("$defs", {}))
        schemas[model.__name__] = generated
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    spec["components"]["securitySchemes"] = {
        SECURITY_SCHEME: {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"}}
    return spec


def patch_spec(spec: dict[str, Any], public_paths: set[str]) -> dict[str, Any]:
    """Declare errors, security and media types on a FastAPI-generated spec (in place; returned for chaining)."""
    _components(spec)
    spec["security"] = [{SECURITY_SCHEME: []}]
    for path, operations in spec.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            if path in public_paths:
                op["security"] = []  # no key needed
                responses.pop("422", None)
            else:
                responses.update(_AUTHENTICATED_ERRORS)
            if (method, path) in _MEDIA_TYPES:
                ok = next((code for code in responses if code.startswith("2")), "200")
                responses[ok]["content"] = _MEDIA_TYPES[(method, path)]
            if (method, path) in _RAW_BODIES:
                op["requestBody"] = _RAW_BODIES[(method, path)]
    readyz = spec.get("paths", {}).get("/readyz", {}).get("get")
    if readyz is not None:
        probe = {"application/json": {"schema": {"$ref": "#/components/schemas/ProbeStatus"}}}
        readyz["responses"]["200"]["content"] = probe
        readyz["responses"]["503"] = {"description": "no model replica answers yet (Retry-After)", "content": probe}
    return spec


def install_openapi(app: FastAPI, public_paths: set[str]) -> None:
    """Serve the patched spec at ``/openapi.json`` (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                               description=app.description, routes=app.routes)
            app.openapi_schema = patch_spec(spec, public_paths)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
