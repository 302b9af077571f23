"""A bounded scale model: the real Serve app (ProxyActor -> Ingress -> SessionAffinityRouter -> ModelServer, the
TaskRunner, Redis stores and cluster-wide limits) with N SIMULATED ModelServer replicas (``sim:h100``,
connectors/sim_engine.py: H100-measured step times, filler tokens), on loopback, to find which of our components
saturates first as N grows.

Per N (``--replicas 1 4 16 32``), on one local Ray and one redis-server started here (free loopback ports; both
stopped at the end, only what this script started):
  chat       closed loop of ``--concurrency-per-replica`` x N workers (capped by ``--max-concurrency``), non-streaming
             POST /v1/chat/completions, ``--max-tokens`` tokens, ~``--prompt-chars`` characters, for ``--phase-s``
  stream     the same with ``stream: true`` (time to first token and to the end)
  contract   ``--tasks-per-replica`` x N (capped) contract_extraction tasks on a generated ``--pages``-page contract,
             all submitted at once; tasks/hour from the ones that ended within ``--task-s``
During each phase: CPU seconds of every process of this Ray (grouped: ProxyActor, Ingress, ModelServer,
TaskRunner, controller, raylet, gcs), redis-server (INFO cpu) and this load generator, over wall time; Redis
commands/s (INFO stats); per-replica ongoing requests and simulated-GPU busy time (the sim's own counters,
sampled through the deployment handle). The bottleneck named is the first of: a process group at >= 85 % of one
core (Python processes run on one core), the simulated GPU (busy >= 75 % of the phase), or the machine.

Usage: python bench/scale_model.py [--replicas 1 4 16 32] [--phase-s 20] [--json out.json]
Bounded: every phase stops at its time limit; the whole run stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from connectors.ports import free_port  # noqa: E402

SAFE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DEDUP_LOGS": "0",
    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    "HF_HUB_OFFLINE": "1",
}
KEY = "sk-scale-model-0001"
TICK = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- per-process CPU from /proc -------------------------------------------------------------------------------

def _proc_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (ppid, cpu seconds, title) for every readable process."""
    out: dict[int, tuple[int, float, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, title)
    return out


def _group(title: str) -> str:
    for name in ("ProxyActor", "Ingress", "ModelServer", "TaskRunner", "ServeController"):
        if name in title:
            return name
    for name in ("raylet", "gcs_server", "redis-server", "dashboard", "log_monitor"):
        if name in title:
            return name
    return "other ray" if "ray" in title else "other"


def ray_cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds per component group over the process tree under ``root`` (this script's Ray), plus the
    load generator itself."""
    table = _proc_table()
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _, _) in table.items():
        children[ppid].append(pid)
    totals: dict[str, float] = defaultdict(float)
    stack = list(children[root])
    while stack:
        pid = stack.pop()
        stack.extend(children[pid])
        _, cpu, title = table[pid]
        totals[_group(title)] += cpu
    totals["load generator"] = table[root][1] if root in table else 0.0
    return dict(totals)


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine (other tenants included)."""
    parts = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def redis_info(port: int) -> dict[str, str]:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        info = {**client.info("stats"), **client.info("cpu"), **client.info("memory")}
    finally:
        client.close()
    return {k: str(v) for k, v in info.items()}


class PhaseMeter:
    """CPU per component, machine CPU and Redis commands between ``start`` and ``stop``."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = ray_cpu_seconds(os.getpid())
        self.machine0 = machine_busy()
        self.redis0 = redis_info(self.redis_port)

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        cpu1, machine1, redis1 = ray_cpu_seconds(os.getpid()), machine_busy(), redis_info(self.redis_port)
        cpu = {k: round(100 * (cpu1.get(k, 0) - self.cpu0.get(k, 0)) / wall, 1) for k in cpu1}
        redis_cpu = sum(float(redis1[k]) - float(self.redis0[k]) for k in ("used_cpu_sys", "used_cpu_user"))
        cpu["redis-server"] = round(100 * redis_cpu / wall, 1)
        busy = (machine1[0] - self.machine0[0]) / max(1.0, machine1[1] - self.machine0[1])
        commands = int(redis1["total_commands_processed"]) - int(self.redis0["total_commands_processed"])
        return {"wall_s": round(wall, 2), "cpu_percent_of_one_core": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
                "machine_cpu_percent": round(100 * busy, 1), "machine_cores": os.cpu_count(),
                "redis_commands_per_s": round(commands / wall, 1),
                "redis_used_memory_mb": round(int(redis1["used_memory"]) / 2**20, 2)}


# ---- simulated replicas' own counters -------------------------------------------------------------------------

async def replica_stats(handle: Any, n: int) -> dict[str, dict[str, Any]]:
    """The sims' stats by instance, sampled through the handle (the router spreads the calls over replicas)."""
    results = await asyncio.gather(*[handle.stats.remote() for _ in range(max(4, 6 * n))], return_exceptions=True)
    return {r["instance"]: r for r in results if isinstance(r, dict) and "instance" in r}


async def _sample_later(handle: Any, n: int, delay: float) -> dict[str, dict[str, Any]]:
    await asyncio.sleep(delay)
    return await replica_stats(handle, n)


def sim_delta(before: dict[str, dict], after: dict[str, dict], wall: float, n: int) -> dict[str, Any]:
    """Simulated-GPU busy fraction and requests per replica over the phase (replicas seen in both samples)."""
    common = [k for k in after if k in before]
    if not common:
        return {}
    busy = [(after[k]["busy_s"] - before[k]["busy_s"]) / wall for k in common]
    return {"replicas_sampled": len(common), "of": n, "sim_gpu_busy_mean": round(sum(busy) / len(busy), 3),
            "sim_gpu_busy_max": round(max(busy), 3),
            "model_calls": sum(after[k]["requests"] - before[k]["requests"] for k in common),
            "prompt_tokens": sum(after[k]["prompt_tokens"] - before[k]["prompt_tokens"] for k in common),
            "generated_tokens": sum(after[k]["generated_tokens"] - before[k]["generated_tokens"] for k in common)}


# ---- load ------------------------------------------------------------------------------------------------------

async def chat_phase(url: str, concurrency: int, seconds: float, max_tokens: int, prompt: str,
                     stream: bool) -> dict[str, Any]:
    import httpx

    latencies, ttfts, tokens, errors = [], [], [0], defaultdict(int)
    deadline = time.monotonic() + seconds
    body = {"model": "kimi-vl", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                                 limits=limits) as http:
        async def worker() -> None:
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    if stream:
                        first = None
                        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                            if r.status_code != 200:
                                errors[str(r.status_code)] += 1
                                await r.aread()
                                continue
                            async for line in r.aiter_lines():
                                if not line.startswith("data: ") or line == "data: [DONE]":
                                    continue
                                if first is None:
                                    first = time.monotonic() - t0
                                if '"usage"' in line:
                                    usage = json.loads(line[6:]).get("usage")
                                    if usage:
                                        tokens[0] += usage["completion_tokens"]
                        ttfts.append(first or 0.0)
                    else:
                        r = await http.post("/v1/chat/completions", json=body)
                        if r.status_code != 200:
                            errors[str(r.status_code)] += 1
                            continue
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    latencies.append(time.monotonic() - t0)
                except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                    errors[type(exc).__name__] += 1

        t_start = time.monotonic()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.monotonic() - t_start
    out = {"concurrency": concurrency, "requests": len(latencies), "errors": dict(errors),
           "requests_per_s": round(len(latencies) / wall, 2), "tokens_per_s": round(tokens[0] / wall, 1),
           "p50_s": _r(percentile(latencies, 0.5)), "p99_s": _r(percentile(latencies, 0.99))}
    if stream:
        out.update(ttft_p50_s=_r(percentile(ttfts, 0.5)), ttft_p99_s=_r(percentile(ttfts, 0.99)))
    return out


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


async def contract_phase(url: str, pdf: bytes, count: int, seconds: float) -> dict[str, Any]:
    import httpx

    options = {"max_output_tokens": 512,  # all CUAD categories (the default); the sim ends replies at 200 tokens
               "max_pages": 100, "truncate": True}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        ref = await http.post("/v1/files", content=pdf, headers={"Content-Type": "application/pdf"})
        ref.raise_for_status()
        blob = ref.json()["ref"]
        t0 = time.monotonic()
        created = await asyncio.gather(*[http.post("/v1/tasks", json={"type": "contract_extraction",
                                                                       "input": {"blob": blob, **options}})
                                         for _ in range(count)])
        ids = [r.json()["id"] for r in created if r.status_code in (200, 201, 202)]
        submit_errors = [r.status_code for r in created if r.status_code not in (200, 201, 202)]
        ended: dict[str, tuple[str, float]] = {}
        deadline = t0 + seconds
        while len(ended) < len(ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            pending = [i for i in ids if i not in ended]
            replies = await asyncio.gather(*[http.get(f"/v1/tasks/{i}") for i in pending], return_exceptions=True)
            for task_id, reply in zip(pending, replies):
                if not isinstance(reply, Exception) and reply.status_code == 200:
                    status = reply.json()["status"]
                    if status in ("succeeded", "failed", "cancelled"):
                        ended[task_id] = (status, time.monotonic() - t0)
        wall = time.monotonic() - t0
        pending = [i for i in ids if i not in ended]  # past the phase: stopped so the next step starts clean
        await asyncio.gather(*[http.post(f"/v1/tasks/{i}/cancel") for i in pending], return_exceptions=True)
    statuses: dict[str, int] = defaultdict(int)
    for status, _ in ended.values():
        statuses[status] += 1
    durations = [d for _, d in ended.values()]
    return {"submitted": len(ids), "submit_errors": submit_errors, "ended": len(ended), "statuses": dict(statuses),
            "cancelled_at_deadline": len(pending),
            "wall_s": round(wall, 1), "tasks_per_hour": round(3600 * len(ended) / wall, 0),
            "task_p50_s": _r(percentile(durations, 0.5)), "task_max_s": _r(max(durations) if durations else None)}


def name_bottleneck(meter: dict[str, Any], sim: dict[str, Any]) -> str:
    cpu = {k: v for k, v in meter["cpu_percent_of_one_core"].items() if k != "ModelServer"}
    top, top_cpu = max(cpu.items(), key=lambda kv: kv[1])
    if top_cpu >= 85:
        return f"{top} CPU ({top_cpu:.0f} % of one core)"
    if sim and sim.get("sim_gpu_busy_mean", 0) >= 0.75:  # closed-loop rounds leave short gaps between batches
        return f"simulated GPU (busy {100 * sim['sim_gpu_busy_mean']:.0f} %)"
    if meter["machine_cpu_percent"] >= 85:
        return (f"machine CPU ({meter['machine_cpu_percent']:.0f} % of {meter['machine_cores']} cores; top: "
                f"{top} {top_cpu:.0f} %)")
    return f"none saturated (top: {top} {top_cpu:.0f} %)"


CALLS_PER_TASK: dict[str, float] = {}


# ---- one step ---------------------------------------------------------------------------------------------------

async def run_step(args: argparse.Namespace, n: int, url: str, redis_port: int, pdf: bytes) -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("ModelServer", app_name="kimiray")
    meter = PhaseMeter(redis_port)
    prompt = ("Summarize the following clause in one sentence. " * 100)[: args.prompt_chars]
    concurrency = min(args.max_concurrency, args.concurrency_per_replica * n)
    step: dict[str, Any] = {"replicas": n}
    phases = [("chat", lambda: chat_phase(url, concurrency, args.phase_s, args.max_tokens, prompt, False)),
              ("stream", lambda: chat_phase(url, concurrency, args.phase_s, args.max_tokens, prompt, True)),
              ("contract", lambda: contract_phase(url, pdf, min(args.max_tasks, args.tasks_per_replica * n),
                                                  args.task_s))]
    for name, phase in phases:
        if name not in args.phases:
            continue
        before = await replica_stats(handle, n)
        meter.start()
        mid_sample = asyncio.ensure_future(_sample_later(handle, n, args.phase_s / 2))
        result = await phase()
        measured = meter.stop()
        sim = sim_delta(before, await replica_stats(handle, n), measured["wall_s"], n)
        mid = await mid_sample
        ongoing = [r["running"] + r["waiting"] for r in mid.values()]
        sim["ongoing_per_replica_mid_phase"] = round(sum(ongoing) / len(ongoing), 1) if ongoing else None
        sim["ongoing_per_replica_mid_phase_max"] = max(ongoing) if ongoing else None
        result.update(meter=measured, sim=sim, bottleneck=name_bottleneck(measured, sim))
        if name == "contract" and sim:
            # tasks end in lumps within a short phase: the steady rate comes from model calls/s over the calls one
            # task makes (from a phase where every task ended)
            if result["cancelled_at_deadline"] == 0 and result["ended"]:
                CALLS_PER_TASK.setdefault("value", sim["model_calls"] / result["ended"])
            per_task = CALLS_PER_TASK.get("value")
            result["model_calls_per_s"] = round(sim["model_calls"] / measured["wall_s"], 2)
            result["calls_per_task"] = per_task
            if per_task:
                result["tasks_per_hour_from_calls"] = round(3600 * result["model_calls_per_s"] / per_task)
        step[name] = result
        print(f"N={n} {name}: {json.dumps(result)}", flush=True)
    return step


def deploy(n: int, redis_url: str, args: argparse.Namespace) -> None:
    from ray import serve

    from serve_app.app import Ingress, ModelServer, TaskRunnerDeployment
    from serve_app.config import AppConfig

    config = AppConfig.model_validate({
        "model": {"model": "sim:h100"},
        "request_timeout_s": 120,
        "auth": {"requests_per_minute": 10_000_000, "max_concurrent_per_key": 100_000,
                 "creates_per_minute": 10_000_000},
        "tasks": {"stores_url": redis_url, "runner_concurrency": args.runner_concurrency, "lease_s": 30},
    }).model_dump()
    model = ModelServer.options(num_replicas=n, max_ongoing_requests=64, max_queued_requests=-1,
                                ray_actor_options={"num_cpus": 0.05}).bind(config)
    runner = TaskRunnerDeployment.options(num_replicas=args.runners, max_ongoing_requests=16,
                                          ray_actor_options={"num_cpus": 0.05}).bind(model, config)
    app = Ingress.options(num_replicas=args.ingress, max_ongoing_requests=512, max_queued_requests=-1,
                          ray_actor_options={"num_cpus": 0.05}).bind(model, config, runner)
    serve.run(app, name="kimiray", route_prefix="/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--phases", nargs="+", default=["chat", "stream", "contract"])
    parser.add_argument("--phase-s", type=float, default=20.0)
    parser.add_argument("--task-s", type=float, default=40.0)
    parser.add_argument("--concurrency-per-replica", type=int, default=32)
    parser.add_argument("--max-concurrency", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-chars", type=int, default=2000)
    parser.add_argument("--pages", type=int, default=2)
    parser.add_argument("--tasks-per-replica", type=int, default=4)
    parser.add_argument("--max-tasks", type=int, default=96)
    parser.add_argument("--runner-concurrency", type=int, default=96)
    parser.add_argument("--runners", type=int, default=1)
    parser.add_argument("--ingress", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.update(SAFE_ENV)

    import ray
    from ray import serve

    from connectors.paths import tiny_checkpoint_dir
    from pipelines.document.synthetic import make_contract
    from tests.redis_harness import RedisServer

    tiny_checkpoint_dir()  # the tokenizer the runner's agents count with (the sim has no files)
    pdf = make_contract(args.pages, seed=7, scanned_pages=[], table_page=None, two_column_page=None).pdf
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    report: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "commit": commit,
                              "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.processor()}",
                              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "steps": []}
    home = Path(tempfile.mkdtemp(prefix="kimiray-scale-"))
    os.environ.update({"KIMIRAY_HOME": str(home), "KIMIRAY_API_KEYS": KEY})
    with RedisServer(home / "redis", appendfsync="everysec") as redis_server:
        port = free_port()
        ray.init(include_dashboard=False, num_cpus=64, _node_ip_address="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {**SAFE_ENV, "PYTHONPATH": str(REPO), "KIMIRAY_HOME": str(home),
                                           "KIMIRAY_API_KEYS": KEY}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for n in args.replicas:
                t0 = time.monotonic()
                deploy(n, redis_server.url, args)
                print(f"N={n}: deployed in {time.monotonic() - t0:.1f}s", flush=True)
                step = asyncio.run(run_step(args, n, f"http://127.0.0.1:{port}", redis_server.port, pdf))
                report["steps"].append(step)
                if args.json:
                    args.json.write_text(json.dumps(report, indent=1))
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
