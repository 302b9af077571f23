"""Online serving benchmark: the AsyncEngine in-process under Poisson arrivals, so users can size clusters.

Each arrival rate (``--rates 1 2 4 8 16 32 inf``; ``inf`` sends every request at once) gets its own requests, none
shared with another rate or the warm-up (no prefix- or vision-cache help between runs). Workloads:

* ``random``: ``--prompt-tokens`` (1,024) random token ids in, exactly ``--output-tokens`` (128) out (EOS ignored).
* ``mixed``: the same, except that a ``--image-share`` of the requests (exactly that share, seeded) is an OpenAI
  chat message with a distinct 1280x720 screenshot PNG (a ``data:`` URL) plus a text instruction, converted by the
  service's own converter (``connectors.openai_messages.to_generate_request``: base64 + PNG decoding under the
  service limits). Where that module's dependencies are missing (the GPU machine has no PyAV), the image is decoded
  by ``engine.processor.load_image`` into the same engine messages; the JSON says which path ran.

Per rate: request and token throughput, TTFT / TPOT / E2E percentiles (TTFT from the moment the client sends,
image conversion included), and per workload the highest rate whose p99 TTFT stays under ``--slo-ttft`` (1 s),
interpolated between the measured rates that bracket it (``--search N`` measures N more rates by bisection first).
A warm-up (excluded) runs bursts at each concurrency of ``--warmup-ladder`` so kernels, autotuning and the decode
CUDA graphs of every batch size are ready before timing.

Usage: python bench/serving_bench.py --json out.json [--workloads random mixed] [--rates 1 2 4 8 16 32 inf]
       [--duration 30 | --num-requests N] [--device cuda] [--tiny | --model PATH | --layers N]
Smoke: python bench/serving_bench.py --device cpu --tiny --rates 4 inf --num-requests 6 --output-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.runtime.engine import AsyncEngine, EngineOptions, LLMEngine  # noqa: E402
from engine.runtime.request import GenerateRequest  # noqa: E402

WORDS = ("open the settings window and click the blue button next to the search field then scroll down to the "
         "invoice table select the third row copy the total amount paste it into the report draft and save the "
         "file before closing every dialog on the screen").split()
# concurrency of the warm-up bursts: every decode-graph batch size on a GPU; on a CPU (no graphs) a token warm-up
DEFAULT_LADDER = {"cuda": (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128), "cpu": (1, 4)}


# ---------------------------------------------------------------------------------------------- request specs
@dataclass
class RequestSpec:
    """One request as the client holds it before sending: token ids (text) or an OpenAI chat body (image)."""

    kind: str  # "text" | "image"
    request_id: str
    prompt_ids: list[int] | None = None
    chat_body: dict[str, Any] | None = None
    max_tokens: int = 128


@dataclass
class RequestResult:
    """What the client saw, in seconds since the rate's start (``None``: never happened)."""

    kind: str
    scheduled: float
    sent: float | None = None
    first_token: float | None = None
    finished: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each streamed token (for ITL)

    @property
    def ok(self) -> bool:
        return self.finish_reason in ("length", "stop") and self.first_token is not None


def random_prompt(rng: random.Random, length: int, vocab_limit: int) -> list[int]:
    return [rng.randrange(vocab_limit) for _ in range(length)]


