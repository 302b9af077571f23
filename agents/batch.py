"""The ``openai_batch`` task type: an OpenAI Batch API batch run as one durable task.

Why a task: the batch then inherits leases, retries, cancellation, progress events and per-key ownership. The
agent reads the input JSONL (an OpenAI file record, ``connectors.stores.files``), runs its chat-completion
requests with up to ``max_in_flight`` in flight (enough to keep the replicas' continuous batching full) and
records each line's result in the task session's partials under ``r.<line index>`` as soon as it is known: a
re-run after a killed runner or a Redis restart skips every finished line, and the output is built from those
partials, so each ``custom_id`` appears exactly once. At the end (completed, cancelled or expired) it writes the
output file (successful lines) and the error file (failed ones) with deterministic ids, so a re-run of the
finalizing step returns the same files.

``request_counts`` travel in the task's progress (``done`` = finished lines, ``total`` = lines, ``message`` =
:func:`counts_message`), so the batch object is a cheap view of the task record (``serve_app.batches``).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agents.base import Agent, AgentContext, AgentError, TaskCancelled
from agents.registry import register_agent
from connectors.errors import ClientInputError
from connectors.model_client import ContextTooLongError, ModelError, ModelReply
from connectors.openai_messages import ChatCompletionRequest, to_generate_request
from connectors.stores.files import FILE_TTL_S, create_file, get_file

BATCH_ENDPOINTS = ("/v1/chat/completions",)
COMPLETION_WINDOWS = {"24h": 24 * 3600.0}
MAX_BATCH_LINES = 50_000
RESULT_PREFIX = "r."
FILES_PARTIAL = "batch_files"


class BatchFileError(ValueError):
    """A malformed input file; ``line`` is 1-based (None: the file as a whole)."""

    def __init__(self, message: str, line: int | None = None, param: str | None = None) -> None:
        super().__init__(message if line is None else f"line {line}: {message}")
        self.line = line
        self.param = param
        self.detail = message


class BatchLine(BaseModel):
    """One input line: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(..., min_length=1, max_length=512)
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


