"""Run by ``tests/test_prefill_layout.py`` in a subprocess with TRITON_INTERPRET=1: the prefill layout kernels
(``engine.kernels.triton_prefill_layout``) on CPU tensors against their PyTorch references, at A3B's dims and at
odd small ones (every mask edge), in fp16 / bf16 / fp32. Prints one line per case; exits non-zero on a mismatch.

What must hold: copies (the query's nope part, K's nope and rope parts, V) are bit-exact; the rotated rope parts
and the normed latent within two roundings of the dtype (the kernel rounds once, the reference after each op; the
interpreter rounds bf16 by truncation); every row's cache slot written, no other slot touched.
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"

import torch  # noqa: E402

from engine.kernels import prefill_layout  # noqa: E402

ULPS = {torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7, torch.float32: 1e-5}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def check(dtype: torch.dtype, rows: int, heads: int, nope: int, rope: int, rank: int, v_dim: int) -> None:
    gen = torch.Generator().manual_seed(rows * 131 + heads)
    q_cols = heads * (nope + rope)
    fused = torch.randn(rows, q_cols + rank + rope + 3, generator=gen).to(dtype)  # one GEMM's output, padded
    q, kv = fused[:, :q_cols], fused[:, q_cols:q_cols + rank + rope]
    angles = torch.rand(rows, rope // 2, generator=gen) * 6.28
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    weight = (torch.rand(rank, generator=gen) + 0.5).to(dtype)
    slots = torch.randperm(3 * rows, generator=gen)[:rows]
    before = torch.randn(3 * rows, rank + rope, generator=gen).to(dtype)
    cache_ref, cache_tri = before.clone(), before.clone()
    args = (q, kv, heads, nope, rope, rank, weight, 1e-6, cos, sin)
    expected = prefill_layout.prologue(*args, cache_ref, slots, impl="torch")
    actual = prefill_layout.prologue(*args, cache_tri, slots, impl="triton")
    assert actual.shape == expected.shape == (rows, heads, nope + rope)
    assert actual.transpose(0, 1).is_contiguous(), "the query is laid out (H, T, ·)"
    assert torch.equal(actual[..., :nope], expected[..., :nope]), "query nope part copied"
    tol = ULPS[dtype]
    assert rel(actual[..., nope:], expected[..., nope:]) <= tol, rel(actual[..., nope:], expected[..., nope:])
    untouched = torch.ones(3 * rows, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(cache_tri[untouched], before[untouched]), "only the rows' slots are written"
    err_latent = rel(cache_tri[slots], cache_ref[slots])
    assert err_latent <= tol, err_latent

    keys = rows + 5  # a cached prefix and the chunk
    kv_full = torch.randn(keys, heads * (nope + v_dim), generator=gen).to(dtype)
    latents = torch.randn(keys, rank + rope, generator=gen).to(dtype)
    k_rope = latents[:, rank:]  # row-strided, as split from the gathered cache rows
    k_ref, v_ref = prefill_layout.expand_kv(kv_full, k_rope, heads, nope, v_dim, impl="torch")
    k_tri, v_tri = prefill_layout.expand_kv(kv_full, k_rope, heads, nope, v_dim, impl="triton")
    assert k_tri.is_contiguous() and v_tri.is_contiguous()
    assert torch.equal(k_tri, k_ref) and torch.equal(v_tri, v_ref), "K / V copied exactly"
    print(f"ok {dtype} rows={rows} heads={heads} nope={nope} rope={rope} rank={rank} v={v_dim} "
          f"rope_err={rel(actual[..., nope:], expected[..., nope:]):.2e} latent_err={err_latent:.2e}")


def check_router(dtype: torch.dtype, rows: int, experts: int, hidden: int) -> None:
    """Prompt rows' router logits from 16-bit rows and the weight's exact 16-bit copy: the fp32 product's sums
    (every product exact), up to their order."""
    from engine.kernels import decode

    gen = torch.Generator().manual_seed(rows + experts)
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    weight = torch.randn(experts, hidden, generator=gen).to(dtype).float()  # fp32 values exact in dtype
    expected = torch.nn.functional.linear(x.double(), weight.double())
    actual = decode.router_logits(x, None, weight, impl="triton", weight_16bit=weight.to(dtype))
    assert actual.dtype == torch.float32 and actual.shape == (rows, experts)
    err = ((actual.double() - expected).abs().max() / expected.abs().max()).item()
    assert err <= 1e-6, err
    print(f"ok router {dtype} rows={rows} experts={experts} hidden={hidden} err={err:.1e}")


def main() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        check(dtype, 37, 16, 128, 64, 512, 128)  # A3B's dims
        check(dtype, 5, 3, 24, 8, 40, 20)  # none a power of two but the rope pairs: every mask edge
    # fp16 only: this Triton's interpreter gets bf16 tl.dot wrong (garbage even for one 16x16 tile); the GPU test
    # checks bf16 (tests/test_gpu_kernels.py)
    check_router(torch.float16, 600, 64, 2048)  # A3B's router over a prompt chunk's rows (not a multiple of the tile)
    check_router(torch.float16, 530, 10, 72)  # experts and hidden size off the tiles
    print("prefill layout interpreter checks passed")


if __name__ == "__main__":
    sys.exit(main())
