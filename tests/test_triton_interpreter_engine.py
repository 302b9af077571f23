"""The merged engine's Triton paths on CPU through Triton's interpreter: the fused decode step (also on the padded
metadata a CUDA graph replays: split-K attention + combine kernel), the same with fp8 weights (expert GEMVs with
scales, Fp8Linear's weight-only GEMM, the fused qkv projection, absorbed weights of the dequantised kv_b_proj; past
MOE_GEMV_MAX_ROWS the fp8 expert tiles, past MOE_TILED_MAX_ROWS_FP8 the weight-only grouped expert GEMM), the expert-tiled kernels (16-bit weights, 10 rows), an
fp8 prefill on the grouped GEMM, greedy generation through LLMEngine (overlap on, full precision and fp8), and the decode kernels without tl.dot in bf16 -- each with
every "auto" dispatch forced onto Triton, against the PyTorch references, end to end and kernel by kernel.

Each kernel also has its own interpreter check (tests/fp8_interpret_checks.py); this one catches what only shows
when they run together in the engine (argument order, strides, dtypes, scales passed on, a silent fallback).
It runs ``tests/triton_interpret_engine_checks.py`` in a subprocess, since TRITON_INTERPRET must be set before
triton is first imported. scripts/test.sh installs Triton on a CPU torch, so CI runs it; without Triton it is skipped.
The model is float16: the interpreter's tl.dot with bf16 operands computes garbage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.interpreter import run_interpret_checks

pytestmark = pytest.mark.slow  # ~19 s under the interpreter on 2 cores

# fp16 logits of the tiny model: the references and the kernels differ by ~2e-3 of the largest value (measured)
REL_TOL = 1e-2
# bf16: the interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest), one bf16 ulp (2^-7 of a
# value) per rounding: ~7e-3 per kernel output, ~1.4e-2 on the logits after 3 layers (measured)
BF16_KERNEL_TOL = 2 * 2**-7
BF16_LOGITS_TOL = 5e-2


def test_engine_triton_paths_under_interpreter(tiny_checkpoint_a3b: Path) -> None:
    out = run_interpret_checks("triton_interpret_engine_checks.py", str(tiny_checkpoint_a3b))
    report = json.loads(out.strip().splitlines()[-1])

    assert report["fallbacks"] == [], report["fallbacks"]  # no kernel failed and was replaced by its reference
    for check in ("decode", "decode_tiled", "decode_padded", "decode_fp8", "decode_fp8_tiled", "decode_fp8_grouped",
                  "prefill_fp8"):
        errors = report[check]
        assert errors["logits"] < REL_TOL and errors["cache"] < REL_TOL, (check, errors)
        assert errors["argmax_equal"] == 1.0, (check, errors)
    # kernel by kernel, on the inputs the engine gave them (router ids: fraction of rows with another expert set)
    for check in ("decode_kernels", "decode_fp8_kernels"):
        kernels = report[check]
        assert len(kernels) >= 9 and max(kernels.values()) < REL_TOL, (check, kernels)
    assert report["decode_padded_calls"].get("attention_splits[512]", 0) > 0  # split-K attention + combine

    # bf16, attention (tl.dot) on its reference: argmax may flip on the random model's near-ties, so no argmax
    bf16 = report["decode_bf16_kernels"]
    assert {"add_rms_norm[0]", "route_topk[0]", "moe_gate_up[0]", "moe_down[0]", "row_gemv[0]"} <= set(bf16)
    assert max(bf16.values()) < BF16_KERNEL_TOL, bf16
    assert bf16["route_topk[0]"] == 0.0, bf16  # fp32 router logits: the same experts
    assert report["decode_bf16"]["logits"] < BF16_LOGITS_TOL, report["decode_bf16"]

    # the Triton kernels really ran (the gate was forced; the counts are per layer and step)
    decode = report["decode_calls"]
    for kernel in ("add_rms_norm", "mla_decode_prologue", "mla_decode_attention", "route_topk", "moe_gate_up",
                   "moe_down", "row_gemv"):
        assert decode.get(kernel, 0) > 0, (kernel, decode)
    fp8_decode = report["decode_fp8_calls"]
    assert fp8_decode.get("moe_gate_up_fp8", 0) > 0 and fp8_decode.get("moe_down_fp8", 0) > 0, fp8_decode
    assert fp8_decode.get(f"fp8_linear[3x{report['fused_qkv_rows']}]", 0) > 0, fp8_decode  # the fused qkv GEMV
    assert sum(n for k, n in fp8_decode.items() if k.startswith("fp8_linear[3x")) > 3, fp8_decode  # + Fp8Linears
    tiled = report["decode_tiled_calls"]  # 16-bit weights past one row: the expert tiles, not the GEMVs
    assert tiled.get("expert_order", 0) > 0 and tiled.get("tiled_gate_up", 0) > 0, tiled
    assert tiled.get("tiled_down", 0) > 0 and tiled.get("moe_gate_up", 0) == 0, tiled
    fp8_tiled = report["decode_fp8_tiled_calls"]  # fp8 experts past the GEMVs: the tiles, up to 32 rows
    assert fp8_tiled.get("tiled_gate_up_fp8", 0) > 0 and fp8_tiled.get("tiled_down_fp8", 0) > 0, fp8_tiled
    assert fp8_tiled.get("fp8_grouped_linear", 0) == 0, fp8_tiled
    assert report["decode_fp8_grouped_calls"].get("fp8_grouped_linear", 0) > 0, report["decode_fp8_grouped_calls"]
    assert report["decode_fp8_grouped_calls"].get("tiled_gate_up_fp8", 0) == 0, report["decode_fp8_grouped_calls"]
    prefill = report["prefill_fp8_calls"]
    assert report["prefill_fp8"]["tokens"] > 64  # past the GEMV row limit of Fp8Linear's weight-only GEMM
    assert prefill.get("fp8_grouped_linear", 0) > 0 and prefill.get("silu_mul_scale", 0) > 0, prefill
    assert prefill.get("moe_combine", 0) > 0, prefill  # the k slots + shared output summed in one pass
    assert prefill.get("moe_dispatch", 0) > 0, prefill  # the pairs grouped by expert in a counting sort
    # the projections' glue and the K/V layout in one pass each (norm, RoPE, cache write; head-major query)
    assert prefill.get("prefill_prologue", 0) > 0 and prefill.get("expand_kv", 0) > 0, prefill
    assert prefill.get("silu_mul", 0) > 0, prefill  # the shared experts' (and dense MLP's) SwiGLU in one pass
    assert prefill.get("route_topk", 0) > 0, prefill  # the router's tail in one kernel for prompt rows too
    assert prefill.get("add_rms_norm", 0) > 0, prefill  # each residual add fused with the norm after it

    # greedy generation: prefill (grouped experts, fused silu) then the fused decode steps, run ahead. The model,
    # prompts and checkpoint seed are fixed, so the tokens are deterministic; they are equal here (no fp16
    # near-tie among the top logits; the per-step logits agree within REL_TOL as checked above).
    for check, length in (("generation", 6), ("generation_fp8", 4)):
        generation = report[check]
        assert generation["actual"] == generation["expected"], check
        assert all(len(tokens) == length for tokens in generation["actual"]), check
        assert report[f"{check}_calls"].get("mla_decode_attention", 0) > 0, report[f"{check}_calls"]
    assert report["generation_fp8_calls"].get("moe_gate_up_fp8", 0) > 0
