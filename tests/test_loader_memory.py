"""Loading never holds two copies of the weights: anonymous memory peaks near one model's size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.tiny import official_tensor_shapes, tiny_config, tiny_preprocessor_config

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import json, sys, threading, time
    import torch
    from engine.loader import load_model

    def anon_kib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    peak = [anon_kib()]
    base = peak[0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_kib())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    model = load_model(sys.argv[1], dtype=torch.float32)
    done.set()
    thread.join()
    peak[0] = max(peak[0], anon_kib())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base_kib": base, "peak_kib": peak[0], "model_bytes": size}))
    """
)


def test_peak_memory_is_about_one_copy(tmp_path: Path) -> None:
    config = tiny_config()
    text = config["text_config"]
    text.update(hidden_size=512, moe_intermediate_size=512, intermediate_size=1024, n_routed_experts=32,
                num_hidden_layers=4, kv_lora_rank=128)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(tiny_preprocessor_config()))
    shapes = official_tensor_shapes(config)
    weight_map = {}
    shard: dict[str, torch.Tensor] = {}
    n_shard = 0

    def flush() -> None:
        nonlocal shard, n_shard
        name = f"model-{n_shard:05d}.safetensors"
        save_file(shard, str(tmp_path / name))
        weight_map.update({k: name for k in shard})
        shard, n_shard = {}, n_shard + 1

    for key, shape in shapes.items():
        shard[key] = torch.full(shape, 0.01, dtype=torch.float32)
        if sum(t.numel() for t in shard.values()) > 16_000_000:
            flush()
    flush()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    model_kib = result["model_bytes"] / 1024
    assert model_kib > 300_000  # the probe is big enough for a second copy to show
    grown = result["peak_kib"] - result["base_kib"]
    # One copy of the weights plus at most one tensor in flight and allocator slack; two copies would be >= 2x.
    assert grown < 1.35 * model_kib, result
