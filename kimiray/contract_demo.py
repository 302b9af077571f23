"""``kimiray contract-demo``: the main job end to end on one machine.

A local Ray with the Serve application (ModelServer + TaskRunner + ingress, embedded SQLite store under
``$KIMIRAY_HOME``, the tiny checkpoint unless ``--model``), a generated sample contract (or ``--pdf``) submitted as
a ``contract_extraction`` task through the SDK with a live progress bar, the JSON result printed and the
annotated PDF written next to it. Everything binds to loopback; Ray and Serve are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from connectors.ports import free_port

LOOPBACK_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
# With the tiny random-weight model the answers are noise; these options keep the demo to about a minute.
TINY_OPTIONS = {"categories": ["Governing Law", "Parties", "Insurance", "Audit Rights", "Cap on Liability"],
                "max_items_per_chunk": 1, "max_value_chars": 24, "max_quote_chars": 60, "max_output_tokens": 120}


def _start_service(model: str | None, port: int) -> None:
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.fast_path import apply_fast_path

    apply_fast_path()  # Serve's short path, as `kimiray serve` runs it (KIMIRAY_SERVE_FAST_PATH=0: Serve's defaults)
    env = {k: v for k, v in os.environ.items() if k in (*LOOPBACK_ENV, "KIMIRAY_HOME", "HF_HUB_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                    os.environ.get("PYTHONPATH")) if p)
    # logical CPUs: the replicas mostly wait on each other, so 4 fit a 2-core machine
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env={"env_vars": env},
             log_to_driver=False, num_cpus=max(4, os.cpu_count() or 1))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": {"model": model}, "tasks": {"runner_concurrency": 2}}), name="kimiray",
              route_prefix="/")


def _stop_service() -> None:
    from kimiray.ray_lifecycle import stop_serve

    stop_serve(["kimiray"])


def _sample_contract(path: Path, pages: int) -> Path:
    from pipelines.document.synthetic import make_contract

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(make_contract(pages=pages, seed=0).pdf)
    return path


def _check_pdf(path: Path) -> None:
    """The same header check the service makes at submission, here before anything starts."""
    from agents.sources import file_kind
    from kimiray.cli_errors import DemoError

    if not path.is_file():
        raise DemoError(f"no such file: {path}")
    with path.open("rb") as f:
        kind = file_kind(f.read(1024))
    if kind != "a PDF":
        raise DemoError(f"{path} is not a PDF ({kind or 'no %PDF- header'}); contract-demo reads PDFs")


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """What to print: the extracted data and each value's citations (the full result is saved as JSON)."""
    return {
        "title": result.get("title"), "page_count": result.get("page_count"), "chunks": result.get("chunks"),
        "fields": {f["name"]: [{"value": v["value"], "verified": v["verified"],
                                "pages": sorted({c["page"] for c in v["citations"]})} for v in f["values"]]
                   for f in result.get("fields", [])},
        "stats": result.get("stats"), "warnings": result.get("warnings", [])[:3],
    }


def run_demo(args: argparse.Namespace) -> int:
    import kimiray
    from connectors.paths import data_dir, tiny_checkpoint_dir
    from kimiray.progress import ProgressPrinter

    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.pop("KIMIRAY_API_KEYS", None)  # loopback only: no key needed
    home = data_dir()
    out_dir = home / "demo"
    if args.pdf:
        _check_pdf(Path(args.pdf).expanduser())  # before Ray starts: a wrong file is refused in a blink
    pdf = Path(args.pdf).expanduser() if args.pdf else _sample_contract(out_dir / "sample-contract.pdf", args.pages)
    if not args.model:
        tiny_checkpoint_dir()  # written once here, not raced by the replicas
    print(f"[kimiray] contract: {pdf} ({pdf.stat().st_size // 1024} KiB)", flush=True)
    print(f"[kimiray] model: {args.model or 'tiny random-weight checkpoint'}; store: embedded under {home}",
          flush=True)
    started = time.monotonic()
    port = free_port()
    print("[kimiray] starting local Ray + Serve (ModelServer, TaskRunner, ingress) …", flush=True)
    _start_service(args.model, port)
    try:
        url = f"http://127.0.0.1:{port}"
        print(f"[kimiray] service ready at {url} ({time.monotonic() - started:.0f}s)", flush=True)
        options: dict[str, Any] = {} if args.model else dict(TINY_OPTIONS)
        with kimiray.Client(url, timeout=120) as client:
            ref = client.upload_file(pdf)
            task = client.submit("contract_extraction", {"blob": ref, **options})
            print(f"[kimiray] task {task.id} submitted", flush=True)
            printer = ProgressPrinter(sys.stderr, show_events=False)
            for event in client.stream_events(task.id):
                printer.handle(event)
            printer.close()
            done = client.wait(task.id, timeout=args.timeout, raise_on_failure=False)
            if done.status != "succeeded":
                print(f"[kimiray] task {done.status}: {done.error}", file=sys.stderr)
                return 1
            stem = pdf.stem
            annotated = out_dir / f"{stem}.annotated.pdf"
            out_dir.mkdir(parents=True, exist_ok=True)
            client.download_artifact(task.id, "annotated_pdf", annotated)
            (out_dir / f"{stem}.result.json").write_text(json.dumps(done.result, indent=1))
            client.download_artifact(task.id, "summary_md", out_dir / f"{stem}.summary.md")
        print(json.dumps(_summary(done.result), indent=1))
        print(f"[kimiray] annotated PDF: {annotated}")
        print(f"[kimiray] full result: {out_dir / (stem + '.result.json')}; summary: {out_dir / (stem + '.summary.md')}")
        print(f"[kimiray] follow-up questions: POST /v1/chat/completions with session_id={done.session_id}")
        if not args.model:
            print("[kimiray] (random weights: values are noise and none verifies; pass --model for a real one)")
        print(f"[kimiray] done in {time.monotonic() - started:.0f}s", flush=True)
        return 0
    finally:
        _stop_service()


def add_contract_demo_command(subparsers: Any) -> None:
    demo = subparsers.add_parser("contract-demo", help="the main job: a contract through the local service")
    demo.add_argument("--model", help="checkpoint dir or HF id (default: the tiny random-weight checkpoint)")
    demo.add_argument("--pdf", help="your contract (default: a generated sample contract)")
    demo.add_argument("--pages", type=int, default=20, help="pages of the generated sample contract")
    demo.add_argument("--timeout", type=float, default=1800.0)
    demo.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    from kimiray.cli_errors import one_line_errors

    demo.set_defaults(func=one_line_errors(run_demo))
