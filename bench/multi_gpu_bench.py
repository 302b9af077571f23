"""Several model replicas on one machine: scaling, session affinity, failover and autoscaling of the real Serve app.

The app is deployed from deploy/ray_config.gpus-one-host.yaml through the same code path as ``kimiray serve``
(ServeDeploySchema -> Serve controller -> ``serve_app.app:build_app``), with ModelServer replicas asking for
``num_gpus: 1`` each. On a GPU machine Ray finds the GPUs; on a CPU machine ``--fake-gpus N`` starts Ray with N
fake GPU resources, so placement, routing and replacement are the real ones and only the engine differs:
``--model sim:h100-slow10`` (connectors/sim_engine.py: H100-measured step shape, 10x slower so the CPU-bound HTTP
path is not what is measured; filler tokens), ``--model tiny`` (the real engine on the tiny checkpoint) or a
checkpoint dir (full-size A3B random weights on GPUs: bench/gpu_serve, docs/multi_gpu.md).

Phases (``--phases``), each with the same per-replica load:
  scaling    for n in ``--replicas`` (1 2 4 ...): ``--concurrency-per-replica`` x n streaming chat workers in a closed
             loop for ``--phase-s``: requests/s, tokens/s, TTFT and TPOT p50/p99; efficiency = rate(n) / (n x rate(1)).
  affinity   ``--sessions`` multi-turn sessions of ``--turns`` turns (each turn re-sends the whole history, as
             OpenAI clients do) with the ``X-Session-Id`` header (routed to the replica holding the session's
             prefix cache) and without it (Serve's default power-of-two choices): prefix-cache hit rate of the
             follow-up turns (usage.prompt_tokens_details.cached_tokens / prompt_tokens) and their TTFT.
  failover   n = max replicas under the streaming load, ``--tasks`` chat tasks accepted, then one replica's process
             SIGKILLed: how in-flight streams ended (clear error event / HTTP error / broken transport), requests
             started after the kill, the replacement coming up (replica RUNNING again), time until throughput is
             back to 90 % of before, and whether every accepted task finished.
  autoscale  autoscaling between 1 and max replicas with deploy/ray_config.gpu-cluster.yaml's ModelServer
             autoscaling_config (``--upscale-delay-s`` etc. override it): a load step from 1 worker to
             target_ongoing_requests x max workers, held until max replicas run, then dropped to none: replica
             counts over time, time to scale up and back down.

Usage: python bench/multi_gpu_bench.py --fake-gpus 4 --model sim:h100-slow10 --replicas 1 2 4 --json out.json
Bounded: every phase has a time limit; Ray and Serve started here are shut down at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import copy
import dataclasses
import json
import multiprocessing
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import scale_model  # noqa: E402
from bench.scale_model import free_port, machine_busy, ray_cpu_seconds  # noqa: E402

ONE_HOST_CONFIG = REPO / "deploy" / "ray_config.gpus-one-host.yaml"
CLUSTER_CONFIG = REPO / "deploy" / "ray_config.gpu-cluster.yaml"
APP = "kimiray"
KEY = "sk-multi-gpu-bench-0001"
SAFE_ENV = {
    **scale_model.SAFE_ENV,
    # NVLink multicast stays off in every process, replicas included (docs/multi_gpu.md): the replicas use no
    # collectives at all, and on shared GPU hosts a program that uses multicast can take the GPUs out of service
    "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
}


def percentile(values: list[float], q: float) -> float | None:
    """scale_model's percentile, rounded for the tables."""
    value = scale_model.percentile(values, q)
    return None if value is None else round(value, 4)


# ---- the Serve config ------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """What every deployment of this run shares (from the command line)."""

    model: str | None  # None: the tiny checkpoint
    port: int
    home: Path
    fake_gpus: bool
    max_tokens: int
    engine: dict[str, Any] = field(default_factory=dict)
    ingress: int | None = None  # Ingress replicas; None: the config file's (1 with fake GPUs)
    gpu_fraction: float = 1.0  # num_gpus per ModelServer replica (0.5: two replicas share a GPU, a 1-GPU check)


def serve_config(setup: Setup, *, replicas: int | None = None, autoscaling: dict[str, Any] | None = None,
                 base: Path = ONE_HOST_CONFIG) -> dict[str, Any]:
    """The one-host config file with this run's model, port, stores and ModelServer replicas (a fixed count or an
    autoscaling_config). Everything else (num_gpus: 1 per replica, routing, queues) stays as the file has it."""
    raw = yaml.safe_load(base.read_text())
    raw["proxy_location"] = "HeadOnly"
    raw["http_options"].update(host="127.0.0.1", port=setup.port)
    app = raw["applications"][0]
    env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
    env.update(SAFE_ENV, KIMIRAY_HOME=str(setup.home), KIMIRAY_API_KEYS=KEY, PYTHONPATH=str(REPO))
    args = app["args"]
    args["host"] = "127.0.0.1"
    args["model"]["model"] = setup.model
    if setup.engine:
        args["model"]["engine"] = {**args["model"].get("engine", {}), **setup.engine}
    args["tasks"]["stores_url"] = f"sqlite:///{setup.home / 'stores'}"
    args["auth"] = {"requests_per_minute": 10_000_000, "max_concurrent_per_key": 100_000,
                    "creates_per_minute": 10_000_000}
    deployments = {d["name"]: d for d in app["deployments"]}
    model = deployments["ModelServer"]
    model.pop("num_replicas", None)
    model.pop("autoscaling_config", None)
    if setup.gpu_fraction != 1.0:
        model["ray_actor_options"]["num_gpus"] = setup.gpu_fraction
    if autoscaling is not None:
        model["autoscaling_config"] = autoscaling
    else:
        model["num_replicas"] = replicas or 1
    if setup.fake_gpus:  # a CPU machine: logical CPUs must not limit placement; the fake GPUs do
        for d in deployments.values():
            d["ray_actor_options"]["num_cpus"] = 0.05
        deployments["Ingress"]["num_replicas"] = 1
        deployments["TaskRunner"]["num_replicas"] = 1
    if setup.ingress:
        deployments["Ingress"]["num_replicas"] = setup.ingress
    return raw


