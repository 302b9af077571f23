"""Issue 17, 8K / 32K prefill under the prefill-glue kernels switched on one at a time, one engine, same process
(exploration: each variant swaps module attributes back to the PyTorch references; rounds interleave the variants
so drift hits them alike, and the median of the rounds is printed).

    python3 bench/gpu_runs/e17prefill_variants.py [--rounds 5] [--fp8]

Variants: "reference" (the prefill glue on PyTorch, as before this issue's prefill kernels), then each change
switched on in turn (STEPS): the MoE combine kernel, the shared experts' SwiGLU kernel, prompt rows' router tail on
route_topk and residual add + norm on add_rms_norm, the attention layout kernels (engine.kernels.prefill_layout),
gate/up as one (grouped) GEMM over the merged layouts, prompt rows' router logits from the 16-bit rows, the MoE
dispatch kernel. The last variant is this tree.
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
_USE_TRITON, _ROUTE = decoder.use_triton, decoder.DeepseekV3MoE.route
_BANK_MERGED, _MLP_MERGED = decoder.ExpertBank.gate_up_weight, decoder.DeepseekV3MLP.gate_up_weight
_EXACT_IN, _DISPATCH = decoder.MoEGate.weight_exact_in, getattr(decoder, "moe_dispatch", None)


def _silu_dense_on_reference(gate, up, weights):
    if weights is None:
        return moe.silu_mul_scale_torch(gate, up, None)
    return _KERNEL_SILU(gate, up, weights)


def _route_on_reference(self, x, x_fp32=None):
    return self.gate(x)


_OFF = lambda *a: False  # noqa: E731
_NONE = property(lambda self: None)
# each variant adds one change to the one before it (the last is this tree)
STEPS = ["combine", "silu", "router+addnorm", "layout", "gateup", "router16", "dispatch"]
VARIANTS = {"reference": set()}
for i, step in enumerate(STEPS):
    VARIANTS["+" + step] = set(STEPS[: i + 1])


def use(name: str) -> None:
    on = VARIANTS[name]
    decoder.moe_combine = _KERNEL_COMBINE if "combine" in on else moe.combine_torch
    decoder.silu_mul_scale = _KERNEL_SILU if "silu" in on else _silu_dense_on_reference
    decoder.use_triton = _USE_TRITON if "router+addnorm" in on else _OFF
    decoder.DeepseekV3MoE.route = _ROUTE if "router+addnorm" in on else _route_on_reference
    prefill_layout._use = _LAYOUT_USE if "layout" in on else _OFF
    decoder.ExpertBank.gate_up_weight = _BANK_MERGED if "gateup" in on else _NONE
    decoder.DeepseekV3MLP.gate_up_weight = _MLP_MERGED if "gateup" in on else _NONE
    decoder.MoEGate.weight_exact_in = _EXACT_IN if "router16" in on else (lambda self, dtype: None)
    if _DISPATCH is not None:
        decoder.moe_dispatch = _DISPATCH if "dispatch" in on else moe.dispatch_torch


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
    parser.add_argument("--profile", type=Path, help="after the rounds, write the current variant's kernel table of "
                        "one prefill here (CUDA time, and the wall time of the same step unprofiled)")
    args = parser.parse_args()
    bundle = a3b_bundle(Path(tempfile.mkdtemp()), args.device, layers=args.layers)
    n = args.tokens
    engine = LLMEngine(bundle, EngineOptions(max_num_seqs=8, max_num_batched_tokens=8192,
                                             cache_tokens=max(args.long, n) + 4096, block_size=16,
                                             cuda_graphs=False, quantization="fp8" if args.fp8 else None))
    tag = "fp8" if args.fp8 else "bf16"
    names = list(VARIANTS)
    current = names[-1]
    seed = iter(range(1000, 10**6))  # a fresh prompt every run: a repeated one would hit the prefix cache
    for name in names:  # warm-up: every variant's kernels built once
        use(name)
        prefill_throughput(engine, n, n, seed=next(seed))
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            use(name)
            row = prefill_throughput(engine, n, n, seed=next(seed))
            results[name].append(row["tok_per_s"])
            print("ROUND", tag, r, name, row["tok_per_s"], row["seconds"], flush=True)
    for name, values in results.items():
        print("PREFILL", n, tag, name, "median", statistics.median(values), "all", values, flush=True)
    if args.long:
        for r in range(2):
            for name in ("reference", "+layout", current):
                use(name)
                row = prefill_throughput(engine, args.long, args.long, seed=next(seed))
                print("PREFILL_LONG", tag, args.long, name, row["tok_per_s"], row["seconds"],
                      row.get("peak_reserved_gib"), flush=True)
    use(current)
    if args.profile:
        write_profile(engine, n, args.profile)


def write_profile(engine: LLMEngine, n: int, path: Path) -> None:
    """Kernel table of one ``n``-token prefill (GPU time per kernel; the step's wall time beside it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        row = prefill_throughput(engine, n, n, seed=99)
    text = f"== {n}-token prefill, current (profiled wall {row['seconds']} s) ==\n"
    text += prof.key_averages().table(sort_by="cuda_time_total", row_limit=45)
    path.write_text(text)
    print("PROFILE", path, row["seconds"], flush=True)


if __name__ == "__main__":
    main()
