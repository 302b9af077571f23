"""The ``os_agent`` task: observe -> prompt -> parse one action -> check -> execute -> record, until the model
says DONE / FAIL, or the step or time budget, the failure limit or a cancel ends the run.

Every step is a ``StepRecord`` kept in the task's session (partial ``os.step.<n>``) and streamed as a
``step_result`` event, so a task re-run after a runner died continues after the last recorded step, and a client
watches the run live. The run ends with a result whatever the outcome (``done``, ``failed`` (the model gave up),
``max_steps``, ``time_budget``, ``step_failures``): the task succeeds as a *run*, and ``result.success`` says
whether the goal was met; the HTML report and the trajectory JSON are artifacts either way.

Nothing the model says is executed unless it parsed into one action, lies on the screen, and the safety policy
(and, for risky actions, the confirmation hook) allows it.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from agents.base import Agent, AgentContext, AgentError, InputRejected, SubmissionCheck
from agents.os_agent import convention
from agents.os_agent.history import PastStep, PromptTooLarge, StepPrompt, fit_image
from agents.os_agent.inputs import OSAgentInput
from agents.os_agent.parse import ParseError, parse_action, parse_json_action, to_screen
from agents.os_agent.policy import ConfirmationHook, check
from agents.os_agent.secrets import Secrets, UnknownSecret, referenced
from agents.os_agent.trajectory import StepRecord
from agents.registry import register_agent
from connectors.desktop.actions import TypeText, describe
from connectors.desktop.base import ActionRejected, Executor, ExecutorError

STEP_KEY = "os.step."
FAILED_STATUSES = {"malformed", "off_screen", "blocked", "rejected", "error"}

# Executors SDK users plug in by name (a VNC desktop, a browser sandbox...); looked up before KIMIRAY_DESKTOPS.
_DESKTOP_FACTORIES: dict[str, Callable[[], Executor]] = {}


def register_desktop(name: str, factory: Callable[[], Executor]) -> None:
    """Make ``factory()`` the executor of desktop ``name`` in this process."""
    _DESKTOP_FACTORIES[name] = factory


def unregister_desktop(name: str) -> None:
    _DESKTOP_FACTORIES.pop(name, None)


async def open_desktop(ctx: AgentContext, input: OSAgentInput) -> Executor:
    if input.replay is not None:
        from connectors.desktop.replay import RecordedTrajectory, ReplayExecutor

        data = await ctx.blobs.get(ctx.owner, input.replay)
        if data is None:
            raise AgentError(f"blob {input.replay} not found (upload it with POST /v1/files)", code="blob_not_found")
        try:
            trajectory = RecordedTrajectory.model_validate_json(data)
        except ValueError as exc:
            raise AgentError(f"the replay blob is not a recorded trajectory: {str(exc)[:300]}",
                             code="bad_trajectory") from None
        return ReplayExecutor(trajectory)
    from connectors.desktop.registry import desktops_from_env, open_executor

    try:
        specs = desktops_from_env()
    except ValueError as exc:
        raise AgentError(f"the runner's desktop configuration is invalid: {exc}", code="desktop_config") from None
    names = sorted({*specs, *_DESKTOP_FACTORIES})
    name = input.desktop
    if name is None:
        if len(names) != 1:
            raise AgentError("name a desktop: " + (f"this runner has {', '.join(names)}" if names else
                             "this runner has none configured (set KIMIRAY_DESKTOPS or DISPLAY)"),
                             code="no_desktop")
        name = names[0]
    if name in _DESKTOP_FACTORIES:
        return _DESKTOP_FACTORIES[name]()
    if name not in specs:
        raise AgentError(f"desktop {name!r} is not configured on this runner; configured: "
                         f"{', '.join(names) or 'none'}", code="unknown_desktop")
    return open_executor(specs[name])


class TaskConfirmation:
    """Confirmation through the task API: a ``confirmation_required`` event, then wait for
    ``POST /v1/tasks/{id}/confirm`` (it writes partial ``confirm.<step>`` of the task's session). Declined on
    timeout; honours cancellation while waiting."""

    def __init__(self, ctx: AgentContext, timeout_s: float, poll_s: float = 0.25) -> None:
        self.ctx, self.timeout_s, self.poll_s = ctx, timeout_s, poll_s

    async def __call__(self, step: int, action: Any, reason: str) -> bool:
        ctx = self.ctx
        key = f"confirm.{step}"
        decided = await ctx.load_partial(key)
        if decided is None:
            await ctx.emit("confirmation_required", {"step": step, "action": action.model_dump(), "reason": reason,
                                                     "timeout_s": self.timeout_s})
        deadline = time.monotonic() + self.timeout_s
        while decided is None and time.monotonic() < deadline:
            ctx.check_cancelled()
            await asyncio.sleep(self.poll_s)
            decided = await ctx.load_partial(key)
        approved = bool(decided)
        await ctx.emit("confirmation", {"step": step, "approved": approved, "timed_out": decided is None})
        return approved


class TaskUserInput:
    """Ask-the-user through the task API: an ``input_required`` event, then wait for ``POST /v1/tasks/{id}/reply``
    (it writes partial ``reply.<step>`` of the task's session). ``None`` on timeout; honours cancellation."""

    def __init__(self, ctx: AgentContext, timeout_s: float, poll_s: float = 0.25) -> None:
        self.ctx, self.timeout_s, self.poll_s = ctx, timeout_s, poll_s

    async def __call__(self, step: int, question: str) -> str | None:
        ctx = self.ctx
        key = f"reply.{step}"
        answer = await ctx.load_partial(key)
        if answer is None:
            await ctx.emit("input_required", {"step": step, "question": question, "timeout_s": self.timeout_s})
        deadline = time.monotonic() + self.timeout_s
        while answer is None and time.monotonic() < deadline:
            ctx.check_cancelled()
            await asyncio.sleep(self.poll_s)
            answer = await ctx.load_partial(key)
        return None if answer is None else str(answer)


class OSAgentLoop:
    """One run over one executor. Usable without the task layer through any ``AgentContext``.

    ``ask`` answers the model's ``call_user(question)`` (None: nobody can, the step is blocked); ``secrets`` are
    the values ``{{secret:name}}`` placeholders type (default: the runner's, ``Secrets.from_env``)."""

    def __init__(self, ctx: AgentContext, executor: Executor, input: OSAgentInput,
                 confirm: ConfirmationHook | None = None, *, ask: Callable[[int, str], Any] | None = None,
                 secrets: Secrets | None = None) -> None:
        self.ctx, self.executor, self.input, self.confirm = ctx, executor, input, confirm
        self.ask = ask
        self.secrets = secrets if secrets is not None else Secrets()
        self.prompt = StepPrompt(counter=ctx.resources.counter, window=ctx.resources.context_window,
                                 max_tokens=input.max_output_tokens, goal=input.goal,
                                 instructions=input.instructions, keep_screenshots=input.keep_screenshots,
                                 json_actions=input.action_format == "json")
        self.json_schema = convention.action_json_schema() if input.action_format == "json" else None
        self.parse = parse_json_action if input.action_format == "json" else parse_action

    async def _resume(self) -> tuple[list[StepRecord], list[PastStep]]:
        partials = await self.ctx.sessions.partials(self.ctx.session_id, self.ctx.owner)
        records = sorted((StepRecord.model_validate(v) for k, v in partials.items() if k.startswith(STEP_KEY)),
                         key=lambda r: r.index)
        records = [r for i, r in enumerate(records) if r.index == i]  # only a gap-free prefix counts
        past = [PastStep(r, None) for r in records]
        for p in past[-(self.input.keep_screenshots - 1):] if self.input.keep_screenshots > 1 else []:
            if p.record.screenshot:
                data = await self.ctx.blobs.get(self.ctx.owner, p.record.screenshot)
                if data is not None:
                    import io

                    p.image = fit_image(Image.open(io.BytesIO(data)).convert("RGB"), self.input.screenshot_max_side)
        return records, past

    async def run(self) -> dict[str, Any]:
        ctx, input = self.ctx, self.input
        records, past = await self._resume()
        if records:
            await ctx.emit("resumed", {"steps_done": len(records)})
        elapsed_before = float(await ctx.load_partial("os.elapsed_s", 0.0) or 0.0)
        started = time.monotonic()
        outcome, answer, reason = None, None, ""
        failures = 0
        for r in reversed(records):
            if r.status not in FAILED_STATUSES:
                break
            failures += 1
        if records and records[-1].status == "terminal":
            outcome = "done" if (records[-1].action or {}).get("kind") == "done" else "failed"
        if records and records[-1].status == "asked" and records[-1].user_reply is None:
            outcome = await self._await_reply(records[-1])  # the runner died while the question was open
        index = len(records)
        while outcome is None:
            if index >= input.max_steps:
                outcome = "max_steps"
                break
            if failures >= input.max_consecutive_failures:
                outcome = "step_failures"
                break
            remaining = input.max_seconds - elapsed_before - (time.monotonic() - started)
            if remaining <= 0:
                outcome = "time_budget"
                break
            await ctx.step("act", index=index)
            note = ""
            if records and records[-1].status in FAILED_STATUSES:
                note = f"Your previous action was not executed: {records[-1].detail}."
            elif records and records[-1].status == "asked":
                note = f"The user answered your question: {records[-1].user_reply}"
            budget = min(input.step_timeout_s, remaining)
            try:
                record, image = await asyncio.wait_for(self._step(index, past, note), timeout=budget)
            except asyncio.TimeoutError:
                record, image = StepRecord(index=index, status="error",
                                           detail=f"the step did not finish within {budget:.0f} s"), None
            records.append(record)
            past.append(PastStep(record, image))
            await ctx.save_partial(f"{STEP_KEY}{index}", record.model_dump())
            await ctx.save_partial("os.elapsed_s", elapsed_before + time.monotonic() - started)
            await ctx.emit("step_result", record.model_dump())
            await ctx.progress(index + 1, input.max_steps, f"step {index + 1}: {record.status}")
            failures = failures + 1 if record.status in FAILED_STATUSES else 0
            if record.status == "terminal":
                kind = (record.action or {}).get("kind")
                outcome = "done" if kind == "done" else "failed"
            if record.status == "asked":
                outcome = await self._await_reply(record)
            index += 1
        last = records[-1] if records else None
        if outcome == "done" and last and last.action:
            answer = last.action.get("answer", "")
        elif outcome == "failed" and last and last.action:
            reason = last.action.get("reason", "")
        return await self._finish(records, outcome, answer, reason,
                                  elapsed_before + time.monotonic() - started)

    async def _await_reply(self, record: StepRecord) -> str | None:
        """Wait for the person's answer to an ``asked`` step, outside the step's time budget (a person is slow);
        the answered record replaces the pending one. Returns ``"no_reply"`` (the run ends) on timeout."""
        question = (record.action or {}).get("question", "")
        answer = await self.ask(record.index, question) if self.ask is not None else None
        if answer is None:
            record.detail = "nobody answered in time"
            await self.ctx.save_partial(f"{STEP_KEY}{record.index}", record.model_dump())
            return "no_reply"
        record.user_reply = self.secrets.redact(answer)
        record.detail = "the user answered"
        await self.ctx.save_partial(f"{STEP_KEY}{record.index}", record.model_dump())
        await self.ctx.emit("user_reply", {"step": record.index, "reply": record.user_reply})
        return None

    async def _step(self, index: int, past: list[PastStep], note: str) -> tuple[StepRecord, Image.Image | None]:
        ctx, input = self.ctx, self.input
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            obs = await self.executor.observe()
        except ExecutorError as exc:
            return StepRecord(index=index, status="error", detail=f"screenshot failed: {exc}",
                              timings={"screenshot": time.perf_counter() - t0}), None
        timings["screenshot"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        shot = obs.screenshot
        image = await asyncio.to_thread(lambda: fit_image(shot.image(), input.screenshot_max_side))
        ref = await ctx.blobs.put(ctx.owner, shot.png, "image/png")
        title = self.secrets.redact(obs.window_title) if obs.window_title else obs.window_title
        accessibility = self.secrets.redact(obs.accessibility_text or "")
        try:
            messages, info = await asyncio.to_thread(self.prompt.build, past, image, title=title,
                                                     index=index, note=note, accessibility=accessibility)
        except PromptTooLarge as exc:
            raise AgentError(str(exc), code="context_too_small") from None
        timings["encode"] = time.perf_counter() - t0
        base = {"index": index, "screenshot": ref.ref,
                "screen_width": shot.width, "screen_height": shot.height, "window_title": title}
        t0 = time.perf_counter()
        output, parsed, action, failure = await self._decide(messages, image.size, (shot.width, shot.height))
        timings["model"] = time.perf_counter() - t0
        output = self.secrets.redact(output)
        if failure is not None:
            status, detail = failure
            return StepRecord(**base, model_output=output, status=status, detail=detail, timings=timings), image
        record = dict(base, model_output=output, action=action.model_dump(), timings=timings)
        dropped = f" ({parsed.dropped} further calls in the reply were not executed)" if parsed.dropped else ""
        if action.kind in ("done", "fail"):
            return StepRecord(**record, status="terminal", detail=describe(action)), image
        if action.kind == "ask_user":
            if self.ask is None:
                return StepRecord(**record, status="blocked", detail="nobody can answer a question here"), image
            return StepRecord(**record, status="asked", detail=describe(action)), image
        verdict = check(input.policy, action, obs.window_title)
        if not verdict.allowed:
            return StepRecord(**record, status="blocked", detail=verdict.reason), image
        if verdict.needs_confirmation:
            if self.confirm is None:
                return StepRecord(**record, status="blocked",
                                  detail=f"{verdict.reason}, and nobody can confirm it here"), image
            t_c = time.perf_counter()
            approved = await self.confirm(index, action, verdict.reason)
            timings["confirm"] = time.perf_counter() - t_c
            if not approved:
                return StepRecord(**record, status="blocked", detail=f"{verdict.reason}: declined"), image
        t0 = time.perf_counter()
        try:
            await self.executor.execute(self._with_secrets(action))
        except UnknownSecret as exc:
            return StepRecord(**record, status="rejected", detail=str(exc)), image
        except ActionRejected as exc:
            timings["execute"] = time.perf_counter() - t0
            return StepRecord(**record, status="rejected", detail=self.secrets.redact(str(exc))), image
        except ExecutorError as exc:
            timings["execute"] = time.perf_counter() - t0
            return StepRecord(**record, status="error",
                              detail=self.secrets.redact(f"the desktop failed: {exc}")), image
        if input.settle_s:
            await asyncio.sleep(input.settle_s)
        timings["execute"] = time.perf_counter() - t0
        return StepRecord(**record, status="executed", detail=describe(action) + dropped), image

    def _with_secrets(self, action: Any) -> Any:
        """The action the executor gets: typed text with its ``{{secret:name}}`` placeholders filled in. The
        value exists only in this object, handed straight to the executor. Raises ``UnknownSecret``."""
        if isinstance(action, TypeText) and referenced(action.text):
            return TypeText.model_construct(text=self.secrets.resolve(action.text), recordable_text=action.text)
        return action

    async def _decide(self, messages: list[dict[str, Any]], image_size: tuple[int, int],
                      screen_size: tuple[int, int]) -> tuple[str, Any, Any, tuple[str, str] | None]:
        """Ask the model; a reply that does not parse gets one corrective re-prompt. Returns (everything the
        model said, the parsed action, the pixel action, None) or (..., None, None, (failed status, why))."""
        input = self.input
        output, attempt = "", messages
        for retry in (False, True):
            reply = await self.ctx.chat(attempt, max_tokens=input.max_output_tokens, temperature=input.temperature,
                                        json_schema=self.json_schema)
            output = f"{output}\n\n[re-prompted]\n\n{reply.text}" if retry else reply.text
            try:
                parsed = self.parse(reply.text)
                action = to_screen(parsed, image_size=image_size, screen_size=screen_size,
                                   coordinates=input.coordinates)
                return output, parsed, action, None
            except ActionRejected as exc:  # parsed, but off screen: not a format problem, no re-prompt
                return output, None, None, ("off_screen", str(exc))
            except ParseError as exc:
                if retry:
                    return output, None, None, ("malformed", str(exc))
                attempt = [*messages, {"role": "assistant", "content": reply.text or "(empty)"},
                           {"role": "user", "content": convention.correction_prompt(str(exc))}]
        raise AssertionError("unreachable")

    async def _finish(self, records: list[StepRecord], outcome: str, answer: str | None, reason: str,
                      elapsed: float) -> dict[str, Any]:
        ctx = self.ctx
        await ctx.step("report", outcome=outcome)
        screenshots: dict[str, bytes] = {}
        for r in records:
            if r.screenshot and r.screenshot not in screenshots:
                data = await ctx.blobs.get(ctx.owner, r.screenshot)
                if data is not None:
                    screenshots[r.screenshot] = data
        from agents.os_agent.report import render_report

        html = await asyncio.to_thread(lambda: render_report(goal=self.input.goal, steps=records,
                                                             screenshots=screenshots, outcome=outcome,
                                                             answer=answer))
        report = await ctx.blobs.put(ctx.owner, html.encode(), "text/html")
        trajectory = [r.model_dump() for r in records]
        traj_ref = await ctx.blobs.put(ctx.owner, json.dumps({"goal": self.input.goal, "outcome": outcome,
                                                              "steps": trajectory}).encode(), "application/json")
        artifacts = {
            "report": {**report.model_dump(), "filename": "os-agent-report.html"},
            "trajectory": {**traj_ref.model_dump(), "filename": "trajectory.json"},
        }
        if self.input.recording:
            from agents.os_agent.recording import render_recording

            try:
                video = await asyncio.to_thread(render_recording, records, screenshots, fps=self.input.recording_fps)
            except Exception:  # noqa: BLE001 - a codec problem must not cost the run its result
                ctx.log.warning("encoding the episode recording failed", exc_info=True)
                video = None
            if video is not None:
                ref = await ctx.blobs.put(ctx.owner, video, "video/mp4")
                artifacts["recording"] = {**ref.model_dump(), "filename": "os-agent-recording.mp4"}
        phases = ("screenshot", "encode", "model", "execute")
        timing = {p: round(statistics.fmean(v), 4) for p in phases
                  if (v := [r.timings[p] for r in records if p in r.timings])}
        summary = "\n".join(
            [f"OS agent run for the goal {self.input.goal!r}: outcome {outcome}."
             + (f" Answer: {answer}" if answer else "") + (f" Reason: {reason}" if reason else "")]
            + [f"Step {r.index + 1}: {r.status} - {r.detail}" for r in records])
        await ctx.remember([{"role": "system", "content": ctx.resources.fit_lines(summary, keep_head=1)}])
        return {
            "outcome": outcome, "success": outcome == "done", "answer": answer, "reason": reason or None,
            "steps": len(records), "executed": sum(r.status == "executed" for r in records),
            "failed_steps": sum(r.status in FAILED_STATUSES for r in records), "elapsed_s": round(elapsed, 3),
            "mean_step_seconds": timing, "trajectory": [
                {k: v for k, v in t.items() if k != "model_output"} for t in trajectory],
            "artifacts": artifacts,
            "session_id": ctx.session_id,
        }


@register_agent
class OSAgent(Agent):
    type = "os_agent"
    Input = OSAgentInput

    @classmethod
    async def check_submission(cls, input: OSAgentInput, check: SubmissionCheck) -> None:
        """The replay blob exists; a named desktop is one of the configured ones (the same configuration the
        runners read: ``KIMIRAY_DESKTOPS`` set for the whole application, or desktops registered in-process)."""
        if input.replay is not None:
            if await check.blob(input.replay) is None:
                raise InputRejected(f"blob {input.replay} not found (upload the trajectory with POST /v1/files)",
                                    "replay")
            return
        from connectors.desktop.registry import desktops_from_env

        try:
            names = sorted({*desktops_from_env(), *_DESKTOP_FACTORIES})
        except ValueError:
            return  # a broken configuration is the operator's problem; the runner reports it on the task
        configured = ", ".join(names) or "none (the operator sets KIMIRAY_DESKTOPS)"
        if input.desktop is None and len(names) != 1:
            raise InputRejected(f"name a desktop; configured: {configured}", "desktop")
        if input.desktop is not None and input.desktop not in names:
            raise InputRejected(f"desktop {input.desktop!r} is not configured; configured: {configured}", "desktop")
    description = ("Computer use: looks at screenshots of an operator-configured desktop and clicks, types and "
                   "scrolls until the goal is met (Kimi-VL pyautogui actions with fractional coordinates), under "
                   "a safety policy; streams every step and ends with an HTML report of the trajectory.")
    max_attempts = 2  # a re-run resumes after the last recorded step

    async def run(self, ctx: AgentContext, input: OSAgentInput) -> dict[str, Any]:
        await ctx.step("connect", desktop=input.desktop or ("replay" if input.replay else None))
        executor = await open_desktop(ctx, input)
        try:
            try:
                width, height = await executor.screen_size()
            except ExecutorError as exc:
                raise AgentError(f"the desktop can't be reached: {exc}", code="desktop_unreachable") from None
            await ctx.emit("desktop", {"width": width, "height": height})
            try:
                secrets = Secrets.from_env()
            except ValueError as exc:
                raise AgentError(f"the runner's secrets configuration is invalid: {exc}", code="secrets_config") \
                    from None
            missing = [n for n in referenced(f"{input.goal}\n{input.instructions}") if n not in secrets.names()]
            if missing:
                raise AgentError(f"the goal names secrets this runner does not have: {', '.join(missing)}",
                                 code="unknown_secret")
            loop = OSAgentLoop(ctx, executor, input, confirm=TaskConfirmation(ctx, input.confirm_timeout_s),
                               ask=TaskUserInput(ctx, input.reply_timeout_s), secrets=secrets)
            return await loop.run()
        finally:
            try:
                await executor.close()
            except Exception:  # noqa: BLE001 - closing a dead desktop must not mask the run's result
                ctx.log.warning("closing the desktop executor failed", exc_info=True)
