"""GPU kernels against their plain PyTorch paths (skipped where no CUDA device is present)."""

from __future__ import annotations

import pytest
import torch

from tests.runtime_helpers import plain_step, random_expert_bank

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
def test_grouped_gemm_experts_match_loop_on_gpu() -> None:
    bank, x, ids, weights = random_expert_bank(3000)
    with torch.no_grad():
        bank.backend = "grouped"
        grouped = bank(x, ids, weights).float()
        bank.backend = "loop"
        looped = bank(x, ids, weights).float()
    assert (grouped - looped).abs().max() <= 2e-2 * looped.abs().max()


@pytest.mark.gpu
def test_tiny_checkpoint_on_gpu_matches_cpu(tiny_checkpoint) -> None:
    """The same loader and model on CUDA (fp32 and bf16) agree with the CPU fp32 run."""
    from engine.loader import load_model

    cpu = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
    gpu = load_model(tiny_checkpoint, device="cuda", dtype=torch.float32)
    gpu_bf16 = load_model(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 700, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = cpu(ids)
        actual = gpu(ids.cuda()).cpu()
        rough = gpu_bf16(ids.cuda()).cpu()
    assert (actual - expected).abs().max() < 1e-3
    assert (rough - expected).abs().median() < 0.1


@pytest.mark.gpu
def test_engine_cuda_graph_decode_matches_eager(tiny_checkpoint) -> None:
    """Greedy tokens with CUDA-graph decode equal the eager runtime's on the same GPU."""
    from engine.loader import load
    from engine.runtime.engine import EngineOptions, LLMEngine

    bundle = load(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)  # graphs need the bf16 grouped GEMM
    outputs = []
    for graphs in (False, True):
        engine = LLMEngine(bundle, EngineOptions(cache_tokens=4096, cuda_graphs=graphs))
        seqs = [
            engine.make_sequence({"messages": [{"role": "user", "content": f"question number {i} " * (i + 1)}],
                                  "max_tokens": 12, "ignore_eos": True})
            for i in range(5)
        ]
        for seq in seqs:
            engine.add(seq)
        while engine.has_work():
            engine.step()
        outputs.append([s.output_ids for s in seqs])
        if graphs:
            assert engine.runner.graphs.replays > 0
    assert outputs[0] == outputs[1]


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-2) -> None:
    actual, expected = actual.float(), expected.float()
    assert torch.isfinite(actual).all()
    assert (actual - expected).abs().max() <= rel * expected.abs().max(), (actual - expected).abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 16, 64])
