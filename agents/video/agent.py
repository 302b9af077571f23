"""The ``video_analysis`` agent: decode + sample frames (uniform, scene changes, or both) with timestamps ->
windows of frames that fit the model's context (the planner prices each frame) -> one guided call per window
(observations with mm:ss times, clamped to the frames the window saw) -> a merged timeline -> the answer (a final
call over the timeline, with citations checked against it), moments as time ranges, or events; plus a
contact-sheet PNG of the key moments. Window results persist in child sessions, so a restarted task resumes.

Kimi-VL has no official video path (spec §4.3): frames go in as images, each preceded by its "[mm:ss]" label.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from agents.base import Agent, AgentContext, AgentError, InputRejected, SubmissionCheck
from agents.registry import register_agent
from agents.sources import file_kind, load_source, source_head
from agents.video import prompts
from agents.video.inputs import VideoInput
from agents.video.timeline import check_citations, merge_timeline, moments, timeline_text, window_observations


def _decode(data: bytes, input: VideoInput) -> tuple[Any, list[Any]]:
    from pipelines.video.decode import probe
    from pipelines.video.sample import sample_frames

    info = probe(data)
    if info.duration_s and info.duration_s > input.max_seconds:
        from pipelines.video.decode import VideoError

        raise VideoError(f"the video is {info.duration_s:.0f} s long, over the limit of {input.max_seconds:.0f} s",
                         "too_long")
    frames = sample_frames(data, budget=input.max_frames, strategy=input.strategy, max_side=input.max_side)
    return info, frames


def plan_windows(frames: list[Any], input: VideoInput, resources: Any) -> list[Any]:
    from pipelines.context import ContextBudget, ContextPlanner, Piece
    from pipelines.video.sample import format_ts

    counter = resources.counter
    prefix = [{"role": "system", "content": prompts.window_prompt(input)}]
    per_frame = max((counter.count_image(*f.image.size) for f in frames), default=1) + 8  # image + its label
    context = resources.context_window
    if input.frames_per_window is not None:
        fixed = counter.count_messages([*prefix, {"role": "user", "content": ""}])
        context = min(context, fixed + per_frame * input.frames_per_window + input.max_output_tokens)
    planner = ContextPlanner(counter, ContextBudget(context_window=context, output_reserve=input.max_output_tokens))
    pieces = [Piece(id=f"f{i}", kind="image", image=f.image, label=f"[{format_ts(f.t)}]", boundary=1,
                    meta={"t": round(f.t, 3)}) for i, f in enumerate(frames)]
    return planner.plan(pieces, prefix_messages=prefix, overlap_tokens=per_frame * input.overlap_frames)


@register_agent
class VideoAnalysisAgent(Agent):
    type = "video_analysis"
    Input = VideoInput

    @classmethod
    async def check_submission(cls, input: VideoInput, check: SubmissionCheck) -> None:
        """A file or blob that is surely no video (a PDF, an image, an Office document) is refused at the door;
        anything else goes to the decoder, which knows far more containers than a magic-number list."""
        got = await source_head(check, input.file, input.blob)
        if got is not None and (kind := file_kind(got[0])) not in (None, "empty"):
            raise InputRejected(f"expected a video file; this file is {kind}", got[1])
    description = ("Videos -> summary, answers with mm:ss citations, moments as time ranges, or schema-shaped "
                   "events; timeline JSON and a contact sheet of the key moments.")

    async def run(self, ctx: AgentContext, input: VideoInput) -> dict[str, Any]:
        from pipelines.map_reduce import map_reduce
        from pipelines.video.decode import VideoError
        from pipelines.video.sample import format_ts, parse_ts

        await ctx.step("load")
        data, name = await load_source(ctx, input.file, input.url, input.blob, max_bytes=2 * 2**30,
                                       what="video", default_name="video.mp4")
        await ctx.step("sample", bytes=len(data))
        try:
            info, frames = await asyncio.to_thread(_decode, data, input)
        except VideoError as exc:
            raise AgentError(str(exc), code=exc.code) from None
        if not frames:
            raise AgentError("no frame could be decoded from the video", code="empty")
        duration = float(info.duration_s or frames[-1].t)
        times = [f.t for f in frames]
        # the largest spacing of the sampled frames: how far one frame "sees" (window ends, moment joins)
        gap = max([b - a for a, b in zip(times, times[1:])] + [duration - times[-1], duration / len(frames)])
        await ctx.emit("video", {"duration_s": duration, "width": info.width, "height": info.height,
                                 "frames_sampled": len(frames), "codec": info.codec})
        await ctx.step("plan")
        windows = await asyncio.to_thread(plan_windows, frames, input, ctx.resources)
        await ctx.emit("planned", {"windows": len(windows), "frames": len(frames)})
        schema = prompts.window_schema(input)

        async def map_fn(chunk: Any, child_session_id: str) -> dict[str, Any]:
            times = [p.meta["t"] for p in chunk.pieces]
            reply = await ctx.chat(chunk.messages(), json_schema=schema, max_tokens=input.max_output_tokens,
                                   temperature=0.0)
            try:
                raw = json.loads(reply.text).get("observations", [])
            except (ValueError, AttributeError):
                raw = []
            span = (min(times), max(times) + gap)
            return {"span": span, "observations": [o.model_dump() for o in
                                                   window_observations(raw, chunk.index, span, parse_ts)],
                    "complete": reply.finish_reason == "stop",
                    "tokens": (reply.usage.prompt_tokens + reply.usage.completion_tokens) if reply.usage else 0}

        async def on_done(index: int, total: int, reused: bool) -> None:
            await ctx.progress(index + 1, total, f"window {index + 1}/{total}{' (reused)' if reused else ''}")

        outcome = await map_reduce(ctx.sessions, ctx.owner, f"{ctx.session_id}.windows", windows, map_fn,
                                   lambda results: results, on_chunk_done=on_done,
                                   should_stop=lambda: ctx.cancel_requested)
        from agents.video.timeline import Observation

        observations = [Observation.model_validate(o) for r in outcome.result for o in r["observations"]]
        timeline = merge_timeline(observations)
        await ctx.step("answer", timeline=len(timeline))
        result: dict[str, Any] = {
            "kind": input.kind, "question": input.question, "duration_s": duration,
            "frames_sampled": len(frames), "windows": len(windows),
            "timeline": [{**o.model_dump(exclude={"window"}), "start_ts": format_ts(o.start),
                          "end_ts": format_ts(o.end)} for o in timeline],
            "warnings": [f"window {i}: output not complete JSON" for i, r in enumerate(outcome.result)
                         if not r["complete"]],
        }
        key_times: list[tuple[float, str]] = [(o.start, o.description) for o in timeline]
        if input.kind in ("summarize", "question"):
            answer, citations = await self._answer(ctx, input, timeline, duration, gap)
            result["answer"], result["citations"] = answer, [
                {**c.model_dump(), "ts": format_ts(c.time)} for c in citations]
            if any(c.supported for c in citations):
                key_times = [(c.time, c.claim) for c in citations if c.supported]
        elif input.kind == "moments":
            found = moments(timeline, gap)
            result["moments"] = [{**m.model_dump(), "range": f"{format_ts(m.start)}-{format_ts(m.end)}"}
                                 for m in found]
            key_times = [(m.start, m.descriptions[0]) for m in found] or key_times
        else:
            result["events"] = [{"start": o.start, "end": o.end, "start_ts": format_ts(o.start),
                                 "end_ts": format_ts(o.end), "event": o.event, "description": o.description}
                                for o in timeline if o.event is not None]
        await ctx.step("outputs")
        sheet, cells = await asyncio.to_thread(_contact_sheet, frames, key_times)
        ref = await ctx.blobs.put(ctx.owner, sheet, "image/png")
        result["artifacts"] = {"contact_sheet": {**ref.model_dump(), "filename": name.rsplit(".", 1)[0] +
                                                 ".contact-sheet.png", "frames": cells}}
        memory = ctx.resources.fit_lines(f"Video {name!r}, {format_ts(duration)} long. Timeline of what was seen:\n"
                                         + timeline_text(timeline, format_ts), keep_head=1)
        await ctx.remember([{"role": "system", "content": memory}])
        result["session_id"] = ctx.session_id
        return result

    async def _answer(self, ctx: AgentContext, input: VideoInput, timeline: list[Any], duration: float,
                      gap: float) -> tuple[str, list[Any]]:
        from pipelines.context import ContextBudget, ContextPlanner
        from pipelines.video.sample import format_ts, parse_ts

        planner = ContextPlanner(ctx.resources.counter, ContextBudget(
            context_window=ctx.resources.context_window, output_reserve=input.max_output_tokens))
        entries = list(timeline)
        while True:  # a timeline too long for one call is thinned evenly (every other entry) until it fits
            messages = [{"role": "system", "content": prompts.answer_prompt(input)},
                        {"role": "user", "content": timeline_text(entries, format_ts) or "(no observations)"}]
            if planner.fits(messages, input.max_output_tokens) or len(entries) <= 1:
                break
            entries = entries[::2]
        reply = await ctx.chat(messages, json_schema=prompts.answer_schema(input),
                               max_tokens=input.max_output_tokens, temperature=0.0)
        try:
            body = json.loads(reply.text)
        except ValueError:
            return reply.text, []
        return str(body.get("answer", "")), check_citations(body.get("citations", []), timeline, duration, gap,
                                                            parse_ts)


def _contact_sheet(frames: list[Any], key_times: list[tuple[float, str]],
                   limit: int = 12) -> tuple[bytes, list[dict[str, Any]]]:
    """The sheet's PNG and where each of its frames is (``{"t", "box": [x0, y0, x1, y1]}`` in sheet pixels), so a
    viewer can show the frame nearest a cited time."""
    from pipelines.video.contact_sheet import contact_sheet, sheet_cells

    chosen: list[tuple[float, Any, str | None]] = []
    for t, caption in sorted(key_times)[:limit] or [(f.t, None) for f in frames[:limit]]:
        nearest = min(frames, key=lambda f: abs(f.t - t))
        chosen.append((nearest.t, nearest.image, (caption or "")[:60] or None))
    cells = [{"t": t, "box": list(box)} for (t, _, _), box in zip(chosen, sheet_cells(chosen))]
    return contact_sheet(chosen), cells
