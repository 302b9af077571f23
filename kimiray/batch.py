"""SDK helpers for the OpenAI Batch API on kimiray: build and upload the JSONL input, wait with progress, read
the results. Pure functions here; ``Client.batch_file`` / ``create_batch`` / ``wait_batch`` / ``batch_results``
are thin methods over them (the official ``openai`` client works against the same endpoints unchanged)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

BATCH_ENDPOINT = "/v1/chat/completions"
TERMINAL_BATCH_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})


def batch_lines(requests: Iterable[Mapping[str, Any]], *, model: str = "kimi-vl") -> list[dict[str, Any]]:
    """Input lines from full lines (``custom_id`` + ``body``), or from chat bodies (``messages`` …), which get
    ``custom_id`` ``request-<n>`` and the batch's ``method`` / ``url``."""
    lines = []
    for n, item in enumerate(requests):
        if "body" in item:
            line = {"custom_id": str(item.get("custom_id", f"request-{n}")), "method": "POST",
                    "url": item.get("url", BATCH_ENDPOINT), "body": dict(item["body"])}
        else:
            line = {"custom_id": f"request-{n}", "method": "POST", "url": BATCH_ENDPOINT,
                    "body": {"model": model, **dict(item)}}
        lines.append(line)
    return lines


def jsonl_bytes(source: Iterable[Mapping[str, Any]] | bytes | str | Path, *, model: str = "kimi-vl") -> bytes:
    """A path to a .jsonl file, its bytes, or request dicts (see :func:`batch_lines`) -> the file's bytes."""
    if isinstance(source, (str, Path)):
        return Path(source).expanduser().read_bytes()
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in batch_lines(source, model=model)).encode()


def multipart_upload(data: bytes, filename: str, purpose: str = "batch") -> tuple[bytes, str]:
    """The ``multipart/form-data`` body of ``files.create`` and its Content-Type header."""
    request = httpx.Request("POST", "http://upload.invalid/v1/files", data={"purpose": purpose},
                            files={"file": (filename, data, "application/jsonl")})
    return request.read(), request.headers["Content-Type"]


def parse_jsonl(data: bytes | str) -> list[dict[str, Any]]:
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def progress_line(batch: Mapping[str, Any]) -> str:
    counts = batch.get("request_counts") or {}
    return (f"{batch.get('id')} {batch.get('status')}: {counts.get('completed', 0)} completed, "
            f"{counts.get('failed', 0)} failed of {counts.get('total', 0)}")


ProgressCallback = Callable[[Mapping[str, Any]], None]
