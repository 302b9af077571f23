"""The product path against the engine alone, same requests, one run (issue 18).

  engine  ``AsyncEngine`` in this process (no Ray, no HTTP), and ``LocalRuntime`` on it for the tasks
  served  the real app as ``serve run ray_config.yaml`` deploys it (deployment options from ray_config.yaml):
          a local Ray on a non-default GCS port, the ModelServer replica on the GPU (num_gpus 1), the Ingress on a
          free loopback port, a TaskRunner, the embedded SQLite store; called with the ``openai`` client / HTTP

Parts (``--parts``, all by default, in this order):
  engine      streaming TTFT / TPOT at each ``--concurrency`` (closed loop), non-streaming throughput at the
              highest one, a 1280x720 screenshot request, a ``chat`` and a ``contract_extraction`` task (a generated
              ``--pages``-page contract, text PDF) through LocalRuntime on the same engine
  served      the same against the service, plus the replica's cold start (deploy -> ready, weights on the GPU)
  fault       the service under load (streams + accepted chat tasks), the ModelServer replica's process SIGKILLed:
              how every in-flight stream ends, when a replacement answers, whether the tasks finish, and when
When the served side follows in the same run, the engine side runs in a child process (its GPU memory is
returned when the child exits; the replica needs it).
The table compares served with engine against the issue's targets: TPOT within 10 % at concurrency 1 and 32,
TTFT within 15 ms at concurrency 1, throughput at the highest concurrency >= 90 %.

The model: ``--device cuda`` (default with a GPU) loads the full-size A3B with random bf16 weights from a
checkpoint in the official format (``bench/gpu_serve/a3b_checkpoint.py`` writes it once into ``--model``, default
``.gpu_serve/a3b``); the serving code loads it as any checkpoint. ``--device cpu`` runs everything on the tiny
checkpoint in seconds (the smoke tests/test_serve_gpu_bench.py runs).

Usage: python bench/serve_gpu_bench.py [--device cuda|cpu] [--parts engine served fault] [--json OUT]
       [--concurrency 1 8 32 64] [--max-tokens 128] [--rounds 2] [--pages 60]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # Ray passes the driver's sys.path to its workers: they import serve_app here

from connectors.ports import free_port  # noqa: E402

SAFE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DEDUP_LOGS": "0",
    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    "HF_HUB_OFFLINE": "1",
}
PROMPT = ("You are reviewing the serving stack of a vision-language model. Explain, step by step and with "
          "concrete numbers, how request batching, key-value cache paging and streaming of partial answers "
          "interact, what limits the number of tokens per second a single user sees, and what limits the "
          "total throughput of one accelerator. Finish with three recommendations for operators.")
SCREENSHOT_PROMPT = "What application is shown and what is the user about to do?"
TASK_CATEGORIES = ["Governing Law", "Parties", "Agreement Date", "Insurance", "Audit Rights", "Cap on Liability"]
SERVED_NAME = "kimi-vl"


def log(message: str) -> None:
    print(f"[serve_gpu_bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


# ---------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------
def production_settings(engine_overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """App args and per-deployment options from ray_config.yaml (what ``serve run`` deploys), with the per-key
    limits opened for load generation and the model/device of this run."""
    import yaml

    config = yaml.safe_load((ROOT / "ray_config.yaml").read_text())
    app = next(a for a in config["applications"] if a["name"] == "kimiray")
    args = app["args"]
    args["auth"] = {**args.get("auth", {}), "requests_per_minute": 10_000_000, "max_concurrent_per_key": 1024,
                    "creates_per_minute": 100_000}
    args["model"]["engine"] = {**args["model"].get("engine", {}), **engine_overrides}
    options = {d.pop("name"): d for d in app["deployments"]}
    # the application's env (runtime_env.env_vars: Serve's knobs) goes to every process of this run's Ray
    args["_env"] = {k: str(v) for k, v in (app.get("runtime_env", {}).get("env_vars") or {}).items()}
    return args, options


def override_deployments(options: dict[str, dict[str, Any]], overrides: list[str]) -> None:
    """Apply ``NAME.KEY=JSON`` overrides (e.g. ``Ingress.num_replicas=2``) to the deployments' options, so a GPU
    call can try a deployment shape without editing ray_config.yaml; an unknown deployment is an error."""
    for item in overrides:
        target, _, value = item.partition("=")
        name, _, key = target.partition(".")
        if name not in options or not key or not value:
            raise SystemExit(f"--deployment-option {item!r}: expected NAME.KEY=JSON with NAME in {sorted(options)}")
        options[name][key] = json.loads(value)


def screenshot_png(width: int = 1280, height: int = 720) -> bytes:
    """A desktop-like screenshot: title bar, sidebar, text lines, a button (the OS agent's typical input)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (236, 239, 244))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, width, 36], fill=(46, 52, 64))
    draw.text((12, 10), "Invoices - Mail", fill=(255, 255, 255))
    draw.rectangle([0, 36, 220, height], fill=(216, 222, 233))
    for i, label in enumerate(["Inbox", "Sent", "Drafts", "Archive", "Spam"]):
        draw.text((20, 60 + 32 * i), label, fill=(20, 20, 20))
    for i in range(14):
        draw.text((250, 60 + 34 * i), f"Invoice #{4711 + i} from ACME Corp - due 2026-12-{10 + i:02d}", fill=(0, 0, 0))
    draw.rectangle([width - 200, height - 70, width - 40, height - 30], fill=(94, 129, 172))
    draw.text((width - 170, height - 58), "Pay selected", fill=(255, 255, 255))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def contract_pdf(pages: int) -> bytes:
    from pipelines.document.synthetic import make_contract

    return make_contract(pages=pages, seed=0, scanned_pages=[]).pdf  # text pages: no OCR on the GPU machine


def contract_input(device: str) -> dict[str, Any]:
    return {"categories": TASK_CATEGORIES, "ocr": False, "max_items_per_chunk": 2, "max_value_chars": 80,
            "max_quote_chars": 160, "max_output_tokens": 256 if device == "cuda" else 64}


# ---------------------------------------------------------------------------------------------------------------
# one request, two ways
# ---------------------------------------------------------------------------------------------------------------
class Timing:
    """One streamed request: TTFT (send -> first streamed item) and TPOT ((last - first) / (tokens - 1))."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.error: str | None = None

    def item(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first is None else 1000 * (self.first - self.started)

    @property
    def tpot_ms(self) -> float | None:
        if self.first is None or self.last is None or self.tokens < 2:
            return None
        return 1000 * (self.last - self.first) / (self.tokens - 1)


class EnginePath:
    name = "engine"

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def _request(self, max_tokens: int, image: bytes | None = None) -> Any:
        from PIL import Image

        from engine.runtime.request import GenerateRequest

        if image is None:
            content: Any = PROMPT
        else:
            content = [{"type": "image", "image": Image.open(io.BytesIO(image)).convert("RGB")},
                       {"type": "text", "text": SCREENSHOT_PROMPT}]
        return GenerateRequest(messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                               temperature=0.0, ignore_eos=True)

    async def stream(self, max_tokens: int, image: bytes | None = None) -> Timing:
        timing = Timing()
        request = self._request(max_tokens, image)  # the image decode counts, as the ingress's does
        async for delta in self.engine.generate(request):
            timing.item()
            if delta.usage is not None:
                timing.tokens = delta.usage.completion_tokens
            if delta.finish_reason not in (None, "stop", "length"):
                timing.error = f"{delta.finish_reason}: {delta.error}"
        return timing

    async def complete(self, max_tokens: int) -> int:
        tokens = 0
        async for delta in self.engine.generate(self._request(max_tokens)):
            if delta.usage is not None:
                tokens = delta.usage.completion_tokens
        return tokens


class ServedPath:
    name = "served"

    def __init__(self, url: str) -> None:
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-unused-on-loopback", max_retries=0,
                                  timeout=600)

    @staticmethod
    def _messages(image: bytes | None) -> list[dict[str, Any]]:
        if image is None:
            return [{"role": "user", "content": PROMPT}]
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": SCREENSHOT_PROMPT}]}]

    async def stream(self, max_tokens: int, image: bytes | None = None) -> Timing:
        timing = Timing()
        stream = await self.client.chat.completions.create(
            model=SERVED_NAME, messages=self._messages(image), max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.usage is not None:
                timing.tokens = chunk.usage.completion_tokens
            else:
                timing.item()  # the role chunk leaves once the first token exists (the route waits for it)
        return timing

    async def complete(self, max_tokens: int) -> int:
        reply = await self.client.chat.completions.create(
            model=SERVED_NAME, messages=self._messages(None), max_tokens=max_tokens, temperature=0,
            extra_body={"ignore_eos": True})
        return reply.usage.completion_tokens


# ---------------------------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------------------------
async def closed_loop(make_call: Any, concurrency: int, total: int) -> tuple[list[Any], list[str], float]:
    results: list[Any] = []
    errors: list[str] = []
    left = [total]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            try:
                results.append(await make_call())
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {str(exc)[:160]}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, errors, time.perf_counter() - started


async def measure_path(path: Any, args: argparse.Namespace, image: bytes) -> dict[str, Any]:
    """Streaming at each concurrency (rounds pooled), non-streaming throughput at the highest, one screenshot."""
    out: dict[str, Any] = {"streaming": {}, "errors": []}
    top = max(args.concurrency)
    await closed_loop(lambda: path.stream(args.warmup_tokens), top, top)  # graphs, batch shapes, connections
    await closed_loop(lambda: path.stream(args.warmup_tokens), 1, 2)
    for c in args.concurrency:
        timings: list[Timing] = []
        walls = []
        for _ in range(args.rounds):
            got, errors, wall = await closed_loop(lambda: path.stream(args.max_tokens), c, max(2 * c, args.min_requests))
            timings += got
            walls.append(wall)
            out["errors"] += errors
        good = [t for t in timings if t.error is None and t.tokens == args.max_tokens]
        out["errors"] += [t.error or f"{t.tokens} tokens" for t in timings if t not in good]
        tokens = sum(t.tokens for t in timings)
        out["streaming"][c] = {
            "requests": len(timings), "ok": len(good),
            "ttft_ms_p50": median([t.ttft_ms for t in good]), "ttft_ms_mean": round(statistics.fmean(
                [t.ttft_ms for t in good]), 3) if good else None,
            "tpot_ms_p50": median([t.tpot_ms for t in good]), "tpot_ms_mean": round(statistics.fmean(
                [t.tpot_ms for t in good]), 3) if good else None,
            "tokens_per_s": round(tokens / sum(walls), 1) if walls else None,
        }
        log(f"{path.name} streaming c={c}: {out['streaming'][c]}")
    counts, errors, wall = await closed_loop(lambda: path.complete(args.max_tokens), top, 2 * top)
    out["errors"] += errors
    out["non_streaming"] = {"concurrency": top, "requests": 2 * top, "ok": len(counts),
                            "tokens_per_s": round(sum(counts) / wall, 1), "wall_s": round(wall, 3)}
    log(f"{path.name} non-streaming c={top}: {out['non_streaming']}")
    shots = [await path.stream(args.screenshot_tokens, image) for _ in range(3)]
    out["screenshot"] = {"ttft_ms": [round(s.ttft_ms or -1, 1) for s in shots],
                         "ttft_ms_p50": median([s.ttft_ms for s in shots if s.ttft_ms is not None])}
    log(f"{path.name} screenshot: {out['screenshot']}")
    out["errors"] = sorted(set(out["errors"]))[:10]
    return out


def run_tasks(client: Any, args: argparse.Namespace, pdf: bytes) -> dict[str, Any]:
    """A ``chat`` and a ``contract_extraction`` task through ``client`` (kimiray.Client or LocalRuntime)."""
    out: dict[str, Any] = {}
    started = time.perf_counter()
    chat = client.submit("chat", {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": args.max_tokens})
    done = client.wait(chat.id, timeout=args.task_timeout, raise_on_failure=False)
    out["chat"] = {"status": done.status, "seconds": round(time.perf_counter() - started, 2),
                   "error": str(done.error)[:200] if done.error else None}
    started = time.perf_counter()
    ref = client.upload_file(pdf)
    task = client.submit("contract_extraction", {"blob": ref, **contract_input(args.device)})
    done = client.wait(task.id, timeout=args.task_timeout, raise_on_failure=False)
    result = done.result or {}
    out["contract_extraction"] = {
        "status": done.status, "seconds": round(time.perf_counter() - started, 2), "pages": args.pages,
        "page_count": result.get("page_count"), "chunks": result.get("chunks"),
        "error": str(done.error)[:200] if done.error else None}
    log(f"tasks: {out}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# the two sides
# ---------------------------------------------------------------------------------------------------------------
def model_path(args: argparse.Namespace) -> str:
    if args.device == "cpu" and args.model is None:
        from connectors.paths import tiny_checkpoint_dir

        return str(tiny_checkpoint_dir())
    path = Path(args.model or ROOT / ".gpu_serve" / "a3b")
    if not (path / "model.safetensors.index.json").exists():
        sys.path.insert(0, str(ROOT / "bench" / "gpu_serve"))
        from a3b_checkpoint import write_a3b_checkpoint

        log(f"writing the random-weight A3B checkpoint to {path} (once; reused while the directory stays)")
        started = time.perf_counter()
        write_a3b_checkpoint(path, layers=args.layers, device=args.device)
        log(f"checkpoint written in {time.perf_counter() - started:.1f}s")
    return str(path)


def engine_side(args: argparse.Namespace, model: str, engine_options: dict[str, Any], image: bytes,
                pdf: bytes) -> dict[str, Any]:
    import torch

    from connectors.backend import LocalBackend
    from connectors.model_client import BackendModelClient
    from engine.runtime.engine import AsyncEngine
    from kimiray.local import LocalRuntime

    out: dict[str, Any] = {}
    started = time.perf_counter()
    engine = AsyncEngine.from_pretrained(model, device=args.device, dtype=args.dtype, **engine_options)
    out["load_s"] = round(time.perf_counter() - started, 2)
    log(f"engine loaded in {out['load_s']}s")
    try:
        out.update(asyncio.run(measure_path(EnginePath(engine), args, image)))
        if "tasks" in args.parts:
            # ``model``: the agents plan with this checkpoint's tokenizer and context window (as the served side's
            # runners do); without it they planned for the tiny checkpoint's window (58 chunks instead of 2)
            with tempfile.TemporaryDirectory() as stores, LocalRuntime(
                    model, stores_url=f"sqlite:///{stores}", model_client=BackendModelClient(LocalBackend(engine)),
                    concurrency=4) as runtime:
                out["tasks"] = run_tasks(runtime, args, pdf)
    finally:
        asyncio.run(engine.shutdown(drain=False))
        del engine
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            log(f"engine freed: {torch.cuda.memory_allocated() / 2**30:.1f} GiB still allocated in this process")
    return out


def _drop_flags(argv: list[str], flags: set[str]) -> list[str]:
    """``argv`` without the given flags and their values (a value is every token up to the next ``--`` flag)."""
    kept, skipping = [], False
    for token in argv:
        if token.startswith("--"):
            skipping = token.split("=", 1)[0] in flags
            if skipping:
                continue
        if not skipping:
            kept.append(token)
    return kept


def engine_side_in_child(argv: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The engine side in a process of its own when the served side follows: after the engine's shutdown its
    process still held 119 GiB of the H200 (caching allocator, graph pools), so the replica could not be deployed
    (first GPU run, 2026-12-06). The child's exit returns all of it."""
    import subprocess

    parts = ["engine", *(["tasks"] if "tasks" in args.parts else [])]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "engine.json"
        command = [sys.executable, str(Path(__file__).resolve()),
                   *_drop_flags(argv, {"--parts", "--json", "--engine-json"}), "--parts", *parts, "--json", str(out)]
        log(f"engine side in a child process: --parts {' '.join(parts)}")
        subprocess.run(command, check=True, cwd=ROOT)
        return engine_side_from_json(out)


def engine_side_from_json(path: str | Path) -> dict[str, Any]:
    """The engine side of an earlier output (JSON turns the concurrency keys into strings)."""
    engine = json.loads(Path(path).read_text())["engine"]
    engine["streaming"] = {int(k): v for k, v in engine["streaming"].items()}
    return engine


class Service:
    """The app on a local Ray of its own (stopped at the end: only what this script started)."""

    def __init__(self, args: argparse.Namespace, model: str, app_args: dict[str, Any],
                 options: dict[str, dict[str, Any]], home: str) -> None:
        import ray

        self.port, gcs_port = free_port(), free_port()
        env = {**app_args["_env"], **SAFE_ENV, "KIMIRAY_HOME": home, "RAY_GCS_SERVER_PORT": str(gcs_port)}
        self._saved_env = {k: os.environ.get(k) for k in (*env, "KIMIRAY_API_KEYS")}  # restored by close()
        os.environ.update(env)
        os.environ.pop("KIMIRAY_API_KEYS", None)  # loopback only: no key needed
        worker_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                           if p)}
        worker_env.pop("RAY_GCS_SERVER_PORT")
        gpus = 1 if args.device == "cuda" else 0
        started = time.perf_counter()
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=max(4, os.cpu_count() or 1),
                 num_gpus=gpus, object_store_memory=2 * 2**30, runtime_env={"env_vars": worker_env},
                 log_to_driver=args.ray_logs)
        try:
            self._deploy(args, model, app_args, options, gpus, started)
        except BaseException:
            self.close()  # never leave this run's Ray behind
            raise

    def _deploy(self, args: argparse.Namespace, model: str, app_args: dict[str, Any],
                options: dict[str, dict[str, Any]], gpus: int, started: float) -> None:
        from ray import serve

        from serve_app.app import Ingress, ModelServer, TaskRunnerDeployment
        from serve_app.config import AppConfig

        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.ray_start_s = round(time.perf_counter() - started, 2)
        app_args = {**{k: v for k, v in app_args.items() if k != "_env"},
                    "model": {**app_args["model"], "model": model, "device": args.device, "dtype": args.dtype}}
        config = AppConfig.model_validate(app_args).model_dump()
        model_options = dict(options["ModelServer"])
        model_options["ray_actor_options"] = {**model_options.get("ray_actor_options", {}), "num_gpus": gpus}
        server = ModelServer.options(**model_options).bind(config)
        runner = TaskRunnerDeployment.options(**options["TaskRunner"]).bind(server, config)
        app = Ingress.options(**options["Ingress"]).bind(server, config, runner)
        started = time.perf_counter()
        serve.run(app, name="kimiray", route_prefix="/")
        self.deploy_s = round(time.perf_counter() - started, 2)
        self.url = f"http://127.0.0.1:{self.port}"
        log(f"service up at {self.url}: ray {self.ray_start_s}s, deploy -> ready {self.deploy_s}s")

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def replica_startup(url: str) -> Any:
    """The ModelServer replica's own cold-start figures (``startup`` in /v1/stats)."""
    import httpx

    try:
        return httpx.get(f"{url}/v1/stats", timeout=30, trust_env=False).json().get("startup")
    except (httpx.HTTPError, ValueError) as exc:
        return f"unavailable: {exc}"


