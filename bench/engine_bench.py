"""AsyncEngine's core (LLMEngine) on the full-size A3B architecture with random bf16 weights, one GPU.

Measures, with the production code path (scheduler, paged latent cache, CUDA-graph decode, sampler,
detokenizer): decode tokens/s at several batch sizes (512-token prompts, 128 new tokens), prefill tokens/s at
8K and 32K, TTFT for a 1280x720 screenshot + ~200 text tokens, and the longest prompt that runs. Then, in the
same process, transformers' DeepseekV3ForCausalLM.generate on the same decoder weights, and the memory-bandwidth
bound of each decode figure (bytes a step must read / measured copy bandwidth).

Usage: python bench/engine_bench.py --json out.json [--batches 1 8 32 64] [--skip-hf] [--profile]
       [--overlap on|off|both]  (the engine's run-ahead; both: decode measured again with it off, same process)
       [--overlap on|off|both]  (the engine's run-ahead; both: decode measured again with it off, same process)
       [--baseline]  (decode also measured on the "modules" decode backend, same process, first: eager then,
                      since decode CUDA graphs only replay the fused backend)
       [--prefill-chunks 8192 32768]  (the longest prompt once per largest-chunk size, peak memory each)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.a3b import A3B_CONFIG, a3b_bundle  # noqa: E402
from engine.runtime.engine import EngineOptions, LLMEngine  # noqa: E402

PROMPT = 512
NEW = 128


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_ids(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 160000, (n,), generator=gen).tolist()


def run_until_done(engine: LLMEngine) -> int:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    return steps


def decode_throughput(engine: LLMEngine, batch: int, seed: int) -> dict[str, float]:
    """All prompts prefilled first; then time the steps that only decode."""
    for i in range(batch):
        engine.add(engine.make_sequence({"prompt_token_ids": random_ids(PROMPT, seed + i), "max_tokens": NEW,
                                         "ignore_eos": True}))
    while any(not s.output_ids for s in engine.by_id.values()):
        engine.step()
    sync()
    start = time.perf_counter()
    produced = sum(len(s.output_ids) for s in engine.by_id.values())
    seqs = list(engine.by_id.values())
    run_until_done(engine)
    sync()
    elapsed = time.perf_counter() - start
    produced = sum(len(s.output_ids) for s in seqs) - produced
    bad = [s.finish_reason for s in seqs if s.finish_reason != "length"]
    if bad:
        raise RuntimeError(f"decode at batch {batch}: sequences finished with {bad[:3]}: {seqs[0].error}")
    return {"batch": batch, "first_ids": seqs[0].output_ids[:64], "decode_tokens": produced,
            "seconds": round(elapsed, 4),
            "tok_per_s": round(produced / elapsed, 1), "ms_per_step": round(1000 * elapsed / (NEW - 1), 3)}


@torch.inference_mode()
def graph_replay_ms(engine: LLMEngine, batch: int, repeats: int = 50) -> float | None:
    """GPU time of one replay of the decode graph captured for ``batch`` (the step minus its host work), with
    distinct random ids and every row at the measured context (``CapturedDecode.park``: keys and new latents in
    the scratch block, so no live cache block is touched and attention's cache reads are understated)."""
    graphs = engine.runner.graphs
    if graphs is None:
        return None
    bucket = graphs._bucket(batch, graphs.BATCH_BUCKETS)
    found = [key for key in graphs.graphs if key[0] == bucket]
    if not found:
        return None
    cap = graphs.graphs[max(found)]
    ids = np.random.default_rng(batch).integers(1000, engine.runner.config.vocab_size - 1000, size=cap.batch)
    cap.park(engine.runner.scratch_slot // engine.runner.block_size, ids, PROMPT + NEW // 2)
    graph = cap.graph
    graph.replay()
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    sync()
    return round(start.elapsed_time(end) / repeats, 3)


ROUNDS = {"baseline": "modules", "fused": "auto"}  # name -> the runner's decode backend


def warm_up_decode(engine: LLMEngine, batches: list[int]) -> None:
    """A few decode steps at each batch size: graph capture per bucket, kernels, autotuning, allocator."""
    for batch in batches:
        for i in range(batch):
            engine.add(engine.make_sequence({"prompt_token_ids": random_ids(PROMPT, 500 + i), "max_tokens": 4,
                                             "ignore_eos": True}))
        run_until_done(engine)


def measure_decode(engine: LLMEngine, batches: list[int], bandwidth: float, name: str, dump) -> list[dict]:
    """Decode rows for each batch under round ``name`` (see ROUNDS); graphs are re-captured for the round
    (warm-up: graph capture for each batch bucket, kernels, autotuning, allocator)."""
    engine.runner.decode_backend = ROUNDS[name]
    if engine.runner.graphs is not None:
        engine.runner.graphs.reset()
    warm_up_decode(engine, batches)
    decode = []
    for batch in batches:
        row = decode_throughput(engine, batch, seed=batch * 1000)
        step_bytes = decode_bytes_per_step(batch, PROMPT + NEW // 2, engine.options.quantization)
        row["round"] = name
        row["graph_replay_ms"] = graph_replay_ms(engine, batch)
        row["bandwidth_bound_tok_per_s"] = round(batch * bandwidth / step_bytes, 1)
        row["fraction_of_bound"] = round(row["tok_per_s"] / row["bandwidth_bound_tok_per_s"], 3)
        decode.append(row)
        print(json.dumps(row), flush=True)
        dump()
    return decode


def kernel_notes() -> dict[str, object]:
    """Fused kernels that fell back to PyTorch (and prefill LSE kernels that failed), the prefill attention kernel
    order, and the autotuner's choices (shape key -> config)."""
    from engine.kernels import decode as fused
    from engine.kernels import prefill

    notes: dict[str, object] = {"fallbacks": sorted(fused._broken), "prefill_lse_failed": sorted(prefill._broken),
                                "prefill_lse_order": prefill.cuda_order()}
    try:
        from engine.kernels import triton_decode, triton_moe_tiles
    except ImportError:
        return notes
    for module, name in ((triton_decode, "_moe_gate_up_kernel"), (triton_decode, "_moe_down_kernel"),
                         (triton_decode, "_row_gemv_kernel"),
                         (triton_moe_tiles, "_tiled_gate_up_kernel"), (triton_moe_tiles, "_tiled_down_kernel")):
        cache = getattr(getattr(module, name), "cache", {})
        notes[name] = {str(k): str(v) for k, v in cache.items()}
    return notes


def prefill_throughput(engine: LLMEngine, tokens: int, chunk: int, seed: int) -> dict[str, float]:
    """One prompt alone, in chunks of ``chunk`` tokens (the scheduler's max_prefill_chunk_tokens over a step budget
    of min(8192, chunk)), to its first token. Peak GPU memory of the round: allocated by tensors, and reserved by
    the allocator (what the card must hold), both since the round began."""
    engine.scheduler.config.max_num_batched_tokens = min(8192, chunk)
    engine.scheduler.config.max_prefill_chunk_tokens = chunk
    seq = engine.make_sequence({"prompt_token_ids": random_ids(tokens, seed), "max_tokens": 1})
    engine.add(seq)
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    steps = run_until_done(engine)
    sync()
    elapsed = time.perf_counter() - start
    if seq.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"prefill of {tokens} tokens ended with {seq.finish_reason}: {seq.error}")
    row = {"tokens": tokens, "chunk": chunk, "steps": steps, "seconds": round(elapsed, 4),
           "tok_per_s": round(tokens / elapsed, 1), "finish_reason": seq.finish_reason}
    if torch.cuda.is_available():
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_activations_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return row


def screenshot_ttft(engine: LLMEngine, seed: int) -> dict[str, float]:
    """A fresh screenshot (no prefix- or vision-cache help) + ~200 text tokens, to the first sampled token."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(720, 1280, 3, generator=gen) * 255).to(torch.uint8).numpy()
    shot = Image.fromarray(pixels, "RGB")
    words = ("click the blue button next to the search field " * 5)[:200]  # ~1 token per byte with this vocabulary
    engine.scheduler.config.max_num_batched_tokens = 8192
    request = {"messages": [{"role": "user", "content": [{"type": "image", "image": shot},
                                                         {"type": "text", "text": words}]}],
               "max_tokens": 1}
    sync()
    start = time.perf_counter()
    seq = engine.make_sequence(request)
    prepared = time.perf_counter()
    engine.add(seq)
    run_until_done(engine)
    sync()
    done = time.perf_counter()
    image_tokens = sum(s.length for s in seq.images)
    return {"prompt_tokens": len(seq.prompt_ids), "image_tokens": image_tokens,
            "text_tokens": len(seq.prompt_ids) - image_tokens,
            "preprocess_s": round(prepared - start, 4), "ttft_s": round(done - start, 4)}


def measure_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (reads + writes), the practical HBM ceiling."""
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync()
    elapsed = time.perf_counter() - start
    del src, dst
    return 2 * 2 * 2**30 * 10 / elapsed


def decode_bytes_per_step(batch: int, context: int, quantization: str | None = None) -> float:
    """Weights and cache a decode step must read at least once, for ``batch`` sequences: bf16 weights, or with
    ``quantization="fp8"`` one byte per quantised weight (every projection, expert and lm_head; the fp32 router,
    and the bf16 absorbed W_UK / W_UV copy of kv_b_proj, at their own sizes). The cache is bf16 either way."""
    t = A3B_CONFIG["text_config"]
    d, layers, moe_layers = t["hidden_size"], t["num_hidden_layers"], t["num_hidden_layers"] - 1
    heads = t["num_attention_heads"]
    attn = d * heads * 192 + d * 576 + 512 + 512 * heads * 256 + heads * 128 * d
    dense = 3 * d * t["intermediate_size"]
    shared = 3 * d * t["moe_intermediate_size"] * t["n_shared_experts"]
    expert = 3 * d * t["moe_intermediate_size"]
    experts = t["n_routed_experts"]
    distinct = experts * (1 - (1 - t["num_experts_per_tok"] / experts) ** batch)  # expected, uniform routing
    lm_head = t["vocab_size"] * d
    cache = batch * context * layers * 576
    if quantization == "fp8":
        kv_b = 512 * heads * 256
        quantised = layers * (attn - kv_b) + dense + moe_layers * (shared + distinct * expert) + lm_head
        return quantised + 2.0 * layers * kv_b + 4.0 * moe_layers * d * experts + 2.0 * cache
    params = layers * attn + dense + moe_layers * (shared + d * experts + distinct * expert) + lm_head
    return 2.0 * (params + cache)


def hf_generate(bundle, batches: list[int]) -> dict[str, object]:
    from bench.model_forward import hf_model_from

    hf = hf_model_from(bundle.model, "cuda")
    bundle.model = None
    gc.collect()
    torch.cuda.empty_cache()
    out: dict[str, object] = {}
    for batch in batches:
        ids = torch.tensor([random_ids(PROMPT, 1000 + i) for i in range(batch)], device="cuda")
        kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        hf.generate(ids, **(kwargs | {"max_new_tokens": 4, "min_new_tokens": 4}))  # warm-up
        sync()
        start = time.perf_counter()
        hf.generate(ids, **kwargs)
        sync()
        elapsed = time.perf_counter() - start
        out[f"batch_{batch}"] = {"tok_per_s": round(batch * NEW / elapsed, 1), "seconds": round(elapsed, 3)}
    prompt = torch.tensor([random_ids(8192, 7)], device="cuda")
    with torch.inference_mode():
        hf(prompt)
        sync()
        start = time.perf_counter()
        hf(prompt)
        sync()
    out["prefill_8k_tok_per_s"] = round(8192 / (time.perf_counter() - start), 1)
    return out


def profile_steps(engine: LLMEngine, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    engine.add(engine.make_sequence({"prompt_token_ids": random_ids(PROMPT, 77), "max_tokens": 12, "ignore_eos": True}))
    engine.step()
    engine.runner.graphs, graphs = None, engine.runner.graphs  # profile the eager decode to see its kernels
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step()
        sync()
    engine.runner.graphs = graphs
    engine.step()  # captures (or finds) the batch-1 graph
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof_graph:
        for _ in range(3):
            engine.step()
        sync()
    run_until_done(engine)
    for i in range(64):
        engine.add(engine.make_sequence({"prompt_token_ids": random_ids(PROMPT, 900 + i), "max_tokens": 6,
                                         "ignore_eos": True}))
    while any(not s.output_ids for s in engine.by_id.values()):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof64:
        engine.step()  # graph replay: shows the step's CPU side and total GPU time
        sync()
    run_until_done(engine)
    engine.scheduler.config.max_num_batched_tokens = 8192
    prompt = min(8192, engine.cache_capacity_tokens - 64)  # smoke runs have small caches
    engine.add(engine.make_sequence({"prompt_token_ids": random_ids(prompt, 78), "max_tokens": 1}))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof2:
        run_until_done(engine)
        sync()
    text = "== eager decode step, batch 1 ==\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    text += "\n== 3 decode steps, batch 1 (graph replays: kernel time without launch gaps) ==\n" + \
        prof_graph.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    text += "\n== decode step, batch 64 (graph) ==\n" + prof64.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    text += "\n== 8K prefill step ==\n" + prof2.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    path.write_text(text)


@torch.inference_mode()
def step_breakdown(engine: LLMEngine, path: Path | None, batch: int = 1, steps: int = 60) -> dict[str, float]:
    """Where a ``batch``-row decode step's wall time goes: each phase timed with a device sync after it (so the sum
    exceeds the free-running step), plus a CPU-side operator table of unsynced steps, written to ``path``. At
    batch 64 the step took 32 ms against an 18 ms graph on the H100: this splits the rest."""
    from torch.profiler import ProfilerActivity, profile

    for row in range(batch):
        engine.add(engine.make_sequence({"prompt_token_ids": random_ids(PROMPT, 4242 + row),
                                         "max_tokens": 2 * steps + 40, "ignore_eos": True}))
    for _ in range(10):
        engine.step()
    sync()
    phases = dict.fromkeys(("schedule", "inputs_and_graph", "sample_and_emit"), 0.0)
    free = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    free = (time.perf_counter() - free) / steps
    overlap, engine.options.overlap = engine.options.overlap, False  # phases of sequential steps
    engine.step()  # reads the step in flight
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = engine.scheduler.schedule()
        t1 = time.perf_counter()
        logits = engine.runner.run_step(batch.seqs, batch.num_new_tokens, engine.blocks.tables)
        sync()
        t2 = time.perf_counter()
        for seq, k in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += k
            if engine.options.enable_prefix_caching:
                engine.blocks.publish(seq)
        engine._start_sampling(batch.seqs, logits, every_row=True)
        launched, engine._inflight = engine._inflight, None
        engine._resolve(launched)
        sync()
        t3 = time.perf_counter()
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[name] += dt / steps
    engine.options.overlap = overlap
    result = {"free_running_ms": round(1000 * free, 3)} | {f"{k}_ms": round(1000 * v, 3) for k, v in phases.items()}
    if path is not None:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                engine.step()
            sync()
        path.write_text("== 20 batch-1 decode steps (graph), by self CPU time ==\n"
                        + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    run_until_done(engine)
    return result


def install_nan_probe(engine: LLMEngine) -> None:
    """Debug aid: after every step, report the first rows with non-finite logits and what the step fed them."""
    runner = engine.runner
    plain = runner.run_step
    history: list[str] = []

    def probed(seqs, num_new_tokens, *args):
        graphs = runner.graphs
        before = graphs.replays if graphs else 0
        logits = plain(seqs, num_new_tokens, *args)
        used_graph = graphs is not None and graphs.replays > before
        kind = "graph" if used_graph else ("decode" if all(k == 1 for k in num_new_tokens) else "mixed")
        history.append(f"{kind}:{len(seqs)}")
        bad = (~torch.isfinite(logits).all(dim=-1)).nonzero().flatten().tolist()
        if bad and not getattr(runner, "_nan_reported", False):
            runner._nan_reported = True
            info = {"kind": kind, "rows": len(seqs), "bad_rows": bad[:40], "recent_steps": history[-8:]}
            if used_graph:  # what the graph derived from its packed inputs (its static views), vs the sequences
                n = len(seqs)
                key = (graphs._bucket(n, graphs.BATCH_BUCKETS),
                       graphs.key_bucket(max(s.num_computed_tokens + 1 for s in seqs)))
                static = graphs.graphs[key].static
                info["bucket"] = list(key)
                rows = []
                for r in bad[:4] + [i for i in range(n) if i not in bad][:2]:
                    seq = seqs[r]
                    start = seq.num_computed_tokens
                    expect = [seq.block_table[i // runner.block_size] * runner.block_size + i % runner.block_size
                              for i in range(start + 1)]
                    rows.append({"row": r, "bad": r in bad, "start": start, "len": len(seq),
                                 "id": int(static.input_ids[r]), "pos": int(static.positions[r]),
                                 "slot": int(static.slot_mapping[r]), "want_slot": expect[-1],
                                 "slots_ok": static.decode_slots[r, : start + 1].tolist() == expect,
                                 "length": int(static.decode_lengths[r])})
                info["detail"] = rows
            print("NAN PROBE:", json.dumps(info), flush=True)
        return logits

    runner.run_step = probed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--longest", type=int, default=131072 - 2)
    parser.add_argument("--prefill", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, help="shrink the model (smoke runs only)")
    parser.add_argument("--decode-backend", default="auto", choices=["auto", "modules"],
                        help="the runner's decode backend (modules: unfused, eager, without CUDA graphs)")
    parser.add_argument("--prefill-chunks", type=int, nargs="+",
                        help="largest prompt chunk(s) for the prefill rounds (default: the engine's default); the "
                             "longest prompt runs once per size")
    parser.add_argument("--decode-only", action="store_true", help="stop after the decode rounds")
    parser.add_argument("--overlap", default="on", choices=["on", "off", "both"],
                        help="the engine's run-ahead (step N+1 launched before step N's samples are read); both: "
                             "decode measured with it on, then again with it off, same process")
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--warm-up", action="store_true", help="EngineOptions.warm_up_decode: every decode bucket's "
                        "kernels compiled at engine start (its seconds recorded); the first rounds then show what is left")
    parser.add_argument("--nan-probe", action="store_true",
                        help="debug: sync after each step and report the first rows with non-finite logits")
    parser.add_argument("--breakdown", type=Path, help="time a decode step's phases; CPU op table here (one file "
                        "per batch of --breakdown-batches, the batch appended to the name)")
    parser.add_argument("--breakdown-batches", type=int, nargs="+", default=[1])
    parser.add_argument("--quantization", choices=["fp8"], help="the engine's weight quantization (FP8's step "
                        "breakdown and profile: --quantization fp8 --decode-only --breakdown F --breakdown-batches 1 64)")
    parser.add_argument("--baseline", action="store_true",
                        help="first measure decode with the fused path off (same process; eager, no graphs)")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    results: dict[str, object] = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__}
    workdir = Path(tempfile.mkdtemp())
    bundle = a3b_bundle(workdir, args.device, layers=args.layers)
    started = time.perf_counter()
    engine = LLMEngine(bundle, EngineOptions(max_num_seqs=max(64, max(args.batches)), max_num_batched_tokens=8192,
                                             cache_tokens=args.longest + 4096, block_size=16,
                                             cuda_graphs=not args.no_graphs, quantization=args.quantization,
                                             warm_up_decode=args.warm_up))
    results["quantization"] = args.quantization
    results["engine_start_s"] = round(time.perf_counter() - started, 1)  # with --warm-up: the warm-up included
    results["warm_up_decode"] = args.warm_up
    engine.options.overlap = args.overlap != "off"
    results["cache_tokens"] = engine.cache_capacity_tokens
    if args.nan_probe:
        install_nan_probe(engine)
    results["bandwidth_GBps"] = round(measure_bandwidth() / 1e9, 1) if on_gpu else float("nan")
    bandwidth = results["bandwidth_GBps"] * 1e9

    def dump() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    def attempt(name: str, batches: list[int]) -> list[dict]:
        try:
            return measure_decode(engine, batches, bandwidth, name, dump)
        except Exception as exc:  # record it and go on with the other rounds
            results.setdefault("errors", {})[name] = repr(exc)
            print(f"round {name} failed: {exc!r}", flush=True)
            cache = engine.runner.kv_cache
            bad = (~torch.isfinite(cache)).any(dim=-1)  # (layers, slots)
            slots = bad.any(dim=0).nonzero().flatten().tolist()
            results.setdefault("nonfinite_cache", {})[name] = {
                "slots": len(slots), "first": slots[:20], "scratch_bad": bool(bad[:, engine.runner.scratch_slot].any()),
                "layers": bad.any(dim=1).nonzero().flatten().tolist()[:10]}
            print("non-finite cache:", results["nonfinite_cache"][name], flush=True)
            return []

    if args.baseline:
        results["decode_baseline"] = attempt("baseline", args.batches)
    decode = attempt("fused" if args.decode_backend == "auto" else "baseline", args.batches)
    results["decode"] = decode
    if args.baseline:
        for rows in [decode]:
            for row, base in zip(rows, results["decode_baseline"]):
                row["speedup_vs_baseline"] = round(row["tok_per_s"] / base["tok_per_s"], 2)
                same = 0
                while same < min(len(row["first_ids"]), len(base["first_ids"])) and \
                        row["first_ids"][same] == base["first_ids"][same]:
                    same += 1
                row["greedy_prefix_equal_to_baseline"] = same
    for row in decode:
        row["overlap"] = engine.options.overlap
    if args.overlap == "both" and decode:  # the same round again with run-ahead off, same process
        engine.options.overlap = False
        results["decode_no_overlap"] = attempt(decode[0]["round"], args.batches)
        engine.options.overlap = True
        for row, base in zip(decode, results["decode_no_overlap"]):
            base["overlap"] = False
            row["speedup_vs_no_overlap"] = round(row["tok_per_s"] / base["tok_per_s"], 2)
            row["greedy_ids_equal_no_overlap"] = row["first_ids"] == base["first_ids"]
        dump()
    if args.breakdown:
        for batch in args.breakdown_batches:
            table = args.breakdown.with_name(f"{args.breakdown.stem}_b{batch}{args.breakdown.suffix}")
            results[f"step_breakdown_batch{batch}"] = step_breakdown(engine, table, batch)
            print(json.dumps(results[f"step_breakdown_batch{batch}"]), flush=True)
    results["graph_replays"] = engine.runner.graphs.replays if engine.runner.graphs else 0
    results["kernels"] = kernel_notes()
    dump()
    if args.decode_only:
        if args.profile:
            profile_steps(engine, args.profile)
        print(json.dumps(results, indent=1))
        return

    chunks = args.prefill_chunks or [engine.scheduler.config.max_prefill_chunk_tokens or 8192]
    results["prefill_chunk_sizes"] = chunks
    prefill_throughput(engine, args.prefill[0], chunks[-1], seed=1)  # warm-up
    results["prefill"] = [prefill_throughput(engine, n, chunks[-1], seed=2 + i) for i, n in enumerate(args.prefill)]
    print(json.dumps(results["prefill"]), flush=True)
    dump()
    screenshot_ttft(engine, seed=0)  # warm-up (vision kernels)
    shots = [screenshot_ttft(engine, seed=seed) for seed in (1, 2, 3)]  # fresh images: no cache helps
    results["screenshot_ttft"] = sorted(shots, key=lambda r: r["ttft_s"])[1] | {
        "ttft_s_each": [r["ttft_s"] for r in shots], "preprocess_s_each": [r["preprocess_s"] for r in shots]}
    print(json.dumps(results["screenshot_ttft"]), flush=True)
    rounds = []
    for i, chunk in enumerate(chunks):
        try:  # a new prompt per chunk size: the same one would be served from the prefix cache
            longest = prefill_throughput(engine, args.longest, chunk, seed=4 + i)
            longest["completed"] = True
        except Exception as exc:  # report, don't crash the rest of the benchmark
            longest = {"tokens": args.longest, "chunk": chunk, "completed": False, "error": repr(exc)}
            engine.scheduler.config.max_prefill_chunk_tokens = 8192
            for seq in list(engine.by_id.values()):
                engine.abort(seq.request_id)
        rounds.append(longest)
        print(json.dumps(longest), flush=True)
        dump()
    results["longest_prompt"] = rounds[-1]
    results["longest_prompt_by_chunk"] = rounds
    if args.profile:
        profile_steps(engine, args.profile)
    results["stats"] = engine.stats()

    if not args.skip_hf:
        engine.runner.kv_cache = None
        engine.runner.graphs = None
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        results["transformers"] = hf_generate(bundle, [1, 32])
        for row in decode:
            ref = results["transformers"].get(f"batch_{row['batch']}")
            if ref:
                row["speedup_vs_transformers"] = round(row["tok_per_s"] / ref["tok_per_s"], 2)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
