"""Where kimiray keeps local state (tiny checkpoint, embedded stores) on one machine."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """``$KIMIRAY_HOME``, else ``~/.cache/kimiray``; created on first use."""
    root = Path(os.environ.get("KIMIRAY_HOME", Path.home() / ".cache" / "kimiray")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def tiny_checkpoint_dir() -> Path:
    """The tiny random-weight checkpoint, written on first use (it loads like any official checkpoint)."""
    from engine.tiny import write_tiny_checkpoint

    path = data_dir() / "tiny-kimi-vl"
    if not (path / "model.safetensors.index.json").exists():
        write_tiny_checkpoint(path, seed=0)
    return path
