"""Prefill attention of one A3B layer over a long prompt, per kernel choice (CUDA).

For a prompt of ``--tokens`` tokens prefilled in chunks of C, each chunk's queries attend to the cached prefix and
to themselves. Times, per chunk size: the old single SDPA call with a lower-right causal bias, the LSE-merged
prefix + chunk attention (``engine.kernels.prefill.chunk_attention``, each LSE kernel forced in turn), and the
re-expansion of the prefix through ``kv_b_proj`` (+ the key concatenation) the chunk needs. Sums over the prompt's
chunks, times 27 layers, give the attention part of a whole prompt.

Usage: python bench/prefill_attention_bench.py --json out.json [--tokens 131072] [--chunks 8192 32768]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kernels import prefill  # noqa: E402

HEADS, NOPE, ROPE, V, RANK, LAYERS = 16, 128, 64, 128, 512, 27


def timed(fn, repeats: int = 2) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--chunks", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    n = args.tokens
    k_all = torch.randn(1, HEADS, n, NOPE + ROPE, device=dev, dtype=bf16)
    v_all = torch.randn(1, HEADS, n, V, device=dev, dtype=bf16)
    w_kv = torch.randn(HEADS * (NOPE + V), RANK, device=dev, dtype=bf16) * RANK**-0.5
    latents = torch.randn(n, RANK + ROPE, device=dev, dtype=bf16)
    scale = (NOPE + ROPE) ** -0.5
    kernels = ["auto"] + [name for name in prefill.CUDA_KERNELS]
    results: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                  "tokens": n, "per_chunk_size": {}}

    def expand(prefix_and_chunk: int) -> None:
        c, kp = latents[:prefix_and_chunk].split([RANK, ROPE], dim=-1)
        kv = F.linear(c, w_kv).view(prefix_and_chunk, HEADS, NOPE + V)
        k_nope, _ = kv.split([NOPE, V], dim=-1)
        torch.cat([k_nope, kp[:, None].expand(-1, HEADS, -1)], dim=-1)

    for chunk in args.chunks:
        totals = {"expand_ms": 0.0, "lower_right_sdpa_ms": 0.0} | {f"lse_{k}_ms": 0.0 for k in kernels}
        for start in range(0, n, chunk):
            c = min(chunk, n - start)
            q = torch.randn(1, HEADS, c, NOPE + ROPE, device=dev, dtype=bf16)
            k, v = k_all[:, :, : start + c], v_all[:, :, : start + c]
            totals["expand_ms"] += timed(partial(expand, start + c), 1)
            if start:
                sdpa = partial(F.scaled_dot_product_attention, q, k, v, attn_mask=causal_lower_right(c, start + c),
                               scale=scale)
            else:
                sdpa = partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, scale=scale)
            totals["lower_right_sdpa_ms"] += timed(sdpa, 1)
            for name in kernels:
                key = f"lse_{name}_ms"
                if totals[key] is None:
                    continue
                try:
                    totals[key] += timed(partial(prefill.chunk_attention, q, k, v, start, scale, impl=name), 1)
                except Exception as exc:  # noqa: BLE001 - a kernel this build lacks
                    totals[key] = None
                    results.setdefault("unavailable", {})[name] = repr(exc)[:300]
            del q
        row = {key: (round(value, 2) if value is not None else None) for key, value in totals.items()}
        row["whole_prompt_27_layers_s"] = {key: (round(value * LAYERS / 1000, 2) if value is not None else None)
                                          for key, value in totals.items()}
        results["per_chunk_size"][str(chunk)] = row
        print(json.dumps({"chunk": chunk} | row), flush=True)
    results["lse_failed_in_auto"] = sorted(prefill._broken)
    results["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
