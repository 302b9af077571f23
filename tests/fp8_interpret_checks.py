"""Run by ``tests/test_fp8.py`` in a subprocess with TRITON_INTERPRET=1: the fp8 Triton kernels (weight-only
GEMM, MoE decode GEMVs with scales) against their PyTorch references on small CPU shapes.

The interpreter's ``tl.dot`` mishandles bf16 operands (numpy has no bf16), so the GEMM is checked with fp16
activations, which take the same code path; the GEMVs (no ``tl.dot``) are checked in bf16.
"""

from __future__ import annotations

import os

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"

import torch  # noqa: E402

from engine.kernels import decode as fused  # noqa: E402
from engine.kernels import fp8, triton_decode, triton_fp8  # noqa: E402


def check_linear() -> None:
    gen = torch.Generator().manual_seed(0)
    for m, n, k in [(1, 48, 64), (5, 40, 96), (33, 64, 80)]:
        q, s = fp8.quantize_rows(torch.randn(n, k, generator=gen) / 8)
        x = torch.randn(m, k, generator=gen).half()
        bias = torch.randn(n, generator=gen).half()
        expected = fp8.linear_torch(x.float(), q, s, bias.float())
        actual = triton_fp8.skinny_linear(x, q, s, bias)
        assert actual.dtype == torch.float16 and actual.shape == (m, n)
        err = (actual.float() - expected).abs().max().item()
        assert err < 5e-3 * expected.abs().max().item() + 1e-3, (m, n, k, err)


def check_moe() -> None:
    gen = torch.Generator().manual_seed(1)
    e, i, d, n, k = 5, 24, 40, 3, 2

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    (qg, s_g), (qu, s_u), (qd, s_d) = (fp8.quantize_rows(w) for w in (rand(e, i, d), rand(e, i, d), rand(e, d, i)))
    (qsg, s_sg), (qsu, s_su), (qsd, s_sd) = (fp8.quantize_rows(w) for w in (rand(2 * i, d), rand(2 * i, d),
                                                                           rand(d, 2 * i)))
    x = (rand(n, d) / 4).bfloat16()
    ids = torch.randint(0, e, (n, k), generator=gen)
    rw = torch.rand(n, k, generator=gen)
    scales = dict(gate_scale=s_g, up_scale=s_u, shared_gate_scale=s_sg, shared_up_scale=s_su)
    ref = fused.moe_gate_up(x, ids, rw, qg, qu, qsg, qsu, impl="torch", **scales)
    out = triton_decode.moe_gate_up(x, ids, rw, qg, qu, qsg, qsu, s_g, s_u, s_sg, s_su)
    assert (out.float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max()
    # no shared experts
    ref2 = fused.moe_gate_up(x, ids, rw, qg, qu, impl="torch", gate_scale=s_g, up_scale=s_u)
    out2 = triton_decode.moe_gate_up(x, ids, rw, qg, qu, None, None, s_g, s_u)
    assert (out2.float() - ref2.float()).abs().max() <= 0.02 * ref2.float().abs().max()
    down_ref = fused.moe_down(ref, ids, qd, qsd, impl="torch", down_scale=s_d, shared_down_scale=s_sd)
    down = triton_decode.moe_down(ref, ids, qd, qsd, s_d, s_sd)
    assert down.dtype == torch.float32
    assert (down - down_ref).abs().max() <= 1e-3 * down_ref.abs().max() + 1e-4
    # bf16 weights keep working without scales
    wg = fp8.dequantize_rows(qg, s_g)
    wu = fp8.dequantize_rows(qu, s_u)
    plain = triton_decode.moe_gate_up(x, ids, rw, wg, wu, None, None)
    plain_ref = fused.moe_gate_up(x, ids, rw, wg, wu, impl="torch")
    assert (plain.float() - plain_ref.float()).abs().max() <= 0.02 * plain_ref.float().abs().max()


def check_grouped() -> None:
    """Expert-sorted rows (some experts empty, one with more rows than a block) through the grouped kernel."""
    gen = torch.Generator().manual_seed(2)
    e, n, k = 6, 40, 48
    q, s = fp8.quantize_rows(torch.randn(e, n, k, generator=gen))
    for counts in ([3, 0, 17, 1, 0, 5], [0, 0, 0, 0, 0, 2], [40, 0, 0, 0, 0, 0]):
        ends = torch.tensor(counts).cumsum(0).to(torch.int32)
        x = torch.randn(int(ends[-1]), k, generator=gen).half()
        expected = fp8.grouped_linear(x.float(), q, s, ends, impl="torch")
        actual = triton_fp8.fp8_grouped_linear(x, q, s, ends)
        assert actual.shape == expected.shape
        err = (actual.float() - expected).abs().max().item()
        assert err < 5e-3 * expected.abs().max().item() + 1e-3, (counts, err)


def check_activation_quant() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 300, generator=gen).bfloat16() * torch.logspace(-2, 2, 5)[:, None].bfloat16()
    x[2] = 0
    q_ref, s_ref = fp8.quantize_activation_rows(x, impl="torch")
    q, s = fp8.quantize_activation_rows(x, impl="triton")
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    assert torch.allclose(s, s_ref, rtol=1e-6)
    # the interpreter's fp32 -> fp8 cast drops the carry when rounding up crosses a power of two (124 -> 64 where
    # the GPU gives 128) and rounds ties away from zero: carries are skipped, ties allowed one ulp here;
    # tests/test_gpu_fp8.py checks the hardware cast against PyTorch's
    qf, rf = q.float(), q_ref.float()
    carry = (rf == 2 * qf) & (torch.frexp(rf).mantissa.abs() == 0.5)
    assert ((qf - rf).abs()[~carry] <= rf.abs()[~carry] * 2**-3).all()
    assert (qf[~carry] == rf[~carry]).float().mean() > 0.95
    assert carry.float().mean() < 0.05, carry.float().mean()


if __name__ == "__main__":
    check_activation_quant()
    check_linear()
    check_moe()
    check_grouped()
    print("fp8 interpreter checks passed")
