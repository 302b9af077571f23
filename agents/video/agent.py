"""The ``video_analysis`` agent: decode + sample frames (uniform, scene changes, or both) with timestamps ->
windows of frames that fit the model's context (the planner prices each frame) -> one guided call per window
(observations with mm:ss times, clamped to the frames the window saw) -> a merged timeline -> the answer (a final
call over the timeline, with citations checked against it), moments as time ranges, or events; plus a
contact-sheet PNG of the key moments. Window results persist in child sessions, so a restarted task resumes.

``question`` and ``moments`` take a second look: the coarse pass (the whole video, ``max_frames``) points to
segments (relevant observations, times the coarse answer cited), which are sampled densely (``dense_frames``,
within ``max_total_tokens``) and observed; the answer comes from both passes and moments are refined to the dense
spacing (``resolution_s``). Each pass is reported in ``passes`` and ``pass`` events; both are resumable (window
results in child sessions ``.windows`` / ``.dense``, answer calls in partials).

Kimi-VL has no official video path (spec §4.3): frames go in as images, each preceded by its "[mm:ss]" label.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from agents.base import Agent, AgentContext, AgentError, InputRejected, SubmissionCheck
from agents.registry import register_agent
from agents.sources import file_kind, load_source, source_head
from agents.video import prompts
from agents.video.inputs import VideoInput
from agents.video.timeline import check_citations, merge_timeline, moments, timeline_text, window_observations


FETCH_CHUNK = 16  # frames fetched per decoder call: progress (with the time position) is reported between calls


def _plan_coarse(data: bytes, input: VideoInput) -> tuple[Any, list[float], str]:
    """Metadata and the coarse pass's sample times (no full-size frame decoded yet), and the strategy used:
    past ``DEFAULT_DETECT_MAX_S`` scene detection (which decodes every frame) gives way to uniform seeking."""
    from pipelines.video.decode import VideoError, probe
    from pipelines.video.sample import DEFAULT_DETECT_MAX_S, plan_times, scene_cuts

    info = probe(data)
    if info.duration_s and info.duration_s > input.max_seconds:
        raise VideoError(f"the video is {info.duration_s:.0f} s long, over the limit of {input.max_seconds:.0f} s",
                         "too_long")
    strategy = input.strategy
    cuts: list[Any] = []
    if strategy != "uniform" and info.duration_s > DEFAULT_DETECT_MAX_S:
        strategy = "uniform"
    elif strategy != "uniform":
        cuts = scene_cuts(data)
    return info, plan_times(info.duration_s, cuts, input.max_frames, strategy=strategy), strategy


async def _fetch(ctx: AgentContext, data: bytes, times: list[float], input: VideoInput, stats: Any, name: str,
                 duration: float) -> list[Any]:
    """The frames at ``times``, fetched (seeking) in chunks, with a ``sampling`` event carrying the time position
    after each chunk, so a two-hour video shows where it is."""
    from pipelines.video.sample import fetch_frames

    frames: list[Any] = []
    seen: set[int] = set()
    ordered = sorted(times)
    for k in range(0, len(ordered), FETCH_CHUNK):
        ctx.check_cancelled()
        chunk = ordered[k:k + FETCH_CHUNK]
        got = await asyncio.to_thread(fetch_frames, data, chunk, max_side=input.max_side,
                                      max_seconds=input.max_seconds, stats=stats)
        for frame in got:
            if frame.index not in seen:
                seen.add(frame.index)
                frames.append(frame)
        await ctx.emit("sampling", {"pass": name, "position_s": round(chunk[-1], 3), "duration_s": duration,
                                    "frames": len(frames), "decoded": stats.decoded, "seeks": stats.seeks})
    return sorted(frames, key=lambda f: f.t)


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
        from agents.video.timeline import Observation
        from pipelines.video.decode import DecodeStats, VideoError
        from pipelines.video.sample import format_ts

        await ctx.step("load")
        data, name = await load_source(ctx, input.file, input.url, input.blob, max_bytes=2 * 2**30,
                                       what="video", default_name="video.mp4")
        await ctx.step("sample", bytes=len(data))
        stats = DecodeStats()
        started = time.perf_counter()
        try:
            info, times, strategy = await asyncio.to_thread(_plan_coarse, data, input)
            duration = float(info.duration_s)
            frames = await _fetch(ctx, data, times, input, stats, "coarse", duration)
        except VideoError as exc:
            raise AgentError(str(exc), code=exc.code) from None
        if not frames:
            raise AgentError("no frame could be decoded from the video", code="empty")
        sample_s = time.perf_counter() - started
        duration = duration or frames[-1].t
        times = [f.t for f in frames]
        # the largest spacing of the sampled frames: how far one frame "sees" (window ends, moment joins)
        gap = max([b - a for a, b in zip(times, times[1:])] + [duration - times[-1], duration / len(frames)])
        await ctx.emit("video", {"duration_s": duration, "width": info.width, "height": info.height,
                                 "frames_sampled": len(frames), "codec": info.codec})
        await ctx.step("plan")
        windows = await asyncio.to_thread(plan_windows, frames, input, ctx.resources)
        await ctx.emit("planned", {"windows": len(windows), "frames": len(frames)})
        await ctx.emit("pass", {"name": "coarse", "status": "started", "frames": len(frames),
                                "windows": len(windows), "resolution_s": round(gap, 3)})
        coarse = await self._observe(ctx, input, windows, gap, f"{ctx.session_id}.windows", "window")
        observations = [Observation.model_validate(o) for r in coarse for o in r["observations"]]
        timeline = merge_timeline(observations)
        warnings = [f"window {i}: output not complete JSON" for i, r in enumerate(coarse) if not r["complete"]]
        if strategy != input.strategy:
            warnings.append(f"scene detection skipped (the video is longer than {format_ts(_detect_max_s())}): "
                            "the coarse pass samples uniformly by seeking")
        tokens = sum(r["tokens"] for r in coarse)
        passes: list[dict[str, Any]] = [{
            "name": "coarse", "span": [0.0, duration], "strategy": strategy, "frames": len(frames),
            "windows": len(windows), "model_calls": len(windows), "tokens": tokens, "resolution_s": round(gap, 3),
            "decoded_frames": stats.decoded, "seeks": stats.seeks, "sample_s": round(sample_s, 3)}]
        await ctx.emit("pass", {**passes[0], "status": "done"})

        answer, citations = None, []
        if input.kind == "question":
            answer, citations = await self._answer_once(ctx, input, timeline, duration, gap, "coarse_answer")
        all_frames, dense_obs = frames, []
        first_segments: list[Any] = []
        edges: list[Any] = []
        if input.kind in ("question", "moments"):
            looks = await self._look_again(ctx, input, data, timeline, citations, gap, duration, info.fps,
                                           tokens, frames, passes, warnings)
            all_frames, dense_obs, first_segments, edges = looks
        if dense_obs:
            timeline = merge_timeline(observations + dense_obs)
        await ctx.step("answer", timeline=len(timeline))
        result: dict[str, Any] = {
            "kind": input.kind, "question": input.question, "duration_s": duration,
            "frames_sampled": len(all_frames), "windows": sum(p.get("windows", 0) for p in passes),
            "passes": passes,
            "timeline": [{**o.model_dump(exclude={"window"}), "start_ts": format_ts(o.start),
                          "end_ts": format_ts(o.end)} for o in timeline],
            "warnings": warnings,
        }
        key_times: list[tuple[float, str]] = [(o.start, o.description) for o in timeline]
        if input.kind in ("summarize", "question"):
            if input.kind == "summarize" or dense_obs:  # a question is answered again from both passes
                answer, citations = await self._answer_once(ctx, input, timeline, duration, gap, "answer")
            result["answer"], result["citations"] = answer, [
                {**c.model_dump(), "ts": format_ts(c.time)} for c in citations]
            if any(c.supported for c in citations):
                key_times = [(c.time, c.claim) for c in citations if c.supported]
        elif input.kind == "moments":
            from agents.video.second_look import refine_moments

            coarse_moments = moments(merge_timeline(observations), gap)
            found = refine_moments(coarse_moments, timeline if dense_obs else [], first_segments, edges, gap)
            result["moments"] = [{**m.model_dump(), "range": f"{format_ts(m.start)}-{format_ts(m.end)}"}
                                 for m in found]
            key_times = [(m.start, m.descriptions[0]) for m in found] or key_times
        else:
            result["events"] = [{"start": o.start, "end": o.end, "start_ts": format_ts(o.start),
                                 "end_ts": format_ts(o.end), "event": o.event, "description": o.description}
                                for o in timeline if o.event is not None]
        await ctx.step("outputs")
        sheet, cells = await asyncio.to_thread(_contact_sheet, all_frames, key_times)
        ref = await ctx.blobs.put(ctx.owner, sheet, "image/png")
        result["artifacts"] = {"contact_sheet": {**ref.model_dump(), "filename": name.rsplit(".", 1)[0] +
                                                 ".contact-sheet.png", "frames": cells}}
        memory = ctx.resources.fit_lines(f"Video {name!r}, {format_ts(duration)} long. Timeline of what was seen:\n"
                                         + timeline_text(timeline, format_ts), keep_head=1)
        await ctx.remember([{"role": "system", "content": memory}])
        result["session_id"] = ctx.session_id
        return result

    async def _observe(self, ctx: AgentContext, input: VideoInput, windows: list[Any], gap: float, key: str,
                       label: str) -> list[dict[str, Any]]:
        """One guided call per window, each result kept in a child session of ``key`` (a rerun reuses them)."""
        from pipelines.map_reduce import map_reduce
        from pipelines.video.sample import parse_ts

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
            await ctx.progress(index + 1, total, f"{label} {index + 1}/{total}{' (reused)' if reused else ''}")

        outcome = await map_reduce(ctx.sessions, ctx.owner, key, windows, map_fn, lambda results: results,
                                   on_chunk_done=on_done, should_stop=lambda: ctx.cancel_requested)
        return list(outcome.result)

    async def _look_again(self, ctx: AgentContext, input: VideoInput, data: bytes, timeline: list[Any],
                          citations: list[Any], gap: float, duration: float, fps: float | None, tokens: int,
                          frames: list[Any], passes: list[dict[str, Any]],
                          warnings: list[str]) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        """Coarse to fine: up to ``max_passes - 1`` looks, the first where the coarse pass points, each later one
        around the edges of what the previous found (or its relevant frames), until frames are 1 s apart.
        Returns (all frames, observations of the looks, the first look's segments with their resolution, every
        look's segments with their resolution)."""
        from agents.video.second_look import edge_segments
        from agents.video.timeline import merge_timeline

        all_frames, found_obs = list(frames), []
        first: list[Any] = []
        edges: list[Any] = []
        current, current_gap, segments = timeline, gap, None
        for look in range(1, input.max_passes):
            used = sum(p.get("tokens", 0) for p in passes)
            got = await self._second_look(ctx, input, data, current, citations if look == 1 else [], current_gap,
                                          duration, fps, used, all_frames, passes, warnings, look, segments)
            if got is None:
                break
            new_frames, obs, with_res = got
            all_frames = sorted(all_frames + new_frames, key=lambda f: f.t)
            found_obs += obs
            first = first or with_res
            edges += with_res
            current_gap = max(r for _, r in with_res)
            if current_gap < 2.0:  # frames are already (nearly) 1 s apart, the finest "mm:ss" labels can tell
                break
            merged = merge_timeline(found_obs)
            segments = edge_segments(merged, input.kind, current_gap, duration, input.max_segments, with_res)
            current = merged
            if not segments:
                break
        return all_frames, found_obs, first, edges

    async def _second_look(self, ctx: AgentContext, input: VideoInput, data: bytes, timeline: list[Any],
                           citations: list[Any], gap: float, duration: float, fps: float | None,
                           tokens_used: int, coarse_frames: list[Any], passes: list[dict[str, Any]],
                           warnings: list[str], look: int = 1,
                           segments: list[Any] | None = None) -> tuple[list[Any], list[Any], list[Any]] | None:
        """Sample densely where the previous pass points (relevant observations, cited times; or ``segments``),
        within the frame and token budgets, and observe those frames. Returns (the new frames, their
        observations, segments with their resolution), or None when there is nothing to look at again (the pass
        report says why). ``coarse_frames``: every frame sampled so far (not sampled again)."""
        from agents.video.second_look import pick_segments
        from agents.video.timeline import Observation
        from pipelines.video.decode import DecodeStats, VideoError
        from pipelines.video.sample import TimeRange, dense_times, format_ts

        name = "dense" if look == 1 else f"dense{look}"
        report: dict[str, Any] = {"name": name}
        budget = input.dense_frames
        if input.max_total_tokens is not None and coarse_frames:
            per_frame = max(1, tokens_used // max(1, len(coarse_frames)))  # what a coarse frame cost, all in
            budget = min(budget, max(0, (input.max_total_tokens - tokens_used - 2 * input.max_output_tokens))
                         // per_frame)
        if segments is None:
            segments = pick_segments(timeline, [c.time for c in citations if c.supported], gap, duration,
                                     input.max_segments)
        if input.dense_frames == 0:
            report["skipped"] = "dense_frames is 0"
        elif not segments:
            report["skipped"] = "the previous pass found nothing the question points to"
        elif budget <= 0:
            report["skipped"] = "no token budget left after the coarse pass"
        if "skipped" in report:
            passes.append(report)
            await ctx.emit("pass", {**report, "status": "skipped"})
            return None
        plan = dense_times([TimeRange(start=s.start, end=s.end) for s in segments], budget, fps=fps,
                           exclude=[f.t for f in coarse_frames])
        times = [t for _, ts, _ in plan for t in ts]
        report["segments"] = [{"start": round(s.start, 3), "end": round(s.end, 3), "range": f"{format_ts(s.start)}"
                               f"-{format_ts(s.end)}", "why": s.why, "frames": len(ts), "resolution_s": round(r, 3)}
                              for s, (_, ts, r) in zip(segments, plan)]
        await ctx.emit("pass", {**report, "status": "started"})
        stats = DecodeStats()
        started = time.perf_counter()
        try:
            dense_frames = await _fetch(ctx, data, times, input, stats, name, duration)
        except VideoError as exc:
            raise AgentError(str(exc), code=exc.code) from None
        sample_s = time.perf_counter() - started
        coarse_index = {f.index for f in coarse_frames}
        dense_frames = [f for f in dense_frames if f.index not in coarse_index]
        if not dense_frames:
            report["skipped"] = "every planned frame was sampled already"
            passes.append(report)
            await ctx.emit("pass", {**report, "status": "skipped"})
            return None
        resolution = max((r for _, _, r in plan), default=gap)
        windows = await asyncio.to_thread(plan_windows, dense_frames, input, ctx.resources)
        results = await self._observe(ctx, input, windows, resolution, f"{ctx.session_id}.{name}", f"{name} window")
        observations = [Observation.model_validate(o) for r in results for o in r["observations"]]
        for k, r in enumerate(results):
            if not r["complete"]:
                warnings.append(f"{name} window {k}: output not complete JSON")
        report.update({"frames": len(dense_frames), "windows": len(windows), "model_calls": len(windows),
                       "tokens": sum(r["tokens"] for r in results), "resolution_s": round(resolution, 3),
                       "decoded_frames": stats.decoded, "seeks": stats.seeks, "sample_s": round(sample_s, 3)})
        passes.append(report)
        await ctx.emit("pass", {**report, "status": "done"})
        return dense_frames, observations, [(s, r) for s, (_, _, r) in zip(segments, plan)]

    async def _answer_once(self, ctx: AgentContext, input: VideoInput, timeline: list[Any], duration: float,
                           gap: float, key: str) -> tuple[str, list[Any]]:
        """The answer call, kept as a partial under ``key`` so a resumed task does not ask again."""
        from agents.video.timeline import AnswerCitation

        saved = await ctx.load_partial(key)
        if isinstance(saved, dict) and saved.get("timeline") == len(timeline):
            return saved["answer"], [AnswerCitation.model_validate(c) for c in saved["citations"]]
        answer, citations = await self._answer(ctx, input, timeline, duration, gap)
        await ctx.save_partial(key, {"timeline": len(timeline), "answer": answer,
                                     "citations": [c.model_dump() for c in citations]})
        return answer, citations

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


def _detect_max_s() -> float:
    from pipelines.video.sample import DEFAULT_DETECT_MAX_S

    return DEFAULT_DETECT_MAX_S


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
