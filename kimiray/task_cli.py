"""``kimiray submit`` and ``kimiray tasks ...``: agent tasks from a shell.

``kimiray.cli`` registers these through :func:`add_task_commands`. Exit codes, for scripts: 0 the task
succeeded (or the command did what it says); 1 the task failed or was cancelled, the wait timed out, or the
server could not be reached / failed; 2 the input was unusable (missing file, bad JSON, unknown task type,
wrong API key, no such task). Stdout carries only results (result JSON, task ids, tables, events), so
``kimiray submit ... | jq`` works; progress and notes go to stderr.

The server is ``--url`` or ``$KIMIRAY_URL`` (default ``http://127.0.0.1:8000``), the key ``--api-key`` or
``$KIMIRAY_API_KEY``. ``submit --local`` runs the task in this process with ``kimiray.local.LocalRuntime``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import json
import mimetypes
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kimiray.client import DEFAULT_URL, Client
from kimiray.errors import (
    AuthenticationError,
    InvalidRequestError,
    KimirayError,
    NotFoundError,
    WaitTimeoutError,
)
from kimiray.progress import ProgressPrinter, render_event
from kimiray.types import Task, format_ts

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_USAGE_ERRORS = (InvalidRequestError, AuthenticationError, NotFoundError)


class UsageError(Exception):
    """The user's input cannot work: the message is printed, the exit code is 2."""


def make_client(url: str | None, api_key: str | None) -> Client:
    """The client every command uses. A module-level seam: tests replace it to inject an httpx transport."""
    return Client(url or os.environ.get("KIMIRAY_URL") or DEFAULT_URL, api_key)


def _err(message: str) -> None:
    print(f"kimiray: {message}", file=sys.stderr)


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn expected failures into a message and an exit code instead of a traceback."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except UsageError as exc:
            _err(f"error: {exc}")
            return EXIT_USAGE
        except WaitTimeoutError as exc:
            _err(f"{exc}; follow it with: kimiray tasks events {exc.task_id} --follow")
            return EXIT_FAILED
        except _USAGE_ERRORS as exc:
            _err(f"error: {exc}")
            return EXIT_USAGE
        except KimirayError as exc:
            _err(f"error: {exc}")
            return EXIT_FAILED
        except KeyboardInterrupt:
            _err("interrupted")
            return EXIT_INTERRUPTED

    return run


# ------------------------------------------------------------------------------------------------------------
# Building a task's input
# ------------------------------------------------------------------------------------------------------------
def _is_file(value: str) -> bool:
    try:
        return Path(value).expanduser().is_file()
    except (OSError, ValueError):  # a long inline JSON is no file name
        return False


def load_json_arg(value: str, flag: str) -> Any:
    """A JSON value given inline, as a file path, or as ``@path``."""
    from_file = value.startswith("@") or (not value.lstrip().startswith(("{", "[")) and _is_file(value))
    path = Path(value.removeprefix("@")).expanduser() if from_file else None
    text = value
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{flag}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        what = f"file {str(path)!r} is not valid JSON" if path is not None else "not a JSON file nor valid JSON"
        raise UsageError(f"{flag}: {what} ({exc})") from None


# ``--option`` keys that are task options (``POST /v1/tasks`` ``options``); every other key is an input field.
TASK_OPTION_KEYS = ("session_id",)


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; a value that parses as JSON (``3``, ``true``, ``[1,2]``) is taken as such."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option {pair!r}: expected key=value")
        try:
            options[key.strip()] = json.loads(raw)
        except ValueError:
            options[key.strip()] = raw
    return options


def build_input(source: str | None, *, schema: str | None = None, input_json: str | None = None) -> dict[str, Any]:
    """The task input: ``--input-json`` as the base, then the file (inlined, base64) or URL, then ``--schema``."""
    data: Any = load_json_arg(input_json, "--input-json") if input_json else {}
    if not isinstance(data, dict):
        raise UsageError("--input-json must be a JSON object")
    if source:
        if re.match(r"(?i)^https?://", source):
            data["url"] = source
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                raise UsageError(f"no such file: {source} (give a local file or an http(s) URL)")
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from None
            data["file"] = {
                "name": path.name, "data": base64.b64encode(raw).decode("ascii"),
                "content_type": mimetypes.guess_type(path.name)[0] or "application/octet-stream",
            }
    if schema:
        data["schema"] = load_json_arg(schema, "--schema")
    return data


