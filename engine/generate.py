"""Reference generation: one request, latent cache, greedy or sampled. Tests and the demo use it.

The serving runtime (``engine/runtime``) batches many requests; this loop is the plain baseline it is
checked against, so it stays simple: prefill the whole prompt, then decode one token per step.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from engine.model.decoder import LatentCache

FinishReason = Literal["stop", "length"]


class SamplingParams(BaseModel):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    use_cache: bool = True


class GenerationResult(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits (vocab,) float32 -> token id."""
    if params.temperature == 0.0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs > params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.inference_mode()
def generate_ids(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    image_grid_hws: torch.Tensor | None,
    params: SamplingParams,
    stop_token_ids: list[int],
) -> tuple[list[int], FinishReason]:
    """Token ids generated after ``input_ids`` (1, L); stops on any of ``stop_token_ids`` (included)."""
    device = model.device
    ids = input_ids.to(device)
    pixel_values = None if pixel_values is None else pixel_values.to(device)
    grids = None if image_grid_hws is None else image_grid_hws.to(device)
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    stops = set(stop_token_ids)
    out: list[int] = []
    if params.use_cache:
        cache = LatentCache()
        embeds = model.embed(ids, pixel_values, grids)
        positions = torch.arange(ids.shape[1], device=device)[None]
        logits = model.language_model(embeds, positions, None, cache)[0, -1]
    else:
        image_features = model.encode_images(pixel_values, grids) if pixel_values is not None else None
        prompt_embeds = model.embed(ids, image_features=image_features)
        logits = _uncached_logits(model, prompt_embeds, [])
    for step in range(params.max_new_tokens):
        token = sample_next(logits, params, generator)
        out.append(token)
        if token in stops:
            return out, "stop"
        if step + 1 == params.max_new_tokens:
            break
        if params.use_cache:
            position = torch.tensor([[cache.length()]], device=device)
            next_embed = _embed_generated(model, [token], device)
            logits = model.language_model(next_embed, position, None, cache)[0, -1]
        else:
            logits = _uncached_logits(model, prompt_embeds, out)
    return out, "length"


def _embed_generated(model: Any, tokens: list[int], device: torch.device) -> torch.Tensor:
    """Generated tokens are plain tokens (a generated <|media_pad|> carries no image)."""
    return model.language_model.model.embed_tokens(torch.tensor([tokens], device=device))


def _uncached_logits(model: Any, prompt_embeds: torch.Tensor, generated: list[int]) -> torch.Tensor:
    """Recompute the whole sequence from scratch: the no-cache baseline other paths are checked against."""
    embeds = prompt_embeds
    if generated:
        embeds = torch.cat([prompt_embeds, _embed_generated(model, generated, prompt_embeds.device)], dim=1)
    positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
    return model.language_model(embeds, positions)[0, -1]


def generate(bundle: Any, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> GenerationResult:
    """Chat messages (text / images) -> the assistant's reply, via the bundle's processor and tokenizer."""
    params = params or SamplingParams()
    inputs = bundle.processor(messages, add_generation_prompt=True)
    stop_ids = params.stop_token_ids if params.stop_token_ids is not None else list(bundle.tokenizer.stop_token_ids)
    token_ids, finish = generate_ids(
        bundle.model, inputs.input_ids, inputs.pixel_values, inputs.image_grid_hws, params, stop_ids
    )
    text_ids = token_ids[:-1] if finish == "stop" else token_ids
    return GenerationResult(
        text=bundle.tokenizer.decode(text_ids, skip_special_tokens=True),
        token_ids=token_ids,
        finish_reason=finish,
        prompt_tokens=int(inputs.input_ids.shape[-1]),
    )
