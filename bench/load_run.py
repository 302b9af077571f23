"""A bounded load run on 127.0.0.1: a fixed number of requests at a fixed concurrency against a local ingress,
with latency percentiles per request kind, the error count (the run passes only with 0) and the server's memory.

Server: a separate process (``--serve``) running the real ingress app under uvicorn with its TaskRunner loop
(``tests/task_server.py``), the tiny checkpoint in the real AsyncEngine, the embedded SQLite stores - no Ray (the
Ray hop is measured by bench/serve_bench.py). Its RSS is read from ``/proc/<pid>/status`` once a second.

Load: ``--concurrency`` closed-loop workers in this process, each with its own API key (the product's default
per-key limits stay on) and keep-alive connection, take requests from one shared counter until ``--requests``
were sent. Request ``i`` is of kind ``MIX[i % 10]``:

  chat     POST /v1/chat/completions, ``--max-tokens`` tokens (ignore_eos), greedy        (4 in 10)
  submit   POST /v1/tasks, a ``chat`` task of ``--max-tokens`` tokens for the runner      (3 in 10)
  get      GET /v1/tasks/{id} of one of this worker's submitted tasks                    (3 in 10)

After the last request the run waits until every submitted task has ended and checks all succeeded.

Pass/fail (exit status 1 on a failure): no request answered other than 2xx, every task succeeded, and the server's
RSS at the end is within ``--rss-growth`` (default 15%) of its RSS after the warm-up.

Usage: python bench/load_run.py [--requests 6000] [--concurrency 8] [--max-tokens 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIX = ("chat", "submit", "get", "chat", "submit", "get", "chat", "submit", "get", "chat")


def _keys(n: int) -> list[str]:
    return [f"sk-load-{i:03d}-5e1f0c" for i in range(n)]


# --------------------------------------------------------------------------------------------------- server


def serve(port_file: Path, home: Path, keys: str, runner_concurrency: int) -> None:
    """The server process: writes its URL to ``port_file`` when ready, runs until SIGTERM."""
    import torch

    from engine.runtime.engine import AsyncEngine
    from connectors.paths import tiny_checkpoint_dir
    from tests.task_server import task_server

    torch.set_num_threads(1)
    engine = AsyncEngine.from_pretrained(str(tiny_checkpoint_dir()), device="cpu", dtype=torch.float32)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with task_server(f"sqlite:///{home / 'stores'}", keys, engine=engine, lease_s=30.0,
                     tasks_args={"runner_concurrency": runner_concurrency}) as url:
        port_file.write_text(url)
        stop.wait()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class ServerProcess:
    def __init__(self, workdir: Path, keys: list[str], runner_concurrency: int) -> None:
        port_file = workdir / "url"
        env = {**os.environ, "KIMIRAY_HOME": str(workdir / "home"), "PYTHONPATH": str(REPO),
               "RAY_USAGE_STATS_ENABLED": "0"}
        self.log = open(workdir / "server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(port_file), str(workdir / "home"),
             ",".join(keys), str(runner_concurrency)], env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 180
        while not port_file.exists() or not port_file.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {workdir / 'server.log'}")
            time.sleep(0.1)
        self.url = port_file.read_text()

    def rss_mib(self) -> float:
        return _rss_mib(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ----------------------------------------------------------------------------------------------------- load


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1000

    return {"count": len(ordered), "p50_ms": round(pct(50), 2), "p95_ms": round(pct(95), 2),
            "p99_ms": round(pct(99), 2), "max_ms": round(ordered[-1] * 1000, 2),
            "mean_ms": round(sum(ordered) / len(ordered) * 1000, 2)}


async def run_load(url: str, keys: list[str], requests: int, max_tokens: int,
                   on_progress: Any = None) -> dict[str, Any]:
    import httpx

    counter = iter(range(requests))
    latencies: dict[str, list[float]] = {kind: [] for kind in set(MIX)}
    errors: list[dict[str, Any]] = []
    submitted: dict[str, list[str]] = {key: [] for key in keys}
    chat_body = {"model": "kimi-vl", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                 "messages": [{"role": "user", "content": "Give me a short status update."}]}
    task_body = {"type": "chat", "input": {"max_tokens": max_tokens,
                                           "messages": [{"role": "user", "content": "Summarise the day."}]}}

    async def worker(key: str) -> None:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                     timeout=120) as client:
            for i in counter:
                kind = MIX[i % len(MIX)]
                if kind == "get" and not submitted[key]:
                    kind = "submit"
                started = time.perf_counter()
                try:
                    if kind == "chat":
                        r = await client.post("/v1/chat/completions", json=chat_body)
                    elif kind == "submit":
                        r = await client.post("/v1/tasks", json=task_body)
                    else:
                        r = await client.get(f"/v1/tasks/{submitted[key][i % len(submitted[key])]}")
                except httpx.HTTPError as exc:
                    errors.append({"kind": kind, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                elapsed = time.perf_counter() - started
                if r.status_code >= 300:
                    errors.append({"kind": kind, "status": r.status_code, "body": r.text[:300]})
                    continue
                latencies[kind].append(elapsed)
                if kind == "submit":
                    submitted[key].append(r.json()["id"])
                if on_progress is not None:
                    on_progress(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker(key) for key in keys))
    wall = time.perf_counter() - started
    ids = [(key, task_id) for key, tasks in submitted.items() for task_id in tasks]
    drain_started = time.perf_counter()
    statuses = await _drain(url, ids)
    return {
        "wall_s": round(wall, 2), "requests_per_s": round(requests / wall, 1),
        "latency": {kind: _percentiles(values) for kind, values in sorted(latencies.items())},
        "errors": len(errors), "error_samples": errors[:10],
        "tasks_submitted": len(ids), "task_statuses": statuses,
        "drain_s": round(time.perf_counter() - drain_started, 2),
    }


async def _drain(url: str, ids: list[tuple[str, str]], timeout_s: float = 600) -> dict[str, int]:
    """Wait until every submitted task has ended (oldest first: the queue is FIFO); returns {status: count}."""
    import httpx

    deadline = time.monotonic() + timeout_s
    pending = list(ids)
    ended: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while pending and time.monotonic() < deadline:
            key, task_id = pending[0]
            r = await client.get(f"/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"})
            status = r.json().get("status", "?") if r.status_code == 200 else f"http_{r.status_code}"
            if status in ("queued", "running"):
                await asyncio.sleep(0.2)
                continue
            ended[status] = ended.get(status, 0) + 1
            pending.pop(0)
    if pending:
        ended["unfinished"] = len(pending)
    return ended


class RssSampler:
    """The server's RSS once a second in a thread; ``mark(name)`` keeps the latest sample under a name."""

    def __init__(self, server: ServerProcess, period_s: float = 1.0) -> None:
        self.server, self.period_s = server, period_s
        self.samples: list[tuple[float, float]] = []
        self.marks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((round(time.monotonic() - started, 1), round(self.server.rss_mib(), 1)))
            self._stop.wait(self.period_s)

    def mark(self, name: str) -> float:
        self.marks[name] = round(self.server.rss_mib(), 1)
        return self.marks[name]

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def warm_up(url: str, key: str, max_tokens: int) -> None:
    """A few of each request kind, so the RSS baseline has the engine, tokenizer and stores loaded."""
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        for _ in range(20):
            client.post("/v1/chat/completions", json={"model": "kimi-vl", "max_tokens": max_tokens,
                                                      "messages": [{"role": "user", "content": "warm up"}]})
            task = client.post("/v1/tasks", json={"type": "chat", "input": {
                "max_tokens": max_tokens, "messages": [{"role": "user", "content": "warm up"}]}}).json()
            client.get(f"/v1/tasks/{task['id']}")
        deadline = time.monotonic() + 120
        while client.get("/v1/tasks", params={"status": "queued"}).json()["data"] and time.monotonic() < deadline:
            time.sleep(0.2)