def screenshot_png(rng: random.Random, size: tuple[int, int]) -> bytes:
    """A distinct desktop-like screenshot (windows, title bars, text lines), PNG-encoded like a real capture."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, tuple(rng.randrange(30, 90) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, height - 32, width, height), fill=(32, 32, 40))
    for _ in range(rng.randint(3, 5)):
        x0, y0 = rng.randrange(0, width // 2), rng.randrange(0, height // 2)
        x1, y1 = x0 + rng.randrange(width // 4, width // 2), y0 + rng.randrange(height // 4, height // 2)
        draw.rectangle((x0, y0, x1, y1), fill=(245, 245, 245), outline=(90, 90, 90))
        draw.rectangle((x0, y0, x1, y0 + 24), fill=tuple(rng.randrange(40, 200) for _ in range(3)))
        draw.text((x0 + 8, y0 + 6), " ".join(rng.choices(WORDS, k=4)), fill=(255, 255, 255))
        for line in range(y0 + 34, y1 - 14, 18):
            draw.text((x0 + 10, line), " ".join(rng.choices(WORDS, k=rng.randint(3, 9))), fill=(20, 20, 20))
        bx, by = x1 - 90, y1 - 36
        if bx > x0 and by > y0 + 24:
            draw.rectangle((bx, by, bx + 80, by + 26), fill=(30, 100, 220))
            draw.text((bx + 12, by + 7), rng.choice(WORDS), fill=(255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def image_chat_body(rng: random.Random, size: tuple[int, int], words: int, max_tokens: int) -> dict[str, Any]:
    """An OpenAI chat-completions body: one user turn with the screenshot as a data: URL and an instruction."""
    url = "data:image/png;base64," + base64.b64encode(screenshot_png(rng, size)).decode()
    text = "Describe what is on this screen, then " + " ".join(rng.choices(WORDS, k=words)) + "."
    return {"model": "kimi-vl", "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": text}]}]}


@dataclass
class WorkloadConfig:
    prompt_tokens: int = 1024
    output_tokens: int = 128
    image_share: float = 0.25
    image_size: tuple[int, int] = (1280, 720)
    image_text_words: int = 48
    vocab_limit: int = 768  # random ids come from [0, vocab_limit): ordinary tokens, no special ones


def build_requests(workload: str, count: int, seed: str, cfg: WorkloadConfig) -> list[RequestSpec]:
    """``count`` requests of ``workload``, fully determined by ``seed`` (a string: deterministic across runs)."""
    rng = random.Random(seed)
    images = 0
    if workload == "mixed":
        images = round(cfg.image_share * count)
    elif workload != "random":
        raise ValueError(f"unknown workload {workload!r}")
    image_rows = set(rng.sample(range(count), images))
    specs = []
    for i in range(count):
        request_id = f"{seed}:{i}"
        if i in image_rows:
            specs.append(RequestSpec("image", request_id, max_tokens=cfg.output_tokens, chat_body=image_chat_body(
                rng, cfg.image_size, cfg.image_text_words, cfg.output_tokens)))
        else:
            specs.append(RequestSpec("text", request_id, max_tokens=cfg.output_tokens,
                                     prompt_ids=random_prompt(rng, cfg.prompt_tokens, cfg.vocab_limit)))
    return specs


def poisson_offsets(count: int, rate: float, rng: random.Random) -> list[float]:
    """Send times (s): the first at 0, then exponential gaps of mean 1/rate; all at 0 for ``rate = inf``."""
    offsets, at = [], 0.0
    for i in range(count):
        if i and math.isfinite(rate):
            at += rng.expovariate(rate)
        offsets.append(at)
    return offsets


# ---------------------------------------------------------------------------------------------- chat conversion
Converter = Callable[[dict[str, Any], str], Awaitable[GenerateRequest]]


def chat_converter() -> tuple[Converter, str]:
    """The service's OpenAI-chat -> engine conversion, or (its dependencies missing) the same messages built from
    ``engine.processor.load_image``; returns it and a label for the JSON."""
    try:
        from connectors.limits import Limits
        from connectors.openai_messages import ChatCompletionRequest, to_generate_request
    except ImportError as exc:
        from engine.processor import load_image

        async def engine_messages(body: dict[str, Any], request_id: str) -> GenerateRequest:
            messages = []
            for message in body["messages"]:
                content = []
                for part in message["content"]:
                    if part["type"] == "image_url":
                        image = await asyncio.to_thread(load_image, part["image_url"]["url"])
                        content.append({"type": "image", "image": image})
                    else:
                        content.append(part)
                messages.append({"role": message["role"], "content": content})
            return GenerateRequest(messages=messages, max_tokens=body["max_tokens"], ignore_eos=body["ignore_eos"],
                                   request_id=request_id)

        return engine_messages, f"engine.processor.load_image (service converter unavailable: {exc})"
    limits = Limits()

    async def service(body: dict[str, Any], request_id: str) -> GenerateRequest:
        return await to_generate_request(ChatCompletionRequest.model_validate(body), limits, request_id)

    return service, "service (connectors.openai_messages.to_generate_request)"


# ---------------------------------------------------------------------------------------------- the client
async def send(engine: AsyncEngine, spec: RequestSpec, result: RequestResult, start: float,
               convert: Converter) -> None:
    """Wait for the request's send time, send it, stream it to the end; fills ``result`` as it goes."""
    await asyncio.sleep(max(0.0, start + result.scheduled - time.perf_counter()))
    result.sent = time.perf_counter() - start
    try:
        if spec.chat_body is not None:
            request = await convert(spec.chat_body, spec.request_id)
        else:
            request = GenerateRequest(prompt_token_ids=spec.prompt_ids, max_tokens=spec.max_tokens, ignore_eos=True,
                                      request_id=spec.request_id)
        async for delta in engine.generate(request):
            if delta.token_ids:
                now = time.perf_counter() - start
                if result.first_token is None:
                    result.first_token = now
                result.token_times.append(now)
                result.output_tokens += len(delta.token_ids)
            if delta.finish_reason is not None:
                result.finished = time.perf_counter() - start
                result.finish_reason = delta.finish_reason
                result.error = delta.error
                if delta.usage is not None:
                    result.prompt_tokens = delta.usage.prompt_tokens
                    result.output_tokens = delta.usage.completion_tokens
    except Exception as exc:  # rejected (overloaded, too long) or the engine died: a failed request
        result.error = f"{type(exc).__name__}: {exc}"