def deploy(raw: dict[str, Any]) -> None:
    """Deploy a Serve config dict the way ``kimiray serve`` / ``serve deploy`` do (non-blocking)."""
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(raw)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)


def model_replica_states() -> dict[str, int]:
    from ray import serve

    apps = serve.status().applications
    if APP not in apps or "ModelServer" not in apps[APP].deployments:
        return {}
    states = apps[APP].deployments["ModelServer"].replica_states
    return {str(getattr(k, "value", k)): v for k, v in states.items()}


def app_running() -> bool:
    from ray import serve

    app = serve.status().applications.get(APP)
    return app is not None and str(getattr(app.status, "value", app.status)) == "RUNNING"


def wait_for(what: str, check: Any, timeout: float, interval: float = 0.5) -> float:
    """Seconds until ``check()`` is true; raises after ``timeout``."""
    t0 = time.monotonic()
    last: Any = None
    while time.monotonic() - t0 < timeout:
        try:
            last = check()
            if last:
                return time.monotonic() - t0
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last problem
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s (last: {last!r}; replicas {model_replica_states()})")


def deploy_and_wait(raw: dict[str, Any], replicas: int, timeout: float) -> float:
    t0 = time.monotonic()
    deploy(raw)
    wait_for(f"{replicas} ModelServer replicas RUNNING",
             lambda: app_running() and model_replica_states() == {"RUNNING": replicas}, timeout)
    return time.monotonic() - t0


def model_replica_pids() -> dict[str, int]:
    """{replica actor name: pid} of the live ModelServer replicas."""
    import ray

    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{APP}#ModelServer#"):
            try:
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                pids[actor["name"]] = ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
            except Exception:  # noqa: BLE001 - a replica going away
                continue
    return pids


# ---- the load ---------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One streamed chat request as the client saw it."""

    started: float
    ended: float = 0.0
    status: int | None = None  # HTTP status; None: no response
    kind: str = "ok"  # ok | http_<status> | stream_error:<code> | truncated | transport:<Exception>
    ttft: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    session: str | None = None
    turn: int = 0

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.tokens < 2:
            return None
        return (self.ended - self.started - self.ttft) / (self.tokens - 1)

    @property
    def clear_error(self) -> bool:
        """Ended with a JSON error the client can act on (an HTTP error body or the stream's error event)."""
        return self.kind.startswith(("http_", "stream_error:"))


async def stream_chat(http: Any, messages: list[dict[str, Any]], max_tokens: int, session: str | None = None,
                      turn: int = 0) -> tuple[Outcome, str]:
    """POST a streaming chat completion; the outcome and the reply text."""
    headers = {"X-Session-Id": session} if session else {}
    body = {"model": "kimi-vl", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    out = Outcome(started=time.monotonic(), session=session, turn=turn)
    text: list[str] = []
    finished = False
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            out.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                out.kind = f"http_{r.status_code}"
                return out, ""
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    finished = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    out.kind = f"stream_error:{event['error'].get('code')}"
                    break
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content") or delta.get("reasoning_content"):
                        if out.ttft is None:
                            out.ttft = time.monotonic() - out.started
                        text.append(delta.get("content") or "")
                usage = event.get("usage")
                if usage:
                    out.tokens = usage["completion_tokens"]
                    out.prompt_tokens = usage["prompt_tokens"]
                    out.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        if out.kind == "ok" and not finished:
            out.kind = "truncated"
    except Exception as exc:  # noqa: BLE001 - a broken connection is an outcome, not a crash of the bench
        out.kind = f"transport:{type(exc).__name__}"
    finally:
        out.ended = time.monotonic()
    return out, "".join(text)


def client(url: str, concurrency: int) -> Any:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120, limits=limits)


class ClosedLoop:
    """``workers`` coroutines each sending streamed requests back to back until ``stop()``; every outcome kept.
    ``set_workers`` changes the concurrency on the fly (the autoscaling load step)."""

    def __init__(self, http: Any, prompt: str, max_tokens: int, sessions: bool = False) -> None:
        self.http, self.prompt, self.max_tokens = http, prompt, max_tokens
        self.sessions = sessions  # odd workers send X-Session-Id (one session per worker), even ones none
        self.outcomes: list[Outcome] = []
        self.tasks: list[asyncio.Task] = []  # the active workers
        self.started: list[asyncio.Task] = []  # every worker ever started (stop() waits for all)
        self.stopped = False

    async def _worker(self, index: int) -> None:
        i = 0
        while not self.stopped and index < len(self.tasks):
            messages = [{"role": "user", "content": f"[{index}.{i}] {self.prompt}"}]
            session = f"worker-{index}" if self.sessions and index % 2 else None
            outcome, _ = await stream_chat(self.http, messages, self.max_tokens, session)
            self.outcomes.append(outcome)
            i += 1
            if not outcome.ok:
                await asyncio.sleep(0.05)  # no hot loop while the service recovers

    def set_workers(self, n: int) -> None:
        while len(self.tasks) < n:
            self.tasks.append(asyncio.ensure_future(self._worker(len(self.tasks))))
            self.started.append(self.tasks[-1])
        del self.tasks[n:]  # the workers past n end after their current request

    async def stop(self) -> None:
        self.stopped = True
        await asyncio.gather(*self.started, return_exceptions=True)


