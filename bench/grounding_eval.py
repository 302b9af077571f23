"""GUI grounding accuracy and latency on a ScreenSpot-format set (``agents.os_agent.grounding``).

Data: ``--data JSON --images DIR`` (ScreenSpot v1 / v2 / Pro annotation file; ``--bbox-format`` when its name and
keys don't tell), else a synthetic set generated into a temp dir (``agents.os_agent.synthetic_ui``).
Model: ``--url http://host:port --api-key K`` for a running kimiray service (its OpenAI-compatible
``/v1/chat/completions``, the screenshot sent as a PNG data URI), else the tiny checkpoint in the engine in this
process (random weights: accuracy is meaningless, latency per sample is the figure).

Prints the report's summary as JSON; ``--json`` also writes the full report (every sample's reply and point).

Usage: python bench/grounding_eval.py [--data screenspot_desktop_v2.json --images screenspotv2_image]
                                      [--url http://127.0.0.1:8000 --api-key K] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from connectors.model_client import ModelError, ModelReply, ModelUnavailableError  # noqa: E402
from engine.runtime.request import GenerateRequest, Usage  # noqa: E402


class OpenAIChatModel:
    """A ModelClient over an OpenAI-compatible ``/v1/chat/completions`` (kimiray's ingress, or any such server).
    PIL images in the request's messages become ``image_url`` parts with a PNG data URI."""

    def __init__(self, url: str, api_key: str | None = None, model: str = "kimi-vl", timeout: float = 300.0) -> None:
        import httpx

        base = url.rstrip("/")
        self.endpoint = (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(timeout=timeout, headers=headers, trust_env=False)

    @staticmethod
    def _part(part: Any) -> Any:
        if not (isinstance(part, dict) and part.get("type") == "image"):
            return part
        image = part.get("image")
        if isinstance(image, str):  # already a data URL (or a path the server may refuse)
            return {"type": "image_url", "image_url": {"url": image}}
        if isinstance(image, bytes | bytearray):
            data = bytes(image)
        else:  # PIL image
            out = io.BytesIO()
            image.save(out, format="PNG")
            data = out.getvalue()
        return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}

    def _messages(self, request: GenerateRequest) -> list[dict[str, Any]]:
        out = []
        for message in request.messages or []:
            content = message.get("content")
            if isinstance(content, list):
                content = [self._part(p) for p in content]
            out.append({**message, "content": content})
        return out

    async def generate(self, request: GenerateRequest) -> ModelReply:
        import httpx

        body = {"model": self.model, "messages": self._messages(request), "max_tokens": request.max_tokens,
                "temperature": request.temperature}
        if request.seed is not None:
            body["seed"] = request.seed
        try:
            response = await self.client.post(self.endpoint, json=body)
        except httpx.HTTPError as exc:
            raise ModelUnavailableError(f"{self.endpoint}: {type(exc).__name__}: {exc}") from exc
        if response.status_code in (429, 502, 503, 504):
            raise ModelUnavailableError(f"HTTP {response.status_code}: {response.text[:300]}")
        if response.status_code != 200:
            raise ModelError(f"HTTP {response.status_code}: {response.text[:300]}")
        data = response.json()
        choice = data["choices"][0]
        usage = data.get("usage")
        return ModelReply(
            text=choice["message"].get("content") or "", reasoning=choice["message"].get("reasoning_content") or "",
            finish_reason=choice.get("finish_reason"),
            usage=Usage(prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"])
            if usage else None)

    async def aclose(self) -> None:
        await self.client.aclose()


def _local_engine(device: str | None):
    import torch

    from engine.runtime.engine import AsyncEngine
    from connectors.paths import tiny_checkpoint_dir

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return AsyncEngine.from_pretrained(str(tiny_checkpoint_dir()), device=device)


async def _run(args: argparse.Namespace, samples: list) -> Any:
    from agents.os_agent.grounding import ModelLocator, evaluate
    from connectors.model_client import BackendModelClient
    from connectors.backend import LocalBackend

    engine = None
    if args.url:
        model = OpenAIChatModel(args.url, args.api_key, model=args.model)
    else:
        engine = await asyncio.to_thread(_local_engine, args.device)
        model = BackendModelClient(LocalBackend(engine))
    try:
        locator = ModelLocator(model, max_tokens=args.max_tokens, temperature=0.0, max_side=args.max_side)
        if args.warmup and samples:  # first call pays one-off costs (kernels, allocator); not a sample
            from PIL import Image

            with Image.open(samples[0].image_path) as im:
                await locator.locate(im.convert("RGB"), samples[0].instruction)
        return await evaluate(samples, locator, concurrency=args.concurrency)
    finally:
        if engine is not None:
            await engine.shutdown(drain=False)
        if isinstance(model, OpenAIChatModel):
            await model.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="ScreenSpot-format annotation json, or a folder of them (v2's "
                        "three split files, Pro's annotations/) (default: synthetic set)")
    parser.add_argument("--images", type=Path, help="directory the entries' img_filename are relative to")
    parser.add_argument("--bbox-format", choices=["auto", "xywh", "xyxy"], default="auto")
    parser.add_argument("--n-images", type=int, default=4, help="synthetic set: screenshots (10 targets each)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic set: seed")
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples")
    parser.add_argument("--url", help="a running kimiray service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("KIMIRAY_API_KEY"))
    parser.add_argument("--model", default="kimi-vl", help="model name sent to --url")
    parser.add_argument("--device", help="in-process engine device (default: cuda if available, else cpu)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-side", type=int, help="downscale screenshots to this long side before the model "
                        "sees them (scoring stays in the original's pixels); default: full size")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--json", type=Path, help="write the full report (per-sample results) here")
    args = parser.parse_args()
    if (args.data is None) != (args.images is None):
        parser.error("--data and --images go together")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from agents.os_agent.grounding import load_screenspot, load_screenspot_dir
    from agents.os_agent.synthetic_ui import make_screenspot_dataset

    out: dict[str, Any] = {"machine": f"{platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}",
                           "model": args.url or "tiny checkpoint, in-process engine"}
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            data, images = make_screenspot_dataset(tmp, n_images=args.n_images, seed=args.seed), Path(tmp)
            out["data"] = f"synthetic: {args.n_images} screenshots 1280x720, seed {args.seed}"
        else:
            data, images = args.data, args.images
            out["data"] = str(data)
        if Path(data).is_dir():
            samples = load_screenspot_dir(data, images, args.bbox_format, check_images=True)[:args.limit]
        else:
            samples = load_screenspot(data, images, args.bbox_format, check_images=True)[:args.limit]
        started = time.perf_counter()
        report = asyncio.run(_run(args, samples))
        out["seconds"] = round(time.perf_counter() - started, 2)
    out["report"] = report.summary()
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**out, "report": report.model_dump(mode="json")}, indent=1))


if __name__ == "__main__":
    main()
