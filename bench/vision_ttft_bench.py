"""Screenshot TTFT through the engine, split into preprocess / device pixels / vision / prefill (issue 17 item 5).

Full-size A3B shapes with random bf16 weights (bench/a3b.py; MoonViT 27 x 1152, 16 heads, the official 4096-patch
budget), one GPU. Per screenshot size (1280x720, 1920x1080) and pixel mode:

- ``host``: the processor resizes / normalises / patchifies on the CPU (Pillow), float32 patches are uploaded;
- ``device``: the processor only decodes (and hashes the encoded bytes); the runner resizes (Pillow-exact
  torch resize), normalises and patchifies on the GPU (engine/pixel_ops.py).

Each request carries a screenshot the engine has not seen (a synthetic UI drawing sent as a PNG data URL, as the
API receives it) + ~200 text tokens, ``max_tokens`` 1; TTFT = make_sequence + the steps to the first token.
Split: ``preprocess`` (make_sequence: template, decode, hash, host pixels), ``pixels`` (device pixel work inside
the runner), ``vision`` (MoonViT + projector), ``rest`` (the prefill step minus vision, sampling). Also: a resent
screenshot behind a different prefix (vision-cache hit at admission: no decode), the same PNG as a PIL image
(``engine_bench``'s form), main's preprocessing (Pillow + float32 hash, as before this change) timed in the same
process, and MoonViT's attention backends on the screenshot grid and on a batch of 5 distinct grids.

Usage: python bench/vision_ttft_bench.py --json out.json [--sizes 1280x720 1920x1080] [--reps 5]
       python bench/vision_ttft_bench.py --cpu-only   (host-side preprocessing figures only; no model)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ProcessorConfig  # noqa: E402
from engine.processor import load_image, prepare_image, preprocess_image  # noqa: E402

TEXT = ("click the blue button next to the search field " * 5)[:200]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def screenshot(width: int, height: int, seed: int) -> Image.Image:
    """A UI-like RGB image (bars, panels, buttons, text): compresses like a real screenshot, unlike noise."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, 0, width, 40], fill=tuple(int(v) for v in rng.integers(20, 80, 3)))
    draw.rectangle([0, 40, width // 6, height], fill=tuple(int(v) for v in rng.integers(220, 245, 3)))
    for _ in range(60):
        x, y = int(rng.integers(width // 6, width - 120)), int(rng.integers(50, height - 40))
        w, h = int(rng.integers(40, 300)), int(rng.integers(16, 60))
        draw.rectangle([x, y, x + w, y + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                       outline=(40, 40, 40))
        draw.text((x + 4, y + 2), f"Item {int(rng.integers(0, 10**6))}", fill=(0, 0, 0))
    for i in range(40):
        draw.text((8, 50 + 22 * i), f"folder_{seed}_{i}", fill=(30, 30, 30))
    return im


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


CPU_TIMES: dict[str, float] = {}


def median_ms(fn, reps: int, label: str | None = None) -> float:
    """Median wall ms of ``fn`` (synchronised); with ``label``, the median process CPU ms (all threads) is kept in
    ``CPU_TIMES`` too: on a shared host the CPU time shows the work when the wall time shows the waiting."""
    fn()
    times, cpu = [], []
    for _ in range(reps):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    if label:
        CPU_TIMES[label] = round(statistics.median(cpu) * 1e3, 2)
    return round(statistics.median(times) * 1e3, 2)


def legacy_preprocess(source, cfg: ProcessorConfig) -> bytes:
    """What main did per image before this change: Pillow pixels on the host, then a hash of the float32 patches."""
    patches, (h, w) = preprocess_image(source, cfg)
    digest = hashlib.blake2b(patches.numpy().tobytes(), digest_size=16)
    digest.update(f"{h}x{w}".encode())
    return digest.digest()


def preprocess_figures(sizes: list[tuple[int, int]], reps: int) -> list[dict]:
    """Host-side per-image preprocessing, no model: main's path, this branch's host path, and the host part of the
    device path (decode + hash); then the device pixel work on CPU tensors and (if present) on the GPU."""
    cfg = ProcessorConfig()  # the released checkpoints' processor (in_token_limit 4096, pad_input)
    rows = []
    for w, h in sizes:
        shot = screenshot(w, h, seed=w)
        data = png_bytes(shot)
        url = data_url(data)
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        item = prepare_image(url, cfg, pixels="device")
        host = prepare_image(url, cfg, pixels="host")
        CPU_TIMES.clear()
        row = {
            "size": f"{w}x{h}", "png_kib": round(len(data) / 1024, 1), "grid": list(item.grid_hw),
            "image_tokens": item.num_tokens,
            "decode_only_ms": median_ms(lambda: load_image(url), reps, "decode_only"),
            "main_png_ms": median_ms(lambda: legacy_preprocess(url, cfg), reps, "main_png"),
            "host_png_ms": median_ms(lambda: prepare_image(url, cfg, pixels="host"), reps, "host_png"),
            "device_mode_host_part_png_ms": median_ms(lambda: prepare_image(url, cfg, pixels="device"), reps,
                                                      "device_mode_host_part_png"),
            "main_pil_noise_ms": median_ms(lambda: legacy_preprocess(noise, cfg), reps, "main_pil_noise"),
            "host_pil_noise_ms": median_ms(lambda: prepare_image(noise, cfg, pixels="host"), reps, "host_pil_noise"),
            "device_mode_host_part_pil_noise_ms": median_ms(lambda: prepare_image(noise, cfg, pixels="device"), reps,
                                                            "device_mode_host_part_pil_noise"),
            "device_pixels_on_cpu_tensors_ms": median_ms(lambda: item.decoded.patches(torch.device("cpu")), reps,
                                                         "device_pixels_on_cpu_tensors"),
            "device_equals_host_patches": bool(torch.equal(item.decoded.patches(), host.patches)),
        }
        row["cpu_time_ms"] = dict(CPU_TIMES)
        if torch.cuda.is_available():
            row["device_pixels_cuda_ms"] = median_ms(lambda: item.decoded.patches(torch.device("cuda")), reps)
            row["cuda_equals_host_patches"] = bool(torch.equal(item.decoded.patches(torch.device("cuda")).cpu(),
                                                               host.patches))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


class Timers:
    """Synchronised wall time of the runner's image work and of the vision tower + projector inside it."""

    def __init__(self, engine) -> None:
        self.image_features = 0.0
        self.encode = 0.0
        runner, model = engine.runner, engine.model
        inner_features, inner_encode = runner._image_features, model.encode_images

        def image_features(images):
            sync()
            start = time.perf_counter()
            out = inner_features(images)
            sync()
            self.image_features += time.perf_counter() - start
            return out

        def encode(pixels, grids):
            sync()
            start = time.perf_counter()
            out = inner_encode(pixels, grids)
            sync()
            self.encode += time.perf_counter() - start
            return out

        runner._image_features = image_features
        model.encode_images = encode
        self._undo = lambda: (runner.__dict__.pop("_image_features", None), model.__dict__.pop("encode_images", None))

    def reset(self) -> None:
        self.image_features = self.encode = 0.0

    def close(self) -> None:
        self._undo()


def one_request(engine, timers: Timers, image, prefix: str | None = None) -> dict:
    messages = [] if prefix is None else [{"role": "system", "content": prefix}]
    messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}
                                                  if isinstance(image, str) else {"type": "image", "image": image},
                                                  {"type": "text", "text": TEXT}]})
    timers.reset()
    sync()
    start = time.perf_counter()
    seq = engine.make_sequence({"messages": messages, "max_tokens": 1})
    prepared = time.perf_counter()
    engine.add(seq)
    while engine.has_work():
        engine.step()
    sync()
    done = time.perf_counter()
    ttft = done - start
    return {
        "ttft_ms": ttft * 1e3, "preprocess_ms": (prepared - start) * 1e3,
        "pixels_ms": (timers.image_features - timers.encode) * 1e3, "vision_ms": timers.encode * 1e3,
        "rest_ms": (done - prepared - timers.image_features) * 1e3,
        "prompt_tokens": len(seq.prompt_ids), "image_tokens": sum(s.length for s in seq.images),
        "finish_reason": seq.finish_reason,
    }


def summarise(runs: list[dict]) -> dict:
    out = {k: round(statistics.median(r[k] for r in runs), 2)
           for k in ("ttft_ms", "preprocess_ms", "pixels_ms", "vision_ms", "rest_ms")}
    out.update(prompt_tokens=runs[-1]["prompt_tokens"], image_tokens=runs[-1]["image_tokens"], n=len(runs),
               ttft_all_ms=[round(r["ttft_ms"], 1) for r in runs], finish_reason=runs[-1]["finish_reason"])
    return out


def ttft_figures(bundle, sizes: list[tuple[int, int]], reps: int, results: dict | None = None,
                 dump=lambda: None) -> dict:
    """Fills ``results`` (written out by ``dump`` after each figure, so a timeout keeps what was measured)."""
    from engine.runtime.engine import EngineOptions, LLMEngine

    results = {} if results is None else results
    seed = 1000
    for mode in ("host", "device"):
        engine = LLMEngine(bundle, EngineOptions(cache_tokens=16384, cuda_graphs=False, image_pixels=mode,
                                                 max_num_batched_tokens=8192))
        timers = Timers(engine)
        for w, h in sizes:
            for _ in range(2):  # warm-up at this size (kernels, coefficient tables)
                seed += 1
                one_request(engine, timers, data_url(png_bytes(screenshot(w, h, seed))))
            runs = []
            for _ in range(reps):
                seed += 1
                last_url = data_url(png_bytes(screenshot(w, h, seed)))
                runs.append(one_request(engine, timers, last_url))
            key = f"{mode}_{w}x{h}"
            results[key] = summarise(runs)
            print(key, json.dumps(results[key]), flush=True)
            dump()
            pil_runs = []
            for _ in range(reps):
                seed += 1
                pil_runs.append(one_request(engine, timers, screenshot(w, h, seed)))
            results[f"{key}_pil_image"] = summarise(pil_runs)
            print(f"{key}_pil_image", json.dumps(results[f"{key}_pil_image"]), flush=True)
            dump()
            if mode == "device":
                # the last PNG sent again behind new prefixes: its features are cached, nothing is decoded
                hits = [one_request(engine, timers, last_url, prefix=f"Different prefix number {i}.")
                        for i in range(reps)]
                results[f"{key}_resent_vision_cache_hit"] = summarise(hits)
                print(f"{key}_resent", json.dumps(results[f"{key}_resent_vision_cache_hit"]), flush=True)
                dump()
        results[f"{mode}_stats"] = {k: v for k, v in engine.stats().items() if "vision" in k}
        timers.close()
        del engine
        torch.cuda.empty_cache()
    return results


def vision_backends(model, reps: int, device: str = "cuda") -> dict:
    """MoonViT + projector alone: the screenshot grid and a batch of distinct grids, per attention backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tower = model.vision_tower
    cases = {"screenshot_50x86": [(50, 86)], "five_grids": [(50, 86), (8, 8), (24, 40), (8, 8), (48, 86)]}
    out: dict = {}
    for name, grids in cases.items():
        n = sum(h * w for h, w in grids)
        px = torch.randn(n, 3, 14, 14, device=device)
        g = torch.tensor(grids)
        row: dict = {"patches": n}
        with torch.no_grad():
            tower.attn_backend = "cudnn"  # cuDNN first (opt-in)
            row["cudnn_first_ms"] = median_ms(lambda: model.encode_images(px, g), reps)
            cudnn = model.encode_images(px, g).float()
            tower.attn_backend = "sdpa"  # the default
            ref = model.encode_images(px, g).float()
            row["cudnn_first_max_diff"] = round((cudnn - ref).abs().max().item(), 4)
            row["sdpa_default_ms"] = median_ms(lambda: model.encode_images(px, g), reps)
            for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                                   ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
                try:
                    with sdpa_kernel([backend]):
                        row[f"sdpa_{label}_ms"] = median_ms(lambda: model.encode_images(px, g), reps)
                        diff = (model.encode_images(px, g).float() - ref).abs().max().item()
                    row[f"sdpa_{label}_max_diff"] = round(diff, 4)
                except Exception as exc:  # backend not available for these shapes / this build
                    row[f"sdpa_{label}_ms"] = f"unavailable: {type(exc).__name__}: {str(exc)[:120]}"
            try:  # FA3 behind SDPA's flash backend (torch >= 2.11 on Hopper), then back to the default impl
                from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl

                activate_flash_attention_impl("FA3")
                try:
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                        row["sdpa_flash_fa3_ms"] = median_ms(lambda: model.encode_images(px, g), reps)
                        row["sdpa_flash_fa3_max_diff"] = round(
                            (model.encode_images(px, g).float() - ref).abs().max().item(), 4)
                finally:
                    restore_flash_attention_impl()
            except Exception as exc:
                row["sdpa_flash_fa3_ms"] = f"unavailable: {type(exc).__name__}: {str(exc)[:120]}"
            tower.attn_backend = "varlen"
            start = time.perf_counter()
            model.encode_images(px, g)
            sync()
            row["varlen_first_call_ms"] = round((time.perf_counter() - start) * 1e3, 1)
            row["varlen_ms"] = median_ms(lambda: model.encode_images(px, g), reps)
            row["varlen_max_diff"] = round((model.encode_images(px, g).float() - ref).abs().max().item(), 4)
            from engine.model.vision import MoonVitPretrainedModel

            row["varlen_fell_back"] = bool(MoonVitPretrainedModel._varlen_broken)
            row["cudnn_first_fell_back"] = bool(MoonVitPretrainedModel._cudnn_broken)
            tower.attn_backend = "sdpa"
        row["ref_max_abs"] = round(ref.abs().max().item(), 3)
        print(name, json.dumps(row), flush=True)
        out[name] = row
    out["first_call_at_new_grid"] = first_calls(model, device)
    print("first_call_at_new_grid", json.dumps(out["first_call_at_new_grid"]), flush=True)
    return out


def first_calls(model, device: str) -> dict:
    """Wall ms of the first call at a grid size not seen before, per backend (cuDNN builds an execution plan per
    new shape; serving sees many screen sizes), next to a repeat call at that grid."""
    tower = model.vision_tower
    out: dict = {}
    for i, backend in enumerate(("cudnn", "sdpa", "varlen")):
        grid = (44 + 2 * i, 78)  # a distinct, never-used grid per backend
        px = torch.randn(grid[0] * grid[1], 3, 14, 14, device=device)
        g = torch.tensor([grid])
        tower.attn_backend = backend
        with torch.no_grad():
            sync()
            start = time.perf_counter()
            model.encode_images(px, g)
            sync()
            first = (time.perf_counter() - start) * 1e3
            again = median_ms(lambda: model.encode_images(px, g), 3)
        out[backend] = {"grid": list(grid), "first_ms": round(first, 1), "repeat_ms": again}
    tower.attn_backend = "sdpa"
    return out


def profile_request(bundle, size: tuple[int, int]) -> list[dict]:
    """Top CUDA ops of one device-mode screenshot request (what the TTFT is made of)."""
    from torch.profiler import ProfilerActivity, profile

    from engine.runtime.engine import EngineOptions, LLMEngine

    engine = LLMEngine(bundle, EngineOptions(cache_tokens=16384, cuda_graphs=False, image_pixels="device"))
    timers = Timers(engine)
    one_request(engine, timers, data_url(png_bytes(screenshot(*size, seed=7))))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one_request(engine, timers, data_url(png_bytes(screenshot(*size, seed=8))))
    rows = []
    for evt in sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0))[:20]:
        rows.append({"op": evt.key[:80], "calls": evt.count,
                     "cuda_ms": round(getattr(evt, "device_time_total", 0) / 1e3, 2),
                     "cpu_ms": round(evt.cpu_time_total / 1e3, 2)})
    timers.close()
    del engine
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sizes", nargs="+", default=["1280x720", "1920x1080"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cpu-only", action="store_true", help="host preprocessing figures only (no model)")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    results: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                     else "cpu", "threads": torch.get_num_threads()}

    def dump() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))

    results["preprocess"] = preprocess_figures(sizes, args.reps)
    dump()
    if args.cpu_only or not torch.cuda.is_available():
        return
    from bench.a3b import a3b_bundle

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        bundle = a3b_bundle(tmp, device="cuda")
        results["build_s"] = round(time.perf_counter() - start, 1)
        results["ttft"] = {}
        ttft_figures(bundle, sizes, args.reps, results["ttft"], dump)
        dump()
        results["vision_backends"] = vision_backends(bundle.model, args.reps)
        dump()
        if not args.no_profile:
            results["profile_device_mode"] = profile_request(bundle, sizes[0])
            for row in results["profile_device_mode"]:
                print(json.dumps(row), flush=True)
        results["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    dump()


if __name__ == "__main__":
    main()
