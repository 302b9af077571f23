"""Run by ``tests/test_triton_interpreter_engine.py`` in a subprocess with TRITON_INTERPRET=1: the merged engine's
Triton paths (fused decode kernels, expert tiles, fp8 GEMMs / GEMVs / grouped GEMM, the MoE silu kernel) on CPU tensors, against
the PyTorch-reference paths of the same engine.

``engine.kernels.triton_device`` is the one device gate of every "auto" dispatch; replacing it with "yes" sends CPU
tensors to the Triton kernels, which the interpreter runs. The model is float16: the interpreter's ``tl.dot`` with
bf16 operands computes garbage (numpy has no bf16), fp16 takes the same code path.

Usage: ``python tests/triton_interpret_engine_checks.py CHECKPOINT`` -> one JSON line on stdout (the measured
errors, which Triton paths ran, which fell back); it exits non-zero when a check fails.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"

import numpy as np  # noqa: E402
import torch  # noqa: E402

import engine.kernels as kernels  # noqa: E402
from engine.kernels import decode as fused  # noqa: E402
from engine.kernels import fp8, moe, prefill_layout, triton_decode, triton_fp8, triton_moe, triton_moe_tiles  # noqa: E402
from engine.kernels import triton_prefill_layout  # noqa: E402
from engine.loader import load  # noqa: E402
from engine.runtime.engine import EngineOptions, LLMEngine  # noqa: E402
from engine.runtime.graphs import decode_views, packed_size, write_decode_inputs  # noqa: E402
from tests.runtime_helpers import text_message  # noqa: E402

DTYPE = torch.float16
_original_device_gate = kernels.triton_device
calls: collections.Counter[str] = collections.Counter()


def _count(module, name: str, label) -> None:
    """Wrap ``module.name`` so each call is counted under ``label(*args)`` (None: not counted)."""
    inner = getattr(module, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        key = label(*args, **kwargs)
        if key is not None:
            calls[key] += 1
        return inner(*args, **kwargs)

    setattr(module, name, wrapper)


for _name in ("add_rms_norm", "mla_decode_prologue", "mla_decode_attention", "route_topk", "row_gemv"):
    _count(triton_decode, _name, lambda *a, _n=_name, **k: _n)
_count(triton_decode, "moe_gate_up", lambda *a, **k: "moe_gate_up_fp8" if a[7] is not None else "moe_gate_up")
_count(triton_decode, "moe_down", lambda *a, **k: "moe_down_fp8" if len(a) > 4 and a[4] is not None else "moe_down")
_count(triton_moe_tiles, "expert_order", lambda *a, **k: "expert_order")
_count(triton_moe_tiles, "tiled_gate_up", lambda *a, **k: "tiled_gate_up_fp8" if a[8] is not None else "tiled_gate_up")
_count(triton_moe_tiles, "tiled_down", lambda *a, **k: "tiled_down_fp8" if a[5] is not None else "tiled_down")
_count(triton_fp8, "skinny_linear",
       lambda x, w, s, *a: f"{'fp8_linear' if s is not None else 'skinny_linear'}[{x.shape[0]}x{w.shape[0]}]")
_count(triton_fp8, "fp8_grouped_linear", lambda x, *a: "fp8_grouped_linear")
_count(triton_moe, "silu_mul_scale", lambda *a: "silu_mul_scale" if a[2] is not None else "silu_mul")
_count(triton_moe, "combine", lambda *a: "moe_combine")
_count(triton_moe, "dispatch", lambda *a, **k: "moe_dispatch")
_count(triton_prefill_layout, "prologue", lambda *a: "prefill_prologue")
_count(triton_prefill_layout, "expand_kv", lambda *a: "expand_kv")
_count(triton_decode, "attention_splits", lambda n, width: f"attention_splits[{width}]")


@contextlib.contextmanager
def triton_forced(on: bool):
    """Every "auto" dispatch takes its Triton kernel for CPU tensors (``on``), or the engine's CPU behaviour."""
    gate = (lambda x: True) if on else _original_device_gate
    kernels.triton_device, fused.triton_device = gate, gate
    try:
        yield
    finally:
        kernels.triton_device, fused.triton_device = _original_device_gate, _original_device_gate


def fallbacks() -> list[str]:
    return (sorted(fused._broken) + sorted(fp8._broken) + sorted(moe._broken)
            + sorted(prefill_layout._broken))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: one number comparable across logits and caches."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-6)).item()


