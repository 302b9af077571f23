"""Batch API throughput vs the same requests sent as concurrent chat completions, one server, one run.

Setup: the real ingress app under uvicorn in a thread of this process with its TaskRunner loop
(``tests/task_server.py``), the real AsyncEngine (the tiny checkpoint unless ``--model``), the embedded SQLite
store. Both sides use the official ``openai`` client and the same ``--requests`` chat bodies (``--max-tokens``
tokens each with ``ignore_eos``, greedy; every ``--images-every``-th with a small PNG):

  batch   files.create(purpose="batch") + batches.create, poll batches.retrieve every 0.1 s until completed, then
          files.content of the output: wall time from the upload to the downloaded output
  chat    AsyncOpenAI chat.completions.create with ``--concurrency`` requests in flight (the batch agent's own
          in-flight bound, 64 by default), wall time for all of them

The two alternate ``--rounds`` times (chat first) after a warm-up, so machine load hits both alike.

Usage: python bench/batch_bench.py [--requests 200] [--max-tokens 16] [--concurrency 64] [--rounds 2]
       [--images-every 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEY = "sk-bench-batch-0001"


def requests_for(n: int, max_tokens: int, images_every: int) -> list[dict[str, Any]]:
    from tests.test_openai_batch import batch_lines

    return batch_lines(n, max_tokens=max_tokens, images_every=images_every, ignore_eos=True)


def run_batch(url: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
    import openai

    from tests.test_openai_batch import jsonl

    c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)
    start = time.perf_counter()
    upload = c.files.create(file=("bench.jsonl", jsonl(lines)), purpose="batch")
    batch = c.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.1)
        batch = c.batches.retrieve(batch.id)
    out = [json.loads(x) for x in c.files.content(batch.output_file_id).text.splitlines() if x.strip()]
    wall = time.perf_counter() - start
    tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in out)
    assert batch.status == "completed" and len(out) == len(lines), batch
    return {"wall_s": wall, "requests": len(out), "completion_tokens": tokens}


async def run_chat(url: str, lines: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    import openai

    c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(body: dict[str, Any]) -> int:
        async with gate:
            extra = {k: body[k] for k in ("ignore_eos",) if k in body}
            reply = await c.chat.completions.create(model=body["model"], messages=body["messages"],
                                                    max_tokens=body["max_tokens"], extra_body=extra)
            return reply.usage.completion_tokens

    start = time.perf_counter()
    tokens = await asyncio.gather(*(one(line["body"]) for line in lines))
    wall = time.perf_counter() - start
    await c.close()
    return {"wall_s": wall, "requests": len(tokens), "completion_tokens": sum(tokens)}


def _rates(run: dict[str, Any]) -> dict[str, Any]:
    return {**run, "req_per_s": run["requests"] / run["wall_s"], "tok_per_s": run["completion_tokens"] / run["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images-every", type=int, default=4)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the tiny checkpoint)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    from connectors.paths import tiny_checkpoint_dir
    from engine.runtime.engine import AsyncEngine
    from tests.task_server import task_server

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = AsyncEngine.from_pretrained(args.model or str(tiny_checkpoint_dir()), device=device,
                                         dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    lines = requests_for(args.requests, args.max_tokens, args.images_every)
    results: dict[str, list[dict[str, Any]]] = {"batch": [], "chat": []}
    with tempfile.TemporaryDirectory() as tmp, task_server(
            f"sqlite:///{tmp}", KEY, engine=engine, agent_modules=(),
            app_args={"auth": {"requests_per_minute": 10**6, "creates_per_minute": 10**6,
                               "max_concurrent_per_key": 4096}}) as url:
        asyncio.run(run_chat(url, lines[:8], 8))  # warm-up: first-call costs out of the timings
        for _ in range(args.rounds):
            results["chat"].append(_rates(asyncio.run(run_chat(url, lines, args.concurrency))))
            results["batch"].append(_rates(run_batch(url, lines)))
    summary = {mode: {"req_per_s": statistics.mean(r["req_per_s"] for r in runs),
                      "tok_per_s": statistics.mean(r["tok_per_s"] for r in runs),
                      "wall_s": [round(r["wall_s"], 2) for r in runs]} for mode, runs in results.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    report = {"args": vars(args), "device": device, "commit": commit, "python": platform.python_version(),
              "torch": torch.__version__, "load_avg": os.getloadavg(), "results": results, "summary": summary}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
