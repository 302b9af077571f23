"""What agents may need to know about the served model without loading it: its tokenizer (exact token counts
for planning) and its context window. Loaded lazily, once per process, from the checkpoint's small files."""

from __future__ import annotations

import json
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

from connectors.paths import tiny_checkpoint_dir
from connectors.sim_engine import is_simulated_model


class ModelResources:
    def __init__(self, model_path: str | None = None) -> None:
        """``model_path``: the checkpoint the ModelServer replicas serve (dir or HF id); None = the tiny one."""
        self._path = model_path
        self._lock = threading.Lock()

    @cached_property
    def path(self) -> Path:
        if self._path is None or is_simulated_model(self._path):  # a simulated model has no files: same tokenizer
            return tiny_checkpoint_dir()
        root = Path(self._path).expanduser()
        if root.is_dir():
            return root
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self._path, allow_patterns=["*.json", "tiktoken.model", "*.jinja"]))

    @cached_property
    def counter(self) -> Any:
        """``pipelines.context.TokenCounter`` of the served model."""
        from pipelines.context import TokenCounter

        with self._lock:
            return TokenCounter.from_pretrained(self.path)

    def fit_lines(self, text: str, share: float = 0.5, *, keep_head: int = 0, note: str = "") -> str:
        """``text`` cut at a line so it takes at most ``share`` of the window (memory for follow-up questions
        must leave room for the questions). The first ``keep_head`` lines always stay; ``note`` is appended
        when something was cut."""
        limit = int(self.context_window * share)
        lines = text.splitlines()
        head, body = lines[:keep_head], lines[keep_head:]
        out = text
        while body and self.counter.count_text(out) > limit:
            body = body[: max(0, int(len(body) * 0.8))]
            out = "\n".join([*head, *body]) + (f"\n\n{note}" if note else "")
        return out

    @cached_property
    def context_window(self) -> int:
        config = json.loads((self.path / "config.json").read_text())
        text = config.get("text_config", config)
        return int(text.get("max_position_embeddings", 131072))
