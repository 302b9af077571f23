"""FP8 weights (``quantization: fp8``) on CPU: quantisation error bounds, Fp8Linear and the fp8 expert bank against
their bf16/fp32 originals, the fused MoE GEMV references with scales, and the tiny checkpoint engine end to end.

The Triton kernels are checked under the Triton interpreter in a subprocess (``tests/fp8_interpret_checks.py``);
the GPU paths in ``tests/test_gpu_fp8.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.interpreter import run_interpret_checks
import torch.nn.functional as F
from torch import nn

from engine.kernels import decode as fused
from engine.kernels import fp8
from engine.model.decoder import ExpertBank
from engine.runtime.engine import EngineOptions, LLMEngine
from tests.runtime_helpers import plain_step, text_message


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantize_round_trip_error_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different size
    w[3] = 0.0  # an all-zero row
    q, s = fp8.quantize_rows(w, chunk_rows=7)  # chunking must not change anything
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64,) and s.dtype == torch.float32
    back = fp8.dequantize_rows(q, s, torch.float32)
    assert torch.isfinite(back).all() and (back[3] == 0).all()
    # e4m3: relative error <= 2^-4 for normal values, absolute <= 2^-10 · scale in the subnormal range
    bound = torch.maximum(w.abs() * 2**-4, s[:, None] * 2**-10) * 1.0001
    assert ((back - w).abs() <= bound).all()
    assert (q.float().abs().amax(dim=1)[s > 1e-11] == fp8.FP8_MAX).all()  # each row's maximum maps to 448
    q3, s3 = fp8.quantize_rows(w.view(4, 16, 256))  # stacked (E, N, K) weights: one scale per (expert, row)
    assert s3.shape == (4, 16) and torch.equal(q3.view(64, 256).float(), q.float())


def test_fp8_linear_matches_linear() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True)
    layer = fp8.Fp8Linear.from_linear(lin)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (40,)
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        expected, actual = lin(x), layer(x)
    assert actual.shape == (3, 5, 40) and actual.dtype == x.dtype
    assert _rel(actual, expected) < 0.05
    # the reference is exactly the GEMM over the dequantised matrix
    assert torch.allclose(actual, F.linear(x, layer.dequantized_weight(torch.float32), lin.bias), atol=1e-5)
    assert fp8.dense_weight(layer, torch.float32).dtype == torch.float32
    assert fp8.dense_weight(lin, torch.float32) is lin.weight
    # linear() passes plain weights straight through
    assert torch.equal(fp8.linear(x, lin.weight, None, lin.bias), F.linear(x, lin.weight, lin.bias))


@pytest.mark.parametrize("backend", ["grouped", "loop"])
def test_expert_bank_fp8_close_to_fp32(backend: str) -> None:
    torch.manual_seed(0)
    bank = ExpertBank(8, 64, 32)
    for p in bank.parameters():
        nn.init.normal_(p, 0, 0.1)
    x = torch.randn(10, 64)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(10)])
    weights = torch.rand(10, 2)
    bank.backend = backend
    with torch.no_grad():
        expected = bank(x, ids, weights)
        bank.quantize_fp8_()
        assert bank.is_fp8 and bank.gate_proj.dtype == torch.float8_e4m3fn and bank.down_scale.shape == (8, 64)
        actual = bank(x, ids, weights)
        bank.quantize_fp8_()  # idempotent
    assert _rel(actual, expected) < 0.08


def test_moe_gemv_references_with_scales() -> None:
    """The fused decode GEMVs with fp8 weights + scales equal the same GEMVs over the dequantised weights."""
    torch.manual_seed(0)
    e, i, d, n, k = 6, 16, 32, 3, 2
    wg, wu, wd = torch.randn(e, i, d), torch.randn(e, i, d), torch.randn(e, d, i)
    sg, su, sd = torch.randn(2 * i, d), torch.randn(2 * i, d), torch.randn(d, 2 * i)
    (qg, s_g), (qu, s_u), (qd, s_d) = (fp8.quantize_rows(w) for w in (wg, wu, wd))
    (qsg, s_sg), (qsu, s_su), (qsd, s_sd) = (fp8.quantize_rows(w) for w in (sg, su, sd))
    deq = fp8.dequantize_rows
    x = torch.randn(n, d)
    ids = torch.randint(0, e, (n, k))
    rw = torch.rand(n, k)
    hidden = fused.moe_gate_up(x, ids, rw, qg, qu, qsg, qsu, impl="torch", gate_scale=s_g, up_scale=s_u,
                               shared_gate_scale=s_sg, shared_up_scale=s_su)
    expected = fused.moe_gate_up(x, ids, rw, deq(qg, s_g, torch.float32), deq(qu, s_u, torch.float32),
                                 deq(qsg, s_sg, torch.float32), deq(qsu, s_su, torch.float32), impl="torch")
    assert hidden.shape == (n, k + 2, i) and torch.allclose(hidden, expected, atol=1e-4)
    out = fused.moe_down(hidden, ids, qd, qsd, impl="torch", down_scale=s_d, shared_down_scale=s_sd)
    ref = fused.moe_down(hidden, ids, deq(qd, s_d, torch.float32), deq(qsd, s_sd, torch.float32), impl="torch")
    assert torch.allclose(out, ref, atol=1e-4)


def _prompt_logits(bundle, quantization: str | None):
    engine = LLMEngine(bundle, EngineOptions(cache_tokens=4096, block_size=8, quantization=quantization,
                                             overlap=False))  # the test prepares steps by hand
    engine.add(engine.make_sequence({"messages": text_message("the quick brown fox " * 6), "max_tokens": 4,
                                     "ignore_eos": True}))
    batch = engine.scheduler.schedule()
    return engine, engine.runner.forward(engine.runner.prepare(batch.seqs, batch.num_new_tokens))


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_checkpoint_a3b", "tiny_checkpoint_q_lora"])
def test_tiny_engine_fp8_close_to_full_precision(fixture: str, request: pytest.FixtureRequest) -> None:
    from engine.loader import load

    path = request.getfixturevalue(fixture)
    _, expected = _prompt_logits(load(path, device="cpu", dtype=torch.float32), None)
    bundle = load(path, device="cpu", dtype=torch.float32)
    engine, actual = _prompt_logits(bundle, "fp8")
    lm = bundle.model.language_model
    assert isinstance(lm.lm_head, fp8.Fp8Linear) and bundle.model.quantization == "fp8"
    attn = lm.model.layers[0].self_attn
    assert isinstance(attn.kv_b_proj, fp8.Fp8Linear) and isinstance(attn.o_proj, fp8.Fp8Linear)
    assert lm.model.embed_tokens.weight.dtype == torch.float32 and engine.runner.dtype == torch.float32
    if hasattr(attn, "q_proj"):  # the fused q/kv layout survives quantisation
        assert attn.fused_qkv_weight is not None and attn.fused_qkv_scale is not None
        assert attn.fused_qkv_weight.dtype == torch.float8_e4m3fn
    assert F.cosine_similarity(actual, expected).min() > 0.99
    assert (actual.argmax(-1) == expected.argmax(-1)).all()
    # the fused decode path (what CUDA graphs replay) agrees with the plain path on the fp8 weights
    engine.step()
    engine.step()
    batch = engine.scheduler.schedule()
    meta = engine.runner.prepare(batch.seqs, batch.num_new_tokens)
    plain, cache_plain = plain_step(engine.runner, meta)
    engine.runner.decode_backend = "fused"
    assert engine.runner.fused_decode_applicable(meta)
    fast = engine.runner.forward_eager(meta)
    assert (fast - plain).abs().max() < 1e-4 and (engine.runner.kv_cache - cache_plain).abs().max() < 1e-4


def test_tiny_engine_fp8_generates(tiny_checkpoint_a3b) -> None:
    from engine.loader import load

    bundle = load(tiny_checkpoint_a3b, device="cpu", dtype=torch.bfloat16, quantization="fp8")
    engine = LLMEngine(bundle, EngineOptions(cache_tokens=4096, block_size=8, quantization="fp8"))
    engine.add(engine.make_sequence({"messages": text_message("count to ten"), "max_tokens": 6, "ignore_eos": True,
                                     "request_id": "a"}))
    engine.add(engine.make_sequence({"messages": text_message("and back " * 9), "max_tokens": 6, "ignore_eos": True,
                                     "request_id": "b"}))
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    finished = set()
    for _ in range(20):
        if not engine.has_work():
            break
        for delta in engine.step():
            assert delta.error is None
            tokens[delta.request_id].extend(delta.token_ids)
            if delta.finish_reason is not None:
                finished.add(delta.request_id)
    assert finished == {"a", "b"} and all(len(t) == 6 for t in tokens.values())


def test_fp8_halves_decoder_weight_memory(tiny_checkpoint_a3b) -> None:
    from engine.loader import load, quantize_model_

    bundle = load(tiny_checkpoint_a3b, device="cpu", dtype=torch.bfloat16)
    layers = bundle.model.language_model.model.layers

    def nbytes() -> int:
        return sum(t.numel() * t.element_size() for t in [*layers.parameters(), *layers.buffers()])

    before = nbytes()
    quantize_model_(bundle.model, "fp8")
    # fp8 values plus one fp32 scale per row; norms and the fp32 router stay
    assert nbytes() < 0.62 * before


def test_unknown_quantization_is_refused(tiny_checkpoint) -> None:
    from pydantic import ValidationError

    from engine.loader import load, quantize_model_

    with pytest.raises(ValidationError):
        EngineOptions(quantization="int4")
    bundle = load(tiny_checkpoint, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="unsupported quantization"):
        quantize_model_(bundle.model, "int4")


def test_triton_kernels_under_interpreter() -> None:
    """Triton's interpreter runs the fp8 kernels on CPU tensors: a subprocess, since TRITON_INTERPRET must be set
    before triton is first imported."""
    assert "fp8 interpreter checks passed" in run_interpret_checks("fp8_interpret_checks.py")


def test_fp8_agreement_harness_scores_a_checkpoint_on_text(tiny_checkpoint_a3b: Path, tmp_path: Path) -> None:
    """The harness users run on real weights: --model loads a checkpoint through the loader, --text cuts a file
    into prompt windows; the report names the model and its layer count and measures every position."""
    text = tmp_path / "contract.txt"
    text.write_text("The Distributor shall sell the Products only in the Territory. " * 60, encoding="utf-8")
    out = tmp_path / "agreement.json"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "fp8_agreement.py"), "--device", "cpu", "--model",
         str(tiny_checkpoint_a3b), "--text", str(text), "--prompts", "2", "--prompt-len", "64", "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    config = json.loads((tiny_checkpoint_a3b / "config.json").read_text())
    assert report["model"] == str(tiny_checkpoint_a3b)
    assert report["layers"] == config["text_config"]["num_hidden_layers"] == len(report["agreement"]["layer_rel_rms_err"])
    agreement = report["agreement"]
    assert agreement["positions"] == 128
    assert 0 < agreement["logit_rel_rms_err"] < 1 and 0 <= agreement["top1_agreement"] <= 1