def parse_batch_jsonl(data: bytes, *, max_lines: int = MAX_BATCH_LINES,
                      endpoint: str | None = None) -> list[BatchLine]:
    """Parse and check the whole file before anything runs; the first problem raises with its line number.
    ``body`` is checked against the chat-completions schema (media are fetched only when the line runs)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BatchFileError(f"the file is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    lines: list[BatchLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(lines) >= max_lines:
            raise BatchFileError(f"more than {max_lines} requests in one batch", line=number)
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise BatchFileError(f"not valid JSON ({exc.msg} at column {exc.colno})", line=number) from None
        if not isinstance(obj, dict):
            raise BatchFileError("each line must be a JSON object", line=number)
        try:
            line = BatchLine.model_validate(obj)
        except Exception as exc:
            errors = getattr(exc, "errors", lambda: [])()
            where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
            msg = errors[0]["msg"] if errors else str(exc)
            raise BatchFileError(f"{where}: {msg}" if where else msg, line=number, param=where or None) from None
        if line.url not in BATCH_ENDPOINTS:
            raise BatchFileError(f"url {line.url!r} is not supported (only {', '.join(BATCH_ENDPOINTS)})",
                                 line=number, param="url")
        if endpoint is not None and line.url != endpoint:
            raise BatchFileError(f"url {line.url!r} differs from the batch's endpoint {endpoint!r}", line=number,
                                 param="url")
        if line.custom_id in seen:
            raise BatchFileError(f"custom_id {line.custom_id!r} appears more than once", line=number,
                                 param="custom_id")
        for field in ("stream", "session_id"):
            if line.body.get(field):
                raise BatchFileError(f"body.{field} is not supported in a batch", line=number,
                                     param=f"body.{field}")
        try:
            ChatCompletionRequest.model_validate(line.body)
        except Exception as exc:
            errors = getattr(exc, "errors", lambda: [])()
            where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
            msg = errors[0]["msg"] if errors else str(exc)
            raise BatchFileError(f"body.{where}: {msg}" if where else f"body: {msg}", line=number,
                                 param=f"body.{where}" if where else "body") from None
        seen.add(line.custom_id)
        lines.append(line)
    if not lines:
        raise BatchFileError("the file has no requests")
    return lines


class BatchInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(..., min_length=1, max_length=200)
    endpoint: Literal["/v1/chat/completions"] = "/v1/chat/completions"
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None
    created_at: float = Field(default_factory=time.time, description="start of the completion window")
    model: str = Field("kimi-vl", description="the served model name written into each response body")
    max_in_flight: int = Field(64, ge=1, le=256, description="requests of this batch in flight at once")


class BatchResult(BaseModel):
    output_file_id: str | None
    error_file_id: str | None
    request_counts: dict[str, int]


def counts_message(completed: int, failed: int) -> str:
    return f"completed={completed} failed={failed}"


_COUNTS = re.compile(r"completed=(\d+) failed=(\d+)")


def parse_counts(message: str | None) -> tuple[int, int] | None:
    match = _COUNTS.search(message or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def _batch_hex(task_id: str) -> str:
    return task_id.removeprefix("task_")


def _ok_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": body.get("id", ""), "body": body}, "error": None}


def _error_line(custom_id: str, status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    error = {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
             "param": param, "code": code}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": {"error": error}},
            "error": None}


def _unrun_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def chat_completion(request_id: str, model: str, reply: ModelReply) -> dict[str, Any]:
    """The ``chat.completion`` body of one output line (reasoning in ``message.reasoning_content``, as the
    chat-completions route answers it)."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.text}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    body: dict[str, Any] = {"id": request_id, "object": "chat.completion", "created": int(time.time()),
                            "model": model, "choices": [{"index": 0, "message": message, "logprobs": None,
                                                         "finish_reason": reply.finish_reason or "stop"}]}
    if reply.usage is not None:
        body["usage"] = {"prompt_tokens": reply.usage.prompt_tokens,
                         "completion_tokens": reply.usage.completion_tokens,
                         "total_tokens": reply.usage.prompt_tokens + reply.usage.completion_tokens,
                         "prompt_tokens_details": {"cached_tokens": reply.usage.cached_tokens}}
    return body


def is_success(line: dict[str, Any]) -> bool:
    response = line.get("response") or {}
    return response.get("status_code") == 200


