"""Video-MME-style multiple-choice evaluation of the video agent through the task API.

Data: rows with ``video_id``, ``question_id``, ``question``, ``options`` (four strings, ``"A. ..."`` to
``"D. ..."``) and ``answer`` (a letter), plus optional ``duration`` (short / medium / long), ``domain``,
``task_type`` and ``videoID`` — the fields of lmms-lab/Video-MME (``videomme/test-*.parquet``, 2,700 questions
on 900 videos). Read from ``.jsonl`` / ``.json`` or ``.parquet`` (needs ``pip install pyarrow``). The video of a
row is ``<videos>/<videoID>.mp4`` (Video-MME's files are named by YouTube id), else ``<videos>/<video_id>.mp4``
(any of mp4/mkv/webm/mov).

Each video is uploaded once; each question is one ``video_analysis`` task (``kind: question``, the options in
the question, "answer with the letter"), run in-process (``--checkpoint``; default the tiny random checkpoint,
which proves the path end to end and scores noise) or on a running server (``--url``). The chosen letter is the
first standalone A-D of the answer (or the option whose text the answer contains); accuracy is reported overall,
per duration and per task type, with unanswered questions counted wrong.

Reproducing Kimi-VL's published Video-MME figure (Kimi-VL-A3B-Instruct: 67.8 without subtitles, 72.6 with;
tech report Table 3): serve the real checkpoint, download Video-MME's parquet and videos, then
  python bench/video_mme.py --data videomme/test-00000-of-00001.parquet --videos data/ --url URL --api-key KEY \\
      --option max_frames=64 --option strategy=uniform --option dense_frames=0 --json videomme.json
Moonshot did not publish their frame count, resolution or prompt (spec §4.3), and our agent answers from a
timeline of observations rather than from the frames in one call, so expect a gap; ``--option`` lets you sweep.

Usage: python bench/video_mme.py --data FILE --videos DIR [--limit N] [--checkpoint PATH | --url URL]
                                 [--option KEY=JSON ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LETTERS = "ABCD"
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".mov")
KIMI_VL_PUBLISHED = {"without_subtitles": 67.8, "with_subtitles": 72.6}


class McqItem(BaseModel):
    """One multiple-choice question about one video (Video-MME's row format)."""

    video_id: str
    question_id: str
    question: str = Field(min_length=1)
    options: list[str] = Field(min_length=2, max_length=4)
    answer: Literal["A", "B", "C", "D"]
    duration: str | None = None
    domain: str | None = None
    task_type: str | None = None
    videoID: str | None = None  # noqa: N815 - Video-MME's field name (YouTube id, names the video file)

    @field_validator("options", mode="before")
    @classmethod
    def _lettered(cls, value: Any) -> Any:
        """Options without a letter get one: ``["x", "y"]`` -> ``["A. x", "B. y"]``."""
        if isinstance(value, list):
            return [o if re.match(r"^[A-D][.)]\s", str(o)) else f"{LETTERS[i]}. {o}" for i, o in enumerate(value)]
        return value


def load_items(path: Path) -> list[McqItem]:
    """Rows from ``.jsonl``, ``.json`` (a list) or ``.parquet``."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("reading parquet needs pyarrow (pip install pyarrow), or convert to jsonl") from None
        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        rows = json.loads(path.read_text())
    return [McqItem.model_validate(r) for r in rows]


def find_video(videos: Path, item: McqItem) -> Path | None:
    for stem in filter(None, (item.videoID, item.video_id)):
        for ext in VIDEO_EXTS:
            if (videos / f"{stem}{ext}").exists():
                return videos / f"{stem}{ext}"
    return None


def mcq_question(item: McqItem) -> str:
    """The question as the agent gets it: question, options one per line, the answer format."""
    return (f"{item.question}\n" + "\n".join(item.options) +
            "\nAnswer with the option's letter (A, B, C or D) first, then a short reason.")


def parse_choice(text: str | None, options: list[str]) -> str | None:
    """The letter an answer picks: "The answer is B", "B.", "(C) ...", or the one option whose text it quotes."""
    if not text:
        return None
    m = re.search(r"\b(?i:answer|option)\s*(?:is|:)?\s*\(?([A-D])\b", text)  # the letter itself: upper case
    if m:
        return m.group(1).upper()
    m = re.search(r"(?:^|[\s(\[])([A-D])(?:[.):\]]|\s|$)", text)
    if m:
        return m.group(1)
    lowered = text.casefold()
    hits = [LETTERS[i] for i, o in enumerate(options)
            if (body := re.sub(r"^[A-D][.)]\s*", "", o).strip().rstrip(".").casefold())
            and re.search(rf"\b{re.escape(body)}\b", lowered)]
    return hits[0] if len(hits) == 1 else None


def score(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (%) overall, per duration and per task type; ``records`` have ``answer``, ``choice``,
    ``duration``, ``task_type`` (a missing choice or a failed task counts wrong)."""
    records = list(records)

    def acc(rows: list[dict[str, Any]]) -> dict[str, Any]:
        right = sum(r["choice"] == r["answer"] for r in rows)
        return {"n": len(rows), "correct": right, "accuracy": round(100 * right / len(rows), 2) if rows else 0.0}

    by: dict[str, dict[str, list[dict[str, Any]]]] = {"duration": defaultdict(list), "task_type": defaultdict(list)}
    for r in records:
        for key in by:
            if r.get(key):
                by[key][r[key]].append(r)
    return {**acc(records), "unanswered": sum(r["choice"] is None for r in records),
            "by_duration": {k: acc(v) for k, v in sorted(by["duration"].items())},
            "by_task_type": {k: acc(v) for k, v in sorted(by["task_type"].items())}}


def evaluate(items: list[McqItem], videos: Path, submit: Callable[[bytes, dict[str, Any]], Any],
             options: dict[str, Any]) -> dict[str, Any]:
    """Run every question whose video exists through ``submit(video_bytes, input) -> finished Task`` and score.
    Questions without a video are listed, not scored."""
    records, missing = [], []
    for item in items:
        path = find_video(videos, item)
        if path is None:
            missing.append(item.question_id)
            continue
        task = submit(path.read_bytes(), {"kind": "question", "question": mcq_question(item), **options})
        answer = task.result.get("answer") if task.status == "succeeded" and task.result else None
        records.append({"question_id": item.question_id, "video_id": item.video_id, "duration": item.duration,
                        "task_type": item.task_type, "answer": item.answer, "status": task.status,
                        "choice": parse_choice(answer, item.options), "response": answer})
    return {"score": score(records), "missing_videos": missing, "records": records,
            "published_kimi_vl_a3b_instruct": KIMI_VL_PUBLISHED}


def _runner(url: str | None, api_key: str | None, checkpoint: str | None, tmp: str) -> tuple[Any, Callable]:
    """A context manager (client or in-process runtime) and ``submit(bytes, input) -> finished Task``."""
    import kimiray

    if url:
        client = kimiray.Client(url, api_key=api_key)
        uploaded: dict[int, str] = {}

        def remote(data: bytes, input: dict[str, Any]) -> Any:
            key = hash(data)
            if key not in uploaded:  # each video is uploaded once, then referenced by its blob id
                uploaded[key] = client.upload_file(data, content_type="video/mp4")
            task = client.submit("video_analysis", {"blob": uploaded[key], **input})
            return client.wait(task.id, timeout=7200, raise_on_failure=False)

        return client, remote
    model = checkpoint
    if model is None:
        from engine.tiny import write_tiny_checkpoint

        model = str(write_tiny_checkpoint(Path(tmp) / "tiny", seed=0))
    runtime = kimiray.LocalRuntime(model, stores_url=f"sqlite:///{tmp}/stores")

    def local(data: bytes, input: dict[str, Any]) -> Any:
        task = runtime.submit("video_analysis", {"file": {"name": "video.mp4",
                                                          "data": base64.b64encode(data).decode()}, **input})
        return runtime.wait(task.id, timeout=7200, raise_on_failure=False)

    return runtime, local


def run(data: Path, videos: Path, *, limit: int | None = None, url: str | None = None, api_key: str | None = None,
        checkpoint: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    items = load_items(data)[:limit]
    with tempfile.TemporaryDirectory() as tmp:
        handle, submit = _runner(url, api_key, checkpoint, tmp)
        with handle:
            return evaluate(items, videos, submit, options or {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="Video-MME rows: .parquet, .jsonl or .json")
    parser.add_argument("--videos", type=Path, required=True, help="directory of <videoID>.mp4 files")
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--checkpoint", help="in-process model (default: the tiny random checkpoint)")
    parser.add_argument("--url", help="a running kimiray server instead of an in-process engine")
    parser.add_argument("--api-key", default=os.environ.get("KIMIRAY_API_KEY"))
    parser.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                        help="video_analysis input, e.g. max_frames=64 (value parsed as JSON, else a string)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options: dict[str, Any] = {}
    for raw in args.option:
        key, _, value = raw.partition("=")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    out = run(args.data, args.videos, limit=args.limit, url=args.url, api_key=args.api_key,
              checkpoint=args.checkpoint, options=options)
    print(json.dumps(out["score"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