def test_fused_decode_kernels_match_torch_at_a3b_shapes(rows: int) -> None:
    """Each Triton kernel of the fused decode path against its PyTorch reference, A3B sizes, bf16."""
    from engine.kernels import decode as fused

    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    heads, nope, rope, rank, d, inter, experts, top_k = 16, 128, 64, 512, 2048, 1408, 64, 6

    parts = torch.randn(rows, 8, d, device=dev)
    res = torch.randn(rows, d, device=dev, dtype=bf16)
    w = torch.rand(d, device=dev, dtype=bf16) + 0.5
    for a, b in zip(fused.add_rms_norm(parts, res, w, 1e-5, True, impl="triton"),
                    fused.add_rms_norm(parts, res, w, 1e-5, True, impl="torch")):
        _close(a, b)

    qkv = torch.randn(rows, heads * (nope + rope) + rank + rope, device=dev, dtype=bf16)
    q, kv = qkv.split([heads * (nope + rope), rank + rope], dim=-1)
    cos, sin = torch.randn(2, rows, rope // 2, device=dev, dtype=bf16).unbind(0)
    cache_a = torch.zeros(4096, rank + rope, device=dev, dtype=bf16)
    cache_b = cache_a.clone()
    slots = torch.randperm(4096, device=dev)[:rows]
    nw = torch.rand(rank, device=dev, dtype=bf16) + 0.5
    kv_b = torch.randn(heads, nope + 128, rank, device=dev, dtype=bf16) * rank**-0.5  # kv_b_proj's layout
    w_uk, w_uv = kv_b[:, :nope], kv_b[:, nope:]
    args = (heads, nope, rope, rank, nw, 1e-6, cos, sin)
    la, pa = fused.mla_decode_prologue(q, kv, w_uk, *args, cache_a, slots, impl="triton")
    lb, pb = fused.mla_decode_prologue(q, kv, w_uk, *args, cache_b, slots, impl="torch")
    _close(la, lb)
    _close(pa, pb)
    _close(cache_a, cache_b)

    for width in (256, 1024, 8192):
        cache = torch.randn(16384, rank + rope, device=dev, dtype=bf16)
        q_latent = torch.randn(rows, heads, rank, device=dev, dtype=bf16).transpose(0, 1)
        q_pe = torch.randn(rows, heads, rope, device=dev, dtype=bf16)
        key_slots = torch.randint(0, 16384, (rows, width), device=dev)
        lengths = torch.randint(1, width + 1, (rows,), device=dev, dtype=torch.int32)
        lengths[0] = width - 3
        if rows > 1:
            lengths[1] = 1  # one key: most splits empty
        _close(fused.mla_decode_attention(q_latent, q_pe, cache, key_slots, lengths, 0.07, w_uv, impl="triton"),
               fused.mla_decode_attention(q_latent, q_pe, cache, key_slots, lengths, 0.07, w_uv, impl="torch"))

    from engine.kernels import fp8

    for n_out in (heads * (nope + rope) + rank + rope, d):  # the fused qkv and o_proj shapes
        weight = torch.randn(n_out, d, device=dev, dtype=bf16) * d**-0.5
        x = torch.randn(rows, d, device=dev, dtype=bf16)
        _close(fused.linear(x, weight, impl="triton"), fused.linear(x, weight, impl="torch"))
        q8, s8 = fp8.quantize_rows(weight)
        _close(fused.linear(x, q8, s8, impl="triton"), fused.linear(x, q8, s8, impl="torch"))

    router = torch.randn(experts, d, device=dev)  # fp32, as the loader keeps it
    x = torch.randn(rows, d, device=dev, dtype=bf16)
    _close(fused.router_logits(x, None, router, impl="triton"), fused.router_logits(x, None, router, impl="torch"))

    logits = torch.randn(rows, experts, device=dev)
    bias = torch.rand(experts, device=dev) * 0.1
    ids_a, w_a = fused.route_topk(logits, bias, top_k, "sigmoid", True, 2.446, impl="triton")
    ids_b, w_b = fused.route_topk(logits, bias, top_k, "sigmoid", True, 2.446, impl="torch")
    sa, sb = ids_a.sort(1), ids_b.sort(1)
    assert torch.equal(sa.values, sb.values)
    _close(w_a.gather(1, sa.indices), w_b.gather(1, sb.indices), 1e-5)

    x = torch.randn(rows, d, device=dev, dtype=bf16)
    wg, wu = (torch.randn(experts, inter, d, device=dev, dtype=bf16) * d**-0.5 for _ in range(2))
    wd = torch.randn(experts, d, inter, device=dev, dtype=bf16) * inter**-0.5
    sg, su = (torch.randn(2 * inter, d, device=dev, dtype=bf16) * d**-0.5 for _ in range(2))
    sd = torch.randn(d, 2 * inter, device=dev, dtype=bf16) * inter**-0.5
    hidden = fused.moe_gate_up(x, ids_b, w_b, wg, wu, sg, su, impl="torch")
    _close(fused.moe_gate_up(x, ids_b, w_b, wg, wu, sg, su, impl="triton"), hidden)
    _close(fused.moe_down(hidden, ids_b, wd, sd, impl="triton"), fused.moe_down(hidden, ids_b, wd, sd, impl="torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [9, 33, 64, 128])
def test_expert_tiled_moe_kernels_match_torch_at_a3b_shapes(rows: int) -> None:
    """Past the GEMV range: the expert order kernel equals argsort + counts, and the expert-tiled gate/up and down
    kernels equal the per-(token, slot) references (bf16, A3B sizes; a skewed routing gives some expert more
    rows than one tile holds)."""
    from engine.kernels import decode as fused

    torch.manual_seed(rows)
    dev, bf16 = "cuda", torch.bfloat16
    d, inter, experts, top_k = 2048, 1408, 64, 6
    ids = torch.stack([torch.randperm(experts, device=dev)[:top_k] for _ in range(rows)])
    ids[: rows // 2, 0] = 5  # expert 5 gets at least rows // 2 rows
    order = fused.moe_expert_order(ids, experts, impl="triton")
    ref_order = fused.moe_expert_order(ids, experts, impl="torch")
    assert torch.equal(order[0], ref_order[0]) and torch.equal(order[1], ref_order[1])

    x = torch.randn(rows, d, device=dev, dtype=bf16)
    w = torch.rand(rows, top_k, device=dev)
    wg, wu = (torch.randn(experts, inter, d, device=dev, dtype=bf16) * d**-0.5 for _ in range(2))
    wd = torch.randn(experts, d, inter, device=dev, dtype=bf16) * inter**-0.5
    sg, su = (torch.randn(2 * inter, d, device=dev, dtype=bf16) * d**-0.5 for _ in range(2))
    sd = torch.randn(d, 2 * inter, device=dev, dtype=bf16) * inter**-0.5
    hidden = fused.moe_gate_up(x, ids, w, wg, wu, sg, su, impl="torch")
    _close(fused.moe_gate_up(x, ids, w, wg, wu, sg, su, impl="triton", order=order), hidden)
    _close(fused.moe_down(hidden, ids, wd, sd, impl="triton", order=order),
           fused.moe_down(hidden, ids, wd, sd, impl="torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("requests", [1, 3, 12])
def test_fast_decode_step_matches_plain_path_on_gpu(tiny_checkpoint_a3b, requests: int) -> None:
    """The whole fused decode step (Triton) against the modules' unfused ops on PyTorch reference kernels, bf16:
    one row takes the expert GEMVs, more the expert-tiled kernels."""
    from engine.loader import load
    from engine.runtime.engine import EngineOptions, LLMEngine

    bundle = load(tiny_checkpoint_a3b, device="cuda", dtype=torch.bfloat16)
    engine = LLMEngine(bundle, EngineOptions(cache_tokens=4096, block_size=8, cuda_graphs=False, overlap=False))
    for i in range(requests):
        text = f"request {i} " + "word " * (3 + 5 * i)
        engine.add(engine.make_sequence({"messages": [{"role": "user", "content": text}], "max_tokens": 4,
                                         "ignore_eos": True}))
    engine.step()
    batch = engine.scheduler.schedule()
    runner = engine.runner
    meta = runner.prepare(batch.seqs, batch.num_new_tokens)
    assert runner.fused_decode_applicable(meta)
    expected, cache_expected = plain_step(runner, meta)
    actual = runner.forward_eager(meta)
    _close(actual, expected, 5e-2)
    _close(runner.kv_cache, cache_expected, 2e-2)


@pytest.mark.gpu
def test_graphs_stay_valid_when_the_batch_crosses_the_fused_path_threshold(tiny_checkpoint) -> None:
    """Wave 1 captures a 16-row graph, wave 2 (3 rows) takes the fused small-batch path, wave 3 repeats wave 1
    and so replays the 16-row graph on the same inputs: its tokens must be wave 1's, bit for bit (prefix caching
    off, so the prompts are recomputed the same way). A graph left reading memory that something else has since
    reused (the fused path's weight layout used to be made lazily, after such captures) changes them."""
    from engine.loader import load
    from engine.runtime.engine import EngineOptions, LLMEngine

    bundle = load(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    engine = LLMEngine(bundle, EngineOptions(cache_tokens=8192, enable_prefix_caching=False))
    outputs = []
    for wave, (count, tag) in enumerate(((12, "a"), (3, "b"), (12, "a"))):
        seqs = [engine.make_sequence({"messages": [{"role": "user", "content": f"wave {tag} item {i} " * 3}],
                                      "max_tokens": 8, "ignore_eos": True}) for i in range(count)]
        for seq in seqs:
            engine.add(seq)
        while engine.has_work():
            engine.step()
        assert all(s.finish_reason == "length" for s in seqs), [s.error for s in seqs]
        outputs.append([s.output_ids for s in seqs])
    assert engine.runner.graphs.replays > 0 and (16, 256) in engine.runner.graphs.graphs
    assert outputs[2] == outputs[0]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,shared", [(8192, True), (5, False), (1, True)])
def test_moe_combine_kernel_matches_reference(tokens: int, shared: bool) -> None:
    """The prefill MoE's one-pass combine against the gather + fp32 sum + cast + add it replaces: the same bf16
    numbers (both sum the k slots in fp32 and round twice)."""
    from engine.kernels import triton_moe
    from engine.kernels.moe import combine_torch

    top_k, d = 6, 2048
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    outputs = torch.randn(tokens * top_k, d, device="cuda", generator=gen).to(torch.bfloat16)
    inverse = torch.randperm(tokens * top_k, device="cuda", generator=gen)
    extra = torch.randn(tokens, d, device="cuda", generator=gen).to(torch.bfloat16) if shared else None
    actual = triton_moe.combine(outputs, inverse, top_k, extra)
    expected = combine_torch(outputs, inverse, top_k, extra)
    assert actual.dtype == torch.bfloat16 and actual.shape == (tokens, d)
    assert (actual.float() - expected.float()).abs().max().item() <= 2 ** -6 * expected.float().abs().max().item()
    assert (actual == expected).float().mean().item() > 0.99  # rounding ties aside, the same bits


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [8192, 1, 777])
def test_prefill_layout_kernels_match_reference(rows: int) -> None:
    """The prefill prologue (kv norm, RoPE, cache write, head-major query) and the K/V layout kernel at A3B's dims
    against their references: copies bit-exact, rounded values within two bf16 roundings, only the rows' slots
    written."""
    from engine.kernels import prefill_layout

    heads, nope, rope, rank, v_dim, bf16 = 16, 128, 64, 512, 128, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(rows)
    q_cols = heads * (nope + rope)
    fused = torch.randn(rows, q_cols + rank + rope, device="cuda", generator=gen).to(bf16)
    q, kv = fused[:, :q_cols], fused[:, q_cols:]
    angles = torch.rand(rows, rope // 2, device="cuda", generator=gen) * 100
    cos, sin = angles.cos().to(bf16), angles.sin().to(bf16)
    weight = (torch.rand(rank, device="cuda", generator=gen) + 0.5).to(bf16)
    slots = torch.randperm(2 * rows, device="cuda", generator=gen)[:rows]
    before = torch.randn(2 * rows, rank + rope, device="cuda", generator=gen).to(bf16)
    cache_ref, cache_tri = before.clone(), before.clone()
    args = (q, kv, heads, nope, rope, rank, weight, 1e-6, cos, sin)
    expected = prefill_layout.prologue(*args, cache_ref, slots, impl="torch")
    actual = prefill_layout.prologue(*args, cache_tri, slots, impl="triton")
    assert actual.transpose(0, 1).is_contiguous() and torch.equal(actual[..., :nope], expected[..., :nope])
    _close(actual[..., nope:], expected[..., nope:], 2 * 2**-8)
    _close(cache_tri[slots], cache_ref[slots], 2 * 2**-8)
    untouched = torch.ones(2 * rows, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert torch.equal(cache_tri[untouched], before[untouched])

    keys = rows + 4096  # a cached prefix and the chunk
    kv_full = torch.randn(keys, heads * (nope + v_dim), device="cuda", generator=gen).to(bf16)
    latents = torch.randn(keys, rank + rope, device="cuda", generator=gen).to(bf16)
    k_ref, v_ref = prefill_layout.expand_kv(kv_full, latents[:, rank:], heads, nope, v_dim, impl="torch")
    k_tri, v_tri = prefill_layout.expand_kv(kv_full, latents[:, rank:], heads, nope, v_dim, impl="triton")
    assert torch.equal(k_tri, k_ref) and torch.equal(v_tri, v_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols", [(1, 1408), (3000, 1408), (77, 96)])
def test_silu_mul_scale_kernel_matches_reference(rows: int, cols: int) -> None:
    from engine.kernels import triton_moe
    from engine.kernels.moe import silu_mul_scale_torch

    gen = torch.Generator(device="cuda").manual_seed(rows)
    gate = torch.randn(rows, cols, device="cuda", generator=gen).to(torch.bfloat16) * 3
    up = torch.randn(rows, cols, device="cuda", generator=gen).to(torch.bfloat16)
    weights = torch.rand(rows, 1, device="cuda", generator=gen).to(torch.bfloat16)
    expected = silu_mul_scale_torch(gate.float(), up.float(), weights.float())
    actual = triton_moe.silu_mul_scale(gate, up, weights)
    assert actual.dtype == torch.bfloat16 and actual.shape == (rows, cols)
    _close(actual, expected, rel=1e-2)
    # no routing weights (the shared experts' SwiGLU), gate and up as halves of one GEMM output
    both = torch.cat([gate, up], dim=1)
    dense = triton_moe.silu_mul_scale(both[:, :cols], both[:, cols:], None)
    _close(dense, silu_mul_scale_torch(gate.float(), up.float(), None), rel=1e-2)


def _routing(tokens: int, top_k: int, experts: int, seed: int, hot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's top-k ids (int64) and softmax weights (fp32); with ``hot``, 90% of the pairs on experts
    0..hot-1 (slots drawn independently: dispatch needs no distinct ids per token)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    weights, ids = torch.randn(tokens, experts, device="cuda", generator=gen).softmax(dim=-1).topk(top_k, dim=-1)
    if hot:
        hot_ids = torch.randint(0, hot, ids.shape, device="cuda", generator=gen)
        ids = torch.where(torch.rand(ids.shape, device="cuda", generator=gen) < 0.9, hot_ids, ids)
    return ids, weights


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,hot,int32", [(8192, 0, False), (1, 0, False), (777, 0, True), (8192, 3, False),
                                              (131072, 0, False)])
def test_moe_dispatch_kernel_matches_reference(tokens: int, hot: int, int32: bool) -> None:
    """The two-launch counting sort against the argsort dispatch it replaces at A3B's E=64, k=6: every output
    bit for bit (integers and a gathered, rounded weight), through moe.dispatch's gate; uneven routing (most pairs
    on 3 experts, the rest with few or none) and a 131K-token chunk's 786K pairs too."""
    from engine.kernels import moe

    ids, weights = _routing(tokens, 6, 64, tokens + hot, hot)
    if int32:
        ids = ids.int()
    actual = moe.dispatch(ids, weights, 64, torch.bfloat16)
    expected = moe.dispatch_torch(ids, weights, 64, torch.bfloat16)
    assert not moe._broken
    for name, a, e in zip(("tokens", "row_weights", "offsets", "inverse"), actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape and torch.equal(a, e), name
    if hot:
        assert expected[2][2].item() > 0.8 * ids.numel()


@pytest.mark.gpu
def test_moe_dispatch_kernel_replays_in_a_cuda_graph() -> None:
    """No host sync and shapes from the input's alone: captured once, a replay on new routing gives the new
    dispatch."""
    from engine.kernels import triton_moe
    from engine.kernels.moe import dispatch_torch

    ids, weights = _routing(777, 6, 64, 1)
    triton_moe.dispatch(ids, weights, 64, torch.bfloat16)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = triton_moe.dispatch(ids, weights, 64, torch.bfloat16)
    new_ids, new_weights = _routing(777, 6, 64, 2, hot=2)
    ids.copy_(new_ids)
    weights.copy_(new_weights)
    graph.replay()
    for a, e in zip(outputs, dispatch_torch(new_ids, new_weights, 64, torch.bfloat16)):
        assert torch.equal(a, e)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [8192, 600])
def test_router_logits_from_16bit_rows_match_fp32(rows: int) -> None:
    """Prompt rows' router logits from bf16 rows and the weight's exact bf16 copy (tensor cores, exact products)
    against the fp32 product at A3B's sizes: the same sums up to their order, so the same top-k almost always."""
    from engine.kernels import decode

    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 2048, device="cuda", generator=gen).to(torch.bfloat16)
    weight = (torch.randn(64, 2048, device="cuda", generator=gen) / 45).to(torch.bfloat16).float()
    expected = torch.nn.functional.linear(x.double(), weight.double())
    fp32 = torch.nn.functional.linear(x.float(), weight)  # the path it replaces: its own rounding of the sums
    actual = decode.router_logits(x, None, weight, impl="triton", weight_16bit=weight.to(torch.bfloat16))
    assert actual.dtype == torch.float32 and actual.shape == (rows, 64)
    scale = expected.abs().max()
    err, err_fp32 = ((actual.double() - expected).abs().max() / scale).item(), ((fp32 - expected).abs().max() / scale).item()
    assert err < max(4 * err_fp32, 1e-5), (err, err_fp32)  # fp32 sums of 2,048 exact products (H100: 2.3e-6)
    auto = decode.router_logits(x, None, weight, weight_16bit=weight.to(torch.bfloat16))  # "auto" takes it too
    assert torch.equal(auto, actual)
    same = (actual.topk(6).indices.sort().values == expected.float().topk(6).indices.sort().values).all(dim=1)
    assert same.float().mean().item() > 0.995


@pytest.mark.gpu
def test_merged_gate_up_grouped_gemm_matches_separate_on_gpu() -> None:
    """An ExpertBank and a shared MLP with the merged gate/up layouts (one grouped GEMM / GEMM for both) against
    the same modules projecting gate and up separately, bf16 at A3B's expert sizes, 8K tokens; the decode expert
    kernels read the merged views."""
    from engine.model.decoder import DeepseekV3MLP, ExpertBank

    torch.manual_seed(0)
    bank = ExpertBank(64, 2048, 1408).to("cuda", torch.bfloat16)
    shared = DeepseekV3MLP(2048, 2816).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for p in [*bank.parameters(), *shared.parameters()]:
            p.normal_(0, 2048 ** -0.5)
    x = torch.randn(8192, 2048, device="cuda").to(torch.bfloat16)
    ids = torch.randn(8192, 64, device="cuda").topk(6, dim=-1).indices
    weights = torch.rand(8192, 6, device="cuda")
    with torch.inference_mode():
        separate_bank, separate_shared = bank(x, ids, weights), shared(x)
        bank.fuse_gate_up_()
        shared.fuse_gate_up_()
        assert bank.gate_up_weight is not None and shared.gate_up_weight is not None
        merged_bank, merged_shared = bank(x, ids, weights), shared(x)
    for a, b in ((merged_bank, separate_bank), (merged_shared, separate_shared)):
        assert (a.float() - b.float()).abs().max().item() <= 2 ** -6 * b.float().abs().max().item()
    from engine.kernels import decode

    rows = x[:3]
    hidden = decode.moe_gate_up(rows, ids[:3], weights[:3], bank.gate_proj, bank.up_proj, impl="triton")
    reference = decode.moe_gate_up(rows, ids[:3], weights[:3], bank.gate_proj.contiguous(), bank.up_proj.contiguous(),
                                   impl="torch")
    assert (hidden.float() - reference.float()).abs().max().item() <= 2 ** -6 * reference.float().abs().max().item()