@dataclass
class Sampler:
    """Samples the engine's ``stats()`` while a rate runs (running / waiting rows, cache use)."""

    engine: AsyncEngine
    every: float = 0.05
    samples: list[dict[str, Any]] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            self.samples.append(self.engine.stats())
            await asyncio.sleep(self.every)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        running = [s["running"] for s in self.samples if "running" in s]
        if running:
            out |= {"running_mean": round(sum(running) / len(running), 2), "running_max": max(running)}
        for key in ("waiting", "cache_usage"):  # stats() is the engine's to change: take what is there
            values = [s[key] for s in self.samples if key in s]
            if values:
                out[f"{key}_max"] = max(values)
        return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 2)


def summarize(rate: float, results: list[RequestResult], duration: float) -> dict[str, Any]:
    """One table row: throughput over the whole run (first send to last completion), latency percentiles over the
    completed requests. TPOT is per request: (E2E - TTFT) / (output tokens - 1); ITL is every gap between two
    streamed tokens (it shows the stalls a request's mean hides, e.g. decode waiting behind a prefill chunk)."""
    done = [r for r in results if r.ok]
    ttft = [r.first_token - r.sent for r in done]
    e2e = [r.finished - r.sent for r in done]
    tpot = [(r.finished - r.first_token) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itl = [b - a for r in done for a, b in zip(r.token_times, r.token_times[1:])]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    errors = sorted({r.error or f"finish_reason={r.finish_reason}" for r in results if not r.ok})
    row: dict[str, Any] = {
        "rate": "inf" if math.isinf(rate) else int(rate) if float(rate).is_integer() else rate,
        "requests": len(results), "completed": len(done), "failed": len(results) - len(done),
        "image_requests": sum(r.kind == "image" for r in results),
        "duration_s": round(duration, 3),
        "request_throughput": round(len(done) / duration, 3) if duration > 0 else None,
        "output_tok_per_s": round(out_tokens / duration, 1) if duration > 0 else None,
        "total_tok_per_s": round((in_tokens + out_tokens) / duration, 1) if duration > 0 else None,
        "prompt_tokens_mean": round(in_tokens / len(done), 1) if done else None,
        "output_tokens_total": out_tokens,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_ms"] = ms(percentile(values, q))
        row[f"{name}_mean_ms"] = ms(sum(values) / len(values)) if values else None
    for kind in ("text", "image"):
        part = [r.first_token - r.sent for r in done if r.kind == kind]
        if part and row["image_requests"]:
            row[f"ttft_p50_{kind}_ms"] = ms(percentile(part, 50))
            row[f"ttft_p99_{kind}_ms"] = ms(percentile(part, 99))
    lags = [r.sent - r.scheduled for r in results if r.sent is not None]
    row["send_lag_max_ms"] = ms(max(lags)) if lags else None  # the client kept to the schedule if this is small
    if errors:
        row["errors"] = errors[:5]
    return row


async def run_rate(engine: AsyncEngine, specs: list[RequestSpec], rate: float, seed: str, convert: Converter,
                   timeout: float) -> dict[str, Any]:
    """Send ``specs`` at ``rate`` (Poisson), wait for all (at most ``timeout`` s after the last send; the rest
    are cancelled, which aborts them in the engine) and summarise."""
    offsets = poisson_offsets(len(specs), rate, random.Random(f"{seed}:arrivals"))
    results = [RequestResult(spec.kind, at) for spec, at in zip(specs, offsets)]
    before = engine.stats()
    sampler = Sampler(engine)
    sampling = asyncio.create_task(sampler.run())
    start = time.perf_counter()
    tasks = [asyncio.create_task(send(engine, spec, result, start, convert)) for spec, result in zip(specs, results)]
    _, pending = await asyncio.wait(tasks, timeout=offsets[-1] + timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    end = max([r.finished for r in results if r.finished is not None], default=time.perf_counter() - start)
    sampling.cancel()
    await asyncio.gather(sampling, return_exceptions=True)
    for r in results:
        if r.finish_reason is None and r.error is None:
            r.error = f"not finished within {timeout} s after the last send"
    row = summarize(rate, results, end)
    after = engine.stats()
    row["engine"] = sampler.summary() | {
        key: after[key] - before[key]
        for key in ("steps", "preemptions", "prefix_cache_hit_blocks", "vision_cache_hits", "vision_cache_misses")
        if key in after and key in before}
    return row


# ---------------------------------------------------------------------------------------------- capacity
def capacity(rows: list[dict[str, Any]], slo_s: float) -> dict[str, Any]:
    """The highest arrival rate whose p99 TTFT stays under ``slo_s``: linear interpolation of p99 TTFT between
    the highest passing rate and the lowest failing one above it (finite rates; a run with failed requests
    fails). A bound when the measured rates do not bracket it."""
    slo_ms = 1000 * slo_s
    finite = sorted((r for r in rows if r["rate"] != "inf"), key=lambda r: r["rate"])

    def passes(row: dict[str, Any]) -> bool:
        return row["failed"] == 0 and row["ttft_p99_ms"] is not None and row["ttft_p99_ms"] <= slo_ms

    if not finite:
        return {"slo_ttft_p99_s": slo_s, "req_per_s": None, "note": "no finite rate measured"}
    first_fail = next((i for i, r in enumerate(finite) if not passes(r)), None)
    if first_fail is None:
        top = finite[-1]
        return {"slo_ttft_p99_s": slo_s, "req_per_s": top["rate"], "bound": "at least",
                "note": f"every measured rate passed; the highest, {top['rate']} req/s, is a lower bound"}
    if first_fail == 0:
        low = finite[0]
        return {"slo_ttft_p99_s": slo_s, "req_per_s": low["rate"], "bound": "below",
                "note": f"the lowest measured rate, {low['rate']} req/s, already fails (p99 TTFT "
                        f"{low['ttft_p99_ms']} ms, {low['failed']} failed)"}
    lo, hi = finite[first_fail - 1], finite[first_fail]
    p_lo = lo["ttft_p99_ms"]
    p_hi = hi["ttft_p99_ms"] if hi["ttft_p99_ms"] is not None and hi["failed"] == 0 else None
    if p_hi is None or p_hi <= p_lo:
        estimate = lo["rate"]
    else:
        estimate = lo["rate"] + (slo_ms - p_lo) * (hi["rate"] - lo["rate"]) / (p_hi - p_lo)
    return {"slo_ttft_p99_s": slo_s, "req_per_s": round(estimate, 2), "bound": "interpolated",
            "bracket": [lo["rate"], hi["rate"]],
            "note": f"p99 TTFT {p_lo} ms at {lo['rate']} req/s, {hi['ttft_p99_ms']} ms at {hi['rate']} req/s"}


def bracket(rows: list[dict[str, Any]], slo_s: float) -> tuple[float, float] | None:
    cap = capacity(rows, slo_s)
    return tuple(cap["bracket"]) if cap.get("bound") == "interpolated" else None


# ---------------------------------------------------------------------------------------------- report
COLUMNS = (("rate", "rate (req/s)"), ("completed", "done"), ("request_throughput", "req/s"),
           ("output_tok_per_s", "out tok/s"), ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
           ("tpot_p50_ms", "TPOT p50 ms"), ("tpot_p99_ms", "TPOT p99 ms"), ("e2e_p50_ms", "E2E p50 ms"))


def markdown(workload: str, rows: list[dict[str, Any]], cap: dict[str, Any]) -> str:
    lines = [f"**{workload}**", "", "| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key)
            if key == "completed":
                value = f"{row['completed']}/{row['requests']}"
            elif key == "rate" and row.get("search"):
                value = f"{value} (search)"
            cells.append("-" if value is None else f"{value:,}" if isinstance(value, (int, float)) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    shots = [f"{row['rate']}: {row['ttft_p50_image_ms']:,} / {row['ttft_p99_image_ms']:,}"
             for row in rows if row.get("ttft_p50_image_ms") is not None]
    if shots:
        lines += ["", "Screenshot requests' TTFT p50 / p99 ms by rate: " + "; ".join(shots)]
    bound = {"at least": ">= ", "below": "< "}.get(cap.get("bound"), "~")
    value = cap.get("req_per_s")
    lines += ["", f"Highest rate with p99 TTFT < {cap['slo_ttft_p99_s']} s: "
              + (f"{bound}{value} req/s" if value is not None else "n/a") + f" ({cap.get('note', '')})"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- engine
def build_engine(args: argparse.Namespace) -> tuple[AsyncEngine, str]:
    """The engine under test and a label: the tiny checkpoint, a checkpoint directory, or the full-size A3B
    architecture with random weights built on the device (bench/a3b.py)."""
    options: dict[str, Any] = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens}
    if args.cache_tokens:
        options["cache_tokens"] = args.cache_tokens
    elif not args.device.startswith("cuda"):  # the CPU default (65,536) can't hold 64 rows of 1,152 tokens
        options["cache_tokens"] = 2 * 65536
    if args.tiny or args.model:
        path = args.model
        if args.tiny:
            from engine.tiny import write_tiny_checkpoint

            path = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="serving-bench-tiny-")), seed=0)
        engine = AsyncEngine.from_pretrained(path, device=args.device, **options)
        return engine, "tiny checkpoint (random weights)" if args.tiny else str(path)
    from bench.a3b import a3b_bundle

    bundle = a3b_bundle(Path(tempfile.mkdtemp(prefix="serving-bench-a3b-")), args.device, layers=args.layers)
    label = "Kimi-VL-A3B shapes, random bf16 weights" + (f" ({args.layers} layers)" if args.layers else "")
    return AsyncEngine(LLMEngine(bundle, EngineOptions(**options))), label


def vocab_limit(engine: AsyncEngine) -> int:
    """Random prompt ids stay below the first special token (they are ordinary text tokens)."""
    tokenizer = engine.tokenizer
    return min(tokenizer.special_tokens.values(), default=tokenizer.vocab_size)


async def warm_up(engine: AsyncEngine, cfg: WorkloadConfig, ladder: Sequence[int], images: bool, seed: int,
                  max_batched: int, convert: Converter) -> dict[str, Any]:
    """Bursts of ``level`` concurrent requests for each level (long enough that the whole burst decodes together,
    so each batch size's decode graph is captured), then two image requests; none of it is timed."""
    start = time.perf_counter()
    rows = []
    for level in ladder:
        tokens = 16 + math.ceil(level * cfg.prompt_tokens / max_batched)
        warm = WorkloadConfig(**{**cfg.__dict__, "output_tokens": tokens})
        specs = build_requests("random", level, f"{seed}:warmup:{level}", warm)
        rows.append(await run_rate(engine, specs, math.inf, f"{seed}:warmup:{level}", convert, timeout=600))
    if images:
        specs = build_requests("mixed", 2, f"{seed}:warmup:images", WorkloadConfig(
            **{**cfg.__dict__, "image_share": 1.0, "output_tokens": 4}))
        rows.append(await run_rate(engine, specs, math.inf, f"{seed}:warmup:images", convert, timeout=600))
    errors = sorted({e for row in rows for e in row.get("errors", [])})
    return {"ladder": list(ladder), "images": images, "seconds": round(time.perf_counter() - start, 2),
            "failed": sum(row["failed"] for row in rows), **({"errors": errors[:5]} if errors else {})}


def requests_for(rate: float, args: argparse.Namespace, finite_counts: list[int]) -> int:
    if args.num_requests:
        return args.num_requests
    if math.isinf(rate):
        return args.inf_requests or max(finite_counts, default=args.min_requests)
    return max(args.min_requests, math.ceil(rate * args.duration))


def expected_seconds(count: int, rate: float, rows: list[dict[str, Any]]) -> float:
    """A rate's expected run time for the budget check: its arrival span, or for ``inf`` the count at the best
    throughput measured so far (nothing known yet: 0)."""
    if math.isfinite(rate):
        return count / rate
    best = max((r["request_throughput"] or 0 for r in rows), default=0)
    return count / best if best > 0 else 0.0


def commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


async def bench(args: argparse.Namespace, command: str) -> dict[str, Any]:
    engine, model = build_engine(args)
    convert, conversion = chat_converter()
    cfg = WorkloadConfig(prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                         image_share=args.image_share, image_size=tuple(args.image_size),
                         image_text_words=args.image_text_words, vocab_limit=vocab_limit(engine))
    on_gpu = args.device.startswith("cuda")
    results: dict[str, Any] = {
        "command": command, "commit": commit(), "model": model,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
        "engine_options": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                           "cache_tokens": getattr(engine.engine, "cache_capacity_tokens", None)},
        "workload": {**cfg.__dict__, "image_size": list(cfg.image_size)}, "seed": args.seed,
        "request_conversion": conversion, "slo_ttft_p99_s": args.slo_ttft, "workloads": {},
    }

    def dump() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    try:
        ladder = args.warmup_ladder
        if ladder is None:
            ladder = DEFAULT_LADDER["cuda" if on_gpu else "cpu"]
        ladder = [n for n in ladder if n <= args.max_num_seqs]
        results["warmup"] = await warm_up(engine, cfg, ladder, "mixed" in args.workloads, args.seed,
                                          args.max_num_batched_tokens, convert)
        print(json.dumps({"warmup": results["warmup"]}), flush=True)
        run = 0
        for workload in args.workloads:
            began = time.perf_counter()
            rows: list[dict[str, Any]] = []
            entry = {"rows": rows}
            results["workloads"][workload] = entry
            finite = sorted(r for r in args.rates if math.isfinite(r))
            counts = [requests_for(r, args, []) for r in finite]

            async def measure(rate: float, search: bool = False) -> None:
                nonlocal run
                count = requests_for(rate, args, counts)
                if args.budget_s and time.perf_counter() - began + expected_seconds(count, rate, rows) > args.budget_s:
                    entry.setdefault("skipped_rates", []).append("inf" if math.isinf(rate) else rate)
                    print(f"{workload}: rate {rate} skipped (it would overrun the {args.budget_s} s budget)", flush=True)
                    return
                run += 1
                seed = f"{args.seed}:{workload}:{run}"
                specs = build_requests(workload, count, seed, cfg)
                row = await run_rate(engine, specs, rate, seed, convert, args.rate_timeout)
                if search:
                    row["search"] = True
                rows.append(row)
                print(json.dumps({"workload": workload, **row}), flush=True)
                dump()

            for rate in finite:
                await measure(rate)
            for _ in range(args.search):
                found = bracket(rows, args.slo_ttft)
                if found is None:
                    break
                await measure(round((found[0] + found[1]) / 2, 3), search=True)
            if any(math.isinf(r) for r in args.rates):
                await measure(math.inf)
            rows.sort(key=lambda r: math.inf if r["rate"] == "inf" else r["rate"])
            entry["capacity"] = capacity(rows, args.slo_ttft)
            entry["seconds"] = round(time.perf_counter() - began, 1)
            entry["markdown"] = markdown(workload, rows, entry["capacity"])
            print(entry["markdown"] + "\n", flush=True)
            dump()
        results["engine_stats"] = engine.stats()
    finally:
        await engine.shutdown(drain=False)
    dump()
    return results


def parse_rate(text: str) -> float:
    value = float(text)
    if value <= 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"a rate must be positive or inf, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["random", "mixed"], choices=["random", "mixed"])
    p.add_argument("--rates", nargs="+", type=parse_rate, default=[1, 2, 4, 8, 16, 32, math.inf],
                   help="Poisson arrival rates in requests/s; inf sends every request at once")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per finite rate")
    p.add_argument("--num-requests", type=int, help="requests per rate (overrides --duration)")
    p.add_argument("--min-requests", type=int, default=16, help="at least this many requests per rate")
    p.add_argument("--inf-requests", type=int, help="requests of the inf rate (default: the largest finite count)")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--image-share", type=float, default=0.25, help="share of the mixed workload with a screenshot")
    p.add_argument("--image-size", type=int, nargs=2, default=[1280, 720], metavar=("WIDTH", "HEIGHT"))
    p.add_argument("--image-text-words", type=int, default=48, help="words of instruction beside each screenshot")
    p.add_argument("--slo-ttft", type=float, default=1.0, help="p99 TTFT target in seconds for the capacity figure")
    p.add_argument("--search", type=int, default=0, help="extra rates measured by bisection of the SLO bracket")
    p.add_argument("--rate-timeout", type=float, default=300.0,
                   help="seconds after a rate's last send before its unfinished requests are cancelled")
    p.add_argument("--budget-s", type=float, help="per workload: skip the remaining rates once this is spent")
    p.add_argument("--warmup-ladder", type=int, nargs="*",
                   help="concurrency of each warm-up burst (default: every decode-graph batch size on a GPU, 1 4 on "
                        "a CPU; levels above --max-num-seqs are dropped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny random checkpoint (smoke runs)")
    p.add_argument("--model", type=Path, help="a checkpoint directory instead of the random full-size A3B")
    p.add_argument("--layers", type=int, help="shrink the random A3B model (smoke runs only)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--cache-tokens", type=int,
                   help="KV cache size in tokens (default: the engine's on a GPU, from free memory; 131,072 on a CPU)")
    p.add_argument("--json", type=Path)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if not 0.0 <= args.image_share <= 1.0:
        raise SystemExit("--image-share must be between 0 and 1")
    command = "python bench/serving_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return asyncio.run(bench(args, command))


if __name__ == "__main__":
    main()
