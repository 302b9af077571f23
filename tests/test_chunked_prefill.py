"""Prefill chunks after a cached prefix: prefix attention (no mask) + chunk attention (causal) merged by their
log-sum-exps equals one causal attention, and a prompt prefilled in chunks of any size (or after a prefix-cache
hit) leaves the same latents and logits as a one-shot prefill (tiny checkpoint, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from engine.kernels.prefill import attention_with_lse, attention_with_lse_torch, chunk_attention, merge_attention
from engine.runtime.engine import EngineOptions, LLMEngine
from engine.runtime.scheduler import Scheduler, SchedulerConfig


def _qkv(prefix: int, chunk: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, chunk, 24, generator=gen)
    k = torch.randn(2, 3, prefix + chunk, 24, generator=gen)
    v = torch.randn(2, 3, prefix + chunk, 16, generator=gen)  # v narrower than q/k, as MLA's 128 vs 192
    return q, k, v


@pytest.mark.parametrize("prefix,chunk", [(0, 1), (0, 9), (5, 1), (13, 7), (40, 40), (3, 64)])
@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_chunk_attention_equals_lower_right_causal_attention(prefix: int, chunk: int, impl: str) -> None:
    q, k, v = _qkv(prefix, chunk)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(chunk, prefix + chunk), scale=0.3)
    actual = chunk_attention(q, k, v, prefix, 0.3, impl=impl)
    assert (actual - expected).abs().max() < 1e-5


def test_lse_merge_of_any_key_split_equals_full_attention() -> None:
    q, k, v = _qkv(30, 10, seed=1)
    keys = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    a, b = keys[:17], keys[17:]
    out_a, lse_a = attention_with_lse_torch(q, k[:, :, a], v[:, :, a], False, 0.25)
    out_b, lse_b = attention_with_lse_torch(q, k[:, :, b], v[:, :, b], False, 0.25)
    full, lse = attention_with_lse_torch(q, k, v, False, 0.25)
    assert (merge_attention(out_a, lse_a, out_b, lse_b) - full).abs().max() < 1e-5
    assert (torch.logaddexp(lse_a, lse_b) - lse).abs().max() < 1e-5
    assert (full - F.scaled_dot_product_attention(q, k, v, scale=0.25)).abs().max() < 1e-5
    out, lse_auto = attention_with_lse(q, k, v, False, 0.25)  # the CPU kernel with v padded to the q/k dim
    assert (out - full).abs().max() < 1e-5 and (lse_auto - lse).abs().max() < 1e-5


def test_a_kernel_whose_lse_disagrees_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Private LSE ops are no stable API: one returning the LSE in another base (here log2) must not be merged."""
    from engine.kernels import prefill

    real = prefill._cpu_flash
    monkeypatch.setattr(prefill, "_broken", set())
    monkeypatch.setattr(prefill, "_checked", set())
    monkeypatch.setattr(prefill, "_cpu_flash", lambda *a: (real(*a)[0], real(*a)[1] / 0.6931471805599453))
    q, k, v = _qkv(13, 7, seed=3)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(7, 20), scale=0.3)
    assert (chunk_attention(q, k, v, 13, 0.3) - expected).abs().max() < 1e-5
    assert prefill._broken == {"cpu_flash:float32"}


