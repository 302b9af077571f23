"""ScreenSpot-style GUI grounding evaluation: does the model's click land inside the target element's box?

Annotation formats (checked against the public evaluation code, 2026-11-26):

- **ScreenSpot v1** (SeeClick): ``screenspot_{desktop,mobile,web}.json``, a json list of
  ``{"img_filename", "bbox", "instruction", "data_type": "text" | "icon", "data_source"}`` with ``bbox`` =
  ``[x, y, w, h]`` in pixels of the image. Source: njucckevin/SeeClick ``pretrain/screenspot_test.py``, which
  turns it into ``[x, y, x + w, y + h]``, normalises by the image size and scores a hit when the predicted point
  lies in that box, bounds included (``x1 <= x <= x2``); a reply without a point counts as wrong ("wrong format").
- **ScreenSpot v2** (OS-Atlas, ``OS-Copilot/ScreenSpot-v2``): ``screenspot_{desktop,mobile,web}_v2.json``, the same
  keys and the same ``[x, y, w, h]`` pixel boxes (v2 corrected annotations, not the schema); evaluation scripts in
  public repositories load it with the v1 code path. Hugging Face *parquet* re-uploads of v2 exist with
  normalised ``[x1, y1, x2, y2]`` boxes: those are a different format and are not read here.
- **ScreenSpot-Pro** (likaixin2000/ScreenSpot-Pro-GUI-Grounding ``eval_screenspot_pro.py``): one json per
  application under ``annotations/``, entries ``{"img_filename", "bbox", "instruction", "instruction_cn", "id",
  "application", "platform", "img_size": [w, h], "ui_type": "text" | "icon", "group"}`` with ``bbox`` =
  ``[x1, y1, x2, y2]`` in pixels (the script's comment says so and its ``[x, y, w, h]`` line is commented out);
  same inclusive point-in-box scoring. Its ``models/kimivl.py`` parses Kimi-VL's ``x=0.xx, y=0.yy`` fractions.

Splits: v1/v2 come as one file per split (``desktop`` / ``mobile`` / ``web``, from the file name); Pro's entries
carry their ``group`` (Dev, Creative, CAD, Scientific, Office, OS), which is its split. The report scores per
split, per data type (text / icon) and per split x type (the papers' table columns), and per platform.
``load_screenspot_dir`` reads every annotation file of a folder (the three v2 files, or Pro's ``annotations/``).
Images of any size: ``ModelLocator(max_side=...)`` downscales larger screenshots before the model sees them and
scores in the original's pixels (Kimi-VL's fractions don't change with the scale; pixels are scaled back).

``bbox_format="auto"`` picks, per file: ``xywh`` for the v1/v2 file names above; else ``xyxy`` when entries carry
Pro's keys (``img_size``, ``ui_type``, ``application``, ``group``); else ``xywh`` when they carry v1's
``data_type`` / ``data_source``; otherwise it refuses to guess (a wrong guess silently corrupts every score).

Hits are judged in pixels: the model's point goes through ``parse.point_to_screen`` with the screenshot as the
screen, so it is read exactly as the agent reads it (fractions in [0, 1] scale by the image size; in ``auto`` mode
whole numbers beyond 1 are pixels, and a non-integer beyond 1 such as ``x=1.7`` is an overshooting fraction). A point
off the image is ``off_screen`` and a reply with no point ``parse_failure``; both count as wrong in ``accuracy``, as a
"wrong format" reply does in SeeClick.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, Field

from agents.os_agent.convention import grounding_prompt
from agents.os_agent.parse import CoordinateMode, parse_point, point_to_screen
from connectors.desktop.base import ActionRejected
from connectors.model_client import ModelClient
from engine.runtime.request import GenerateRequest

BBoxFormat = Literal["xywh", "xyxy", "auto"]
_V1_V2_NAME = re.compile(r"^screenspot_(desktop|mobile|web)(_v2)?\.json$", re.I)
_PRO_KEYS = ("img_size", "ui_type", "application", "group")
_V1_KEYS = ("data_type", "data_source")


class GroundingSample(BaseModel):
    """One instruction on one screenshot; ``bbox`` is ``(x0, y0, x1, y1)`` in image pixels, whatever the file used."""

    index: int = Field(..., description="position in the annotation file")
    image_path: Path
    instruction: str
    bbox: tuple[float, float, float, float]
    data_type: str = "unknown"
    platform: str = Field("unknown", description="v1/v2 data_source, Pro platform")
    split: str = Field("unknown", description="v1/v2 desktop / mobile / web (file name); Pro's group")
    application: str | None = None
    sample_id: str | None = None
    image_size: tuple[int, int] | None = Field(None, description="Pro's img_size, when the file gives it")

    def contains(self, point: tuple[float, float]) -> bool:
        x0, y0, x1, y1 = self.bbox
        return x0 <= point[0] <= x1 and y0 <= point[1] <= y1


def _resolve_format(entries: list[Any], path: Path) -> Literal["xywh", "xyxy"]:
    if _V1_V2_NAME.match(path.name):
        return "xywh"
    dicts = [e for e in entries if isinstance(e, dict)]
    if any(k in e for e in dicts for k in _PRO_KEYS):
        return "xyxy"
    if any(k in e for e in dicts for k in _V1_KEYS):
        return "xywh"
    raise ValueError(f"{path.name}: cannot tell whether bbox is [x, y, w, h] (ScreenSpot v1/v2) or "
                     "[x1, y1, x2, y2] (ScreenSpot-Pro); pass bbox_format='xywh' or 'xyxy'")


def _text(entry: dict, key: str, where: str, required: bool = True) -> str | None:
    value = entry.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key!r} must be a non-empty string, got {value!r}"[:300])
    return value


def _split_of(path: Path) -> str:
    match = _V1_V2_NAME.match(path.name)
    return match.group(1).lower() if match else "unknown"


def _sample(i: int, entry: Any, fmt: str, images: Path, where_file: str, check_images: bool,
            split: str = "unknown") -> GroundingSample:
    where = f"{where_file} entry {i}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    filename = _text(entry, "img_filename", where)
    instruction = _text(entry, "instruction", where)
    bbox = entry.get("bbox")
    if (not isinstance(bbox, list | tuple) or len(bbox) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        raise ValueError(f"{where}: bbox must be 4 finite numbers, got {bbox!r}"[:300])
    a, b, c, d = (float(v) for v in bbox)
    box = (a, b, a + c, b + d) if fmt == "xywh" else (a, b, c, d)
    if box[2] < box[0] or box[3] < box[1] or min(box) < 0:
        raise ValueError(f"{where}: bbox {list(bbox)} is not a valid {fmt} box (negative size or coordinate)")
    size = entry.get("img_size")
    if size is not None:
        if (not isinstance(size, list | tuple) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise ValueError(f"{where}: img_size must be [width, height] in pixels, got {size!r}"[:300])
        size = (int(size[0]), int(size[1]))
    path = (images / filename).resolve()
    if not path.is_relative_to(images.resolve()):
        raise ValueError(f"{where}: img_filename {filename!r} points outside the images directory")
    if check_images and not path.is_file():
        raise ValueError(f"{where}: image {filename!r} not found in {images}")
    sample_id = entry.get("id")
    return GroundingSample(
        index=i, image_path=path, instruction=instruction, bbox=box,
        data_type=str(entry.get("data_type") or entry.get("ui_type") or "unknown"),
        platform=str(entry.get("data_source") or entry.get("platform") or "unknown"),
        application=_text(entry, "application", where, required=False),
        split=str(entry.get("group") or split), sample_id=None if sample_id is None else str(sample_id),
        image_size=size)


def load_screenspot(json_path: str | Path, images_dir: str | Path, bbox_format: BBoxFormat = "auto", *,
                    check_images: bool = False) -> list[GroundingSample]:
    """Read a ScreenSpot v1/v2/Pro annotation file. A malformed entry raises ``ValueError`` naming its index."""
    path = Path(json_path)
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name}: not valid json ({exc})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path.name}: expected a json list of annotations, got {type(entries).__name__}")
    if bbox_format not in ("xywh", "xyxy", "auto"):
        raise ValueError(f"bbox_format must be 'xywh', 'xyxy' or 'auto', got {bbox_format!r}")
    fmt = _resolve_format(entries, path) if bbox_format == "auto" else bbox_format
    images = Path(images_dir)
    split = _split_of(path)
    return [_sample(i, e, fmt, images, path.name, check_images, split) for i, e in enumerate(entries)]


def load_screenspot_dir(annotations: str | Path, images_dir: str | Path, bbox_format: BBoxFormat = "auto", *,
                        check_images: bool = False) -> list[GroundingSample]:
    """Every ``*.json`` annotation file of a folder, in name order (v2's three split files, or ScreenSpot-Pro's
    ``annotations/`` with one file per application), each read with its own format; ``index`` runs across all."""
    files = sorted(Path(annotations).glob("*.json"))
    if not files:
        raise ValueError(f"{annotations}: no .json annotation files")
    samples: list[GroundingSample] = []
    for file in files:
        for sample in load_screenspot(file, images_dir, bbox_format, check_images=check_images):
            samples.append(sample.model_copy(update={"index": len(samples)}))
    return samples


# ----------------------------------------------------------------------------------------------------- locating
class LocateResult(BaseModel):
    status: Literal["ok", "parse_failure", "off_screen", "error"]
    point_px: tuple[int, int] | None = None
    point_model: tuple[float, float] | None = Field(None, description="the point as the model wrote it")
    raw_text: str = ""
    seconds: float = 0.0
    completion_tokens: int | None = None
    error: str | None = None


class ModelLocator:
    """Asks the model for one element with the model card's grounding prompt and reads back a pixel point."""

    def __init__(self, model: ModelClient, max_tokens: int = 64, temperature: float = 0.0,
                 coordinates: CoordinateMode = "auto", max_side: int | None = None) -> None:
        self.model = model
        self.max_side = max_side
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.coordinates = coordinates

    def request(self, image: Image.Image, instruction: str) -> GenerateRequest:
        content = [{"type": "image", "image": image}, {"type": "text", "text": grounding_prompt(instruction)}]
        return GenerateRequest(messages=[{"role": "user", "content": content}], max_tokens=self.max_tokens,
                               temperature=self.temperature)

    def fit(self, image: Image.Image) -> Image.Image:
        """The screenshot as the model gets it: at most ``max_side`` on its long side (None: as it is)."""
        if not self.max_side or max(image.size) <= self.max_side:
            return image
        scale = self.max_side / max(image.size)
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                            Image.Resampling.BICUBIC)

    async def locate(self, image: Image.Image, instruction: str) -> LocateResult:
        """The point in ``image``'s own pixels, whatever size the model saw."""
        started = time.perf_counter()
        shown = await asyncio.to_thread(self.fit, image)
        try:
            reply = await self.model.generate(self.request(shown, instruction))
        except Exception as exc:  # noqa: BLE001 - one failed call is one failed sample, not a failed evaluation
            return LocateResult(status="error", seconds=time.perf_counter() - started,
                                error=f"{type(exc).__name__}: {exc}"[:500])
        seconds = time.perf_counter() - started
        base = dict(raw_text=reply.text, seconds=seconds,
                    completion_tokens=reply.usage.completion_tokens if reply.usage else None)
        point = parse_point(reply.text)
        if point is None:
            return LocateResult(status="parse_failure", **base)
        try:
            px = point_to_screen(point, image_size=shown.size, screen_size=image.size, coordinates=self.coordinates)
        except ActionRejected as exc:
            return LocateResult(status="off_screen", point_model=point, error=str(exc), **base)
        return LocateResult(status="ok", point_px=px, point_model=point, **base)