def run(requests: int, concurrency: int, max_tokens: int, rss_growth: float,
        runner_concurrency: int = 8) -> dict[str, Any]:
    keys = _keys(concurrency)
    with tempfile.TemporaryDirectory(prefix="kimiray-load-") as tmp:
        server = ServerProcess(Path(tmp), keys, runner_concurrency)
        try:
            warm_up(server.url, keys[0], max_tokens)
            with RssSampler(server) as rss:
                rss.mark("start")
                half = requests // 2

                def on_progress(i: int) -> None:
                    if i == half:
                        rss.mark("middle")

                result = asyncio.run(run_load(server.url, keys, requests, max_tokens, on_progress))
                rss.mark("end")
            samples = rss.samples
        finally:
            server.stop()
    marks = rss.marks
    growth = marks["end"] / marks["start"] - 1
    failures = []
    if result["errors"]:
        failures.append(f"{result['errors']} requests failed")
    if set(result["task_statuses"]) != {"succeeded"}:
        failures.append(f"tasks did not all succeed: {result['task_statuses']}")
    if growth > rss_growth:
        failures.append(f"server RSS grew {growth:.1%}, over the bound of {rss_growth:.0%}")
    return {
        "config": {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens,
                   "runner_concurrency": runner_concurrency,
                   "mix": "chat 4 / submit 3 / get 3 in 10", "server": "in-process ingress + TaskRunner, "
                   "tiny checkpoint, embedded SQLite, no Ray", "per_key_limits": "defaults (600/min, 64 at once)"},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        **result,
        "rss_mib": {**marks, "max": max(v for _, v in samples), "growth": round(growth, 4), "bound": rss_growth},
        "rss_samples": samples,
        "passed": not failures, "failures": failures,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--runner-concurrency", type=int, default=8, help="tasks the runner runs at once")
    parser.add_argument("--rss-growth", type=float, default=0.15, help="allowed RSS growth, start to end")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    out = run(args.requests, args.concurrency, args.max_tokens, args.rss_growth, args.runner_concurrency)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    sys.exit(0 if out["passed"] else 1)


if __name__ == "__main__":
    main()
