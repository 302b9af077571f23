"""GPU kernels against their plain PyTorch paths (skipped where no CUDA device is present)."""

from __future__ import annotations

import pytest
import torch

from engine.model.decoder import ExpertBank

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
def test_grouped_gemm_experts_match_loop_on_gpu() -> None:
    torch.manual_seed(0)
    bank = ExpertBank(64, 2048, 1408).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(3000, 2048, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(64, device="cuda")[:6] for _ in range(3000)])
    weights = torch.rand(3000, 6, device="cuda")
    with torch.no_grad():
        bank.backend = "grouped"
        grouped = bank(x, ids, weights).float()
        bank.backend = "loop"
        looped = bank(x, ids, weights).float()
    assert (grouped - looped).abs().max() <= 2e-2 * looped.abs().max()


@pytest.mark.gpu
def test_tiny_checkpoint_on_gpu_matches_cpu(tiny_checkpoint) -> None:
    """The same loader and model on CUDA (fp32 and bf16) agree with the CPU fp32 run."""
    from engine.loader import load_model

    cpu = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
    gpu = load_model(tiny_checkpoint, device="cuda", dtype=torch.float32)
    gpu_bf16 = load_model(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 700, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = cpu(ids)
        actual = gpu(ids.cuda()).cpu()
        rough = gpu_bf16(ids.cuda()).cpu()
    assert (actual - expected).abs().max() < 1e-3
    assert (rough - expected).abs().median() < 0.1


@pytest.mark.gpu
def test_engine_cuda_graph_decode_matches_eager(tiny_checkpoint) -> None:
    """Greedy tokens with CUDA-graph decode equal the eager runtime's on the same GPU."""
    from engine.loader import load
    from engine.runtime.engine import EngineOptions, LLMEngine

    bundle = load(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)  # graphs need the bf16 grouped GEMM
    outputs = []
    for graphs in (False, True):
        engine = LLMEngine(bundle, EngineOptions(cache_tokens=4096, cuda_graphs=graphs))
        seqs = [
            engine.make_sequence({"messages": [{"role": "user", "content": f"question number {i} " * (i + 1)}],
                                  "max_tokens": 12, "ignore_eos": True})
            for i in range(5)
        ]
        for seq in seqs:
            engine.add(seq)
        while engine.has_work():
            engine.step()
        outputs.append([s.output_ids for s in seqs])
        if graphs:
            assert engine.runner.graphs.replays > 0
    assert outputs[0] == outputs[1]
