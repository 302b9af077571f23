"""Task type -> agent class. Built-in agents and users' modules register the same way."""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import BaseModel, ValidationError

from agents.base import Agent

BUILTIN_AGENT_MODULES: tuple[str, ...] = ("agents.chat", "agents.contract.agent", "agents.video.agent",
                                         "agents.os_agent.agent", "agents.examples.customer_service",
                                         "agents.batch", "agents.responses", "agents.medical.agent")
# Task types the platform reserves for its own agents (issues land them one by one); a reserved type whose
# agent is not installed is refused at submission like any unknown type.
RESERVED_TYPES = ("chat", "os_agent", "contract_extraction", "video_analysis")


class UnknownTaskType(KeyError):
    def __init__(self, type_: str, known: list[str]) -> None:
        super().__init__(type_)
        self.type = type_
        self.known = known

    def __str__(self) -> str:
        return f"unknown task type {self.type!r}; this service runs: {', '.join(self.known) or 'none'}"


class InvalidTaskInput(ValueError):
    def __init__(self, type_: str, error: ValidationError) -> None:
        self.type = type_
        self.errors = error.errors(include_url=False, include_context=False)
        first = self.errors[0] if self.errors else {"loc": (), "msg": "invalid"}
        self.param = "input" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(input)'}: {e['msg']}" for e in self.errors
        )
        super().__init__(f"invalid input for task type {type_!r}: {problems}")


class AgentRegistry:
    def __init__(self) -> None:
        self._agents: dict[str, type[Agent]] = {}

    def register(self, agent_cls: type[Agent]) -> type[Agent]:
        type_ = getattr(agent_cls, "type", None)
        if not isinstance(type_, str) or not type_:
            raise TypeError(f"{agent_cls.__name__} needs a class attribute `type` (the task type)")
        existing = self._agents.get(type_)
        if existing is not None and existing is not agent_cls and existing.__qualname__ != agent_cls.__qualname__:
            raise ValueError(f"task type {type_!r} is already registered by {existing.__module__}.{existing.__name__}")
        self._agents[type_] = agent_cls
        return agent_cls

    def load_module(self, name: str) -> None:
        """Import ``name``; its ``@register_agent`` classes land in the default registry, and a module-level
        ``AGENTS`` list (classes) is registered here."""
        module = importlib.import_module(name)
        for agent_cls in getattr(module, "AGENTS", ()):
            self.register(agent_cls)
        if self is not default_registry:
            for type_, cls in default_registry._agents.items():
                if cls.__module__ == module.__name__:
                    self.register(cls)

    def get(self, type_: str) -> type[Agent]:
        try:
            return self._agents[type_]
        except KeyError:
            raise UnknownTaskType(type_, self.types()) from None

    def types(self) -> list[str]:
        return sorted(self._agents)

    def validate(self, type_: str, data: dict[str, Any]) -> BaseModel:
        cls = self.get(type_)
        try:
            return cls.validate_input(data)
        except ValidationError as exc:
            raise InvalidTaskInput(type_, exc) from None

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"type": t, "description": c.description, "input_schema": c.Input.model_json_schema()}
            for t, c in sorted(self._agents.items())
        ]


default_registry = AgentRegistry()


def register_agent(agent_cls: type[Agent]) -> type[Agent]:
    """Class decorator: register in the default registry."""
    return default_registry.register(agent_cls)


def build_registry(modules: list[str] | tuple[str, ...] = (), *, builtins: bool = True) -> AgentRegistry:
    """A registry with the built-in agents plus ``modules`` (dotted names, e.g. from ray_config.yaml)."""
    registry = AgentRegistry()
    for name in (*(BUILTIN_AGENT_MODULES if builtins else ()), *modules):
        registry.load_module(name)
    return registry
