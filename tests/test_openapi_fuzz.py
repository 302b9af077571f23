"""Schemathesis over the published OpenAPI spec: every operation, schema-valid and schema-invalid input, against
the real ingress app (tiny engine, SQLite stores, a task runner) served in-process by tests/task_server.py.

Checks on every response: no 5xx; the status is one the spec declares; the content type and body match the
spec (errors included: ``{"error": {...}}`` JSON); authenticated routes refuse the same request without a key
or with a wrong one. Nothing is excluded: the streaming routes (chat with ``stream``, task events) are declared
``text/event-stream`` and end on their own (chat is capped at 8 tokens; fuzzed task ids do not exist).

Why HTTP to an in-thread uvicorn rather than schemathesis' ASGI transport: the app's store and engine live on
the server's event loop, and the ASGI test client would call them from loops of its own.

``KIMIRAY_FUZZ_EXAMPLES`` raises the examples per operation for a deeper local run (default 25). Runs are
derandomized, so CI is repeatable; ``KIMIRAY_FUZZ_RANDOM=1`` explores new inputs each run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

schemathesis = pytest.importorskip("schemathesis")  # the `test` extra

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import Failure  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    ignored_auth,
    response_schema_conformance,
    status_code_conformance,
)

from serve_app.ingress import create_app  # noqa: E402
from tests.task_server import task_server  # noqa: E402

KEY = "sk-fuzz-0123456789"
HEADERS = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = int(os.environ.get("KIMIRAY_FUZZ_EXAMPLES", "25"))
DERANDOMIZE = os.environ.get("KIMIRAY_FUZZ_RANDOM", "") != "1"
SPEC = create_app().openapi()
SCHEMA = schemathesis.openapi.from_dict(SPEC)
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}


def _negatable(label: str) -> bool:
    """Negative data needs something that can break the schema: a query parameter or a JSON body (any string
    is a valid path parameter here)."""
    method, path = label.split(" ", 1)
    op = SPEC["paths"][path][method.lower()]
    json_body = "application/json" in op.get("requestBody", {}).get("content", {})
    return json_body or any(p["in"] == "query" for p in op.get("parameters", []))


CASES = [(label, GenerationMode.POSITIVE) for label in sorted(OPERATIONS)] + [
    (label, GenerationMode.NEGATIVE) for label in sorted(OPERATIONS) if _negatable(label)]


def errors_are_json(ctx: Any, response: Any, case: Any) -> bool | None:
    """An error, whatever its status, is an OpenAI-style JSON body - never Starlette's text/plain 500."""
    if response.status_code < 400 or case.path == "/readyz":
        return None
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if not content_type.startswith("application/json"):
        raise Failure(operation=case.operation.label, title="Error response is not JSON",
                      message=f"{response.status_code} answered with {content_type!r}")
    error = response.json().get("error") if isinstance(response.json(), dict) else None
    if not isinstance(error, dict) or not error.get("message"):
        raise Failure(operation=case.operation.label, title="Error body has no error.message",
                      message=response.text[:300])
    return None


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          ignored_auth, errors_are_json]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    from engine.runtime.engine import AsyncEngine

    engine = AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32)
    app_args = {"limits": {"max_tokens_cap": 8}, "request_timeout_s": 30,
                "auth": {"requests_per_minute": 10**6, "max_concurrent_per_key": 64}}
    with task_server(f"sqlite:///{tmp_path_factory.mktemp('fuzz')}", KEY, engine=engine, app_args=app_args) as url:
        yield url


def test_the_fuzzed_spec_is_the_published_one(base_url: str) -> None:
    published = httpx.get(f"{base_url}/openapi.json", timeout=30)
    assert published.status_code == 200
    assert published.json() == SPEC
    assert set(SPEC["components"]["securitySchemes"]) == {"ApiKey"}


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{m.value}-{label}" for label, m in CASES])
def test_operation(base_url: str, label: str, mode: GenerationMode) -> None:
    operation = OPERATIONS[label]

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, headers=HEADERS, timeout=60)
        case.validate_response(response, checks=CHECKS, headers=HEADERS, transport_kwargs={"base_url": base_url})

    run()
