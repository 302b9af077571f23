"""A request's state inside the runtime: tokens, images, cache blocks, and per-request helpers."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.runtime.request import GenerateRequest, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class ImageSpan:
    """One image's placeholder run in the prompt. ``content_hash`` identifies its pixels (and sampling)."""

    start: int  # index of the first <|media_pad|> of this image in the prompt
    length: int  # number of placeholder tokens (= merged feature rows)
    content_hash: bytes
    pixel_values: torch.Tensor | None  # (h*w, 3, p, p) on CPU, when preprocessed on the host
    grid_hw: tuple[int, int]
    decoded: Any = None  # engine.processor.DecodedImage: pixel work deferred to the model's device
    features: torch.Tensor | None = None  # projected features found in the vision cache at admission

    @property
    def end(self) -> int:
        return self.start + self.length


_ids = itertools.count()

PENDING_TOKEN = -1
"""Placeholder in ``Sequence.output_ids`` for a token sampled on the device that the host has not read yet."""


@dataclass(eq=False)
class Sequence:
    request: GenerateRequest
    prompt_ids: list[int]
    images: list[ImageSpan]
    sampling: SamplingParams
    stop_token_ids: set[int]
    generator: torch.Generator | None = None
    matcher: Any = None  # guided-decoding state (engine.runtime.guided.GrammarMatcher) or None
    detokenizer: Any = None  # engine.runtime.detokenizer.IncrementalDetokenizer
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    table_row: int = -1  # this sequence's row in BlockManager.tables while it holds blocks
    # trailing output_ids that are placeholders (PENDING_TOKEN): sampled on the device by a step whose result the
    # host has not read yet (the engine runs one step ahead); they count in len() but are never read as ids
    num_pending: int = 0
    plain_greedy: bool = False  # sampling is a bare argmax (engine.runtime.sampler.plain_greedy), set at creation
    num_computed_tokens: int = 0  # tokens whose latent KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at (the latest) admission
    num_registered_blocks: int = 0  # leading full blocks whose hash is published for reuse
    block_hashes: list[bytes] = field(default_factory=list)  # hash chain of the leading full blocks
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None
    arrival: float = 0.0
    preemptions: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens_between(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without copying the whole (possibly 128K-token) sequence."""
        split = len(self.prompt_ids)
        if start >= split:
            return self.output_ids[start - split : end - split]
        if end <= split:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - split]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens the host knows (placeholders of in-flight samples excluded)."""
        return len(self.output_ids) - self.num_pending

    @property
    def num_uncomputed(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def max_tokens(self) -> int:
        return self.request.max_tokens
