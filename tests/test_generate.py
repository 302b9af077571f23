"""Reference generation and the whole image -> answer path on the tiny checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from engine.generate import SamplingParams, generate, generate_ids
from tests.runtime_helpers import image as _image
from tests.runtime_helpers import image_message

REPO = Path(__file__).resolve().parents[1]


def _messages(*images: Image.Image, question: str = "Describe the images.") -> list[dict]:
    return image_message(list(images), question)


def test_greedy_cached_equals_uncached_with_images(tiny_bundle) -> None:
    inputs = tiny_bundle.processor(_messages(_image(0), _image(1, (50, 30))), add_generation_prompt=True)
    stops = list(tiny_bundle.tokenizer.stop_token_ids)
    cached, _ = generate_ids(
        tiny_bundle.model, inputs.input_ids, inputs.pixel_values, inputs.image_grid_hws,
        SamplingParams(max_new_tokens=12), stops,
    )
    uncached, _ = generate_ids(
        tiny_bundle.model, inputs.input_ids, inputs.pixel_values, inputs.image_grid_hws,
        SamplingParams(max_new_tokens=12, use_cache=False), stops,
    )
    assert cached == uncached and len(cached) >= 1


def test_image_changes_the_answer(tiny_bundle) -> None:
    """The image features really reach the decoder: different pixels, different logits."""
    a = tiny_bundle.processor(_messages(_image(0)), add_generation_prompt=True)
    b = tiny_bundle.processor(_messages(_image(7)), add_generation_prompt=True)
    assert torch.equal(a.input_ids, b.input_ids)
    with torch.no_grad():
        la = tiny_bundle.model(a.input_ids, a.pixel_values, a.image_grid_hws)[0, -1]
        lb = tiny_bundle.model(b.input_ids, b.pixel_values, b.image_grid_hws)[0, -1]
    assert (la - lb).abs().max() > 1e-3


def test_seeded_sampling_is_reproducible(tiny_bundle) -> None:
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=123)
    first = generate(tiny_bundle, _messages(_image(2)), params)
    second = generate(tiny_bundle, _messages(_image(2)), params)
    other = generate(tiny_bundle, _messages(_image(2)), params.model_copy(update={"seed": 124}))
    assert first.token_ids == second.token_ids
    assert first.token_ids != other.token_ids or first.finish_reason == "stop"
    assert first.prompt_tokens > 6


def test_stops_at_im_end(tiny_bundle) -> None:
    """Greedy decoding with <|im_end|> forced to win ends with finish_reason 'stop' and no stop text."""
    im_end = tiny_bundle.tokenizer.im_end_id
    head = tiny_bundle.model.language_model.lm_head
    saved = head.weight.data[im_end].clone()
    try:
        head.weight.data[im_end] = 0
        bias = torch.zeros(head.weight.shape[0])
        bias[im_end] = 1e4
        head.bias = torch.nn.Parameter(bias)
        result = generate(tiny_bundle, _messages(_image(3)), SamplingParams(max_new_tokens=5))
    finally:
        head.bias = None
        head.weight.data[im_end] = saved
    assert result.finish_reason == "stop" and result.token_ids == [im_end] and result.text == ""


def test_main_job_cli(tmp_path: Path) -> None:
    env = dict(os.environ, KIMIRAY_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "kimiray.cli", "demo", "--max-tokens", "6", "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "reply (" in proc.stdout and "finish=" in proc.stdout
    assert (tmp_path / "tiny-kimi-vl" / "model.safetensors.index.json").exists()
