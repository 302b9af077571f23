"""One MoE layer of the decode step at the A3B's shapes, per backend and row count, in CUDA graphs.

Backends: ``gemv`` (per-(token, slot) expert GEMVs, the fused path up to MOE_GEMV_MAX_ROWS), ``tiled`` (expert
order + expert-tiled gate/up and down, the fused path past it), ``grouped`` (the modules' path: sort, torch's
grouped GEMM, silu kernel, scatter, plus the shared experts' MLP). Routing is uniform random top-k (each token k
distinct experts), the same ids for every backend. ``--layers`` copies of the weights are cycled so that no layer
finds its experts in L2. Reports µs per layer and the bandwidth it reached on the bytes it had to read (the
distinct experts chosen + the shared experts), bf16 and, with ``--fp8``, fp8 weights.

    python3 bench/moe_kernel_bench.py --rows 1 4 8 16 32 64 128 --fp8 --json moe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from engine.kernels import decode as fused_ops
from engine.kernels import fp8
from engine.model.decoder import DeepseekV3MLP, ExpertBank

E, INTER, D, K, NS = 64, 1408, 2048, 6, 2


def make_layer(device: str, quantize: bool) -> tuple[ExpertBank, DeepseekV3MLP]:
    bank = ExpertBank(E, D, INTER).to(device=device, dtype=torch.bfloat16)
    shared = DeepseekV3MLP(D, INTER * NS).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in list(bank.parameters()) + list(shared.parameters()):
            p.normal_(0, 0.02)
    if quantize:  # as the loader's quantization: fp8 does
        bank.quantize_fp8_()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(shared, name, fp8.Fp8Linear.from_linear(getattr(shared, name)))
    return bank, shared


def run_backend(backend: str, x, ids, weights, bank: ExpertBank, shared: DeepseekV3MLP) -> torch.Tensor:
    if backend == "grouped":
        return bank(x, ids, weights) + shared(x)
    sg, su, sd = shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight
    sgs, sus, sds = (fp8.weight_scale(m) for m in (shared.gate_proj, shared.up_proj, shared.down_proj))
    order = fused_ops.moe_expert_order(ids, E) if backend == "tiled" else None
    hidden = fused_ops.moe_gate_up(x, ids, weights, bank.gate_proj, bank.up_proj, sg, su,
                                   gate_scale=bank.gate_scale, up_scale=bank.up_scale,
                                   shared_gate_scale=sgs, shared_up_scale=sus, order=order)
    return fused_ops.moe_down(hidden, ids, bank.down_proj, sd, down_scale=bank.down_scale,
                              shared_down_scale=sds, order=order).sum(dim=1)


def time_graph(fn, replays: int) -> float:
    """ms per call of ``fn`` replayed from one CUDA graph (launch overhead excluded, as in the engine)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--layers", type=int, default=6, help="weight copies cycled through (defeats L2)")
    parser.add_argument("--backends", nargs="+", default=["gemv", "tiled", "grouped"])
    parser.add_argument("--fp8", action="store_true", help="also with fp8 weights")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for quantize in [False, True] if args.fp8 else [False]:
        layers = [make_layer("cuda", quantize) for _ in range(args.layers)]
        expert_bytes = sum(t.numel() * t.element_size() for t in (layers[0][0].gate_proj, layers[0][0].up_proj,
                                                                    layers[0][0].down_proj)) / E
        shared_bytes = sum(p.numel() * p.element_size() for p in layers[0][1].parameters())
        for rows in args.rows:
            x = torch.randn(rows, D, device="cuda", dtype=torch.bfloat16)
            ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(rows)])
            weights = torch.rand(rows, K, device="cuda")
            distinct = int(ids.unique().numel())
            needed = distinct * expert_bytes + shared_bytes
            reference = None
            for backend in args.backends:
                if backend == "gemv" and rows > 16:
                    continue
                try:
                    out = run_backend(backend, x, ids, weights, *layers[0]).float()
                    if reference is None:
                        reference = out
                    err = ((out - reference).abs().max() / reference.abs().max()).item()

                    def step(backend=backend, layers=layers):
                        for bank, shared in layers:
                            run_backend(backend, x, ids, weights, bank, shared)

                    ms = time_graph(step, args.replays) / len(layers)
                except Exception as exc:  # noqa: BLE001 - report and go on with the next backend
                    print(f"{'fp8' if quantize else 'bf16'} rows {rows} {backend}: failed: {exc!r}"[:300])
                    continue
                row = {"weights": "fp8" if quantize else "bf16", "rows": rows, "backend": backend,
                       "us_per_layer": round(ms * 1000, 1), "distinct_experts": distinct,
                       "GBps": round(needed / (ms / 1000) / 1e9), "rel_err_vs_first": round(err, 5)}
                results.append(row)
                print(json.dumps(row), flush=True)
        del layers
        torch.cuda.empty_cache()
    from engine.kernels import triton_moe_tiles

    chosen = {name: {str(k): str(v) for k, v in getattr(triton_moe_tiles, name).cache.items()}
              for name in ("_tiled_gate_up_kernel", "_tiled_down_kernel")}
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results,
                                         "autotuned": chosen}, indent=1))


if __name__ == "__main__":
    main()
