"""Full-size Kimi-VL-A3B forward on one GPU (random bf16 weights) beside transformers' DeepseekV3.

Measures: (1) one forward over a 1280x720 screenshot + 512 text tokens (vision tower + projector + decoder),
(2) an 8K-token text prefill; wall time (median of N after warm-up) and peak GPU memory. In the same run,
transformers' ``DeepseekV3ForCausalLM`` gets the very same decoder weights and the same inputs (the
screenshot case passes our merged embeddings as ``inputs_embeds``), and the logits of both are compared.

Usage: python bench/model_forward.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.a3b import A3B_CONFIG, random_a3b_model  # noqa: E402
from engine.config import ProcessorConfig  # noqa: E402
from engine.processor import image_grid  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """Median seconds over ``repeats`` after one warm-up, and peak memory (GiB) during the runs."""
    out = fn()
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        del out
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), _peak_gib(), out


def screenshot_inputs(device: str):
    grid_h, grid_w = image_grid(1280, 720, ProcessorConfig(in_token_limit=4096))
    n_patches, n_tokens = grid_h * grid_w, grid_h * grid_w // 4
    gen = torch.Generator(device=device).manual_seed(0)
    pixel_values = torch.randn(n_patches, 3, 14, 14, device=device, generator=gen)
    grids = torch.tensor([[grid_h, grid_w]], device=device)
    text = torch.randint(0, 163584, (1, 512), device=device, generator=gen)
    pads = torch.full((1, n_tokens), A3B_CONFIG["media_placeholder_token_id"], device=device)
    input_ids = torch.cat([text[:, :16], pads, text[:, 16:]], dim=1)
    return input_ids, pixel_values, grids, n_tokens


def hf_model_from(ours, device: str, layers: int | None = None):
    """transformers' DeepseekV3ForCausalLM holding the same decoder weights (experts re-fused its way)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    text = dict(A3B_CONFIG["text_config"])
    text["rope_interleave"] = True
    if layers is not None:
        text["num_hidden_layers"] = layers
    config = DeepseekV3Config(**text)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # materialise in bf16 directly: an fp32 copy would not fit
    try:
        with torch.device("meta"):
            hf = DeepseekV3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    hf = hf.to_empty(device=device)
    hf.eval()
    src = ours.language_model
    with torch.no_grad():
        hf_params = dict(hf.named_parameters())
        hf_buffers = dict(hf.named_buffers())
        for name, param in src.named_parameters():
            if ".experts." in name:
                prefix, kind = name.rsplit(".", 1)
                if kind == "gate_proj":
                    up = dict(src.named_parameters())[prefix + ".up_proj"]
                    hf_params[prefix + ".gate_up_proj"].copy_(torch.cat([param, up], dim=1))
                elif kind == "down_proj":
                    hf_params[prefix + ".down_proj"].copy_(param)
                continue
            target = hf_params.get(name, hf_buffers.get(name))
            if target is None:
                raise KeyError(f"transformers model has no {name}")
            target.copy_(param)
        for name, buf in hf.named_buffers():
            if name.endswith("inv_freq") or name.endswith("original_inv_freq"):
                head = config.qk_rope_head_dim
                inv = 1.0 / (A3B_CONFIG["text_config"]["rope_theta"] ** (torch.arange(0, head, 2, dtype=torch.float, device=device) / head))
                buf.copy_(inv)
    return hf


