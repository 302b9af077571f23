"""Issue 17, 8K / 32K prefill under the prefill-glue kernels switched on one at a time, one engine, same process
(exploration: each variant swaps module attributes back to the PyTorch references; rounds interleave the variants
so drift hits them alike, and the median of the rounds is printed).

    python3 bench/gpu_runs/e17prefill_variants.py [--rounds 5] [--fp8]

Variants: "reference" (the MoE combine, the shared experts' SwiGLU and the attention layout all on PyTorch, as
before them), "+combine", "+combine+silu", "current" (+ the layout kernels of engine.kernels.prefill_layout).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.a3b import a3b_bundle  # noqa: E402
from bench.engine_bench import prefill_throughput  # noqa: E402
from engine.kernels import moe, prefill_layout  # noqa: E402
from engine.model import decoder  # noqa: E402
from engine.runtime.engine import EngineOptions, LLMEngine  # noqa: E402

_KERNEL_SILU, _KERNEL_COMBINE, _LAYOUT_USE = decoder.silu_mul_scale, decoder.moe_combine, prefill_layout._use


def _silu_dense_on_reference(gate, up, weights):
    if weights is None:
        return moe.silu_mul_scale_torch(gate, up, None)
    return _KERNEL_SILU(gate, up, weights)


VARIANTS = {  # name -> (combine, silu, layout "use" gate)
    "reference": (moe.combine_torch, _silu_dense_on_reference, lambda *a: False),
    "+combine": (_KERNEL_COMBINE, _silu_dense_on_reference, lambda *a: False),
    "+combine+silu": (_KERNEL_COMBINE, _KERNEL_SILU, lambda *a: False),
    "current": (_KERNEL_COMBINE, _KERNEL_SILU, _LAYOUT_USE),
}


def use(name: str) -> None:
    decoder.moe_combine, decoder.silu_mul_scale, prefill_layout._use = VARIANTS[name]


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, help="shrink the model (smoke runs only)")
    parser.add_argument("--long", type=int, default=32768, help="one prompt of this many tokens in one chunk, "
                        "reference and current, 2 rounds (0: skip)")
    args = parser.parse_args()
    bundle = a3b_bundle(Path(tempfile.mkdtemp()), args.device, layers=args.layers)
    n = args.tokens
    engine = LLMEngine(bundle, EngineOptions(max_num_seqs=8, max_num_batched_tokens=8192,
                                             cache_tokens=max(args.long, n) + 4096, block_size=16,
                                             cuda_graphs=False, quantization="fp8" if args.fp8 else None))
    tag = "fp8" if args.fp8 else "bf16"
    for name in VARIANTS:  # warm-up: every variant's kernels built once
        use(name)
        prefill_throughput(engine, n, n, seed=1)
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name in VARIANTS:
            use(name)
            row = prefill_throughput(engine, n, n, seed=10 + r)
            results[name].append(row["tok_per_s"])
            print("ROUND", tag, r, name, row["tok_per_s"], row["seconds"], flush=True)
    for name, values in results.items():
        print("PREFILL", n, tag, name, "median", statistics.median(values), "all", values, flush=True)
    if args.long:
        for r in range(2):
            for name in ("reference", "current"):
                use(name)
                row = prefill_throughput(engine, args.long, args.long, seed=40 + r)
                print("PREFILL_LONG", tag, args.long, name, row["tok_per_s"], row["seconds"],
                      row.get("peak_reserved_gib"), flush=True)
    use("current")


if __name__ == "__main__":
    main()
