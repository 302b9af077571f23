"""Helpers for runtime tests: deterministic images, message builders, the plain uncached reference."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from PIL import Image

from engine.generate import SamplingParams, generate_ids
from engine.model.decoder import ExpertBank
from engine.runtime.request import Delta


def image(seed: int, size: tuple[int, int] = (84, 56)) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


def random_expert_bank(rows: int, device: str = "cuda") -> tuple[ExpertBank, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 64 x 2048 x 1408 bf16 ExpertBank with N(0, 0.02) weights, ``rows`` random hidden rows, each routed to 6
    distinct experts with random weights: (bank, x, ids, weights). Seeded."""
    torch.manual_seed(0)
    bank = ExpertBank(64, 2048, 1408).to(device, torch.bfloat16)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(rows, 2048, device=device, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(64, device=device)[:6] for _ in range(rows)])
    weights = torch.rand(rows, 6, device=device)
    return bank, x, ids, weights


def text_message(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def image_message(images: list[Image.Image], text: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image", "image": im} for im in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def reference_tokens(bundle, messages, max_tokens: int, stop_ids: list[int] | None = None) -> list[int]:
    """What the plain model generates alone, greedy, without any cache."""
    inputs = bundle.processor(messages, add_generation_prompt=True)
    stops = list(bundle.tokenizer.stop_token_ids) if stop_ids is None else stop_ids
    ids, _ = generate_ids(
        bundle.model, inputs.input_ids, inputs.pixel_values, inputs.image_grid_hws,
        SamplingParams(max_new_tokens=max_tokens, use_cache=False), stops,
    )
    return ids


async def collect(engine, request: dict[str, Any]) -> list[Delta]:
    return [delta async for delta in engine.generate(request)]


def run(coro):
    return asyncio.run(coro)


def tokens_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def plain_step(runner: Any, meta: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the cache after ``meta`` on the modules' unfused ops and the PyTorch reference kernels; the cache
    is then put back as it was, so the same step can run again on another path (fused, padded, graph inputs) and
    be compared."""
    before = runner.kv_cache.clone()
    mode, runner.decode_backend = runner.decode_backend, "modules"
    kernels, runner.kernels = runner.kernels, "torch"
    try:
        logits = runner.forward_eager(meta)
    finally:
        runner.decode_backend, runner.kernels = mode, kernels
    after = runner.kv_cache.clone()
    runner.kv_cache.copy_(before)
    return logits, after


async def play_script(script: list[Any], on_close: Callable[[], None] = lambda: None) -> AsyncIterator[Delta]:
    """A scripted delta stream: Deltas are yielded, numbers are pauses (seconds), exceptions are raised;
    ``on_close`` runs when the stream ends or is closed."""
    try:
        for step in script:
            if isinstance(step, BaseException):
                raise step
            if isinstance(step, (int, float)):
                await asyncio.sleep(step)
                continue
            yield step
    finally:
        on_close()