def model_server_pid() -> int:
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "#ModelServer#" in actor["name"]:
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            try:
                return ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
            except Exception:  # noqa: BLE001 - a replica going away: try the next
                continue
    raise RuntimeError("no live ModelServer replica")


def fault_part(service: Service, args: argparse.Namespace) -> dict[str, Any]:
    """SIGKILL the ModelServer's worker process while streams and accepted tasks are in flight."""
    import httpx

    import kimiray

    out: dict[str, Any] = {}
    path = ServedPath(service.url)
    streams: list[dict[str, Any]] = []
    killed_at: list[float] = []

    progress: dict[int, int] = {}

    async def one_stream() -> None:
        record: dict[str, Any] = {"chunks": 0}
        progress[id(record)] = 0
        try:
            stream = await path.client.chat.completions.create(
                model=SERVED_NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=args.fault_tokens,
                temperature=0, stream=True, extra_body={"ignore_eos": True})
            async for _chunk in stream:
                record["chunks"] += 1
                progress[id(record)] = record["chunks"]
            record["outcome"] = "completed"
        except Exception as exc:  # noqa: BLE001 - the point: how does it end
            record["outcome"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        progress[id(record)] = 10**9  # ended (before the kill, if it has not happened): nothing to wait for
        if killed_at:
            record["ended_after_kill_s"] = round(time.perf_counter() - killed_at[0], 3)
        streams.append(record)

    at_kill: dict[str, str] = {}

    async def load_and_kill(pid: int, client: Any, accepted: list[str]) -> None:
        tasks = [asyncio.ensure_future(one_stream()) for _ in range(args.fault_streams)]
        await asyncio.sleep(args.fault_after_s)
        flowing_by = time.perf_counter() + 120
        while (len(progress) < args.fault_streams or min(progress.values()) < 2) and time.perf_counter() < flowing_by:
            await asyncio.sleep(0.05)  # every stream is flowing before the kill
        for task_id in accepted:  # were they in flight? (a task already done proves nothing)
            at_kill[task_id] = (await asyncio.to_thread(client.get, task_id)).status
        os.kill(pid, signal.SIGKILL)
        killed_at.append(time.perf_counter())
        await asyncio.gather(*tasks)

    with kimiray.Client(service.url, timeout=120) as client:
        accepted = [client.submit("chat", {"messages": [{"role": "user", "content": PROMPT}],
                                           "max_tokens": args.fault_task_tokens}).id
                    for _ in range(args.fault_tasks)]
        pid = model_server_pid()
        log(f"fault: {args.fault_streams} streams + {len(accepted)} accepted chat tasks; SIGKILL pid {pid} in "
            f"{args.fault_after_s}s")
        asyncio.run(load_and_kill(pid, client, accepted))
        out["streams"] = streams
        out["streams_ended_with_error"] = sum(1 for s in streams if s["outcome"] != "completed")
        # the replacement: the first chat completion that succeeds after the kill
        deadline = time.perf_counter() + args.task_timeout
        ready = None
        while time.perf_counter() < deadline:
            try:
                r = httpx.post(f"{service.url}/v1/chat/completions", timeout=60, json={
                    "model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
                if r.status_code == 200:
                    ready = time.perf_counter() - killed_at[0]
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        out["replacement_answers_after_s"] = None if ready is None else round(ready, 2)
        out["replacement_startup"] = replica_startup(service.url)
        log(f"fault: streams {[s['outcome'][:60] for s in streams]}; replacement answers after {ready}")
        finished = {}
        for task_id in accepted:
            done = client.wait(task_id, timeout=args.task_timeout, raise_on_failure=False)
            finished[task_id] = {"status_at_kill": at_kill.get(task_id), "status": done.status,
                                 "after_kill_s": round(time.perf_counter() - killed_at[0], 2),
                                 "attempts": getattr(done, "attempts", None)}
        out["tasks"] = finished
        out["tasks_succeeded"] = sum(1 for t in finished.values() if t["status"] == "succeeded")
        log(f"fault: tasks {finished}")
    return out


def served_side(args: argparse.Namespace, model: str, app_args: dict[str, Any],
                options: dict[str, dict[str, Any]], image: bytes, pdf: bytes, out: dict[str, Any],
                save: Any) -> dict[str, Any]:
    """Fills ``out`` as it goes (``save()`` writes the JSON after each part: a run cut short keeps its numbers)."""
    import kimiray

    with tempfile.TemporaryDirectory() as home:
        service = Service(args, model, app_args, options, home)
        out["ray_start_s"], out["deploy_to_ready_s"] = service.ray_start_s, service.deploy_s
        out["replica_startup"] = replica_startup(service.url)  # checkpoint load; process start -> ready
        log(f"replica cold start: {out['replica_startup']}")
        save()
        try:
            if "served" in args.parts:
                out.update(asyncio.run(measure_path(ServedPath(service.url), args, image)))
                save()
                if "tasks" in args.parts:
                    with kimiray.Client(service.url, timeout=120) as client:
                        out["tasks"] = run_tasks(client, args, pdf)
                    save()
            if "fault" in args.parts:
                try:
                    out["fault"] = fault_part(service, args)
                except Exception as exc:  # noqa: BLE001 - keep the rest of the run's numbers
                    traceback.print_exc()
                    out["fault"] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            service.close()
    return out


# ---------------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------------
def comparison(engine: dict[str, Any], served: dict[str, Any], levels: list[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    es, ss = engine.get("streaming", {}), served.get("streaming", {})
    top = max(levels)
    for c in levels:
        e, s = es.get(c, {}), ss.get(c, {})
        for metric in ("ttft_ms_p50", "tpot_ms_p50"):
            ev, sv = e.get(metric), s.get(metric)
            row: dict[str, Any] = {"metric": f"{metric} c={c}", "engine": ev, "served": sv}
            if ev and sv:
                row["served_vs_engine"] = f"{sv / ev:.3f}x, {sv - ev:+.2f} ms"
            if metric == "tpot_ms_p50" and c in (1, 32):
                row["target"] = "<= 1.10x"
                row["met"] = bool(ev and sv and sv <= 1.10 * ev)
            if metric == "ttft_ms_p50" and c == 1:
                row["target"] = "<= +15 ms"
                row["met"] = bool(ev is not None and sv is not None and sv - ev <= 15)
            rows.append(row)
    ev = engine.get("non_streaming", {}).get("tokens_per_s")
    sv = served.get("non_streaming", {}).get("tokens_per_s")
    rows.append({"metric": f"non-streaming tok/s c={top}", "engine": ev, "served": sv,
                 "served_vs_engine": f"{sv / ev:.3f}x" if ev and sv else None, "target": ">= 0.90x",
                 "met": bool(ev and sv and sv >= 0.9 * ev)})
    ev = es.get(top, {}).get("tokens_per_s")
    sv = ss.get(top, {}).get("tokens_per_s")
    rows.append({"metric": f"streaming tok/s c={top}", "engine": ev, "served": sv,
                 "served_vs_engine": f"{sv / ev:.3f}x" if ev and sv else None})
    ev = engine.get("screenshot", {}).get("ttft_ms_p50")
    sv = served.get("screenshot", {}).get("ttft_ms_p50")
    rows.append({"metric": "screenshot 1280x720 TTFT ms", "engine": ev, "served": sv,
                 "served_vs_engine": f"{sv - ev:+.1f} ms" if ev and sv else None})
    for name in ("chat", "contract_extraction"):
        ev = engine.get("tasks", {}).get(name, {})
        sv = served.get("tasks", {}).get(name, {})
        rows.append({"metric": f"{name} task s", "engine": ev.get("seconds"), "served": sv.get("seconds"),
                     "status": f"{ev.get('status')} / {sv.get('status')}"})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'metric':<32} {'engine':>10} {'served':>10}  {'served vs engine':<22} {'target':<10} met")
    for r in rows:
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        met = "" if "met" not in r else ("yes" if r["met"] else "NO")
        print(f"{r['metric']:<32} {fmt(r.get('engine')):>10} {fmt(r.get('served')):>10}  "
              f"{fmt(r.get('served_vs_engine') or r.get('status')):<22} {r.get('target', ''):<10} {met}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(description="served (Ray Serve + OpenAI API) vs engine in-process")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", help="checkpoint dir (cuda default: .gpu_serve/a3b, written if absent; "
                        "cpu default: the tiny checkpoint)")
    parser.add_argument("--layers", type=int, default=None, help="A3B with fewer layers (only when writing it)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--parts", nargs="+", default=["engine", "served", "tasks", "fault"],
                        choices=["engine", "served", "tasks", "fault"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per streamed request")
    parser.add_argument("--warmup-tokens", type=int, default=None)
    parser.add_argument("--screenshot-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--pages", type=int, default=60)
    parser.add_argument("--task-timeout", type=float, default=150.0)
    parser.add_argument("--fault-streams", type=int, default=8)
    parser.add_argument("--fault-tasks", type=int, default=4)
    parser.add_argument("--fault-tokens", type=int, default=None, help="tokens of the streams that get cut")
    parser.add_argument("--fault-task-tokens", type=int, default=None)
    parser.add_argument("--fault-after-s", type=float, default=None)
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=JSON",
                        help="EngineOptions override for both sides, e.g. max_num_seqs=64")
    parser.add_argument("--deployment-option", action="append", default=[], metavar="NAME.KEY=JSON",
                        help="a deployment option of the served side over ray_config.yaml's, e.g. "
                        "Ingress.num_replicas=2")
    parser.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the Ray processes of the served side (on top of "
                        "ray_config.yaml's runtime_env and serve_app.fast_path's), e.g. KIMIRAY_SERVE_FAST_PATH=0 "
                        "(Serve's defaults) or RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=1")
    parser.add_argument("--ray-logs", action="store_true", help="show the replicas' logs")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--engine-json", help="without the engine part: compare with the engine side of this "
                        "earlier output (split a long GPU run over two calls)")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.concurrency = args.concurrency or ([1, 8, 32, 64] if gpu else [1, 4])
    args.max_tokens = args.max_tokens or (128 if gpu else 8)
    args.warmup_tokens = args.warmup_tokens or (16 if gpu else 2)
    args.fault_tokens = args.fault_tokens or (4000 if gpu else 400)
    args.fault_task_tokens = args.fault_task_tokens or (1024 if gpu else 16)  # still running at the kill
    args.fault_after_s = args.fault_after_s if args.fault_after_s is not None else (3.0 if gpu else 2.0)
    args.dtype = args.dtype or ("bfloat16" if gpu else None)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    for key, value in SAFE_ENV.items():
        os.environ.setdefault(key, value)
    overrides = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.engine_option)}
    app_args, options = production_settings(overrides)
    from serve_app.fast_path import fast_path_env

    given = dict(kv.split("=", 1) for kv in args.serve_env)
    app_args["_env"].update(given)
    # Serve's fast path, as `kimiray serve` starts Ray (--serve-env KIMIRAY_SERVE_FAST_PATH=0: Serve's defaults)
    app_args["_env"].update(fast_path_env({**os.environ, **app_args["_env"]}))
    override_deployments(options, args.deployment_option)
    from serve_app.config import AppConfig

    engine_options = AppConfig.model_validate({k: v for k, v in app_args.items() if k != "_env"}).model.engine
    image, pdf = screenshot_png(), contract_pdf(args.pages) if "tasks" in args.parts else b""
    results: dict[str, Any] = {"device": args.device, "argv": sys.argv[1:] if argv is None else argv,
                               "settings": {k: v for k, v in vars(args).items() if k != "json"},
                               "engine_options": engine_options, "serve_env": app_args["_env"]}
    try:
        import subprocess

        results["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip() or None
    except OSError:
        results["commit"] = None
    if args.device == "cuda":
        import torch

        results["gpu"] = torch.cuda.get_device_name(0)
    started = time.perf_counter()
    def save() -> None:
        results["wall_s"] = round(time.perf_counter() - started, 1)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))

    model = model_path(args)
    results["model"] = model
    results["model_ready_s"] = round(time.perf_counter() - started, 1)
    if "engine" in args.parts and {"served", "fault"} & set(args.parts):
        results["engine"] = engine_side_in_child(results["argv"], args)
        save()
    elif "engine" in args.parts:
        results["engine"] = engine_side(args, model, engine_options, image, pdf)
        save()
    if {"served", "fault"} & set(args.parts):
        results["served"] = {}
        served_side(args, model, app_args, options, image, pdf, results["served"], save)
    if "engine" not in results and args.engine_json:  # the engine side measured by an earlier call
        results["engine"] = engine_side_from_json(args.engine_json)
        results["engine_from"] = args.engine_json
    if "engine" in results and "served" in results:
        results["comparison"] = comparison(results["engine"], results["served"], args.concurrency)
        print_table(results["comparison"])
    save()
    log(f"done in {results['wall_s']}s")
    return results


if __name__ == "__main__":
    main()