def test_a_kernel_wrong_only_on_larger_calls_is_caught_on_its_first_real_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel right on a toy problem but wrong past row 40 of a real chunk (the H100 showed such shape-dependent
    failures) is checked on sampled rows of the call itself: its output never reaches the caller."""
    from engine.kernels import prefill

    real = prefill._cpu_flash

    def late_rows_wrong(q, k, v, causal, scale):
        out, lse = real(q, k, v, causal, scale)
        if q.shape[-2] > 40:
            out = out.clone()
            out[..., 40:, :] += 0.5
        return out, lse

    monkeypatch.setattr(prefill, "_broken", set())
    monkeypatch.setattr(prefill, "_checked", set())
    monkeypatch.setattr(prefill, "_cpu_flash", late_rows_wrong)
    q, k, v = _qkv(5, 30, seed=4)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(30, 35), scale=0.3)
    assert (chunk_attention(q, k, v, 5, 0.3) - expected).abs().max() < 1e-5
    assert prefill._broken == set() and len(prefill._checked) == 2  # small calls are right: checked, kept
    q, k, v = _qkv(64, 64, seed=5)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(64, 128), scale=0.3)
    assert (chunk_attention(q, k, v, 64, 0.3) - expected).abs().max() < 1e-5
    assert prefill._broken == {"cpu_flash:float32"}


def _prefill(bundle, prompts: list[list[int]], kernels: str = "auto",
             **options) -> tuple[list[torch.Tensor], list[torch.Tensor], list]:
    """Prefill each prompt in turn (one new token each, so only the prompt's chunks run); returns each prompt's
    next-token logits, its latents gathered from the cache, and per prompt its step sizes."""
    engine = LLMEngine(bundle, EngineOptions(cache_tokens=2048, block_size=8, **options))
    runner = engine.runner
    runner.kernels = kernels
    logits, latents, steps = [], [], []
    for prompt in prompts:
        seq = engine.make_sequence({"prompt_token_ids": prompt, "max_tokens": 1, "ignore_eos": True})
        engine.add(seq)
        captured: list[torch.Tensor] = []
        tables: list[list[int]] = []
        sizes: list[int] = []
        original = runner.run_step

        def spy(seqs, num_new_tokens, *args, original=original, captured=captured, tables=tables, sizes=sizes,
                **kwargs):
            out = original(seqs, num_new_tokens, *args, **kwargs)
            captured.append(out)
            tables.append(list(seqs[0].block_table))
            sizes.extend(num_new_tokens)
            return out

        runner.run_step = spy
        while engine.has_work():
            engine.step()
        runner.run_step = original
        steps.append(sizes)
        assert seq.finish_reason == "length", seq.error
        logits.append(captured[-1][0])
        table = torch.tensor(tables[-1])
        pos = torch.arange(len(prompt))
        latents.append(runner.kv_cache[:, table[pos // 8] * 8 + pos % 8].clone())
    return logits, latents, steps


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(5, 600, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("budget,big", [(16, None), (40, None), (16, 100)])
def test_chunked_prefill_equals_one_shot(tiny_bundle, budget: int, big: int | None) -> None:
    prompt = _prompt(230, seed=3)
    (expected,), (cache_expected,), one_shot = _prefill(tiny_bundle, [prompt], max_num_batched_tokens=512,
                                                        enable_prefix_caching=False)
    assert one_shot == [[230]]
    (actual,), (cache_actual,), steps = _prefill(tiny_bundle, [prompt], max_num_batched_tokens=budget,
                                                 max_prefill_chunk_tokens=big, enable_prefix_caching=False)
    chunk = max(budget, big or 0)
    assert steps == [[chunk] * (230 // chunk) + [230 % chunk]]  # really chunked, at that size
    assert (cache_actual - cache_expected).abs().max() < 1e-5
    assert (actual - expected).abs().max() < 1e-4
    assert actual.argmax() == expected.argmax()


def test_prefill_after_a_prefix_cache_hit_equals_one_shot(tiny_bundle) -> None:
    shared = _prompt(120, seed=4)
    first, second = shared + _prompt(30, seed=5), shared + _prompt(45, seed=6)
    (_, expected), (_, cache_expected), _ = _prefill(tiny_bundle, [first, second], max_num_batched_tokens=512,
                                                     enable_prefix_caching=False)
    (_, actual), (_, cache_actual), steps = _prefill(tiny_bundle, [first, second], max_num_batched_tokens=32)
    # the second prompt computed only what follows the cached blocks of the shared prefix, in chunks
    assert sum(steps[1]) <= 165 - 112 and len(steps[1]) >= 2
    assert (cache_actual - cache_expected).abs().max() < 1e-5
    assert (actual - expected).abs().max() < 1e-4


def test_large_prompt_chunks_only_in_steps_without_decode_rows(tiny_bundle) -> None:
    """A prompt chunk that opens a step may take max_prefill_chunk_tokens; with decode rows in the step (scheduled
    first) prompts get only the ordinary budget, so decoding sequences never wait on a larger step."""
    from engine.runtime.block_manager import BlockManager

    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_prefill_chunk_tokens=100),
                          BlockManager(512, 8))
    engine = LLMEngine(tiny_bundle, EngineOptions(cache_tokens=512, block_size=8))
    long_a = engine.make_sequence({"prompt_token_ids": _prompt(300, 8), "max_tokens": 1})
    long_b = engine.make_sequence({"prompt_token_ids": _prompt(300, 9), "max_tokens": 1})
    scheduler.add(long_a)
    scheduler.add(long_b)
    batch = scheduler.schedule()
    assert batch.seqs == [long_a] and batch.num_new_tokens == [100]  # alone: one large chunk, nothing else
    long_a.num_computed_tokens = 100
    decoding = engine.make_sequence({"prompt_token_ids": _prompt(10, 7), "max_tokens": 5})
    decoding.num_computed_tokens = 10
    decoding.output_ids.append(1)  # one generated token: the next step decodes it
    scheduler.running.append(decoding)
    batch = scheduler.schedule()
    assert batch.seqs[0] is decoding and batch.num_new_tokens == [1, 15]  # decode first, then the budget's rest
