"""The fused decode backend of the decoder modules (``decode_backend="fused"``) through its PyTorch references.

On CUDA the same path runs Triton kernels (``tests/test_gpu_kernels.py`` compares those with these references);
here it must give the same logits and the same cache writes as the plain runtime path.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import decode as fused
from engine.runtime.engine import EngineOptions, LLMEngine
from tests.runtime_helpers import plain_step, text_message


def _decode_step(bundle, rows: int):
    engine = LLMEngine(bundle, EngineOptions(cache_tokens=4096, block_size=8, max_num_seqs=16, overlap=False))
    for i in range(rows):
        engine.add(engine.make_sequence({"messages": text_message(f"request {i} " + "word " * (3 + 5 * i)),
                                         "max_tokens": 4, "ignore_eos": True}))
    engine.step()  # prefill all, sample their first token
    batch = engine.scheduler.schedule()
    assert len(batch.seqs) == rows and all(n == 1 for n in batch.num_new_tokens)
    return engine, engine.runner.prepare(batch.seqs, batch.num_new_tokens)


def _compare(runner, meta, tol: float) -> None:
    expected, cache_expected = plain_step(runner, meta)
    runner.decode_backend = "fused"
    assert runner.fused_decode_applicable(meta)
    actual = runner.forward_eager(meta)
    runner.decode_backend = "auto"
    assert (actual - expected).abs().max() < tol
    assert (runner.kv_cache - cache_expected).abs().max() < tol
    assert (actual.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_checkpoint_a3b", "tiny_checkpoint_q_lora"])
@pytest.mark.parametrize("rows", [1, 3, 6])  # 6 rows: fused attention, grouped-GEMM MoE
def test_fast_decode_matches_plain_path(fixture: str, rows: int, request: pytest.FixtureRequest) -> None:
    from engine.loader import load

    bundle = load(request.getfixturevalue(fixture), device="cpu", dtype=torch.float32)
    engine, meta = _decode_step(bundle, rows)
    _compare(engine.runner, meta, 1e-4)


def test_fast_decode_on_padded_graph_metadata(tiny_checkpoint_a3b) -> None:
    """The CUDA graph pads rows and key slots (its inputs written from the sequences, as a replay does); padded rows
    only touch the scratch slot."""
    import numpy as np

    from engine.loader import load
    from engine.runtime.graphs import decode_views, packed_size, write_decode_inputs

    bundle = load(tiny_checkpoint_a3b, device="cpu", dtype=torch.float32)
    engine, meta = _decode_step(bundle, 3)
    runner, bs = engine.runner, engine.options.block_size
    seqs = engine.scheduler.running
    host = np.zeros(packed_size(4, 512, bs), dtype=np.int64)
    write_decode_inputs(host, seqs, 4, 512, bs, runner.scratch_slot // bs, engine.blocks.tables)
    padded = decode_views(torch.from_numpy(host), 4, 512, bs, torch.zeros(128, dtype=torch.long))
    expected, cache_expected = plain_step(runner, meta)
    runner.decode_backend = "fused"
    actual = runner.forward_eager(padded)[:3]
    runner.decode_backend = "auto"
    assert torch.isfinite(actual).all()
    assert (actual - expected).abs().max() < 1e-4
    real = runner.scratch_slot
    assert (runner.kv_cache[:, :real] - cache_expected[:, :real]).abs().max() < 1e-5


def test_fused_qkv_layout_is_made_at_load_time(tiny_checkpoint) -> None:
    """The loader lays q_proj / kv_a_proj_with_mqa out as one matrix (both weights views of it, checkpoint values);
    the runner only reads it: building engines changes no parameter."""
    from safetensors import safe_open

    from engine.loader import _weight_files, load, load_model

    bundle = load(tiny_checkpoint, device="cpu", dtype=torch.float32)
    attn = bundle.model.language_model.model.layers[1].self_attn
    merged = attn.fused_qkv_weight
    assert merged is not None and merged.data_ptr() == attn.q_proj.weight.data_ptr()
    assert attn.kv_a_proj_with_mqa.weight.data_ptr() == merged[attn.q_proj.weight.shape[0]:].data_ptr()
    assert isinstance(attn.q_proj.weight, torch.nn.Parameter)
    assert "language_model.model.layers.1.self_attn.q_proj.weight" in bundle.model.state_dict()
    assert not any("self_attn.qkv" in k or "_qkv" in k for k in bundle.model.state_dict())  # nothing new to save
    files = _weight_files(tiny_checkpoint)
    for name in ("q_proj", "kv_a_proj_with_mqa"):
        key = f"language_model.model.layers.1.self_attn.{name}.weight"
        with safe_open(str(files[key]), "pt") as f:
            assert torch.equal(getattr(attn, name).weight, f.get_tensor(key))
    pointers = [p.data_ptr() for p in bundle.model.parameters()]
    engine, meta = _decode_step(bundle, 1)
    engine.runner.decode_backend = "fused"
    engine.runner.forward_eager(meta)
    assert [p.data_ptr() for p in bundle.model.parameters()] == pointers
    x = torch.randn(2, attn.q_proj.weight.shape[1])
    q, kv = attn.project_qkv(x)  # one GEMV over the merged matrix equals the two projections
    assert torch.allclose(q, attn.q_proj(x), atol=1e-6) and torch.allclose(kv, attn.kv_a_proj_with_mqa(x), atol=1e-6)
    # a layout that no longer holds (each weight re-allocated) is not used: the fused path projects separately
    plain = load_model(tiny_checkpoint, dtype=torch.float32).language_model.model.layers[1].self_attn
    plain.q_proj.weight = torch.nn.Parameter(plain.q_proj.weight.clone(), requires_grad=False)
    assert plain.fused_qkv_weight is None


def test_merged_gate_up_layouts_are_made_at_load_time_and_quantised_as_one(tiny_checkpoint_a3b) -> None:
    """The loader lays each ExpertBank's gate/up out as one (E, 2I, D) tensor and each SwiGLU MLP's (shared experts,
    dense layers) as one (2I, D) matrix, the parameters views of them holding the checkpoint's values; prompt rows
    then run one (grouped) GEMM for both, with the numbers of the separate ones. fp8 quantises each merged tensor
    once: the same bits as quantising the parts."""
    from safetensors import safe_open

    from engine.kernels import fp8
    from engine.loader import _weight_files, load, quantize_model_
    from engine.model.decoder import DeepseekV3MoE

    bundle = load(tiny_checkpoint_a3b, device="cpu", dtype=torch.float32)
    layers = bundle.model.language_model.model.layers
    index = next(i for i, layer in enumerate(layers) if isinstance(layer.mlp, DeepseekV3MoE))
    moe, dense = layers[index].mlp, next(layer.mlp for layer in layers if not isinstance(layer.mlp, DeepseekV3MoE))
    bank, shared = moe.experts, moe.shared_experts
    inter = bank.gate_proj.shape[1]
    merged = bank.gate_up_weight
    assert merged is not None and merged.shape == (bank.gate_proj.shape[0], 2 * inter, bank.gate_proj.shape[2])
    assert bank.gate_proj.data_ptr() == merged.data_ptr() and bank.up_proj.data_ptr() == merged[:, inter:].data_ptr()
    assert shared.gate_up_weight is not None and dense.gate_up_weight is not None
    assert not any("_gate_up" in k for k in bundle.model.state_dict())  # nothing new to save
    files = _weight_files(tiny_checkpoint_a3b)
    for name in ("gate_proj", "up_proj"):
        key = f"language_model.model.layers.{index}.mlp.experts.3.{name}.weight"
        with safe_open(str(files[key]), "pt") as f:
            assert torch.equal(getattr(bank, name)[3], f.get_tensor(key))

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, bank.gate_proj.shape[2], generator=gen)
    ids = torch.randint(0, bank.gate_proj.shape[0], (37, moe.gate.top_k), generator=gen)
    weights = torch.rand(37, moe.gate.top_k, generator=gen)

    def separate(module, *args):  # the same module with its merged layout forgotten
        saved = module._gate_up
        module._gate_up = None
        try:
            return module(*args)
        finally:
            module._gate_up = saved

    assert torch.allclose(bank(x, ids, weights), separate(bank, x, ids, weights), atol=1e-5)
    assert torch.allclose(shared(x), separate(shared, x), atol=1e-5)

    parts = {name: fp8.quantize_rows(getattr(bank, name).detach()) for name in ("gate_proj", "up_proj")}
    quantize_model_(bundle.model, "fp8")
    assert bank.gate_up_weight is not None and fp8.is_fp8(bank.gate_up_weight)
    assert bank.gate_proj.data_ptr() == bank.gate_up_weight.data_ptr()
    for name, scale in (("gate_proj", bank.gate_scale), ("up_proj", bank.up_scale)):
        assert torch.equal(getattr(bank, name).view(torch.uint8), parts[name][0].view(torch.uint8))
        assert torch.equal(scale, parts[name][1]) and scale.is_contiguous()
    assert isinstance(shared.gate_proj, fp8.Fp8Linear) and shared.gate_up_scale is not None
    assert shared.gate_proj.weight.data_ptr() == shared.gate_up_weight.data_ptr()
    bank_scale = bank._gate_up_scale
    bank._gate_up_scale = None  # the forgotten layout must not be half used
    saved = bank._gate_up
    bank._gate_up = None
    expected = bank(x, ids, weights)
    bank._gate_up, bank._gate_up_scale = saved, bank_scale
    assert torch.allclose(bank(x, ids, weights), expected, atol=1e-5)


def test_q_lora_checkpoint_has_no_fused_layout(tiny_checkpoint_q_lora) -> None:
    from engine.loader import load_model

    model = load_model(tiny_checkpoint_q_lora, dtype=torch.float32)
    assert all(layer.self_attn.fused_qkv_weight is None for layer in model.language_model.model.layers)


def test_expert_gemvs_equal_expert_bank_and_shared_mlp() -> None:
    from engine.model.decoder import DeepseekV3MLP, ExpertBank

    torch.manual_seed(0)
    bank = ExpertBank(8, 64, 32)
    shared = DeepseekV3MLP(64, 64)  # two shared slots of width 32
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(3, 64)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(3)])
    weights = torch.rand(3, 2)
    with torch.no_grad():
        bank.backend = "loop"
        expected = bank(x, ids, weights) + shared(x)
        hidden = fused.moe_gate_up(x, ids, weights, bank.gate_proj, bank.up_proj,
                                   shared.gate_proj.weight, shared.up_proj.weight, impl="torch")
        parts = fused.moe_down(hidden, ids, bank.down_proj, shared.down_proj.weight, impl="torch")
    assert parts.shape == (3, 4, 64)
    assert (parts.sum(1) - expected).abs().max() < 1e-5


def test_route_topk_equals_moe_gate() -> None:
    from engine.config import parse_config
    from engine.model.decoder import MoEGate
    from engine.tiny import tiny_config

    for scoring, method in (("sigmoid", "noaux_tc"), ("softmax", "greedy")):
        raw = tiny_config("a3b_routing")["text_config"] | {"scoring_func": scoring, "topk_method": method}
        gate = MoEGate(parse_config({**tiny_config("a3b_routing"), "text_config": raw}).text_config)
        torch.manual_seed(1)
        with torch.no_grad():
            gate.weight.normal_(0, 0.2)
            if method == "noaux_tc":
                gate.e_score_correction_bias.uniform_(0, 0.1)
        x = torch.randn(5, gate.weight.shape[1])
        ids, weights = gate(x)
        bias = gate.e_score_correction_bias if method == "noaux_tc" else None
        ids2, weights2 = fused.route_topk(x @ gate.weight.T, bias, gate.top_k, scoring, gate.norm_topk_prob,
                                          gate.routed_scaling_factor, impl="torch")
        order, order2 = ids.sort(1), ids2.sort(1)
        assert torch.equal(order.values, order2.values)
        assert torch.allclose(weights.gather(1, order.indices), weights2.gather(1, order2.indices), atol=1e-6)


def test_latent_attention_reference_equals_naive_softmax() -> None:
    torch.manual_seed(0)
    heads, rank, rope, n = 3, 16, 8, 2
    cache = torch.randn(40, rank + rope)
    q_latent = torch.randn(heads, n, rank)
    q_pe = torch.randn(n, heads, rope)
    slots = torch.tensor([list(range(0, 10)), list(range(20, 30))])
    lengths = torch.tensor([10, 7])
    w_uv = torch.randn(heads, 5, rank)
    values = fused.mla_decode_attention(q_latent, q_pe, cache, slots, lengths, 0.3, w_uv, impl="torch")
    assert values.shape == (n, heads, 5)
    for t in range(n):
        keys = cache[slots[t, : lengths[t]]]
        for h in range(heads):
            q = torch.cat([q_latent[h, t], q_pe[t, h]])
            p = torch.softmax(keys @ q * 0.3, dim=0)
            assert torch.allclose(values[t, h], w_uv[h] @ (p @ keys[:, :rank]), atol=1e-4)