# ------------------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------------------
def _runtime(args: argparse.Namespace) -> Any:
    """A Client, or with ``--local`` the in-process runtime (same submit / stream_events / wait / get)."""
    if getattr(args, "local", False):
        try:
            from kimiray.local import LocalRuntime
        except ImportError as exc:
            raise UsageError(f"--local is not available here: {exc}") from None
        return LocalRuntime()
    return make_client(args.url, args.api_key)


def _close(runtime: Any) -> None:
    close = getattr(runtime, "close", None)
    if callable(close):
        close()


def follow(runtime: Any, task: Task, printer: ProgressPrinter, timeout: float | None = None) -> Task:
    """Show the task's events until it ends, then return its final state (polling if the stream gives out)."""
    if not task.done:
        events = runtime.stream_events(task.id)
        lost: KimirayError | None = None
        try:
            for event in events:
                printer.handle(event)
        except AuthenticationError:
            raise
        except KimirayError as exc:
            lost = exc
        finally:
            printer.close()
            with contextlib.suppress(Exception):
                events.close()
        if lost is not None:
            _err(f"event stream lost ({lost}); polling instead")
    return runtime.wait(task.id, timeout, raise_on_failure=False)


def _write_result(task: Task, output: str | None) -> None:
    text = json.dumps(task.result, indent=2, ensure_ascii=False)
    if not output:
        print(text)
        return
    try:
        Path(output).expanduser().write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--output: cannot write {output}: {exc.strerror or exc}") from None
    _err(f"result written to {output}")


def _task_outcome(task: Task, output: str | None) -> int:
    if task.status == "succeeded":
        _write_result(task, output)
        return EXIT_OK
    if task.status == "failed":
        info = task.error
        detail = f"{info.code or 'error'}: {info.message}" if info else "no error detail"
        _err(f"task {task.id} failed: {detail}")
    else:
        _err(f"task {task.id} was {task.status}")
    return EXIT_FAILED


