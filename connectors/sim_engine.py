"""A SIMULATED model engine for capacity planning: no weights, no torch, no GPU.

It answers like ``AsyncEngine`` (``generate`` streams ``Delta`` objects, ``stats``, ``alive``, ``shutdown``) but its
tokens are filler and its timing follows the step-time model measured for the real engine on one H100
(bench/RESULTS.md, "Serving runtime (LLMEngine / AsyncEngine), full-size A3B"): a decode step of a batch of B
sequences takes ``decode_ms(B)`` (interpolated between the measured batch sizes), and prompt tokens cost
1 / ``prefill_tok_s`` seconds each inside the step that admits them (continuous batching). So N replicas of it
behave like N GPUs to everything in front of them (ingress, router, stores, task runners) at almost no cost,
which is what bench/scale_model.py needs to find the component that saturates first.

Never the default: the ModelServer uses it only for a model named ``sim:<profile>`` (``sim:h100``), logs a
warning saying so, and ``/v1/models`` marks the model ``simulated``. Its outputs mean nothing.
"""

from __future__ import annotations

import asyncio
import bisect
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from engine.runtime.request import Delta, GenerateRequest, Usage

SIM_PREFIX = "sim:"


@dataclass(frozen=True)
class StepProfile:
    """Measured step times of one engine on one accelerator."""

    name: str
    decode_points: tuple[tuple[int, float], ...]  # (batch, ms per decode step), batch ascending
    prefill_tok_s: float  # prompt tokens per second (one 8K chunk per step)
    max_batch: int = 64  # running sequences at once; the rest wait (the real engine's max_num_seqs)
    stop_after: int = 200  # a reply ends ("stop") after this many tokens if max_tokens allows more
    image_tokens: int = 1024  # prompt tokens charged per image/video part (no processor here)

    def decode_ms(self, batch: int) -> float:
        """Linear interpolation between measured points; linear extrapolation past the largest."""
        if batch <= 0:
            return 0.0
        xs = [b for b, _ in self.decode_points]
        ys = [ms for _, ms in self.decode_points]
        if batch <= xs[0]:
            return ys[0]
        i = bisect.bisect_left(xs, batch)
        if i >= len(xs):
            i = len(xs) - 1
        (x0, y0), (x1, y1) = (xs[i - 1], ys[i - 1]), (xs[i], ys[i])
        return y0 + (y1 - y0) * (batch - x0) / (x1 - x0)


# bench/RESULTS.md, "Serving runtime ... full-size A3B", current figures (1x H100 80GB HBM3, commit 2904644):
# decode ms/step at batch 1/8/16/32/64 and the 8K-token one-step prefill rate.
PROFILES: dict[str, StepProfile] = {
    "h100": StepProfile(
        name="h100",
        decode_points=((1, 3.44), (8, 8.97), (16, 14.29), (32, 17.51), (64, 24.77)),
        prefill_tok_s=65_568.0,
    ),
}


def slowed(profile: StepProfile, factor: float) -> StepProfile:
    """The same step-time shape ``factor`` times slower: on a small CPU machine the HTTP path can't carry several
    simulated H100s' token rates, so multi-replica runs there (bench/multi_gpu_bench.py) use a slowed GPU to keep
    the replicas, not the test machine, the bottleneck."""
    return StepProfile(name=f"{profile.name}-slow{factor:g}",
                       decode_points=tuple((b, ms * factor) for b, ms in profile.decode_points),
                       prefill_tok_s=profile.prefill_tok_s / factor, max_batch=profile.max_batch,
                       stop_after=profile.stop_after, image_tokens=profile.image_tokens)


PROFILES["h100-slow10"] = slowed(PROFILES["h100"], 10)


def is_simulated_model(model: str | None) -> bool:
    return bool(model) and str(model).startswith(SIM_PREFIX)


def sim_profile(model: str) -> StepProfile:
    """The profile a ``sim:<name>`` model names; anything else is refused with the list of known ones."""
    if not is_simulated_model(model):
        raise ValueError(f"{model!r} is not a simulated model (those are named {SIM_PREFIX}<profile>)")
    name = model[len(SIM_PREFIX):]
    if name not in PROFILES:
        raise ValueError(f"unknown simulated profile {name!r}; known: {sorted(PROFILES)}")
    return PROFILES[name]


