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


def routing_near_ties(bundle, prompt: list[int], layers: int, rel_margin: float = 1e-2) -> torch.Tensor:
    """(layers, positions) bool: True where the latent of that layer at that position comes after a MoE router
    near-tie at an earlier layer -- the k-th and (k+1)-th expert scores closer than ``rel_margin`` of the top
    score (in an fp32 one-shot forward of ``prompt`` on ``bundle``). bf16 rounding can swap such experts, which
    changes that position's hidden state by a whole expert's output: a discrete difference no kernel tolerance
    covers (random tiny weights make near-ties common; seen on the H100 and H200 at layer 1, position 17)."""
    import re

    from engine.model.decoder import MoEGate
    from engine.runtime.engine import EngineOptions, LLMEngine

    margins: dict[int, torch.Tensor] = {}

    def record(layer: int):
        def hook(gate, inputs, _output) -> None:
            top = gate.selection_scores(inputs[0])[1].topk(gate.top_k + 1, dim=-1).values
            margins[layer] = ((top[:, -2] - top[:, -1]) / top[:, 0]).cpu()
        return hook

    handles = [module.register_forward_hook(record(int(re.search(r"layers\.(\d+)\.", name).group(1))))
               for name, module in bundle.model.named_modules() if isinstance(module, MoEGate)]
    try:
        engine = LLMEngine(bundle, EngineOptions(cache_tokens=2048, block_size=8, cuda_graphs=False,
                                                 max_num_batched_tokens=max(256, len(prompt))))
        engine.runner.kernels = "torch"
        engine.add(engine.make_sequence({"prompt_token_ids": prompt, "max_tokens": 1, "ignore_eos": True}))
        while engine.has_work():
            engine.step()
    finally:
        for handle in handles:
            handle.remove()
    ties = torch.zeros(layers, len(prompt), dtype=torch.bool)
    for layer, margin in margins.items():
        ties[layer + 1:] |= (margin[: len(prompt)] < rel_margin)
    return ties
