"""FP8 weight paths on the GPU against their references (skipped where no CUDA device is present): the Triton
weight-only GEMM, ``torch._scaled_mm`` rowwise, the grouped expert path, the fp8 MoE decode GEMVs, and the tiny
checkpoint engine with ``quantization: fp8`` (fused decode + CUDA graphs) against its own eager fp8 run."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import decode as fused
from engine.kernels import fp8
from tests.runtime_helpers import random_expert_bank

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= rel * expected.float().abs().max().item() + 1e-3, err


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64, 300])
@pytest.mark.parametrize("shape", [(3648, 2048), (576, 2048), (2048, 11264)])
def test_fp8_linear_paths_match_reference(rows: int, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    n, k = shape
    q, s = fp8.quantize_rows(torch.randn(n, k, device="cuda") / k**0.5)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    expected = fp8.linear(x, q, s, impl="torch")
    if rows <= fp8.GEMV_MAX_ROWS:
        _close(fp8.linear(x, q, s, impl="triton"), expected, 1e-2)
    if fp8.scaled_mm_available(x):
        _close(fp8.linear(x, q, s, impl="scaled_mm"), expected, 6e-2)  # activations quantised too
    out = fp8.linear(x, q, s)  # auto
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    _close(out, expected, 6e-2)
    assert not fp8._broken, fp8._broken


@pytest.mark.gpu
@pytest.mark.parametrize("k", [2048, 11264])
def test_activation_quantisation_kernel_is_exact(k: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(300, k, device="cuda", dtype=torch.bfloat16) * torch.logspace(-3, 3, 300, device="cuda")[:, None]
    x[7] = 0
    q_ref, s_ref = fp8.quantize_activation_rows(x, impl="torch")
    q, s = fp8.quantize_activation_rows(x, impl="triton")
    assert torch.allclose(s, s_ref, rtol=1e-6, atol=0)
    assert (q.float() != q_ref.float()).float().mean().item() < 1e-3  # division rounding may differ by one ulp


@pytest.mark.gpu
def test_fp8_expert_bank_grouped_matches_loop() -> None:
    bank, x, ids, weights = random_expert_bank(1000)
    with torch.no_grad():
        bank.backend = "grouped"
        bf16 = bank(x, ids, weights).float()
        bank.quantize_fp8_()
        grouped = bank(x, ids, weights).float()
        bank.backend = "loop"
        looped = bank(x, ids, weights).float()
    _close(grouped, looped, 6e-2)
    assert ((looped - bf16).norm() / bf16.norm()).item() < 0.08
    assert not fp8._broken, fp8._broken


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [64, 1024])
@pytest.mark.parametrize("impl", ["triton", "scaled_grouped_mm"])
def test_fp8_grouped_paths_match_reference(tokens: int, impl: str) -> None:
    if impl == "scaled_grouped_mm" and not fp8._scaled_grouped_ok(0):
        pytest.skip("torch._scaled_grouped_mm needs SM90")
    torch.manual_seed(0)
    e, k = 64, 6
    for n, d in ((1408, 2048), (2048, 1408)):  # gate/up, down
        q, s = fp8.quantize_rows(torch.randn(e, n, d, device="cuda") * 0.02)
        ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(tokens)]).flatten()
        counts = torch.zeros(e, dtype=torch.long, device="cuda").scatter_add_(0, ids, torch.ones_like(ids))
        ends = counts.cumsum(0).to(torch.int32)
        x = torch.randn(tokens * k, d, device="cuda", dtype=torch.bfloat16)
        expected = fp8.grouped_linear(x, q, s, ends, impl="torch")
        _close(fp8.grouped_linear(x, q, s, ends, impl=impl), expected, 1e-2 if impl == "triton" else 6e-2)


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "tiled"), [(1, False), (8, False), (9, True), (64, True), (128, True)])
def test_fp8_moe_gemvs_match_reference(rows: int, tiled: bool) -> None:
    """The expert GEMVs (few rows) and the expert-tiled kernels (more) with fp8 weights, against the reference."""
    torch.manual_seed(0)
    e, i, d, k = 64, 1408, 2048, 6
    dev = "cuda"
    (qg, s_g), (qu, s_u) = (fp8.quantize_rows(torch.randn(e, i, d, device=dev) * 0.02) for _ in range(2))
    qd, s_d = fp8.quantize_rows(torch.randn(e, d, i, device=dev) * 0.02)
    (qsg, s_sg), (qsu, s_su) = (fp8.quantize_rows(torch.randn(2 * i, d, device=dev) * 0.02) for _ in range(2))
    qsd, s_sd = fp8.quantize_rows(torch.randn(d, 2 * i, device=dev) * 0.02)
    x = torch.randn(rows, d, device=dev, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(e, device=dev)[:k] for _ in range(rows)])
    rw = torch.rand(rows, k, device=dev)
    order = fused.moe_expert_order(ids, e, impl="triton") if tiled else None
    scales = dict(gate_scale=s_g, up_scale=s_u, shared_gate_scale=s_sg, shared_up_scale=s_su)
    ref = fused.moe_gate_up(x, ids, rw, qg, qu, qsg, qsu, impl="torch", **scales)
    out = fused.moe_gate_up(x, ids, rw, qg, qu, qsg, qsu, impl="triton", order=order, **scales)
    _close(out, ref, 2e-2)
    down_ref = fused.moe_down(ref, ids, qd, qsd, impl="torch", down_scale=s_d, shared_down_scale=s_sd)
    _close(fused.moe_down(ref, ids, qd, qsd, impl="triton", down_scale=s_d, shared_down_scale=s_sd, order=order),
           down_ref, 1e-2)


@pytest.mark.gpu
def test_tiny_engine_fp8_on_gpu(tiny_checkpoint_a3b) -> None:
    """quantization=fp8 on CUDA: the graph-replayed fused decode produces what the eager fp8 engine does,
    and the prompt logits stay close to bf16."""
    from engine.loader import load
    from engine.runtime.engine import EngineOptions, LLMEngine

    def run(quantization, graphs):
        bundle = load(tiny_checkpoint_a3b, device="cuda", dtype=torch.bfloat16)
        engine = LLMEngine(bundle, EngineOptions(cache_tokens=8192, block_size=16, quantization=quantization,
                                                 cuda_graphs=graphs))
        out: dict[str, list[int]] = {}
        for j in range(3):
            engine.add(engine.make_sequence({"messages": [{"role": "user", "content": f"story {j} " * (4 + j)}],
                                             "max_tokens": 12, "ignore_eos": True, "request_id": str(j)}))
        while engine.has_work():
            for delta in engine.step():
                assert delta.error is None
                out.setdefault(delta.request_id, []).extend(delta.token_ids)
        return out

    eager = run("fp8", False)
    graphed = run("fp8", True)
    assert all(len(t) == 12 for t in eager.values())
    assert graphed == eager
    assert not fp8._broken, fp8._broken
