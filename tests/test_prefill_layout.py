"""The prefill layout kernels (engine.kernels.prefill_layout): the references keep the numbers the decoder's
modules computed before them, and the Triton kernels match the references (under the interpreter here, on the
GPU in tests/test_gpu_kernels.py)."""

from __future__ import annotations


import torch

from tests.interpreter import run_interpret_checks

from engine.kernels import prefill_layout
from engine.model.rope import apply_interleaved_rope


def test_reference_equals_the_unfused_projection_glue() -> None:
    """query_and_latent_torch is the separate RoPE / norm / cat the attention module did inline: the same bits."""
    heads, nope, rope, rank = 4, 16, 8, 32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, heads * (nope + rope), generator=gen).to(torch.bfloat16)
    kv = torch.randn(2, 7, rank + rope, generator=gen).to(torch.bfloat16)
    angles = torch.rand(2, 7, rope // 2, generator=gen)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    weight = torch.rand(rank, generator=gen) + 0.5
    query, latent = prefill_layout.query_and_latent_torch(q, kv, heads, nope, rope, rank, weight, 1e-6, cos, sin)

    q_nope, q_pe = q.view(2, 7, heads, nope + rope).split([nope, rope], dim=-1)
    c_kv, k_pe = kv.split([rank, rope], dim=-1)
    q_rot = apply_interleaved_rope(q_pe, cos[..., None, :], sin[..., None, :])
    k_rot = apply_interleaved_rope(k_pe, cos, sin)
    normed = torch.nn.functional.rms_norm(c_kv, (rank,), weight.to(torch.bfloat16), 1e-6)
    assert torch.equal(query, torch.cat([q_nope, q_rot], dim=-1))
    assert torch.equal(latent, torch.cat([normed, k_rot], dim=-1))


def test_reference_prologue_writes_the_cache_and_expand_kv_lays_out_heads() -> None:
    heads, nope, rope, rank, v_dim = 2, 4, 2, 6, 3
    q = torch.randn(3, heads * (nope + rope))
    kv = torch.randn(3, rank + rope)
    cos, sin = torch.ones(3, rope // 2), torch.zeros(3, rope // 2)  # angle 0: RoPE is the identity
    cache = torch.zeros(10, rank + rope)
    slots = torch.tensor([7, 2, 5])
    query = prefill_layout.prologue(q, kv, heads, nope, rope, rank, torch.ones(rank), 1e-6, cos, sin, cache, slots)
    assert torch.equal(query, q.view(3, heads, nope + rope))
    assert torch.equal(cache[slots, rank:], kv[:, rank:]) and cache[[0, 1, 3, 4, 6, 8, 9]].abs().sum() == 0
    assert torch.allclose(cache[slots, :rank].pow(2).mean(-1), torch.ones(3), atol=1e-4)  # RMS-normed

    kv_full = torch.arange(4 * heads * (nope + v_dim), dtype=torch.float32).view(4, -1)
    k_rope = torch.randn(4, rope)
    k, v = prefill_layout.expand_kv(kv_full, k_rope, heads, nope, v_dim)
    per_head = kv_full.view(4, heads, nope + v_dim)
    for h in range(heads):
        assert torch.equal(k[h], torch.cat([per_head[:, h, :nope], k_rope], dim=-1))
        assert torch.equal(v[h], per_head[:, h, nope:])


def test_triton_kernels_under_interpreter() -> None:
    out = run_interpret_checks("prefill_layout_interpret_checks.py")
    assert "prefill layout interpreter checks passed" in out
    assert out.count("ok ") == 8


def test_router_weight_exact_in_16_bits_only_when_every_value_is(tiny_checkpoint_a3b) -> None:
    """Prompt rows' router logits take the 16-bit kernel only when the fp32 router weight loses nothing in x's
    dtype (then every product is exact in fp32); otherwise they keep the fp32 product."""
    from engine.loader import load_model
    from engine.model.decoder import MoEGate

    model = load_model(tiny_checkpoint_a3b, dtype=torch.bfloat16)
    gate = next(m for m in model.modules() if isinstance(m, MoEGate))
    assert gate.weight.dtype == torch.float32  # the loader keeps the router in fp32
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape).to(torch.bfloat16).float())
    low = gate.weight_exact_in(torch.bfloat16)
    assert low is not None and low.dtype == torch.bfloat16 and torch.equal(low.float(), gate.weight)
    assert gate.weight_exact_in(torch.bfloat16) is low  # checked once
    assert gate.weight_exact_in(torch.float32) is None
    with torch.no_grad():
        gate.weight[3, 5] = 1.0 + 2**-12  # no longer a bf16 value
    gate.weight = torch.nn.Parameter(gate.weight.detach().clone())  # a new weight: checked again
    assert gate.weight_exact_in(torch.bfloat16) is None