# ---------------------------------------------------------------------------------------------------- evaluation
SampleStatus = Literal["hit", "miss", "parse_failure", "off_screen", "error"]


class SampleResult(BaseModel):
    index: int
    sample_id: str | None = None
    image: str
    instruction: str
    data_type: str
    platform: str
    split: str = "unknown"
    bbox: tuple[float, float, float, float]
    status: SampleStatus
    point_px: tuple[int, int] | None = None
    point_model: tuple[float, float] | None = None
    raw_text: str = ""
    seconds: float = 0.0
    completion_tokens: int | None = None
    error: str | None = None


class Bucket(BaseModel):
    total: int = 0
    hits: int = 0
    accuracy: float = 0.0


class GroundingReport(BaseModel):
    total: int
    hits: int
    accuracy: float = Field(..., description="hits / total; parse failures, off-screen points and errors are wrong")
    misses: int
    parse_failures: int
    off_screen: int
    errors: int
    by_data_type: dict[str, Bucket]
    by_platform: dict[str, Bucket]
    by_split: dict[str, Bucket] = Field(default_factory=dict)
    by_split_and_type: dict[str, Bucket] = Field(default_factory=dict, description='"mobile/text", "web/icon"...')
    latency_mean_s: float | None = Field(None, description="per model call, over samples the model answered")
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    mean_completion_tokens: float | None = Field(None, description="latency grows with the reply's length")
    wall_s: float = 0.0
    concurrency: int = 1
    results: list[SampleResult] = Field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-sample list (what the bench prints)."""
        return self.model_dump(exclude={"results"})


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _buckets(results: list[SampleResult], key: str) -> dict[str, Bucket]:
    out: dict[str, Bucket] = {}
    for r in results:
        name = f"{r.split}/{r.data_type}" if key == "split_and_type" else getattr(r, key)
        bucket = out.setdefault(name, Bucket())
        bucket.total += 1
        bucket.hits += r.status == "hit"
    for bucket in out.values():
        bucket.accuracy = bucket.hits / bucket.total
    return dict(sorted(out.items()))


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


async def _score(sample: GroundingSample, locator: ModelLocator, gate: asyncio.Semaphore) -> SampleResult:
    base = dict(index=sample.index, sample_id=sample.sample_id, image=sample.image_path.name,
                instruction=sample.instruction, data_type=sample.data_type, platform=sample.platform,
                split=sample.split, bbox=sample.bbox)
    async with gate:
        try:
            image = await asyncio.to_thread(_open_rgb, sample.image_path)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return SampleResult(**base, status="error", error=f"image: {type(exc).__name__}: {exc}"[:500])
        found = await locator.locate(image, sample.instruction)
    if found.status == "ok":
        status: SampleStatus = "hit" if sample.contains(found.point_px) else "miss"
    else:
        status = found.status  # type: ignore[assignment]
    return SampleResult(**base, status=status, point_px=found.point_px, point_model=found.point_model,
                        raw_text=found.raw_text, seconds=found.seconds, completion_tokens=found.completion_tokens,
                        error=found.error)


async def evaluate(samples: Sequence[GroundingSample], locator: ModelLocator, concurrency: int = 4) -> GroundingReport:
    """Run every sample (``concurrency`` model calls in flight) and score it."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    gate = asyncio.Semaphore(concurrency)
    started = time.perf_counter()
    results = list(await asyncio.gather(*(_score(s, locator, gate) for s in samples)))
    wall = time.perf_counter() - started
    count = {s: sum(r.status == s for r in results) for s in ("hit", "miss", "parse_failure", "off_screen", "error")}
    latencies = [r.seconds for r in results if r.status != "error"]
    tokens = [r.completion_tokens for r in results if r.completion_tokens is not None]
    total = len(results)
    return GroundingReport(
        total=total, hits=count["hit"], accuracy=count["hit"] / total if total else 0.0, misses=count["miss"],
        parse_failures=count["parse_failure"], off_screen=count["off_screen"], errors=count["error"],
        by_data_type=_buckets(results, "data_type"), by_platform=_buckets(results, "platform"),
        by_split=_buckets(results, "split"), by_split_and_type=_buckets(results, "split_and_type"),
        latency_mean_s=sum(latencies) / len(latencies) if latencies else None,
        latency_p50_s=_percentile(latencies, 0.5), latency_p95_s=_percentile(latencies, 0.95),
        mean_completion_tokens=sum(tokens) / len(tokens) if tokens else None,
        wall_s=wall, concurrency=concurrency, results=results)