def tokens_between(o: Outcome, t0: float, t1: float) -> float:
    """Tokens of ``o`` streamed within [t0, t1): the first at the TTFT, the rest spread evenly up to its end (a
    window shorter than a long reply still counts the tokens it saw, not only replies that ended in it)."""
    if not o.ok or o.ttft is None or o.tokens <= 0:
        return 0.0
    first = o.started + o.ttft
    count = 1.0 if t0 <= first < t1 else 0.0
    if o.tokens > 1 and o.ended > first:
        overlap = max(0.0, min(o.ended, t1) - max(first, t0))
        count += (o.tokens - 1) * overlap / (o.ended - first)
    return count


def summarize(outcomes: list[Outcome], t0: float, t1: float) -> dict[str, Any]:
    """Requests that ended in [t0, t1) (rate, errors, latencies) and the tokens streamed in it."""
    wall = t1 - t0
    ended = in_window(outcomes, t0, t1)
    ok = [o for o in ended if o.ok]
    return {"requests": len(ended), "ok": len(ok), "errors": dict(Counter(o.kind for o in ended if not o.ok)),
            "requests_per_s": round(len(ok) / wall, 2) if wall > 0 else None,
            "tokens_per_s": round(sum(tokens_between(o, t0, t1) for o in outcomes) / wall, 1) if wall > 0 else None,
            "ttft_p50_s": percentile([o.ttft for o in ok if o.ttft is not None], 0.5),
            "ttft_p99_s": percentile([o.ttft for o in ok if o.ttft is not None], 0.99),
            "tpot_p50_s": percentile([t for o in ok if (t := o.tpot) is not None], 0.5),
            "tpot_p99_s": percentile([t for o in ok if (t := o.tpot) is not None], 0.99)}


def in_window(outcomes: list[Outcome], t0: float, t1: float) -> list[Outcome]:
    """Requests that ended in [t0, t1)."""
    return [o for o in outcomes if t0 <= o.ended < t1]


