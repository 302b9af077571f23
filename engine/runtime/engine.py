"""The serving engine: ``LLMEngine`` (synchronous schedule -> run -> postprocess) and ``AsyncEngine`` on top.

``AsyncEngine.generate(request)`` streams ``Delta`` objects. Requests are preprocessed (chat template, image
decoding, patching, content hashing) off the engine thread, so a slow or bad image never stalls the batch and
a bad input fails only its own call. The engine thread runs steps while any request is active.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from engine.loader import KimiVLBundle, load, quantize_model_
from engine.runtime.block_manager import BlockManager
from engine.runtime.detokenizer import IncrementalDetokenizer
from engine.runtime.request import Delta, GenerateRequest, TokenLogprob, Usage
from engine.runtime.runner import ModelRunner
from engine.runtime.sampler import PendingSample, SamplerInput, make_generator, plain_greedy, sample_async
from engine.runtime.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from engine.runtime.sequence import PENDING_TOKEN, ImageSpan, Sequence, SequenceStatus

log = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """Too many requests are queued; retry later (the service maps this to HTTP 503)."""


class RequestTooLongError(ValueError):
    """Prompt plus max_tokens exceed the model's context or the cache (HTTP 400)."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped; the health check reports it."""


class EngineOptions(BaseModel):
    block_size: int = Field(16, ge=1)
    cache_tokens: int | None = Field(None, ge=1, description="latent cache size in tokens (default: from memory)")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=0.99)
    cpu_cache_tokens: int = Field(65536, ge=1)
    max_model_len: int | None = None
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=16)
    max_prefill_chunk_tokens: int | None = Field(
        None, ge=16, description="a step without decode rows may give one prompt chunk this many tokens (None: "
        "32768 on CUDA, see ModelRunner.default_prefill_chunk's memory math; the step budget elsewhere)")
    max_waiting: int = Field(1024, ge=0)
    vision_cache_rows: int = Field(65536, ge=0)
    reasoning: bool | Literal["auto"] = "auto"
    enable_prefix_caching: bool = True
    cuda_graphs: bool = Field(True, description="replay CUDA graphs for pure-decode steps on GPU")
    quantization: Literal["none", "fp8"] | None = Field(
        None, description="fp8: decoder weights quantised at load (float8_e4m3fn, per-row scales); the memory "
        "freed goes to the KV cache")
    image_pixels: Literal["auto", "host", "device"] = Field(
        "auto", description="where images are resized/normalised/patchified: auto = on the model's GPU, else host"
    )
    warm_up_decode: bool = Field(False, description=(
        "at start, run each CUDA-graph batch bucket's decode kernels once on padded rows, so Triton compiles and "
        "autotunes them before serving rather than in the first step at a new batch size (GPU, graphs on; "
        "ray_config.yaml turns it on for replicas)"))
    overlap: bool = Field(True, description=(
        "launch the next decode step before reading this one's samples, so the host's emit work overlaps the "
        "device's next step (exact: see LLMEngine.step)"))


@dataclass
class _InFlight:
    """A launched step whose samples the host has not read yet."""

    seqs: list[Sequence]  # the sampled rows, in row order; each has one more PENDING_TOKEN in its output_ids
    sample: PendingSample
    carryable: bool  # every row of the step sampled, none guided or using output history (penalties)


def _uses_history(params) -> bool:
    """Sampling that reads the output so far (penalties): it needs the previous token on the host."""
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def _image_spans(input_ids: list[int], pad_id: int, items: list) -> list[ImageSpan]:
    """Locate each image's placeholder run; its key (content hash from the processor) is the prefix-cache and
    vision-cache key for those tokens. ``items``: ``engine.processor.ImageItem`` in prompt order."""
    spans: list[ImageSpan] = []
    pos = 0
    for item in items:
        while input_ids[pos] != pad_id:
            pos += 1
        spans.append(ImageSpan(start=pos, length=item.num_tokens, content_hash=item.key, pixel_values=item.patches,
                               grid_hw=tuple(item.grid_hw), decoded=item.decoded, features=item.features))
        pos += item.num_tokens
    return spans