@register_agent
class OpenAIBatchAgent(Agent):
    type = "openai_batch"
    Input = BatchInput
    description = "An OpenAI Batch API batch (POST /v1/batches): runs each line of the input file once."
    max_attempts = 10  # progress is checkpointed per line, so another attempt only costs the lines in flight

    async def run(self, ctx: AgentContext, input: BatchInput) -> BatchResult:
        await ctx.step("validating")
        record = await get_file(ctx.sessions, ctx.owner, input.input_file_id)
        data = await ctx.blobs.get(ctx.owner, record.ref) if record is not None else None
        if data is None:
            raise AgentError(f"input file {input.input_file_id!r} not found", code="file_not_found")
        try:
            # off the event loop: 50,000 lines take seconds, and this loop also runs the lease heartbeats
            lines = await asyncio.to_thread(parse_batch_jsonl, data, endpoint=input.endpoint)
        except BatchFileError as exc:
            raise AgentError(str(exc), code="invalid_file") from None

        partials = await ctx.sessions.partials(ctx.session_id, ctx.owner)
        results: dict[int, dict[str, Any]] = {
            int(k[len(RESULT_PREFIX):]): v for k, v in partials.items() if k.startswith(RESULT_PREFIX)}
        completed = sum(1 for r in results.values() if is_success(r))
        failed = len(results) - completed
        total = len(lines)
        await ctx.progress(len(results), total, counts_message(completed, failed))
        deadline = input.created_at + COMPLETION_WINDOWS[input.completion_window]

        pending = [i for i in range(total) if i not in results]
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in pending:
            queue.put_nowait(i)
        stop_reason: str | None = None
        last_progress = 0.0

        async def report(force: bool = False) -> None:
            nonlocal last_progress
            if force or time.monotonic() - last_progress >= 0.5:
                last_progress = time.monotonic()
                await ctx.progress(len(results), total, counts_message(completed, failed))

        async def worker() -> None:
            nonlocal completed, failed, stop_reason
            while stop_reason is None:
                if ctx.cancel_requested:
                    stop_reason = "cancelled"
                    return
                if time.time() > deadline:
                    stop_reason = "expired"
                    return
                try:
                    index = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    line = await self._run_line(ctx, input, lines[index])
                except TaskCancelled:  # asked to stop while this line was being prepared: it did not run
                    stop_reason = "cancelled"
                    return
                await ctx.save_partial(f"{RESULT_PREFIX}{index}", line)  # the checkpoint, before counting it
                results[index] = line
                if is_success(line):
                    completed += 1
                else:
                    failed += 1
                await report()

        workers = [asyncio.create_task(worker()) for _ in range(min(input.max_in_flight, max(1, len(pending))))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
        if ctx.cancel_requested and stop_reason is None and len(results) < total:
            stop_reason = "cancelled"
        await report(force=True)

        await ctx.emit("step", {"name": "finalizing"})
        await ctx.progress(len(results), total, counts_message(completed, failed) + " finalizing")
        files = await self._write_files(ctx, lines, results, stop_reason)
        counts = {"total": total, "completed": completed, "failed": failed}
        if stop_reason == "cancelled":
            raise TaskCancelled(ctx.task_id)
        if stop_reason == "expired":
            raise AgentError(f"the batch did not finish within its {input.completion_window} completion window; "
                             f"{total - len(results)} requests were not run", code="batch_expired")
        return BatchResult(request_counts=counts, **files)

    async def _run_line(self, ctx: AgentContext, input: BatchInput, line: BatchLine) -> dict[str, Any]:
        """One request -> its output line (200) or error line (4xx/5xx). Model unavailability is not a line
        error: it propagates, the runner re-queues the task, and the line runs again in the next attempt."""
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            body = ChatCompletionRequest.model_validate(line.body)
            request = await to_generate_request(body, ctx.limits, request_id)  # the service's limits and URL rules
            ctx.check_cancelled()
            # no session id: the lines of a batch are independent and should spread over the replicas
            reply: ModelReply = await ctx.model.generate(request)
        except ClientInputError as exc:
            return _error_line(line.custom_id, exc.status_code, exc.code, exc.message, exc.param)
        except ContextTooLongError as exc:
            return _error_line(line.custom_id, 400, "context_length_exceeded", str(exc))
        except ModelError as exc:
            return _error_line(line.custom_id, 500, "model_error", str(exc)[:2000])
        except ValueError as exc:
            return _error_line(line.custom_id, 400, "invalid_request", str(exc)[:2000])
        return _ok_line(line.custom_id, chat_completion(request_id, body.model or input.model, reply))

    async def _write_files(self, ctx: AgentContext, lines: list[BatchLine], results: dict[int, dict[str, Any]],
                           stop_reason: str | None) -> dict[str, str | None]:
        """Output and error JSONL files, one line per custom_id; lines never run (cancelled / expired) go to the
        error file with code ``batch_cancelled`` / ``batch_expired``. Ids are derived from the task id."""
        ok: list[str] = []
        bad: list[str] = []
        for index, line in enumerate(lines):
            result = results.get(index)
            if result is None:
                if stop_reason is None:
                    continue
                code = f"batch_{stop_reason}"
                result = _unrun_line(line.custom_id, code, f"the batch was {stop_reason} before this request ran")
            (ok if is_success(result) else bad).append(json.dumps(result, separators=(",", ":")))
        hex_id = _batch_hex(ctx.task_id)
        files: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for key, rows, suffix in (("output_file_id", ok, "output"), ("error_file_id", bad, "errors")):
            if rows:
                record = await create_file(
                    ctx.sessions, ctx.blobs, ctx.owner, ("\n".join(rows) + "\n").encode(),
                    filename=f"batch_{hex_id}_{suffix}.jsonl", purpose="batch_output",
                    content_type="application/jsonl", file_id=f"file-{hex_id}-{suffix}", ttl_s=FILE_TTL_S)
                files[key] = record.id
        await ctx.save_partial(FILES_PARTIAL, files)
        return files
