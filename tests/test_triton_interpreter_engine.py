"""The merged engine's Triton paths on CPU through Triton's interpreter: the fused decode step, the same with fp8
weights (expert GEMVs with scales, Fp8Linear's weight-only GEMM, the fused qkv projection, absorbed weights of the
dequantised kv_b_proj), an fp8 prefill on the weight-only grouped expert GEMM, and greedy generation through
LLMEngine (overlap on) -- each with every "auto" dispatch forced onto Triton, against the PyTorch references.

Each kernel also has its own interpreter check (tests/fp8_interpret_checks.py); this one catches what only shows
when they run together in the engine (argument order, strides, dtypes, scales passed on, a silent fallback).
It runs ``tests/triton_interpret_engine_checks.py`` in a subprocess, since TRITON_INTERPRET must be set before
triton is first imported. Triton is not a CI dependency: without it this test is skipped (in CI it always is).
The model is float16: the interpreter's tl.dot with bf16 operands computes garbage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# fp16 logits of the tiny model: the references and the kernels differ by ~1.5e-3 of the largest value (measured)
REL_TOL = 1e-2


def test_engine_triton_paths_under_interpreter(tiny_checkpoint_a3b: Path) -> None:
    pytest.importorskip("triton")
    script = Path(__file__).with_name("triton_interpret_engine_checks.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(script.parent.parent)}
    done = subprocess.run([sys.executable, str(script), str(tiny_checkpoint_a3b)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert report["fallbacks"] == [], report["fallbacks"]  # no kernel failed and was replaced by its reference
    for check in ("decode", "decode_fp8", "decode_fp8_grouped", "prefill_fp8"):
        errors = report[check]
        assert errors["logits"] < REL_TOL and errors["cache"] < REL_TOL, (check, errors)
        assert errors["argmax_equal"] == 1.0, (check, errors)

    # the Triton kernels really ran (the gate was forced; the counts are per layer and step)
    decode = report["decode_calls"]
    for kernel in ("add_rms_norm", "mla_decode_prep", "mla_decode_attention", "route_topk", "moe_gate_up",
                   "moe_down"):
        assert decode.get(kernel, 0) > 0, (kernel, decode)
    fp8_decode = report["decode_fp8_calls"]
    assert fp8_decode.get("moe_gate_up_fp8", 0) > 0 and fp8_decode.get("moe_down_fp8", 0) > 0, fp8_decode
    assert fp8_decode.get(f"fp8_linear[3x{report['fused_qkv_rows']}]", 0) > 0, fp8_decode  # the fused qkv GEMV
    assert sum(n for k, n in fp8_decode.items() if k.startswith("fp8_linear[3x")) > 3, fp8_decode  # + Fp8Linears
    assert report["decode_fp8_grouped_calls"].get("fp8_grouped_linear", 0) > 0, report["decode_fp8_grouped_calls"]
    prefill = report["prefill_fp8_calls"]
    assert report["prefill_fp8"]["tokens"] > 64  # past the GEMV row limit of Fp8Linear's weight-only GEMM
    assert prefill.get("fp8_grouped_linear", 0) > 0 and prefill.get("silu_mul_scale", 0) > 0, prefill

    # greedy generation: prefill (grouped experts, fused silu) then the fused decode steps, run ahead. The model,
    # prompts and checkpoint seed are fixed, so the tokens are deterministic; they are equal here (no fp16
    # near-tie among the top logits; the per-step logits agree within REL_TOL as checked above).
    generation = report["generation"]
    assert generation["actual"] == generation["expected"]
    assert all(len(tokens) == 6 for tokens in generation["actual"])
    assert report["generation_calls"].get("mla_decode_attention", 0) > 0, report["generation_calls"]
