"""Operator-defined secrets for the OS agent: referred to by name, typed by the executor, never shown.

A goal says ``Log in with the password {{secret:crm_password}}``; the model sees only that placeholder and types it
(``pyautogui.write('{{secret:crm_password}}')``); the agent swaps the value in at the last moment, in the
``TypeText`` handed to the executor, and nowhere else. Prompts, events, step records, the trajectory, the report,
the recording's overlay and the logs keep the placeholder. As a second line, every text the agent stores or
shows is passed through ``redact`` (a value that comes back in an executor error, an accessibility tree or a
user's reply becomes its placeholder again).

Where values come from (the runner's environment, read when a task starts): ``KIMIRAY_OS_SECRETS_FILE`` (a JSON
object file, name -> value, readable by the runner only) and/or ``KIMIRAY_OS_SECRETS`` (the same JSON inline),
plus ``register_secret`` for SDK users running the loop in-process.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

SECRET_REF = re.compile(r"\{\{\s*secret:([A-Za-z0-9_.-]{1,64})\s*\}\}")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_REGISTERED: dict[str, str] = {}


class UnknownSecret(KeyError):
    """A placeholder names a secret this runner does not have (the message names it, never a value)."""

    def __str__(self) -> str:
        return f"no secret named {self.args[0]!r} is configured on this runner"


def register_secret(name: str, value: str) -> None:
    """Make ``{{secret:name}}`` type ``value`` in this process (SDK users; operators use the environment)."""
    if not _NAME.match(name) or not value:
        raise ValueError("a secret needs a name of letters, digits, '_', '.', '-' and a non-empty value")
    _REGISTERED[name] = value


def unregister_secret(name: str) -> None:
    _REGISTERED.pop(name, None)


def referenced(text: str) -> list[str]:
    """The secret names ``text`` refers to, in order, without repeats."""
    return list(dict.fromkeys(SECRET_REF.findall(text or "")))


class Secrets:
    """The name -> value table of one run."""

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = {k: v for k, v in (values or {}).items() if v}
        # longest first, so a value that contains another is replaced whole
        self._by_length = sorted(self._values.items(), key=lambda kv: -len(kv[1]))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Secrets":
        """The runner's secrets. Raises ``ValueError`` (naming the variable, never a value) on a bad config."""
        env = os.environ if env is None else env
        values: dict[str, str] = {}
        sources = []
        if env.get("KIMIRAY_OS_SECRETS_FILE"):
            try:
                sources.append(("KIMIRAY_OS_SECRETS_FILE", Path(env["KIMIRAY_OS_SECRETS_FILE"]).read_text()))
            except OSError as exc:
                raise ValueError(f"KIMIRAY_OS_SECRETS_FILE can't be read ({exc.strerror})") from None
        if env.get("KIMIRAY_OS_SECRETS"):
            sources.append(("KIMIRAY_OS_SECRETS", env["KIMIRAY_OS_SECRETS"]))
        for var, raw in sources:
            try:
                table = json.loads(raw)
            except ValueError:
                raise ValueError(f"{var} is not a JSON object") from None
            if not isinstance(table, dict) or not all(
                    isinstance(k, str) and _NAME.match(k) and isinstance(v, str) and v for k, v in table.items()):
                raise ValueError(f"{var} must map secret names (letters, digits, _ . -) to non-empty strings")
            values.update(table)
        values.update(_REGISTERED)
        return cls(values)

    def names(self) -> set[str]:
        return set(self._values)

    def __bool__(self) -> bool:
        return bool(self._values)

    def resolve(self, text: str) -> str:
        """``text`` with every placeholder replaced by its value. Raises ``UnknownSecret``."""
        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self._values:
                raise UnknownSecret(name)
            return self._values[name]

        return SECRET_REF.sub(value, text)

    def redact(self, text: str) -> str:
        """``text`` with every secret value replaced by its placeholder."""
        if not text or not self._values:
            return text
        for name, secret in self._by_length:
            if secret in text:
                text = text.replace(secret, "{{secret:%s}}" % name)
        return text
