"""Issue 17, batch-1 decode under kernel variants, one engine per weight format, same process (exploration:
each variant patches module constants, re-captures the graphs and measures decode like engine_bench).

    python3 bench/gpu_runs/e17variants.py [--fp8]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.a3b import a3b_bundle  # noqa: E402
from bench.engine_bench import measure_bandwidth, measure_decode  # noqa: E402
from engine.kernels import decode, triton_decode  # noqa: E402
from engine.model.decoder import DeepseekV3ForCausalLM, DeepseekV3MLP  # noqa: E402
from engine.runtime.engine import EngineOptions, LLMEngine  # noqa: E402



def _logits_unfused(self, normed, fused=False):
    return self.lm_head(normed).float()


def _mlp_unfused(self, x, fused=False):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _block_v_32(n_rows, v_dim):
    return min(32, v_dim)


_OLD = {(decode, "ROUTER_GEMV_MAX_ROWS"): 0, (DeepseekV3ForCausalLM, "logits"): _logits_unfused,
        (DeepseekV3MLP, "forward"): _mlp_unfused, (triton_decode, "epilogue_row_block_v"): _block_v_32}
VARIANTS = {  # name -> (env, {(module or class, attribute): value}); unnamed attributes keep their defaults
    "base": ({"KIMIRAY_PDL": "0"}, _OLD),
    "pdl_router": ({"KIMIRAY_PDL": "1"}, {**_OLD, (decode, "ROUTER_GEMV_MAX_ROWS"): 1}),
    "pdl_router_logits": ({}, {**_OLD, (decode, "ROUTER_GEMV_MAX_ROWS"): 1, (DeepseekV3MLP, "forward"):
                                DeepseekV3MLP.forward, (DeepseekV3ForCausalLM, "logits"): DeepseekV3ForCausalLM.logits}
                          | {(DeepseekV3MLP, "forward"): _mlp_unfused}),
    "pdl_router_logits_mlp": ({}, {(triton_decode, "epilogue_row_block_v"): _block_v_32}),
    "current": ({"KIMIRAY_PDL": "1"}, {}),
}


@torch.inference_mode()
def main() -> None:
    fp8 = "--fp8" in sys.argv
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or list(VARIANTS)
    bundle = a3b_bundle(Path(tempfile.mkdtemp()), "cuda")
    engine = LLMEngine(bundle, EngineOptions(max_num_seqs=64, max_num_batched_tokens=8192, cache_tokens=65536,
                                             block_size=16, cuda_graphs=True, quantization="fp8" if fp8 else None))
    bandwidth = measure_bandwidth()
    defaults = {key: getattr(*key) for _, patches in VARIANTS.values() for key in patches}
    defaults[(DeepseekV3ForCausalLM, "logits")] = DeepseekV3ForCausalLM.logits
    defaults[(DeepseekV3MLP, "forward")] = DeepseekV3MLP.forward
    first = None
    for name in names:
        env, patches = VARIANTS[name]
        os.environ.update(env)
        for key, value in defaults.items():
            setattr(*key, patches.get(key, value))
        rows = measure_decode(engine, [1, 1, 2, 8], bandwidth, "fused", lambda: None)[1:]
        first = first or rows[0]["first_ids"]
        same = next((i for i, (a, b) in enumerate(zip(first, rows[0]["first_ids"])) if a != b), len(first))
        for row in rows:
            print("VARIANT", "fp8" if fp8 else "bf16", name, row["batch"], row["tok_per_s"], row["ms_per_step"],
                  row["graph_replay_ms"], "same_prefix", same, "fallbacks", sorted(decode._broken), flush=True)


if __name__ == "__main__":
    main()
