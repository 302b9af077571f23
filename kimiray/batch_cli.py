"""``kimiray batch submit FILE.jsonl`` (and ``get`` / ``cancel``): the OpenAI Batch API from the shell.

``submit`` uploads the file (a malformed line is reported with its number before anything runs), creates the
batch, shows its progress on stderr, and writes the output and error files next to the input (or to
``--output-dir``) as ``<name>.output.jsonl`` / ``<name>.errors.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kimiray.batch import progress_line
from kimiray.task_cli import EXIT_FAILED, EXIT_OK, UsageError, _connection_parent, _err, _guarded, make_client


def _write(client: Any, file_id: str | None, path: Path) -> str | None:
    if not file_id:
        return None
    path.write_bytes(client.file_content(file_id))
    return str(path)


def cmd_batch_submit(args: argparse.Namespace) -> int:
    source = Path(args.file).expanduser()
    if not source.is_file():
        raise UsageError(f"{args.file}: no such file")
    metadata = dict(pair.split("=", 1) for pair in (args.metadata or []) if "=" in pair)
    client = make_client(args.url, args.api_key)
    try:
        upload = client.batch_file(source)
        batch = client.create_batch(upload["id"], metadata=metadata or None)
        _err(f"batch {batch['id']} created from {upload['id']} ({upload['bytes']} bytes)")
        if args.no_wait:
            print(batch["id"])
            return EXIT_OK
        batch = client.wait_batch(batch["id"], args.timeout, poll_s=args.poll,
                                  on_progress=lambda b: _err(progress_line(b)))
        out_dir = Path(args.output_dir).expanduser() if args.output_dir else source.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        written = {"output": _write(client, batch.get("output_file_id"), out_dir / f"{source.stem}.output.jsonl"),
                   "errors": _write(client, batch.get("error_file_id"), out_dir / f"{source.stem}.errors.jsonl")}
        print(json.dumps({"id": batch["id"], "status": batch["status"], "request_counts": batch["request_counts"],
                          "files": written}, indent=2))
        return EXIT_OK if batch["status"] == "completed" else EXIT_FAILED
    finally:
        client.close()


def cmd_batch_get(args: argparse.Namespace) -> int:
    client = make_client(args.url, args.api_key)
    try:
        print(json.dumps(client.get_batch(args.id), indent=2))
        return EXIT_OK
    finally:
        client.close()


def cmd_batch_cancel(args: argparse.Namespace) -> int:
    client = make_client(args.url, args.api_key)
    try:
        batch = client.cancel_batch(args.id)
        _err(progress_line(batch))
        return EXIT_OK
    finally:
        client.close()


def add_batch_commands(subparsers: Any) -> None:
    conn = _connection_parent()
    batch = subparsers.add_parser("batch", help="OpenAI Batch API: submit a JSONL file, watch it, get results")
    sub = batch.add_subparsers(dest="batch_command", required=True, metavar="{submit,get,cancel}")
    submit = sub.add_parser("submit", parents=[conn], help="upload FILE.jsonl, run it as a batch, save results")
    submit.add_argument("file", help="JSONL: one {custom_id, method, url, body} per line")
    submit.add_argument("--output-dir", help="where to write <name>.output.jsonl / .errors.jsonl (default: "
                        "next to the input)")
    submit.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="batch metadata (repeatable)")
    submit.add_argument("--no-wait", action="store_true", help="print the batch id and exit")
    submit.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    submit.add_argument("--poll", type=float, default=1.0, help="seconds between status checks")
    submit.set_defaults(func=_guarded(cmd_batch_submit))
    get = sub.add_parser("get", parents=[conn], help="print a batch as JSON")
    get.add_argument("id")
    get.set_defaults(func=_guarded(cmd_batch_get))
    cancel = sub.add_parser("cancel", parents=[conn], help="cancel a batch (finished requests are kept)")
    cancel.add_argument("id")
    cancel.set_defaults(func=_guarded(cmd_batch_cancel))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kimiray")
    add_batch_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