@contextlib.contextmanager
def kernel_errors(errors: dict[str, float]):
    """Each decode kernel call also runs its PyTorch reference on the same inputs (a copy of the cache for the
    prologue, which writes it); ``errors`` gets the largest relative difference per kernel output (for the router's
    ids: the fraction of rows whose expert set differs). Localises a difference to one kernel in situ."""
    saved = {}

    def wrap(name: str, reference, cache_arg: int | None = None) -> None:
        inner = getattr(triton_decode, name)
        if inner is reference:  # replaced by its reference (attention_on_reference): nothing to compare
            return
        saved[name] = inner

        def checked(*args):
            ref_args = list(args)
            if cache_arg is not None:
                ref_args[cache_arg] = args[cache_arg].clone()
            expected = reference(*ref_args)
            actual = inner(*args)
            pairs = zip(actual, expected) if isinstance(actual, tuple) else [(actual, expected)]
            for i, (a, e) in enumerate(pairs):
                key = f"{name}[{i}]"
                if a is None:
                    continue
                if a.is_floating_point():
                    err = rel_err(a, e)
                else:
                    err = (a.sort(-1).values != e.sort(-1).values).any(-1).float().mean().item()
                errors[key] = max(errors.get(key, 0.0), err)
            if cache_arg is not None:
                key = f"{name}[cache]"
                errors[key] = max(errors.get(key, 0.0), rel_err(args[cache_arg], ref_args[cache_arg]))
            return actual

        setattr(triton_decode, name, checked)

    wrap("add_rms_norm", fused.add_rms_norm_torch)
    wrap("mla_decode_prologue", fused.mla_decode_prologue_torch, cache_arg=11)
    wrap("mla_decode_attention", fused.mla_decode_attention_torch)
    wrap("route_topk", fused.route_topk_torch)
    wrap("moe_gate_up", fused.moe_gate_up_torch)
    wrap("moe_down", fused.moe_down_torch)
    wrap("row_gemv", fused.linear_torch)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(triton_decode, name, fn)


def new_engine(bundle, quantization: str | None, overlap: bool = False, **options) -> LLMEngine:
    options = {"cache_tokens": 2048, "block_size": 8, "max_num_seqs": 16} | options
    return LLMEngine(bundle, EngineOptions(overlap=overlap, quantization=quantization, **options))


def add_requests(engine: LLMEngine, rows: int, max_tokens: int, first: int = 0) -> None:
    for i in range(first, first + rows):
        engine.add(engine.make_sequence({"messages": text_message(f"request {i} " + "word " * (3 + 4 * i)),
                                         "max_tokens": max_tokens, "ignore_eos": True}))


def both_ways(runner, meta, backend: str, rows: int | None = None) -> dict[str, float]:
    """The same step on the references and with Triton forced, from the same cache; returns the errors (of the
    first ``rows`` logits rows and the real cache slots: padded rows of graph metadata only touch scratch)."""
    before = runner.kv_cache.clone()
    runner.decode_backend = backend
    runner.kernels = "torch"
    with triton_forced(False):
        expected = runner.forward_eager(meta)
    cache_expected = runner.kv_cache.clone()
    runner.kv_cache.copy_(before)
    runner.kernels = "auto"
    with triton_forced(True):
        if backend == "fused":
            assert runner.fused_decode_applicable(meta)
        actual = runner.forward_eager(meta)
    actual, expected = actual[:rows], expected[:rows]
    assert torch.isfinite(actual).all()
    written = (cache_expected != before).any(dim=-1)  # the slots this step wrote
    written[:, runner.scratch_slot :] = False
    return {"logits": rel_err(actual, expected), "cache": rel_err(runner.kv_cache[written], cache_expected[written]),
            "argmax_equal": float((actual.argmax(-1) == expected.argmax(-1)).float().mean())}


