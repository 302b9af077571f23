"""The MoE dispatch (engine.kernels.moe.dispatch): the reference groups the (token, slot) pairs by expert as
ExpertBank.forward did inline (a stable sort, counts, the inverse permutation), its outputs feed combine and
F.grouped_mm, and the Triton kernel matches it bit for bit (under the interpreter here, on the GPU in
tests/test_gpu_kernels.py)."""

from __future__ import annotations


import pytest
import torch

from tests.interpreter import run_interpret_checks
import torch.nn.functional as F

from engine.kernels import moe


def naive_dispatch(ids: torch.Tensor, weights: torch.Tensor, n_experts: int, dtype: torch.dtype):
    """The semantics spelled out pair by pair: experts in order, each expert's pairs in flat order t·k + j."""
    n_tokens, top_k = ids.shape
    pairs = [(t, j) for e in range(n_experts) for t in range(n_tokens) for j in range(top_k) if ids[t, j] == e]
    tokens = torch.tensor([t for t, _ in pairs], dtype=torch.int64)
    rows = torch.stack([weights[t, j] for t, j in pairs]).to(dtype)[:, None]
    ends = torch.tensor([int((ids == e).sum()) for e in range(n_experts)]).cumsum(0).to(torch.int32)
    inverse = torch.empty(n_tokens * top_k, dtype=torch.int64)
    for row, (t, j) in enumerate(pairs):
        inverse[t * top_k + j] = row
    return tokens, rows, ends, inverse


def _routed(n_tokens: int, top_k: int, n_experts: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_tokens, n_experts, generator=gen).topk(top_k, dim=1).indices


CASES = {
    "a3b": (_routed(40, 6, 64, 0), 64),
    "experts with no pairs": (_routed(30, 4, 12, 1), 64),  # ids only in 0..11
    "all pairs on one expert": (torch.full((25, 1), 7), 16),
    "one token": (_routed(1, 6, 64, 2), 64),
    "k=1": (_routed(33, 1, 8, 3), 8),
    "int32 ids": (_routed(20, 2, 8, 4).int(), 8),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_groups_pairs_by_expert(case: str, dtype: torch.dtype) -> None:
    ids, n_experts = CASES[case]
    weights = torch.rand(ids.shape, generator=torch.Generator().manual_seed(9))
    actual = moe.dispatch_torch(ids, weights, n_experts, dtype)
    expected = naive_dispatch(ids, weights, n_experts, dtype)
    for name, a, e in zip(("tokens", "row_weights", "offsets", "inverse"), actual, expected):
        assert a.dtype == e.dtype and torch.equal(a, e), name
    # CPU tensors take the reference through the public entry point
    for a, e in zip(moe.dispatch(ids, weights, n_experts, dtype), actual):
        assert torch.equal(a, e)


def test_outputs_feed_grouped_mm_and_combine() -> None:
    """offsets are grouped_mm's offs and inverse is what combine takes: routed experts end to end equal a loop
    over tokens and slots."""
    n_tokens, top_k, n_experts, d, out = 13, 3, 5, 8, 4
    gen = torch.Generator().manual_seed(1)
    ids = torch.rand(n_tokens, n_experts, generator=gen).topk(top_k, dim=1).indices
    weights = torch.rand(n_tokens, top_k, generator=gen)
    x = torch.randn(n_tokens, d, generator=gen)
    w = torch.randn(n_experts, d, out, generator=gen)
    tokens, row_weights, offsets, inverse = moe.dispatch(ids, weights, n_experts, torch.float32)
    rows = F.grouped_mm(x[tokens], w, offs=offsets) * row_weights
    actual = moe.combine(rows, inverse, top_k)
    expected = torch.stack([sum(weights[t, j] * (x[t] @ w[ids[t, j]]) for j in range(top_k))
                            for t in range(n_tokens)])
    torch.testing.assert_close(actual, expected)
    assert torch.equal(tokens[inverse], torch.arange(n_tokens).repeat_interleave(top_k))


def test_triton_kernel_under_interpreter() -> None:
    out = run_interpret_checks("moe_dispatch_interpret_checks.py")
    assert "moe dispatch interpreter checks passed" in out
    assert out.count("ok ") == 11
