"""Shared fixtures (tiny official-format checkpoints written once per test session, the session's shared local
Ray) and the test groups.

Groups, assigned here by module (and, in mixed modules, by the fixture that starts a service) so a test file
never has to move:

* ``unit``: in-process only (the engine on the tiny checkpoint, scripted models, SQLite in tmp dirs, loopback
  HTTP threads); the few long ones are also ``slow``: ``pytest -m "unit and not slow"`` is the fast subset
  (README).
* ``integration``: a real service the test starts - redis-server, a local Ray, Xvfb, worker processes, the
  ingress app over HTTP with the real engine.
* ``e2e``: the whole product path - Ray Serve with the kimiray app, ``kimiray serve``, the SDK and agents end to
  end, load and fault injection.

A new test module that starts a service belongs in ``INTEGRATION`` or ``E2E`` below (or sets its own
``pytestmark``); everything else is ``unit``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.tiny import write_tiny_checkpoint
from tests.serve_harness import stop_shared_ray

GROUPS = ("unit", "integration", "e2e")
E2E = {
    "test_console_browser", "test_contract_serve_real", "test_openai_apis_serve", "test_readme_examples",
    "test_contract_e2e", "test_fault_injection", "test_kimiray_serve", "test_load_smoke", "test_os_agent_e2e",
    "test_sdk_e2e", "test_serve", "test_serve_limits", "test_serve_multinode", "test_video_e2e",
}
INTEGRATION = {
    "test_cli_errors", "test_openai_batch", "test_openai_responses",
    "test_bad_input_battery", "test_desktop_executors", "test_loader_memory", "test_openapi_fuzz", "test_os_agent",
    "test_security", "test_task_durability", "test_tasks_api",
}
# mixed modules: a test that uses one of these fixtures (a started service) joins that group; the rest are unit
SERVICE_FIXTURES = {"ray_local": "integration", "shared_redis": "integration", "serve_instance": "e2e"}
SERVICE_FIXTURES_BY_MODULE = {"test_langchain": {"service": "e2e"}}
# mixed modules where the service is a parameter or in the test's name (the Redis half of the store contract)
SERVICE_IN_NAME = {"test_store_contract": ("redis", "integration")}
# single tests of otherwise in-process modules: the CLI in a subprocess, a memory bound measured in a subprocess
TEST_GROUPS = {"test_generate::test_main_job_cli": "e2e",
               "test_document_reader::test_long_pdf_bounded_memory": "integration"}
# in-process but long (tens of seconds on 2 cores): unit, and also ``slow``, so the fast subset leaves them out
SLOW = {"test_runtime::test_concurrent_mixed_requests_equal_plain_model", "test_runtime::test_preemption_keeps_outputs"}


def _module_name(item: pytest.Item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) is not None else ""


def group_of(item: pytest.Item) -> str:
    module = _module_name(item)
    if module in E2E:
        return "e2e"
    if module in INTEGRATION:
        return "integration"
    if f"{module}::{item.originalname}" in TEST_GROUPS:
        return TEST_GROUPS[f"{module}::{item.originalname}"]
    if module in SERVICE_IN_NAME and SERVICE_IN_NAME[module][0] in item.name:
        return SERVICE_IN_NAME[module][1]
    fixtures = set(getattr(item, "fixturenames", ()))
    wanted = {**SERVICE_FIXTURES, **SERVICE_FIXTURES_BY_MODULE.get(module, {})}
    found = {wanted[f] for f in fixtures if f in wanted}
    if "e2e" in found:
        return "e2e"
    return "integration" if found else "unit"


# modules that deploy on the session's shared local Ray (tests/serve_harness.py): run as one block at the end, so
# the shared Ray is started once and is not left idle beside the rest of the suite
SHARED_RAY_MODULES = ("test_langchain", "test_metrics", "test_serve", "test_serve_limits", "test_session_affinity")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: _module_name(item) in SHARED_RAY_MODULES)  # stable: order kept within each part
    for item in items:
        if not any(item.get_closest_marker(g) for g in GROUPS):  # a module's own pytestmark wins
            item.add_marker(getattr(pytest.mark, group_of(item)))
        if f"{_module_name(item)}::{item.originalname}" in SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _shared_ray_stops_at_the_end() -> Iterator[None]:
    """The local Ray that modules share (tests.serve_harness.shared_ray) is started on first use; stop it once."""
    yield
    stop_shared_ray()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Main variant: dense layer 0, MoE with shared expert, n_group 4 / topk_group 2, YaRN, no q_lora."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-main"), seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_q_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-q-lora"), seed=1, variant="q_lora")


@pytest.fixture(scope="session")
def tiny_checkpoint_a3b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A3B-faithful routing: one group, two shared experts fused into one SwiGLU, no YaRN."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-a3b"), seed=2, variant="a3b_routing")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path):
    from engine.loader import load

    return load(tiny_checkpoint, device="cpu", dtype=torch.float32)