def prompt_text(chars: int) -> str:
    return ("Summarize the following clause in one sentence. " * (chars // 48 + 1))[:chars]


def _reaped_children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Between ``start`` and ``stop``: CPU of this run's processes by component (bench/scale_model.py's grouping:
    ProxyActor, Ingress, ModelServer, ...; the load generator's children included), the machine's CPU, and each
    GPU's utilization from nvidia-smi (sampled every second, when there is one). Says which side saturated."""

    def start(self) -> None:
        self.t0, self.cpu0, self.machine0 = time.monotonic(), ray_cpu_seconds(os.getpid()), machine_busy()
        self.children0 = _reaped_children_cpu()
        self.gpu: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = None
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._sample_gpus, daemon=True)
            self._thread.start()

    def _sample_gpus(self) -> None:
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.gpu.append([float(x) for x in out.split()])
            except (OSError, ValueError, subprocess.SubprocessError):
                continue

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        cpu1, machine1 = ray_cpu_seconds(os.getpid()), machine_busy()
        # load-generator processes (--load-procs-per-replica) have ended and been reaped by now: their CPU is
        # this process's children's
        cpu1["load generator"] = cpu1.get("load generator", 0.0) + _reaped_children_cpu() - self.children0
        cpu = {k: round(100 * (cpu1.get(k, 0) - self.cpu0.get(k, 0)) / wall, 1) for k in cpu1}
        busy = (machine1[0] - self.machine0[0]) / max(1.0, machine1[1] - self.machine0[1])
        out: dict[str, Any] = {"cpu_percent_of_one_core": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
                               "machine_cpu_percent": round(100 * busy, 1), "machine_cores": os.cpu_count()}
        if self.gpu:
            per_gpu = list(zip(*[row for row in self.gpu if len(row) == len(self.gpu[0])]))
            out["gpu_util_percent"] = [round(sum(g) / len(g), 1) for g in per_gpu]
        return out


def _load_in_child(url: str, workers: int, seconds: float, warmup_s: float, prompt: str,
                   max_tokens: int) -> tuple[list[dict[str, Any]], float, float]:
    """One load-generator process (``--load-procs``): its outcomes and its measuring window (monotonic clock,
    which is the same in every process of the machine)."""
    async def go() -> tuple[list[Outcome], float, float]:
        async with client(url, workers) as http:
            loop = ClosedLoop(http, prompt, max_tokens)
            loop.set_workers(workers)
            await asyncio.sleep(warmup_s)
            t0 = time.monotonic()
            await asyncio.sleep(seconds)
            t1 = time.monotonic()
            await loop.stop()
        return loop.outcomes, t0, t1

    outcomes, t0, t1 = asyncio.run(go())
    return [dataclasses.asdict(o) for o in outcomes], t0, t1


def measure_load(url: str, workers: int, seconds: float, warmup_s: float, prompt: str, max_tokens: int,
                 procs: int = 1) -> dict[str, Any]:
    """A closed loop of ``workers`` streams, spread over ``procs`` load-generator processes (one Python process
    parses ~thousands of SSE events per second: more GPUs need more of them)."""
    meter = Meter()
    procs = max(1, min(procs, workers))
    shares = [workers // procs + (i < workers % procs) for i in range(procs)]
    meter.start()
    if procs == 1:
        rows, t0, t1 = _load_in_child(url, workers, seconds, warmup_s, prompt, max_tokens)
        results = [(rows, t0, t1)]
    else:
        ctx = multiprocessing.get_context("spawn")  # never fork a Ray driver
        with concurrent.futures.ProcessPoolExecutor(procs, mp_context=ctx) as pool:
            futures = [pool.submit(_load_in_child, url, share, seconds, warmup_s + 2.0, prompt, max_tokens)
                       for share in shares]
            results = [f.result() for f in futures]
    measured = meter.stop()
    t0, t1 = max(r[1] for r in results), min(r[2] for r in results)  # the window every process measured
    outcomes = [Outcome(**row) for r in results for row in r[0]]
    return {"workers": workers, "load_procs": procs, **summarize(outcomes, t0, t1),
            "meter": measured}


# ---- phases -----------------------------------------------------------------------------------------------------


def phase_scaling(args: argparse.Namespace, setup: Setup, url: str) -> dict[str, Any]:
    steps = []
    prompt = prompt_text(args.prompt_chars)
    for n in args.replicas:
        deploy_s = deploy_and_wait(serve_config(setup, replicas=n), n, args.deploy_timeout_s)
        result = measure_load(url, args.concurrency_per_replica * n, args.phase_s, args.warmup_s, prompt,
                              setup.max_tokens, args.load_procs_per_replica * n)
        result.update(replicas=n, deploy_s=round(deploy_s, 1))
        steps.append(result)
        print(f"scaling n={n}: {json.dumps(result)}", flush=True)
    base = next((s for s in steps if s["replicas"] == 1), None)
    for s in steps:
        if base and base["requests_per_s"]:
            s["efficiency_requests"] = round(s["requests_per_s"] / (s["replicas"] * base["requests_per_s"]), 3)
            s["efficiency_tokens"] = round(s["tokens_per_s"] / (s["replicas"] * base["tokens_per_s"]), 3)
    return {"steps": steps}


async def run_sessions(url: str, sessions: int, turns: int, routed: bool, prefix: str, max_tokens: int,
                       doc_chars: int) -> list[Outcome]:
    """``sessions`` conversations at once, each ``turns`` turns long over its own document."""
    rng = random.Random(prefix)

    async def one(http: Any, s: int) -> list[Outcome]:
        words = " ".join(f"w{rng.randrange(10**6)}" for _ in range(doc_chars // 8))
        history: list[dict[str, Any]] = [{"role": "system", "content": f"Session {prefix}-{s}. Document: {words}"}]
        outcomes = []
        for t in range(turns):
            history.append({"role": "user", "content": f"Question {t + 1} about the document?"})
            outcome, text = await stream_chat(http, history, max_tokens, f"{prefix}-{s}" if routed else None, t)
            outcomes.append(outcome)
            history.append({"role": "assistant", "content": text})
        return outcomes

    async with client(url, sessions) as http:
        results = await asyncio.gather(*[one(http, s) for s in range(sessions)])
    return [o for r in results for o in r]


def affinity_summary(outcomes: list[Outcome]) -> dict[str, Any]:
    follow = [o for o in outcomes if o.turn > 0 and o.ok]
    first = [o for o in outcomes if o.turn == 0 and o.ok]
    prompt = sum(o.prompt_tokens for o in follow)
    per_turn = []
    for turn in range(1, max((o.turn for o in outcomes), default=0) + 1):
        these = [o for o in follow if o.turn == turn]
        tokens = sum(o.prompt_tokens for o in these)
        per_turn.append(round(sum(o.cached_tokens for o in these) / tokens, 3) if tokens else None)
    return {"hit_rate_by_turn": per_turn,"requests": len(outcomes), "errors": dict(Counter(o.kind for o in outcomes if not o.ok)),
            "follow_up_prompt_tokens": prompt, "follow_up_cached_tokens": sum(o.cached_tokens for o in follow),
            "follow_up_hit_rate": round(sum(o.cached_tokens for o in follow) / prompt, 3) if prompt else None,
            "follow_up_ttft_p50_s": percentile([o.ttft for o in follow if o.ttft is not None], 0.5),
            "follow_up_ttft_p99_s": percentile([o.ttft for o in follow if o.ttft is not None], 0.99),
            "first_turn_ttft_p50_s": percentile([o.ttft for o in first if o.ttft is not None], 0.5)}


def phase_affinity(args: argparse.Namespace, setup: Setup, url: str) -> dict[str, Any]:
    n = max(args.replicas)
    if args.affinity_model:
        setup = dataclasses.replace(setup, model=None if args.affinity_model == "tiny" else args.affinity_model)
    deploy_and_wait(serve_config(setup, replicas=n), n, args.deploy_timeout_s)
    out: dict[str, Any] = {"replicas": n, "sessions": args.sessions, "turns": args.turns,
                           "model": setup.model or "tiny"}
    # each mode gets documents of its own (a fresh prefix), so neither reuses the other's cache
    for mode, routed in (("routed", True), ("unrouted", False)):
        outcomes = asyncio.run(run_sessions(url, args.sessions, args.turns, routed, f"{mode}-{time.time_ns()}",
                                            setup.max_tokens, args.doc_chars))
        out[mode] = affinity_summary(outcomes)
        print(f"affinity {mode}: {json.dumps(out[mode])}", flush=True)
    if setup.model and setup.model.startswith("sim:"):
        out["note"] = "the simulated engine has no prefix cache: hit rates are 0 by construction"
    return out


async def submit_tasks(url: str, count: int, max_tokens: int) -> list[str]:
    async with client(url, count) as http:
        replies = await asyncio.gather(*[http.post("/v1/tasks", json={
            "type": "chat", "input": {"messages": [{"role": "user", "content": f"task {i}: say something"}],
                                      "max_tokens": max_tokens}}) for i in range(count)])
    bad = [r.text[:200] for r in replies if r.status_code not in (200, 201, 202)]
    if bad:
        raise RuntimeError(f"task submissions refused: {bad[:3]}")
    return [r.json()["id"] for r in replies]


async def wait_tasks(url: str, ids: list[str], timeout: float, since: float) -> dict[str, Any]:
    """Poll until every task ended (or ``timeout``); ``seconds``: from ``since`` (the kill) to the last end."""
    ended: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    last_end = since
    end_times: list[float] = []
    async with client(url, 8) as http:
        while len(ended) < len(ids) and time.monotonic() - t0 < timeout:
            for task_id in [i for i in ids if i not in ended]:
                try:
                    reply = await http.get(f"/v1/tasks/{task_id}")
                except Exception:  # noqa: BLE001 - the ingress is busy: poll again
                    continue
                if reply.status_code == 200 and reply.json()["status"] in ("succeeded", "failed", "cancelled"):
                    ended[task_id] = reply.json()
                    last_end = time.monotonic()
                    end_times.append(round(last_end - since, 1))
            await asyncio.sleep(0.5)
    return {"accepted": len(ids), "ended": len(ended), "statuses": dict(Counter(t["status"] for t in ended.values())),
            "attempts_max": max((t.get("attempts") or 0 for t in ended.values()), default=0),
            "all_succeeded": len(ended) == len(ids) and all(t["status"] == "succeeded" for t in ended.values()),
            "all_ended_after_kill_s": round(last_end - since, 1) if len(ended) == len(ids) else None,
            "ended_after_kill_s": sorted(end_times)}


async def failover_load(args: argparse.Namespace, setup: Setup, url: str, n: int) -> dict[str, Any]:
    prompt = prompt_text(args.prompt_chars)
    workers = args.concurrency_per_replica * n
    async with client(url, workers) as http:
        loop = ClosedLoop(http, prompt, setup.max_tokens, sessions=True)
        loop.set_workers(workers)
        await asyncio.sleep(args.warmup_s)
        before_t0 = time.monotonic()
        await asyncio.sleep(args.failover_before_s)
        # tasks long enough to be generating when the replica dies (their model calls are retried elsewhere)
        task_ids = await submit_tasks(url, args.tasks, 4 * setup.max_tokens)
        pids = await asyncio.to_thread(model_replica_pids)
        victim_name, victim_pid = sorted(pids.items())[0]
        killed_at = time.monotonic()
        os.kill(victim_pid, signal.SIGKILL)
        print(f"failover: SIGKILL {victim_name} (pid {victim_pid}) with {workers} streams running", flush=True)
        tasks_done = asyncio.ensure_future(wait_tasks(url, task_ids, args.task_timeout_s, killed_at))
        before = summarize(loop.outcomes, before_t0, killed_at)

        timeline: list[tuple[float, dict[str, int]]] = []
        replaced_at = None
        while time.monotonic() - killed_at < args.failover_after_s:
            states = await asyncio.to_thread(model_replica_states)
            if not timeline or timeline[-1][1] != states:
                timeline.append((round(time.monotonic() - killed_at, 2), states))
            if replaced_at is None and states == {"RUNNING": n}:
                names = set(await asyncio.to_thread(model_replica_pids))
                if len(names) == n and victim_name not in names:
                    replaced_at = time.monotonic()
            if replaced_at is not None and time.monotonic() - replaced_at > args.failover_settle_s:
                break
            await asyncio.sleep(0.5)
        end = time.monotonic()
        await loop.stop()
        tasks = await tasks_done

    outcomes = loop.outcomes
    in_flight = [o for o in outcomes if o.started < killed_at <= (o.ended or end)]
    after = [o for o in outcomes if o.started >= killed_at]
    first_5s = [o for o in after if o.started < killed_at + 5]
    rate_before = before["tokens_per_s"] or 0.0
    recovered_s = None  # end of the first 3-s window after the kill (sliding by 0.5 s) at 90 % of the token rate
    t = killed_at
    while t + 3 <= end:
        if rate_before and sum(tokens_between(o, t, t + 3) for o in outcomes) / 3 >= 0.9 * rate_before:
            recovered_s = round(t + 3 - killed_at, 1)
            break
        t += 0.5
    return {
        "replicas": n, "workers": workers, "victim": victim_name,
        "before": before,
        "in_flight_at_kill": {"streams": len(in_flight), "completed": sum(o.ok for o in in_flight),
                              "clear_error": sum(o.clear_error for o in in_flight),
                              "unclear": sum(not o.ok and not o.clear_error for o in in_flight),
                              "kinds": dict(Counter(o.kind for o in in_flight))},
        "started_after_kill": {"requests": len(after), "ok": sum(o.ok for o in after),
                               "errors": dict(Counter(o.kind for o in after if not o.ok)),
                               "first_5s_ok_fraction": round(sum(o.ok for o in first_5s) / len(first_5s), 3)
                               if first_5s else None,
                               # with and without a session: a session's requests prefer one replica
                               **{f"first_5s_{name}": _first_seconds(first_5s, routed)
                                  for name, routed in (("with_session", True), ("without_session", False))}},
        "replacement_running_s": round(replaced_at - killed_at, 1) if replaced_at else None,
        "throughput_recovered_s": recovered_s,
        "after_replacement": summarize(outcomes, replaced_at, end)
        if replaced_at and end - replaced_at > 1 else None,
        "replica_states_timeline": timeline,
        "tasks": tasks,
    }


def _first_seconds(outcomes: list[Outcome], routed: bool) -> dict[str, Any]:
    these = [o for o in outcomes if (o.session is not None) == routed]
    ttfts = [o.ttft for o in these if o.ok and o.ttft is not None]
    return {"requests": len(these), "ok": sum(o.ok for o in these), "ttft_p50_s": percentile(ttfts, 0.5),
            "ttft_max_s": round(max(ttfts), 3) if ttfts else None}


def phase_failover(args: argparse.Namespace, setup: Setup, url: str) -> dict[str, Any]:
    n = max(args.replicas)
    if n < 2:
        return {"skipped": "failover needs at least 2 replicas"}
    deploy_and_wait(serve_config(setup, replicas=n), n, args.deploy_timeout_s)
    result = asyncio.run(failover_load(args, setup, url, n))
    print(f"failover: {json.dumps({k: v for k, v in result.items() if k != 'replica_states_timeline'})}", flush=True)
    return result


def autoscaling_config(args: argparse.Namespace) -> dict[str, Any]:
    """ModelServer's autoscaling_config from the cluster config file, with max = this run's replicas and the
    overrides given on the command line."""
    raw = yaml.safe_load(CLUSTER_CONFIG.read_text())
    model = next(d for d in raw["applications"][0]["deployments"] if d["name"] == "ModelServer")
    config = copy.deepcopy(model["autoscaling_config"])
    config.update(min_replicas=1, max_replicas=max(args.replicas))
    for key in ("upscale_delay_s", "downscale_delay_s", "metrics_interval_s", "look_back_period_s",
                "target_ongoing_requests"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    return config


async def autoscale_load(args: argparse.Namespace, setup: Setup, config: dict[str, Any], url: str) -> dict[str, Any]:
    n = config["max_replicas"]
    timeline: list[tuple[float, dict[str, int]]] = []
    marks: dict[str, float | None] = {"step_up": None, "first_upscale": None, "all_running": None,
                                      "step_down": None, "first_downscale": None, "back_to_min": None}
    prompt = prompt_text(args.prompt_chars)
    workers = int(config["target_ongoing_requests"] * n)
    t0 = time.monotonic()

    async def sample() -> dict[str, int]:
        states = await asyncio.to_thread(model_replica_states)
        if not timeline or timeline[-1][1] != states:
            timeline.append((round(time.monotonic() - t0, 1), states))
        return states

    async with client(url, workers) as http:
        loop = ClosedLoop(http, prompt, setup.max_tokens)
        loop.set_workers(1)
        await asyncio.sleep(args.autoscale_low_s)
        marks["step_up"] = time.monotonic() - t0
        loop.set_workers(workers)
        deadline = time.monotonic() + args.autoscale_timeout_s
        while time.monotonic() < deadline:
            states = await sample()
            total = sum(states.values())
            if marks["first_upscale"] is None and total > 1:
                marks["first_upscale"] = time.monotonic() - t0
            if states == {"RUNNING": n}:
                marks["all_running"] = time.monotonic() - t0
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(args.autoscale_hold_s)
        loop.set_workers(0)
        await loop.stop()
    marks["step_down"] = time.monotonic() - t0
    deadline = time.monotonic() + args.autoscale_timeout_s + config["downscale_delay_s"]
    while time.monotonic() < deadline:
        states = await sample()
        if marks["first_downscale"] is None and states.get("RUNNING", 0) < n:
            marks["first_downscale"] = time.monotonic() - t0
        if states == {"RUNNING": config["min_replicas"]}:
            marks["back_to_min"] = time.monotonic() - t0
            break
        await asyncio.sleep(0.5)
    r = {k: (round(v, 1) if v is not None else None) for k, v in marks.items()}

    def since(a: str, b: str) -> float | None:
        return round(r[b] - r[a], 1) if r[a] is not None and r[b] is not None else None

    return {"autoscaling_config": config, "load_workers": workers, "marks_s": r,
            "upscale_decision_s": since("step_up", "first_upscale"), "scale_up_s": since("step_up", "all_running"),
            "downscale_decision_s": since("step_down", "first_downscale"),
            "scale_down_s": since("step_down", "back_to_min"),
            "load": summarize(loop.outcomes, t0, t0 + max(1e-9, r["step_down"] or 0.0)),
            "replica_states_timeline": timeline}


def phase_autoscale(args: argparse.Namespace, setup: Setup, url: str) -> dict[str, Any]:
    config = autoscaling_config(args)
    deploy(serve_config(setup, autoscaling=config))
    wait_for("the autoscaled app RUNNING at its minimum", lambda: app_running() and
             model_replica_states() == {"RUNNING": config["min_replicas"]}, args.deploy_timeout_s)
    result = asyncio.run(autoscale_load(args, setup, config, url))
    print(f"autoscale: {json.dumps({k: v for k, v in result.items() if k != 'replica_states_timeline'})}",
          flush=True)
    return result


# ---- tables -----------------------------------------------------------------------------------------------------

def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f}"


def tables(report: dict[str, Any]) -> str:
    lines: list[str] = []
    phases = report["phases"]
    if "scaling" in phases:
        lines += ["| replicas | streams | req/s | tok/s | efficiency (req / tok) | TTFT p50 / p99 ms | "
                  "TPOT p50 / p99 ms | CPU % of a core: Ingress / proxy / load gen | GPU util % | errors |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for s in phases["scaling"].get("steps", []):
            cpu = s["meter"]["cpu_percent_of_one_core"]
            gpu = s["meter"].get("gpu_util_percent")
            lines.append(f"| {s['replicas']} | {s['workers']} | {s['requests_per_s']} | {s['tokens_per_s']} | "
                         f"{s.get('efficiency_requests', '-')} / {s.get('efficiency_tokens', '-')} | "
                         f"{_ms(s['ttft_p50_s'])} / {_ms(s['ttft_p99_s'])} | "
                         f"{_ms(s['tpot_p50_s'])} / {_ms(s['tpot_p99_s'])} | {cpu.get('Ingress', 0):.0f} / "
                         f"{cpu.get('ProxyActor', 0):.0f} / {cpu.get('load generator', 0):.0f} | "
                         f"{' '.join(f'{g:.0f}' for g in gpu) if gpu else '-'} | {s['errors'] or '-'} |")
        lines.append("")
    if "affinity" in phases and "routed" in phases["affinity"]:
        a = phases["affinity"]
        lines += [f"| routing ({a['model']}, {a['replicas']} replicas, {a['sessions']} sessions x {a['turns']} turns) "
                  "| follow-up prefix hit rate (by turn) | follow-up TTFT p50 / p99 ms | first-turn TTFT p50 ms | "
                  "errors |", "|---|---|---|---|---|"]
        for mode in ("routed", "unrouted"):
            m = a[mode]
            lines.append(f"| {mode} | {m['follow_up_hit_rate']} ({' '.join(str(x) for x in m['hit_rate_by_turn'])})"
                         f" | {_ms(m['follow_up_ttft_p50_s'])} / "
                         f"{_ms(m['follow_up_ttft_p99_s'])} | {_ms(m['first_turn_ttft_p50_s'])} | "
                         f"{m['errors'] or '-'} |")
        lines.append("")
    if "failover" in phases and "in_flight_at_kill" in phases["failover"]:
        f = phases["failover"]
        i, a = f["in_flight_at_kill"], f["started_after_kill"]
        lines += ["| failover | value |", "|---|---|",
                  f"| replicas / streams | {f['replicas']} / {f['workers']} |",
                  f"| req/s before the kill | {f['before']['requests_per_s']} |",
                  f"| in flight at the kill: completed / clear error / unclear | {i['completed']} / "
                  f"{i['clear_error']} / {i['unclear']} ({i['kinds']}) |",
                  f"| started after the kill: ok / all (first 5 s ok fraction) | {a['ok']} / {a['requests']} "
                  f"({a['first_5s_ok_fraction']}) |",
                  f"| replacement RUNNING after | {f['replacement_running_s']} s |",
                  f"| token rate back to 90 % of before, after | {f['throughput_recovered_s']} s |",
                  f"| accepted tasks: succeeded / accepted (max attempts), all ended after | "
                  f"{f['tasks']['statuses'].get('succeeded', 0)} / {f['tasks']['accepted']} "
                  f"({f['tasks']['attempts_max']}), {f['tasks']['all_ended_after_kill_s']} s |", ""]
    if "autoscale" in phases and "marks_s" in phases["autoscale"]:
        s = phases["autoscale"]
        c = s["autoscaling_config"]
        lines += ["| autoscaling | value |", "|---|---|",
                  f"| config | min {c['min_replicas']}, max {c['max_replicas']}, target "
                  f"{c['target_ongoing_requests']}, upscale_delay_s {c['upscale_delay_s']}, downscale_delay_s "
                  f"{c['downscale_delay_s']} |",
                  f"| load step | 1 -> {s['load_workers']} streams |",
                  f"| first upscale decision / all {c['max_replicas']} RUNNING after the step | "
                  f"{s['upscale_decision_s']} s / {s['scale_up_s']} s |",
                  f"| first downscale / back to {c['min_replicas']} after the load stopped | "
                  f"{s['downscale_decision_s']} s / {s['scale_down_s']} s |", ""]
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------------------------

TERMINATED: list[int] = []


def _exit_on_signal(signum: int, _frame: Any) -> None:
    TERMINATED.append(signum)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sim:h100-slow10",
                        help="sim:<profile>, 'tiny' (the tiny checkpoint) or a checkpoint dir")
    parser.add_argument("--fake-gpus", type=int, default=0,
                        help="start Ray with this many fake GPU resources (CPU machines); 0: Ray detects real GPUs")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--phases", nargs="+", default=["scaling", "affinity", "failover", "autoscale"],
                        choices=["scaling", "affinity", "failover", "autoscale"])
    parser.add_argument("--concurrency-per-replica", type=int, default=16)
    parser.add_argument("--load-procs-per-replica", type=int, default=0,
                        help="load-generator processes per replica in the scaling phase (0: the bench's own)")
    parser.add_argument("--gpu-fraction", type=float, default=1.0,
                        help="num_gpus of each ModelServer replica (0.5: two replicas per GPU, to check failover "
                        "and affinity on a 1-GPU machine; throughput then does not scale)")
    parser.add_argument("--ingress", type=int, help="Ingress replicas (default: the config file's; 1 with fake GPUs)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-chars", type=int, default=1000)
    parser.add_argument("--phase-s", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--deploy-timeout-s", type=float, default=300.0)
    parser.add_argument("--affinity-model", help="the model of the affinity phase (default: --model); the "
                        "simulated engine has no prefix cache, so on CPU use 'tiny' there")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--doc-chars", type=int, default=2000, help="per-session document in the system prompt")
    parser.add_argument("--tasks", type=int, default=8, help="chat tasks accepted just before the kill")
    parser.add_argument("--task-timeout-s", type=float, default=120.0)
    parser.add_argument("--failover-before-s", type=float, default=5.0)
    parser.add_argument("--failover-after-s", type=float, default=90.0)
    parser.add_argument("--failover-settle-s", type=float, default=5.0)
    parser.add_argument("--upscale-delay-s", type=float)
    parser.add_argument("--downscale-delay-s", type=float)
    parser.add_argument("--metrics-interval-s", type=float)
    parser.add_argument("--look-back-period-s", type=float)
    parser.add_argument("--target-ongoing-requests", type=float)
    parser.add_argument("--autoscale-low-s", type=float, default=5.0)
    parser.add_argument("--autoscale-hold-s", type=float, default=5.0)
    parser.add_argument("--autoscale-timeout-s", type=float, default=120.0)
    parser.add_argument("--engine", type=json.loads, default={},
                        help='EngineOptions overrides as JSON, e.g. \'{"max_num_seqs": 64}\'')
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.update(SAFE_ENV)

    import ray
    from ray import serve

    home = Path(tempfile.mkdtemp(prefix="kimiray-multi-gpu-"))
    os.environ.update({"KIMIRAY_HOME": str(home), "KIMIRAY_API_KEYS": KEY})
    model = None if args.model == "tiny" else args.model
    if "tiny" in (args.model, args.affinity_model):
        from connectors.paths import tiny_checkpoint_dir

        tiny_checkpoint_dir()  # written once here, not raced by replicas
    setup = Setup(model=model, port=free_port(), home=home, fake_gpus=args.fake_gpus > 0,
                  max_tokens=args.max_tokens, engine=args.engine, ingress=args.ingress,
                  gpu_fraction=args.gpu_fraction)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    report: dict[str, Any] = {"command": " ".join(["python", "bench/multi_gpu_bench.py", *(argv or sys.argv[1:])]),
                              "commit": commit, "model": args.model,
                              "simulated": bool(model and model.startswith("sim:")),
                              "machine": f"{platform.node()} {os.cpu_count()} cores",
                              "phases": {}}
    init: dict[str, Any] = {"include_dashboard": False, "_node_ip_address": "127.0.0.1", "log_to_driver": False,
                            "runtime_env": {"env_vars": {**SAFE_ENV, "PYTHONPATH": str(REPO)}}}
    if args.fake_gpus:
        init.update(num_gpus=args.fake_gpus, num_cpus=max(8, 4 * args.fake_gpus))
    ray.init(**init)
    # a time limit (``timeout``) sends SIGTERM: unwind through the finally below so Serve and Ray are shut down
    # (the phases done so far are already in --json). Set after ray.init, which installs a handler of its own.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        report["gpus"] = {"count": gpus, "fake": bool(args.fake_gpus), "per_replica": args.gpu_fraction}
        if max(args.replicas) * args.gpu_fraction > gpus:
            raise SystemExit(f"--replicas up to {max(args.replicas)} x {args.gpu_fraction} GPU but Ray sees {gpus}")
        url = f"http://127.0.0.1:{setup.port}"
        for phase in args.phases:
            runner = {"scaling": phase_scaling, "affinity": phase_affinity, "failover": phase_failover,
                      "autoscale": phase_autoscale}[phase]
            t0 = time.monotonic()
            try:
                report["phases"][phase] = runner(args, setup, url)
            except Exception as exc:  # noqa: BLE001 - one phase failing still leaves the others' numbers
                report["phases"][phase] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"{phase} FAILED: {exc}", flush=True)
            report["phases"][phase]["seconds"] = round(time.monotonic() - t0, 1)
            if args.json:
                args.json.write_text(json.dumps(report, indent=1))
    finally:
        try:
            if not TERMINATED:  # a graceful Serve shutdown drains the replicas; past a time limit just stop Ray
                serve.shutdown()
        finally:
            ray.shutdown()
    report["tables"] = tables(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(report["tables"])
    return report


if __name__ == "__main__":
    main()
