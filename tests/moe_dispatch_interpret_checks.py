"""Run by ``tests/test_moe_dispatch.py`` in a subprocess with TRITON_INTERPRET=1: the MoE dispatch kernel
(``engine.kernels.triton_moe.dispatch``) on CPU tensors against ``engine.kernels.moe.dispatch_torch``, bit for bit,
at A3B's E / k and at other shapes: int32 and int64 ids, bf16 / fp16 / fp32 rows, one chunk or many (small chunk /
sub sizes, so a few thousand pairs walk many chunks, sub-blocks and tiles of the per-chunk counts), experts with
no pairs, all pairs on one expert, weights on bf16 rounding ties. Prints one line per case; exits non-zero on a
mismatch. The kernel rounds fp32 -> bf16 by its bits, so the interpreter (whose own cast truncates) must match
torch exactly too.
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"

import torch  # noqa: E402

from engine import kernels  # noqa: E402
from engine.kernels import moe, triton_moe  # noqa: E402

NAMES = ("tokens", "row_weights", "offsets", "inverse")


def routed(tokens: int, top_k: int, experts: int, seed: int, hot: int | None = None) -> torch.Tensor:
    """Distinct experts per token as a router's top-k picks them; with ``hot``, most pairs on experts 0..hot-1."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.rand(tokens, experts, generator=gen)
    if hot is not None:
        logits[:, :hot] += 10.0
    return logits.topk(top_k, dim=1).indices


def tie_weights(tokens: int, top_k: int, seed: int) -> torch.Tensor:
    """fp32 weights whose low 16 bits are a bf16 rounding tie (0x8000) or just either side of it."""
    gen = torch.Generator().manual_seed(seed)
    high = torch.randint(0x3C00, 0x3F80, (tokens, top_k), generator=gen, dtype=torch.int32) << 16
    low = torch.tensor([0x8000, 0x7FFF, 0x8001, 0x0000], dtype=torch.int32)[torch.randint(0, 4, (tokens, top_k), generator=gen)]
    return (high | low).view(torch.float32)


def check(label: str, ids: torch.Tensor, weights: torch.Tensor, experts: int, dtype: torch.dtype,
          chunk: int | None = None, sub: int | None = None) -> None:
    expected = moe.dispatch_torch(ids, weights, experts, dtype)
    actual = triton_moe.dispatch(ids, weights, experts, dtype, chunk, sub)
    for name, a, e in zip(NAMES, actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, (label, name, a.dtype, e.dtype, a.shape, e.shape)
        assert torch.equal(a, e), (label, name)
    print(f"ok {label} T={ids.shape[0]} k={ids.shape[1]} E={experts} ids={ids.dtype} rows={dtype} chunk={chunk}")


def check_gate() -> None:
    """moe.dispatch takes the kernel once the device gate says Triton (fp32 activations keep the reference)."""
    calls = []
    kernel = triton_moe.dispatch

    def counted(*args):
        calls.append(args[3])
        return kernel(*args)

    kernels.triton_device, triton_moe.dispatch = (lambda x: True), counted
    ids, weights = routed(9, 6, 64, 5), torch.rand(9, 6)
    for dtype in (torch.bfloat16, torch.float32):
        for a, e in zip(moe.dispatch(ids, weights, 64, dtype), moe.dispatch_torch(ids, weights, 64, dtype)):
            assert torch.equal(a, e)
    assert calls == [torch.bfloat16] and not moe._broken, (calls, moe._broken)
    print("ok gate")


def main() -> None:
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    check("a3b one token", routed(1, 6, 64, 1), torch.rand(1, 6), 64, bf16)
    check("a3b", routed(7, 6, 64, 2).int(), torch.rand(7, 6), 64, fp16)
    check("a3b many chunks", routed(1000, 6, 64, 3), torch.rand(1000, 6), 64, bf16, chunk=256, sub=64)
    check("a3b default sizes", routed(1000, 6, 64, 4).int(), torch.rand(1000, 6), 64, fp32)
    check("uneven", routed(300, 2, 8, 5, hot=3), torch.rand(300, 2), 8, bf16)
    check("E=256 tiles of counts", routed(50, 8, 256, 6).int(), torch.rand(50, 8), 256, bf16, chunk=16, sub=16)
    check("one expert, k=1", torch.full((500, 1), 5), torch.rand(500, 1), 64, bf16, chunk=64, sub=32)
    check("experts 0..9 of 64", routed(200, 4, 10, 7), torch.rand(200, 4), 64, fp16)
    check("bf16 ties", routed(100, 6, 64, 8), tie_weights(100, 6, 8), 64, bf16, chunk=128, sub=64)
    check("bf16 weights", routed(100, 6, 64, 9), torch.rand(100, 6).to(bf16), 64, fp16)
    check_gate()
    print("moe dispatch interpreter checks passed")


if __name__ == "__main__":
    sys.exit(main())
