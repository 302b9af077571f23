"""deploy/kuberay-rayservice.yaml against the RayService CRD schema of the KubeRay version it names (vendored,
see tests/data/kuberay/README.md), with the strictness of ``kubectl apply --validate=strict`` (an unknown field is
an error), and its Serve args against the app's own config: shared Redis HA stores and GCS fault tolerance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from connectors.stores.sentinel import parse_sentinel_url
from serve_app.config import AppConfig
from serve_app.store_guard import check_shared_stores

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "deploy" / "kuberay-rayservice.yaml"
SCHEMA = Path(__file__).parent / "data" / "kuberay" / "rayservice-v1-openapi-schema-kuberay-v1.7.0.json"


def _unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare (where it neither preserves unknown fields nor allows extra ones)."""
    out: list[str] = []
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                out += _unknown_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += _unknown_fields(item, extra, f"{path}.{key}")
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                out.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += _unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def _manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


def test_manifest_validates_against_the_rayservice_crd_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    doc = _manifest()
    assert "v1.7.0" in MANIFEST.read_text() and "v1.7.0" in SCHEMA.name  # the version it names is the one used
    jsonschema.Draft7Validator(schema).validate(doc)
    assert _unknown_fields(doc, schema) == []


def test_the_strict_check_catches_a_misspelt_field() -> None:
    schema = json.loads(SCHEMA.read_text())
    doc = _manifest()
    doc["spec"]["rayClusterConfig"]["gcsFaultToleranceOption"] = doc["spec"]["rayClusterConfig"].pop(
        "gcsFaultToleranceOptions")
    assert _unknown_fields(doc, schema) == [".spec.rayClusterConfig.gcsFaultToleranceOption"]


def test_app_runs_on_shared_redis_ha_and_the_gcs_is_fault_tolerant() -> None:
    doc = _manifest()
    cluster = doc["spec"]["rayClusterConfig"]
    sentinel = cluster["gcsFaultToleranceOptions"]["redisAddress"]
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    args = serve["applications"][0]["args"]
    config = AppConfig.model_validate(args)  # the args are valid for this app
    assert config.tasks.min_replica_acks == 1
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        url = env["KIMIRAY_STORES_URL"]["value"]
        address = parse_sentinel_url(url.replace("$(REDIS_PASSWORD)", "pw"))
        assert [f"{h}:{p}" for h, p in address.sentinels] == [sentinel]  # app and GCS share one Redis HA
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "kimiray-redis"
        check_shared_stores(config.tasks.model_copy(update={"stores_url": url}), alive_nodes=3)
    assert "redis-ha --version 4.36.2" in MANIFEST.read_text()  # the Redis HA chart is named and pinned