class LLMEngine:
    """Synchronous core. Not thread-safe: one thread calls ``add``/``abort``/``step`` (the AsyncEngine's)."""

    def __init__(self, bundle: KimiVLBundle, options: EngineOptions | None = None) -> None:
        self.bundle = bundle
        self.options = options = options or EngineOptions()
        self.tokenizer = bundle.tokenizer
        self.model = bundle.model
        cfg = bundle.config.text_config
        quantize_model_(self.model, options.quantization)  # before sizing the cache: freed memory goes there
        self.max_model_len = min(options.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        num_blocks = self._num_blocks(options)
        self.blocks = BlockManager(num_blocks, options.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=options.max_num_seqs,
                max_num_batched_tokens=options.max_num_batched_tokens,
                max_prefill_chunk_tokens=options.max_prefill_chunk_tokens or ModelRunner.default_prefill_chunk(
                    self.model.device, options.max_num_batched_tokens),
                max_waiting=options.max_waiting,
            ),
            self.blocks,
        )
        self.runner = ModelRunner(
            self.model, num_blocks, options.block_size, options.vision_cache_rows, use_cuda_graphs=options.cuda_graphs
        )
        if options.warm_up_decode and self.runner.graphs is not None:
            started = time.monotonic()
            steps = self.runner.graphs.warm_up(options.max_num_seqs)
            log.info("decode warm-up: %d padded steps in %.1f s", steps, time.monotonic() - started)
        self.reasoning = (
            "thinking" in str(bundle.path).lower() if options.reasoning == "auto" else bool(options.reasoning)
        )
        pixels = options.image_pixels
        self.image_pixels = ("device" if self.model.device.type == "cuda" else "host") if pixels == "auto" else pixels
        self._guided = None
        self._guided_lock = threading.Lock()  # requests are admitted from several threads: build it once
        self.by_id: dict[str, Sequence] = {}
        self.steps = 0
        self.steps_ahead = 0  # steps launched before the previous step's samples were read
        self._inflight: _InFlight | None = None  # the launched step whose samples are not read yet

    def _num_blocks(self, options: EngineOptions) -> int:
        bs = options.block_size
        if options.cache_tokens is not None:
            tokens = options.cache_tokens
        elif self.model.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.model.device)
            per_token = ModelRunner.cache_bytes_per_token(
                self.bundle.config.text_config, self.model.language_model.model.embed_tokens.weight.dtype)
            reserve = 4 * 2**30  # activations of a full prefill step, logits, vision
            tokens = int(max(free * options.gpu_memory_utilization - reserve, per_token * bs) // per_token)
        else:
            tokens = options.cpu_cache_tokens
        return max(1, tokens // bs)

    @property
    def cache_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    # ------------------------------------------------------------------ admission
    @property
    def guided(self):
        if self._guided is None:
            from engine.runtime.guided import GuidedDecoding

            with self._guided_lock:
                if self._guided is None:
                    self._guided = GuidedDecoding(self.tokenizer)
        return self._guided

    def make_sequence(self, request: GenerateRequest | dict[str, Any]) -> Sequence:
        """Validate and preprocess a request (thread-safe; runs outside the engine thread)."""
        if not isinstance(request, GenerateRequest):
            request = GenerateRequest.model_validate(request)
        vocab = self.bundle.config.text_config.vocab_size
        images: list[ImageSpan] = []
        if request.prompt_token_ids is not None:
            prompt = list(request.prompt_token_ids)
            bad = [t for t in prompt if not 0 <= t < vocab or t == self.tokenizer.media_pad_id]
            if bad:
                raise ValueError(f"prompt_token_ids has ids outside the vocabulary or image placeholders: {bad[:10]}")
            prompt_text = ""
        else:
            inputs = self.bundle.processor(
                request.messages, add_generation_prompt=request.add_generation_prompt,
                pixels=self.image_pixels, lookup=self.runner.vision_cache.peek,
            )
            prompt = inputs.input_ids[0].tolist()
            prompt_text = getattr(inputs, "prompt", "") or ""
            images = _image_spans(prompt, self.tokenizer.media_pad_id, inputs.images)
        if request.fit_max_tokens:
            room = min(self.max_model_len, self.cache_capacity_tokens) - len(prompt)
            if room < 1:
                raise RequestTooLongError(
                    f"the prompt ({len(prompt)} tokens) leaves no room for output in the context window of "
                    f"{min(self.max_model_len, self.cache_capacity_tokens)} tokens"
                )
            if room < request.max_tokens:
                request = request.model_copy(update={"max_tokens": room})
        total = len(prompt) + request.max_tokens
        if total > self.max_model_len:
            raise RequestTooLongError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({request.max_tokens}) = {total} exceeds the "
                f"context window of {self.max_model_len} tokens"
            )
        if total > self.cache_capacity_tokens:
            raise RequestTooLongError(
                f"prompt + max_tokens = {total} tokens exceeds the KV cache capacity ({self.cache_capacity_tokens})"
            )
        bad_stops = [t for t in request.stop_token_ids if not 0 <= t < vocab]
        if bad_stops:
            raise ValueError(f"stop_token_ids outside the vocabulary: {bad_stops}")
        stops = set(request.stop_token_ids) | (set() if request.ignore_eos else set(self.tokenizer.stop_token_ids))
        matcher = self.guided.matcher(request.json_schema) if request.json_schema is not None else None
        reasoning_started = self.reasoning and prompt_text.rstrip().endswith("◁think▷")
        detok = IncrementalDetokenizer(
            self.tokenizer,
            stop=request.stop,
            skip_special_tokens=True,
            split_reasoning=self.reasoning and matcher is None,
            reasoning_started=reasoning_started,
        )
        sampling = request.sampling()
        return Sequence(
            plain_greedy=plain_greedy(sampling),
            request=request,
            prompt_ids=prompt,
            images=images,
            sampling=sampling,
            stop_token_ids=stops,
            generator=make_generator(request.seed),
            matcher=matcher,
            detokenizer=detok,
            arrival=time.monotonic(),
        )

    def add(self, seq: Sequence) -> None:
        if len(self.scheduler.waiting) >= self.options.max_waiting:
            raise EngineOverloadedError(f"{len(self.scheduler.waiting)} requests already queued")
        if seq.request_id in self.by_id:
            raise ValueError(f"request_id {seq.request_id!r} is already running")
        self.by_id[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> Delta | None:
        seq = self.by_id.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, "cancelled")

    def has_work(self) -> bool:
        return len(self.scheduler) > 0 or self._inflight is not None

    # ------------------------------------------------------------------ step
    def _finish(self, seq: Sequence, reason: str, text: str = "", reasoning: str = "", error: str | None = None) -> Delta:
        if seq.num_pending:  # samples still in flight for it are void
            del seq.output_ids[len(seq.output_ids) - seq.num_pending :]
            seq.num_pending = 0
        self.scheduler.remove(seq)
        self.by_id.pop(seq.request_id, None)
        seq.finish_reason = reason
        seq.error = error
        usage = Usage(
            prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids), cached_tokens=seq.num_cached_tokens
        )
        return Delta(
            request_id=seq.request_id, text=text, reasoning_text=reasoning, finish_reason=reason, usage=usage,
            error=error,
        )

    def step(self) -> list[Delta]:
        """One schedule -> run -> postprocess cycle; returns the deltas it produced.

        With ``options.overlap`` a step is launched before the previous step's samples are read: when the previous
        step left every running sequence one sampled token to decode (no admission waiting for room, no guided or
        penalty rows, blocks to spare), the next step's rows are those sequences, its input ids come from the
        previous samples on the device, and the host reads and emits the previous step's tokens while the device
        runs the next one. A sequence that the previous tokens finish (EOS, stop string) had one extra token
        computed, which is discarded; one that max_tokens or the context finishes is left out. Any other step
        first reads the previous samples, then schedules as usual."""
        previous, self._inflight = self._inflight, None
        deltas: list[Delta] = []
        ahead = self._ahead(previous) if previous is not None else None
        if previous is not None and ahead is None:
            deltas += self._resolve(previous)
            previous = None
        failed = self._launch(ahead)
        if previous is not None:
            deltas += self._resolve(previous)
        for seq, error in failed:
            if seq.status is not SequenceStatus.FINISHED:
                deltas.append(self._finish(seq, "error", error=error))
        if self._inflight is not None and not self.options.overlap:
            launched, self._inflight = self._inflight, None
            deltas += self._resolve(launched)
        return deltas

    def _ahead(self, previous: _InFlight) -> tuple[ScheduledBatch, tuple[torch.Tensor, np.ndarray]] | None:
        """The step that continues ``previous`` from its device-side samples, and its carry: (those samples, each
        row's index there); None when the next step must go through the scheduler (see :meth:`step`)."""
        if not (self.options.overlap and previous.carryable):
            return None
        scheduler = self.scheduler
        if scheduler.waiting and len(scheduler.running) < scheduler.config.max_num_seqs:
            return None  # an admission may fit: the scheduler decides
        seqs: list[Sequence] = []
        rows: list[int] = []
        growing: list[Sequence] = []  # their next token starts a block
        running = 0
        block_size = self.blocks.block_size
        max_len = self.max_model_len
        for row, seq in enumerate(previous.seqs):
            if seq.status is not SequenceStatus.RUNNING:
                continue
            running += 1
            outputs = len(seq.output_ids)
            if outputs >= seq.request.max_tokens or len(seq.prompt_ids) + outputs >= max_len:
                continue  # its pending token ends it (by length, if nothing stops it first)
            seqs.append(seq)
            rows.append(row)
            if seq.num_computed_tokens == len(seq.block_table) * block_size:
                growing.append(seq)
        if not seqs or running != len(scheduler.running) or len(seqs) > scheduler.config.max_num_batched_tokens:
            return None
        if len(growing) > self.blocks.num_free_blocks:
            return None  # the scheduler preempts
        for seq in growing:
            self.blocks.grow(seq, seq.num_computed_tokens + 1)
        carry = (previous.sample.tokens, np.asarray(rows, dtype=np.int64))
        return ScheduledBatch(seqs=seqs, num_new_tokens=[1] * len(seqs)), carry

    def _launch(self, ahead: tuple[ScheduledBatch, tuple[torch.Tensor, np.ndarray]] | None
                ) -> list[tuple[Sequence, str]]:
        """Schedule (unless ``ahead`` gives the batch), run the forward, start sampling; the launched step becomes
        ``self._inflight``. Returns rows that failed, to be finished after the previous step's tokens."""
        carry = None
        if ahead is None:
            batch = self.scheduler.schedule()
            if not batch:
                return []
        else:
            batch, carry = ahead
            self.steps_ahead += 1
        self.steps += 1
        try:
            logits = self.runner.run_step(batch.seqs, batch.num_new_tokens, self.blocks.tables, carry)
        except Exception as exc:  # a failed forward fails this step's requests, not the engine
            log.exception("forward failed")
            return [(s, f"model forward failed: {exc}") for s in batch.seqs]

        if carry is not None:  # every row decoded its carried token and samples; blocks publish once it is read
            for seq in batch.seqs:
                seq.num_computed_tokens += 1
            return self._start_sampling(batch.seqs, logits, every_row=True)
        sampling: list[Sequence] = []
        publish = self.options.enable_prefix_caching
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if publish:
                self.blocks.publish(seq)
            if seq.num_computed_tokens == len(seq):
                sampling.append(seq)
        if not sampling:
            return []
        return self._start_sampling(sampling, logits, every_row=len(sampling) == len(batch.seqs))

    def _start_sampling(self, seqs: list[Sequence], logits: torch.Tensor, every_row: bool) -> list[tuple[Sequence, str]]:
        failed: list[tuple[Sequence, str]] = []
        vocab = logits.shape[-1]
        masks = None
        alive = list(range(len(seqs)))
        rows = [(s.matcher, i) for i, s in enumerate(seqs) if s.matcher is not None]
        if rows:
            masks, bad_masks = self._guided_masks(rows, len(seqs), vocab, logits.device)
            for i, error in sorted(bad_masks.items()):
                failed.append((seqs[i], f"guided decoding failed: {error}"))
                alive.remove(i)
        if not alive:
            return failed
        live = seqs
        if len(alive) != len(seqs):
            index = torch.tensor(alive, device=logits.device)
            live = [seqs[i] for i in alive]
            logits = logits[index]
            masks = None if masks is None else masks[index]
        try:
            pending = sample_async(
                SamplerInput(
                    logits=logits,
                    params=[s.sampling for s in live],
                    generators=[s.generator for s in live],
                    prompt_token_ids=[s.prompt_ids for s in live],
                    output_token_ids=[s.output_ids for s in live],
                    allowed_mask=masks,
                    plain_greedy=all(s.plain_greedy for s in live),
                )
            )
        except Exception as exc:  # fail these requests, never the engine thread
            log.exception("sampling failed")
            return failed + [(s, f"sampling failed: {exc}") for s in live]
        for seq in live:
            seq.output_ids.append(PENDING_TOKEN)
            seq.num_pending += 1
        carryable = every_row and not rows and not any(_uses_history(s.sampling) for s in live)
        self._inflight = _InFlight(seqs=live, sample=pending, carryable=carryable)
        return failed

    def _resolve(self, inflight: _InFlight) -> list[Delta]:
        """Read a launched step's samples and emit them: one pass over its rows. Rows whose sequence finished
        meanwhile (aborted, or ended by an earlier token) are void."""
        try:
            out = inflight.sample.result()
        except Exception as exc:
            log.exception("sampling failed")
            return [self._finish(s, "error", error=f"sampling failed: {exc}") for s in inflight.seqs
                    if s.status is not SequenceStatus.FINISHED]
        deltas: list[Delta] = []
        bad = set(out.nonfinite_rows)
        finished = SequenceStatus.FINISHED
        publish = self.options.enable_prefix_caching
        for row, seq in enumerate(inflight.seqs):
            if seq.status is finished:
                continue
            if row in bad:
                log.error("non-finite logits for %s at output token %d", seq.request_id, seq.num_output_tokens)
                deltas.append(self._finish(seq, "error", error="the model produced non-finite logits (NaN or inf)"))
                continue
            token = out.token_ids[row]
            seq.output_ids[len(seq.output_ids) - seq.num_pending] = token
            seq.num_pending -= 1
            try:
                deltas.append(self._postprocess(seq, token, out.logprobs[row]))
            except Exception as exc:
                log.exception("postprocess failed for %s", seq.request_id)
                deltas.append(self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}"))
                continue
            if publish and seq.status is not finished:
                self.blocks.publish(seq)
        return deltas

    def _guided_masks(self, rows: list[tuple[Any, int]], batch: int, vocab: int,
                      device: torch.device) -> tuple[torch.Tensor, dict[int, str]]:
        """Allowed-token mask ``(batch, vocab)`` on ``device`` for one step: the guided rows' masks built into one
        bitmask by one parallel llguidance call, copied once, unpacked on the device (other rows: all allowed).
        Also ``{row: error}`` for rows whose grammar failed or allows nothing."""
        from engine.runtime.guided import allocate_bitmask, bitmask_to_bool

        bitmask = allocate_bitmask(batch, vocab)
        try:
            failed = self.guided.fill_batch(rows, bitmask)
        except Exception as exc:  # llguidance itself failed: fail the guided rows, never the engine thread
            log.exception("guided mask failed")
            failed = {i: f"{type(exc).__name__}: {exc}" for _, i in rows}
        return bitmask_to_bool(bitmask.to(device, non_blocking=True), vocab), failed

    def _postprocess(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> Delta:
        """Emit ``token`` (already in ``seq.output_ids``): detokenize, check stop ids / strings and length."""
        if seq.matcher is not None:
            seq.matcher.accept(token)
        logprobs = None
        if logprob is not None:
            logprob.token_bytes = self.tokenizer.token_bytes(token)
            logprob.top_bytes = [self.tokenizer.token_bytes(t) for t, _ in logprob.top]
            logprobs = [logprob]
        if token in seq.stop_token_ids:
            tail = seq.detokenizer.finish()
            delta = self._finish(seq, "stop", tail.text, tail.reasoning_text)
            delta.token_ids, delta.logprobs = [token], logprobs
            return delta
        piece = seq.detokenizer.feed(token)
        if piece.stopped:
            delta = self._finish(seq, "stop", piece.text, piece.reasoning_text)
        elif seq.num_output_tokens >= seq.max_tokens or len(seq) - seq.num_pending >= self.max_model_len:
            tail = seq.detokenizer.finish()
            delta = self._finish(seq, "length", piece.text + tail.text, piece.reasoning_text + tail.reasoning_text)
        else:
            return Delta(request_id=seq.request_id, text=piece.text, reasoning_text=piece.reasoning_text,
                         token_ids=[token], logprobs=logprobs)
        delta.token_ids, delta.logprobs = [token], logprobs
        return delta

    def stats(self) -> dict[str, Any]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "cache_usage": round(self.blocks.usage(), 4),
            "free_blocks": self.blocks.num_free_blocks,
            "num_blocks": self.blocks.num_blocks,
            "prefix_cache_hit_blocks": self.blocks.hits,
            "prefix_cache_query_blocks": self.blocks.queries,
            "vision_cache_hits": self.runner.vision_cache.hits,
            "vision_cache_misses": self.runner.vision_cache.misses,
            "steps": self.steps,
            "steps_ahead": self.steps_ahead,
            "preemptions": self.scheduler.num_preemptions,
        }


