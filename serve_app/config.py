"""Settings of the serving application, parsed from ray_config.yaml ``args`` (or built in code)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from connectors.limits import Limits


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys_env: str = "KIMIRAY_API_KEYS"  # comma-separated keys
    keys_file_env: str = "KIMIRAY_API_KEYS_FILE"  # a file with one key per line
    requests_per_minute: int = Field(600, ge=1, description="per key")
    max_concurrent_per_key: int = Field(64, ge=1)
    creates_per_minute: int = Field(
        300, ge=1, description="per key: task submissions, file uploads and session creations together (each "
        "stores something, so they get their own budget on top of requests_per_minute)")


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="checkpoint dir or HF id; None = the tiny checkpoint")
    served_name: str = "kimi-vl"
    device: str | None = None  # None: cuda when the replica has a GPU, else cpu
    dtype: str | None = None
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineOptions fields")


class TasksConfig(BaseModel):
    """The task and session layer: where state lives, which agents run, and how runners lease work."""

    model_config = ConfigDict(extra="forbid")

    stores_url: str | None = Field(
        None, description="redis://host:port/db, redis+sentinel://h1:26379,h2:26379/service_name[/db] (Redis HA), "
        "sqlite:///dir, or None: $KIMIRAY_STORES_URL, else $REDIS_URL, else the embedded SQLite store under "
        "$KIMIRAY_HOME")
    min_replica_acks: int | None = Field(
        None, ge=0, le=16, description="replicas that must confirm (Redis WAIT) a task submission, each task "
        "transition and each session write before it counts as accepted; None: 1 with a Sentinel URL, else 0")
    replica_ack_timeout_s: float = Field(2.0, gt=0, le=60, description="how long a write waits for those "
                                         "replicas; past it the client gets 503 + Retry-After, never a success")
    agent_modules: list[str] = Field(default_factory=list, description="extra modules that register agents")
    max_attempts: int = Field(3, ge=1, le=100, description="runs of one task before it fails (runner deaths)")
    retention_s: float = Field(7 * 24 * 3600.0, gt=0, description="ended tasks are kept this long")
    lease_s: float = Field(30.0, gt=0.5, description="a runner silent this long loses its tasks")
    runner_concurrency: int = Field(4, ge=1, le=256, description="tasks one TaskRunner replica runs at once")
    session_ttl_s: float | None = Field(7 * 24 * 3600.0, gt=0, description="sessions expire this long after "
                                        "their last write")
    blob_threshold: int = Field(64 * 1024, ge=0, description="media larger than this go to the blob store")
    sse_keepalive_s: float = Field(15.0, gt=0)
    max_input_bytes: int = Field(16 * 2**20, ge=1024, description="JSON size of a task's input + options")


class AppConfig(BaseModel):
    """Everything ``build_app`` needs; every field has a default so ``serve run`` works bare on one CPU."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    limits: Limits = Field(default_factory=Limits)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    request_timeout_s: float = Field(300.0, gt=0)
    host: str = "127.0.0.1"
