"""kimiray: Kimi-VL served on Ray, with agents for screens, contracts and videos.

``kimiray.Client`` / ``kimiray.AsyncClient`` talk to a running service; ``kimiray.LocalRuntime`` runs the same
agents in this process. Imports are lazy so ``import kimiray`` stays cheap (no torch until it is needed).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Client": "kimiray.client",
    "AsyncClient": "kimiray.client",
    "LocalRuntime": "kimiray.local",
    "Task": "kimiray.types",
    "TaskEvent": "kimiray.types",
    "ChatResult": "kimiray.types",
    "KimirayError": "kimiray.errors",
    "TaskFailedError": "kimiray.errors",
    "TaskCancelledError": "kimiray.errors",
    "WaitTimeoutError": "kimiray.errors",
    "NotFoundError": "kimiray.errors",
    "InvalidRequestError": "kimiray.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kimiray' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