def _put_all(items: list[tuple[asyncio.Queue, Delta]]) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)


class AsyncEngine:
    """Asyncio front of ``LLMEngine``: ``async for delta in engine.generate(request)``.

    Closing the iterator early (client gone, task cancelled) aborts the request and frees its cache blocks.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: deque[tuple[str, Any]] = deque()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Delta | BaseException]]] = {}
        self._wake = threading.Condition()
        self._stopped = False
        self.last_step_at = time.monotonic()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="kimiray-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None, **options: Any
    ) -> "AsyncEngine":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        bundle = load(path, device=device, dtype=dtype)
        return cls(LLMEngine(bundle, EngineOptions(**options)))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopped

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, delta: Delta | BaseException, request_id: str) -> None:
        target = self._queues.get(request_id)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, delta)
        except RuntimeError:  # the caller's loop is closed
            self._queues.pop(request_id, None)

    def _deliver_step(self, deltas: list[Delta]) -> None:
        """A step's deltas with one wake-up per caller event loop (not one per delta: each call_soon_threadsafe
        writes the loop's self-pipe)."""
        if not deltas:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Delta]]] = {}
        queues = self._queues
        for delta in deltas:
            target = queues.get(delta.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], delta))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed
                for _, delta in items:
                    queues.pop(delta.request_id, None)

    def _loop(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._wake:
                    while not self._inbox and not engine.has_work() and not self._stopped:
                        self._wake.wait(timeout=1.0)
                        self.last_step_at = time.monotonic()
                    if self._stopped and not engine.has_work() and not self._inbox:
                        return
                    inbox = list(self._inbox)
                    self._inbox.clear()
                for kind, payload in inbox:
                    if kind == "add":
                        try:
                            engine.add(payload)
                        except Exception as exc:
                            self._deliver(exc, payload.request_id)
                    elif kind == "abort":
                        delta = engine.abort(payload)
                        if delta is not None:
                            self._deliver(delta, payload)
                self._deliver_step(engine.step())
                self.last_step_at = time.monotonic()
        except BaseException as exc:  # pragma: no cover - a bug in the engine itself
            log.exception("engine thread died")
            self.error = exc
            for request_id in list(self._queues):
                self._deliver(EngineDeadError(f"engine stopped: {exc}"), request_id)

    def _post(self, kind: str, payload: Any) -> None:
        with self._wake:
            self._inbox.append((kind, payload))
            self._wake.notify()

    # ------------------------------------------------------------------ public API
    async def generate(self, request: GenerateRequest | dict[str, Any]) -> AsyncIterator[Delta]:
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        if not isinstance(request, GenerateRequest):
            request = GenerateRequest.model_validate(request)
        if len(self.engine.scheduler.waiting) + len(self._inbox) >= self.engine.options.max_waiting:
            raise EngineOverloadedError("too many queued requests; retry later")
        if request.request_id in self._queues:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        seq = await asyncio.to_thread(self.engine.make_sequence, request)
        queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self._queues[request.request_id] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            self._post("add", seq)
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request.request_id, None)
            if not finished:
                self._post("abort", request.request_id)

    async def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def stats(self) -> dict[str, Any]:
        return {**self.engine.stats(), "alive": self.alive, "seconds_since_step": time.monotonic() - self.last_step_at}

    async def shutdown(self, drain: bool = True) -> None:
        """Stop the engine thread; with ``drain`` the running requests finish first."""
        if not drain:
            for request_id in list(self.engine.by_id):
                self._post("abort", request_id)
        with self._wake:
            self._stopped = True
            self._wake.notify()
        await asyncio.to_thread(self._thread.join)