def decode_step(bundle, quantization: str | None, rows: int, padded: bool = False, first: int = 0,
                **options) -> dict[str, float]:
    """Checks 1 and 2: one pure-decode step of ``rows`` sequences on the fused backend (up to
    the GEMV limit the expert GEMVs, beyond it the expert-tiled kernels). ``padded``: on the metadata
    a CUDA graph replays (rows padded to the next bucket, 512 key slots: a split-K attention with the combine
    kernel), written from the sequences as a replay does."""
    engine = new_engine(bundle, quantization, **options)
    add_requests(engine, rows, 40, first)
    seqs = list(engine.scheduler.waiting)
    with triton_forced(False):
        while any(not s.output_ids for s in seqs):
            engine.step()  # prefill all on the references (a few steps for many rows), sample their first token
    batch = engine.scheduler.schedule()
    assert len(batch.seqs) == rows and all(n == 1 for n in batch.num_new_tokens)
    runner = engine.runner
    if not padded:
        return both_ways(runner, runner.prepare(batch.seqs, batch.num_new_tokens), "fused")
    bs, keys, bucket = engine.options.block_size, 512, rows + 1
    host = np.zeros(packed_size(bucket, keys, bs), dtype=np.int64)
    write_decode_inputs(host, batch.seqs, bucket, keys, bs, runner.scratch_slot // bs, engine.blocks.tables)
    meta = decode_views(torch.from_numpy(host), bucket, keys, bs, torch.zeros(128, dtype=torch.long))
    return both_ways(runner, meta, "fused", rows=rows)


@contextlib.contextmanager
def attention_on_reference():
    """The latent attention and the prologue (the absorbed query) on their PyTorch references while the other
    kernels stay on Triton: they are the decode kernels with ``tl.dot``, which the interpreter computes wrongly
    for bf16 operands."""
    kernels = triton_decode.mla_decode_attention, triton_decode.mla_decode_prologue
    triton_decode.mla_decode_attention = fused.mla_decode_attention_torch
    triton_decode.mla_decode_prologue = fused.mla_decode_prologue_torch
    try:
        yield
    finally:
        triton_decode.mla_decode_attention, triton_decode.mla_decode_prologue = kernels


def prefill_step(bundle, quantization: str | None) -> dict[str, float]:
    """Check 3: one prompt's prefill (enough rows for the grouped expert GEMM) with Triton forced."""
    engine = new_engine(bundle, quantization)
    engine.add(engine.make_sequence({"messages": text_message("a longer prompt " * 12), "max_tokens": 2}))
    batch = engine.scheduler.schedule()
    meta = engine.runner.prepare(batch.seqs, batch.num_new_tokens)
    out = both_ways(engine.runner, meta, "modules")
    out["tokens"] = float(sum(batch.num_new_tokens))
    return out


def generation(bundle, quantization: str | None, max_tokens: int) -> dict[str, object]:
    """Check 4: greedy generation through LLMEngine (overlap on, decode backend "auto"), Triton forced vs the
    engine's CPU paths. Tokens are compared; on a first difference (an fp16 near-tie) the rest is not compared."""
    def run(on: bool) -> list[list[int]]:
        with triton_forced(on):
            engine = new_engine(bundle, quantization, overlap=True)
            add_requests(engine, 2, max_tokens)
            seqs = list(engine.scheduler.waiting)
            while engine.has_work():
                engine.step()
            if on:
                assert engine.runner.decode_backend == "auto"
        return [list(s.output_ids) for s in seqs]

    expected, actual = run(False), run(True)
    return {"expected": expected, "actual": actual}


def main(path: str) -> None:
    started = time.monotonic()
    report: dict[str, object] = {}
    errors: dict[str, float]
    bundle = load(path, device="cpu", dtype=DTYPE)
    errors = {}
    with kernel_errors(errors):
        report["decode"] = decode_step(bundle, None, 1)  # 16-bit weights: the expert GEMVs at one row only
    report["decode_kernels"] = errors
    report["decode_calls"] = dict(calls)
    calls.clear()
    report["decode_tiled"] = decode_step(bundle, None, 10)  # > MOE_GEMV_MAX_ROWS: the expert-tiled kernels
    report["decode_tiled_calls"] = dict(calls)
    calls.clear()
    report["decode_padded"] = decode_step(bundle, None, 3, padded=True)
    report["decode_padded_calls"] = dict(calls)
    calls.clear()
    report["generation"] = generation(bundle, None, 6)
    report["generation_calls"] = dict(calls)
    calls.clear()
    # the production dtype for every decode kernel without tl.dot (norm, MLA prologue, router, expert GEMVs);
    # the interpreter rounds fp32 -> bf16 by truncation (the GPU to nearest), so results differ by bf16 ulps:
    # each kernel is also compared with its reference on the same inputs
    bundle16 = load(path, device="cpu", dtype=torch.bfloat16)
    errors = {}
    with attention_on_reference(), kernel_errors(errors):
        report["decode_bf16"] = decode_step(bundle16, None, 1)  # one row: the GEMVs (the tiles use tl.dot)
    report["decode_bf16_kernels"] = errors
    report["decode_bf16_calls"] = dict(calls)
    calls.clear()
    del bundle16
    bundle8 = load(path, device="cpu", dtype=DTYPE, quantization="fp8")
    attn = bundle8.model.language_model.model.layers[0].self_attn
    assert attn.fused_qkv_weight is not None and fp8.is_fp8(attn.fused_qkv_weight)
    report["fused_qkv_rows"] = attn.fused_qkv_weight.shape[0]
    errors = {}
    with kernel_errors(errors):
        report["decode_fp8"] = decode_step(bundle8, "fp8", 3)
    report["decode_fp8_kernels"] = errors
    report["decode_fp8_calls"] = dict(calls)
    calls.clear()
    report["decode_fp8_tiled"] = decode_step(bundle8, "fp8", 10)  # > MOE_GEMV_MAX_ROWS: the fp8 expert tiles
    report["decode_fp8_tiled_calls"] = dict(calls)
    calls.clear()
    # > MOE_TILED_MAX_ROWS_FP8: the grouped experts. Request 16's prompt meets a routing near-tie at layer 1 in fp16
    # (inputs 2e-3 apart choose another expert: 0.4 of the logits' scale, however exact each kernel is), so these
    # rows take other prompts
    report["decode_fp8_grouped"] = decode_step(bundle8, "fp8", 34, first=40, max_num_seqs=40, cache_tokens=65536,
                                               max_num_batched_tokens=65536)
    report["decode_fp8_grouped_calls"] = dict(calls)
    calls.clear()
    report["prefill_fp8"] = prefill_step(bundle8, "fp8")
    report["prefill_fp8_calls"] = dict(calls)
    calls.clear()
    report["generation_fp8"] = generation(bundle8, "fp8", 4)
    report["generation_fp8_calls"] = dict(calls)
    report["fallbacks"] = fallbacks()
    report["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