def split_options(pairs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--option`` pairs -> (input fields, task options). Input fields go through the agent's schema on the
    server, so an unknown key or a bad value is refused there (422) instead of being ignored."""
    fields = {k: v for k, v in pairs.items() if k not in TASK_OPTION_KEYS}
    return fields, {k: v for k, v in pairs.items() if k in TASK_OPTION_KEYS}


def cmd_submit(args: argparse.Namespace) -> int:
    payload = build_input(args.source, schema=args.schema, input_json=args.input_json)
    fields, options = split_options(parse_options(args.option))
    payload.update(fields)
    if args.source is None and args.input_json is None and args.schema is None and not (fields or options):
        raise UsageError("nothing to submit: give a file or URL, or --input-json (use '{}' for no input)")
    runtime = _runtime(args)
    try:
        task = runtime.submit(args.type, payload, options=options or None, idempotency_key=args.idempotency_key)
        if args.no_wait:
            print(task.id)
            return EXIT_OK
        note = "submitted" if task.created is not False else "already submitted (same idempotency key)"
        _err(f"task {task.id} ({task.type or args.type}) {note}")
        printer = ProgressPrinter(sys.stderr, show_events=not args.quiet)
        try:
            task = follow(runtime, task, printer, args.timeout)
        except KeyboardInterrupt:
            printer.close()
            _err(f"stopped watching; task {task.id} keeps running (kimiray tasks cancel {task.id} stops it)")
            return EXIT_INTERRUPTED
        return _task_outcome(task, args.output)
    finally:
        _close(runtime)


def _progress_cell(task: Task) -> str:
    p = task.progress
    if p is None or p.done is None:
        return "-"
    done = int(p.done) if float(p.done).is_integer() else p.done
    if not p.total:
        return str(done)
    total = int(p.total) if float(p.total).is_integer() else p.total
    return f"{done}/{total}"


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def cmd_tasks_ls(args: argparse.Namespace) -> int:
    client = make_client(args.url, args.api_key)
    try:
        page = client.list_tasks(status=args.status, type=args.type, limit=args.limit, cursor=args.cursor)
    finally:
        client.close()
    rows = [[t.id, t.type, t.status, _progress_cell(t), format_ts(t.created_at)] for t in page.data]
    if rows:
        print(format_table(rows, ["ID", "TYPE", "STATUS", "PROGRESS", "CREATED"]))
    else:
        _err("no tasks")
    if page.next_cursor:
        _err(f"more: kimiray tasks ls --cursor {page.next_cursor}")
    return EXIT_OK


def _dump(task: Task) -> str:
    return json.dumps(task.model_dump(mode="json", exclude={"created"} if task.created is None else None),
                      indent=2, ensure_ascii=False)


def cmd_tasks_get(args: argparse.Namespace) -> int:
    client = make_client(args.url, args.api_key)
    try:
        print(_dump(client.get(args.id)))
    finally:
        client.close()
    return EXIT_OK


def cmd_tasks_cancel(args: argparse.Namespace) -> int:
    client = make_client(args.url, args.api_key)
    try:
        task = client.cancel(args.id)
    finally:
        client.close()
    if task.status == "cancelled":
        note = ""
    elif task.done:
        note = "already finished; nothing to cancel"
    else:
        note = "cancel requested; it stops shortly"
    print(f"{task.id}: {task.status}" + (f" ({note})" if note else ""))
    return EXIT_OK


def cmd_tasks_events(args: argparse.Namespace) -> int:
    """Without ``--follow``: the events logged so far; with it, live until the task ends."""
    client = make_client(args.url, args.api_key)
    try:
        upto = None if args.follow else client.get(args.id).last_event_id
        if upto is not None and upto <= args.after:
            return EXIT_OK
        with contextlib.closing(client.stream_events(args.id, after=args.after)) as events:
            for event in events:
                if args.text:
                    print(f"{event.id:>4} {render_event(event)}")
                else:
                    print(json.dumps(event.model_dump(mode="json"), ensure_ascii=False))
                sys.stdout.flush()
                if upto is not None and event.id >= upto:
                    break
    finally:
        client.close()
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------------------
def _connection_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--url", default=None, help="server URL (default: $KIMIRAY_URL or http://127.0.0.1:8000)")
    parent.add_argument("--api-key", default=None, help="API key (default: $KIMIRAY_API_KEY)")
    return parent


def add_task_commands(subparsers: Any) -> None:
    """Register ``submit`` and ``tasks`` on an ``add_subparsers()`` object; each sets ``func(args) -> int``."""
    conn = _connection_parent()

    submit = subparsers.add_parser(
        "submit", parents=[conn], help="submit an agent task and follow it to its result",
        description="Submit a task, show its progress, print the result JSON on stdout.")
    submit.add_argument("type", help="task type: contract_extraction, video_analysis, os_agent, chat, ... "
                        "(GET /v1/task-types lists them with their input fields)")
    submit.add_argument("source", nargs="?", help="a local file (sent inline, base64) or an http(s) URL")
    submit.add_argument("--schema", help="JSON schema for the result: a file path or inline JSON")
    submit.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="an input field of the task type, e.g. kind=question (repeatable; values that parse "
                        "as JSON are sent as such; an unknown key or bad value is refused); session_id=ID "
                        "continues a session")
    submit.add_argument("--input-json", help="extra input fields: a JSON object, inline or a file path")
    submit.add_argument("--idempotency-key", help="resubmitting with the same key returns the same task")
    submit.add_argument("--no-wait", action="store_true", help="print the task id and exit")
    submit.add_argument("--output", "-o", help="write the result JSON to this file instead of stdout")
    submit.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    submit.add_argument("--quiet", "-q", action="store_true", help="show only the progress bar, no other events")
    submit.add_argument("--local", action="store_true", help="run in this process (kimiray.local), no server")
    submit.set_defaults(func=_guarded(cmd_submit))

    tasks = subparsers.add_parser("tasks", help="list, inspect, cancel and watch tasks")
    sub = tasks.add_subparsers(dest="tasks_command", required=True, metavar="{ls,get,cancel,events}")
    ls = sub.add_parser("ls", parents=[conn], help="list your tasks, newest first")
    ls.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    ls.add_argument("--type")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--cursor", help="next_cursor of an earlier page")
    ls.set_defaults(func=_guarded(cmd_tasks_ls))
    get = sub.add_parser("get", parents=[conn], help="print a task as JSON")
    get.add_argument("id")
    get.set_defaults(func=_guarded(cmd_tasks_get))
    cancel = sub.add_parser("cancel", parents=[conn], help="ask a task to stop")
    cancel.add_argument("id")
    cancel.set_defaults(func=_guarded(cmd_tasks_cancel))
    events = sub.add_parser("events", parents=[conn], help="print a task's events (JSON lines)")
    events.add_argument("id")
    events.add_argument("--after", type=int, default=0, help="only events with a larger id")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing until the task ends")
    events.add_argument("--text", action="store_true", help="one human line per event instead of JSON")
    events.set_defaults(func=_guarded(cmd_tasks_events))


def main(argv: list[str] | None = None) -> int:
    """The task commands on their own (``python -m kimiray.task_cli``)."""
    parser = argparse.ArgumentParser(prog="kimiray", description="kimiray agent tasks")
    add_task_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