def estimate_prompt_tokens(request: GenerateRequest, image_tokens: int) -> int:
    """Prompt length without a tokenizer: the given ids, else ~4 characters per token plus a fixed cost per
    image/video part (the sim's timing needs a size, not exact tokens)."""
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    chars, media = 0, 0
    for message in request.messages or []:
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", message)
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            if isinstance(part, str):
                chars += len(part)
            elif isinstance(part, dict):
                if part.get("type") == "text" or "text" in part:
                    chars += len(str(part.get("text", "")))
                else:
                    media += 1
            elif part is not None:
                media += 1
    return max(1, chars // 4 + 8) + media * image_tokens


@dataclass
class _Sequence:
    request_id: str
    prompt_tokens: int
    target: int  # tokens this sequence will emit
    finish: str  # "length" or "stop" when it reaches target
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    emitted: int = 0
    prefilled: bool = False


_FILLER = ("sim ", "token ", "text ", "only ")


class SimEngine:
    """Continuous batching on an asyncio clock. ``sleep``/``now`` are injectable so tests run on a fake clock."""

    simulated = True

    def __init__(self, profile: StepProfile, *, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.profile = profile
        self._sleep, self._now = sleep, now
        self.waiting: deque[_Sequence] = deque()
        self.running: dict[str, _Sequence] = {}
        self.instance = uuid.uuid4().hex  # tells replicas apart in sampled stats
        self.requests = 0
        self.steps = 0
        self.busy_s = 0.0  # simulated GPU-busy time
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.last_step_at = now()
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._stopped = False

    @classmethod
    def from_model(cls, model: str, **kwargs: Any) -> "SimEngine":
        return cls(sim_profile(model), **kwargs)

    @property
    def alive(self) -> bool:
        return not self._stopped and (self._loop_task is None or not self._loop_task.done())

    def _ensure_loop(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def generate(self, request: GenerateRequest | dict[str, Any]) -> AsyncIterator[Delta]:
        request = request if isinstance(request, GenerateRequest) else GenerateRequest.model_validate(request)
        prompt = estimate_prompt_tokens(request, self.profile.image_tokens)
        target = min(request.max_tokens, self.profile.stop_after)
        seq = _Sequence(request_id=request.request_id or uuid.uuid4().hex, prompt_tokens=prompt, target=target,
                        finish="length" if target == request.max_tokens else "stop")
        self._ensure_loop()
        self.requests += 1
        self.waiting.append(seq)
        assert self._wake is not None
        self._wake.set()
        finished = False
        try:
            while True:
                delta: Delta = await seq.queue.get()
                yield delta
                if delta.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:  # consumer gone: drop the sequence (frees its batch slot like an abort)
                self.running.pop(seq.request_id, None)
                try:
                    self.waiting.remove(seq)
                except ValueError:
                    pass

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._stopped:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            admitted: list[_Sequence] = []
            while self.waiting and len(self.running) < self.profile.max_batch:
                seq = self.waiting.popleft()
                self.running[seq.request_id] = seq
                admitted.append(seq)
            decoding = [s for s in self.running.values() if s.prefilled]
            prefill_tokens = sum(s.prompt_tokens for s in admitted)
            step_s = self.profile.decode_ms(len(decoding)) / 1000.0 + prefill_tokens / self.profile.prefill_tok_s
            await self._sleep(step_s)
            self.steps += 1
            self.busy_s += step_s
            self.prompt_tokens += prefill_tokens
            self.last_step_at = self._now()
            for seq in admitted:
                seq.prefilled = True
            # every live sequence admitted or decoding gets one token (prefill emits the first token)
            for seq in [*decoding, *admitted]:
                if seq.request_id not in self.running:  # cancelled during the step
                    continue
                self._emit(seq)

    def _emit(self, seq: _Sequence) -> None:
        seq.emitted += 1
        self.generated_tokens += 1
        done = seq.emitted >= seq.target
        delta = Delta(request_id=seq.request_id, text=_FILLER[seq.emitted % len(_FILLER)],
                      token_ids=[1000 + seq.emitted % 1000])
        if done:
            delta.finish_reason = seq.finish  # type: ignore[assignment]
            delta.usage = Usage(prompt_tokens=seq.prompt_tokens, completion_tokens=seq.emitted)
            self.running.pop(seq.request_id, None)
        seq.queue.put_nowait(delta)

    def stats(self) -> dict[str, Any]:
        return {"simulated": True, "profile": self.profile.name, "instance": self.instance,
                "requests": self.requests, "running": len(self.running),
                "waiting": len(self.waiting), "steps": self.steps, "busy_s": round(self.busy_s, 4),
                "generated_tokens": self.generated_tokens, "prompt_tokens": self.prompt_tokens,
                "cache_usage": 0.0, "preemptions": 0, "alive": self.alive,
                "seconds_since_step": self._now() - self.last_step_at}

    async def shutdown(self, drain: bool = True) -> None:
        if drain:
            while self.running or self.waiting:
                await self._sleep(0.01)
        self._stopped = True
        if self._wake is not None:
            self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