def precision_check(device: str, layers: int, tokens: int) -> dict[str, object]:
    """bf16 error of ours and of transformers against an fp32 run of the same weights (first ``layers`` layers).

    Shows whether a bf16 disagreement between the two is rounding noise both share or a real difference.
    """
    fp32 = random_a3b_model(device, dtype=torch.float32, layers=layers, seed=1)
    ids = torch.randint(0, 163584, (1, tokens), device=device, generator=torch.Generator(device=device).manual_seed(1))
    with torch.inference_mode():
        reference = fp32(ids)[0].float()
    with torch.no_grad():
        for name, param in fp32.named_parameters():
            if ".mlp.gate." not in name:  # router weights and biases stay fp32, as the loader keeps them
                param.data = param.data.to(torch.bfloat16)
    bf16 = fp32
    with torch.inference_mode():
        ours = bf16(ids)[0].float()
    hf = hf_model_from(bf16, device, layers)
    with torch.inference_mode():
        theirs = hf(ids).logits[0].float()

    def stats(x: torch.Tensor) -> dict[str, float]:
        return {
            "max_abs_diff_vs_fp32": round(float((x - reference).abs().max()), 4),
            "median_abs_diff_vs_fp32": round(float((x - reference).abs().median()), 5),
            "argmax_agree_with_fp32": round(float((x.argmax(-1) == reference.argmax(-1)).float().mean()), 4),
        }

    return {"layers": layers, "tokens": tokens, "ours_bf16": stats(ours), "transformers_bf16": stats(theirs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill", type=int, default=8192)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, help="shrink both towers (smoke runs only)")
    parser.add_argument("--precision-layers", type=int, default=4, help="layers for the bf16-vs-fp32 check (0: skip)")
    args = parser.parse_args()
    device = args.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    results: dict[str, object] = {"device": name, "torch": torch.__version__, "layers": args.layers or 27}

    model = random_a3b_model(device, layers=args.layers)
    results["weights_gib"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 2)
    input_ids, pixel_values, grids, n_image_tokens = screenshot_inputs(device)
    results["screenshot_tokens"] = {"image": n_image_tokens, "total": int(input_ids.shape[1])}

    with torch.inference_mode():
        t_vision, m_vision, feats = timed(lambda: model.encode_images(pixel_values, grids), args.repeats)
        t_shot, m_shot, shot_logits = timed(lambda: model(input_ids, pixel_values, grids), args.repeats)
        embeds = model.embed(input_ids, image_features=feats)
        prefill_ids = torch.randint(0, 163584, (1, args.prefill), device=device)
        t_pre, m_pre, pre_logits = timed(lambda: model(prefill_ids), args.repeats)
    results["ours"] = {
        "vision_encode_s": round(t_vision, 4),
        "screenshot_forward_s": round(t_shot, 4),
        "screenshot_peak_gib": round(m_shot, 2),
        "prefill_s": round(t_pre, 4),
        "prefill_tok_per_s": round(args.prefill / t_pre, 1),
        "prefill_peak_gib": round(m_pre, 2),
    }
    print(json.dumps(results, indent=1), flush=True)
    if not args.skip_hf:
        shot_logits_cpu = shot_logits[0, -64:].float().cpu()
        pre_logits_cpu = pre_logits[0, -64:].float().cpu()
        del shot_logits, pre_logits, feats
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        hf = hf_model_from(model, device, args.layers)
        # drop our decoder (keep the embeddings we already computed) so both never share the GPU's memory budget
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        with torch.inference_mode():
            t_hf_shot, m_hf_shot, hf_shot = timed(lambda: hf(inputs_embeds=embeds).logits, args.repeats)
            t_hf_pre, m_hf_pre, hf_pre = timed(lambda: hf(prefill_ids).logits, args.repeats)
        results["transformers"] = {
            "screenshot_decoder_forward_s": round(t_hf_shot, 4),
            "screenshot_peak_gib": round(m_hf_shot, 2),
            "prefill_s": round(t_hf_pre, 4),
            "prefill_tok_per_s": round(args.prefill / t_hf_pre, 1),
            "prefill_peak_gib": round(m_hf_pre, 2),
        }
        # bf16 kernels differ in rounding; with random weights the router's near-ties then pick other experts
        # for some tokens, so report agreement statistics rather than one max (fp32 parity is a CPU test).
        results["logit_agreement_last64"] = {
            name: {
                "max_abs_diff": float((theirs - ours_).abs().max()),
                "median_abs_diff": float((theirs - ours_).abs().median()),
                "argmax_agree": float((theirs.argmax(-1) == ours_.argmax(-1)).float().mean()),
                "logit_scale": float(ours_.abs().max()),
            }
            for name, theirs, ours_ in (
                ("screenshot", hf_shot[0, -64:].float().cpu(), shot_logits_cpu),
                ("prefill", hf_pre[0, -64:].float().cpu(), pre_logits_cpu),
            )
        }
        results["speedup_prefill"] = round(t_hf_pre / t_pre, 2)
        del hf, hf_shot, hf_pre, embeds
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.precision_layers:
        results["precision"] = precision_check(device, args.precision_layers, 1024)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
