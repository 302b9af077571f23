"""Host time per decode step: the engine's own work (scheduling, writing the graph's inputs, sampling, emitting)
with the device part stubbed by a no-op, on the tiny checkpoint, at several batch sizes.

On the CPU (default) the decode graph is faked: ``DecodeGraphs`` runs its real host code (coverage checks, the
inputs written into the packed staging buffer), but capture, copy and replay are no-ops and the "logits" are a
fixed random tensor (only base-vocabulary ids, so every token detokenizes to text). So a step's time is host work
only (plus a tiny CPU argmax standing in for the device's).

``--before REF`` also runs the same measurement on the code of git commit REF (extracted to a temporary directory,
run in a subprocess), so before and after come from the same run on the same machine.

``--device-ms D`` (CPU): each faked replay keeps a stand-in device busy for D ms after its previous work, and reading
a step's samples waits for it, so a step costs about host + D run sequentially and max(host, D) with the engine's
run-ahead: a projection of the overlap on this CPU's host times, not a GPU measurement.

``--device cuda`` runs the real engine (tiny checkpoint, bf16, real CUDA graphs). The current code is measured with
run-ahead (``EngineOptions.overlap``) off and on.

Usage: python bench/host_step_bench.py [--batches 64 32 1] [--steps 96] [--repeats 3] [--before 7b4e40b]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PROMPT = 512


def _worker(args: argparse.Namespace) -> list[dict]:
    sys.path.insert(0, args.code_root)
    import torch

    from engine.loader import load
    from engine.runtime import graphs as graphs_module
    from engine.runtime.engine import EngineOptions, LLMEngine
    from engine.tiny import NUM_BASE_TOKENS, write_tiny_checkpoint

    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)  # the stand-in "device" ops (argmax of tiny logits) must not spin a thread pool
    workdir = Path(tempfile.mkdtemp())
    on_gpu = args.device == "cuda"
    bundle = load(write_tiny_checkpoint(workdir), device=args.device,
                  dtype=torch.bfloat16 if on_gpu else torch.float32)
    new_api = hasattr(graphs_module, "packed_size")
    rows_out = []
    for batch in args.batches:
        for overlap in ((False, True) if new_api else (None,)):
            options = dict(max_num_seqs=max(batch, 1), max_num_batched_tokens=8192, block_size=16,
                           cache_tokens=batch * (PROMPT + args.steps * args.repeats + 64), max_model_len=4096)
            if "overlap" in EngineOptions.model_fields and overlap is not None:
                options["overlap"] = overlap
            engine = LLMEngine(bundle, EngineOptions(**options))
            if not on_gpu:
                _fake_graphs(engine, graphs_module, new_api, NUM_BASE_TOKENS, args.device_ms / 1000)
            gen = torch.Generator().manual_seed(batch)
            for i in range(batch):
                prompt = torch.randint(0, NUM_BASE_TOKENS, (PROMPT,), generator=gen).tolist()
                engine.add(engine.make_sequence({"prompt_token_ids": prompt,
                                                 "max_tokens": args.steps * args.repeats + 8, "ignore_eos": True}))
            while any(len(s.output_ids) < 4 for s in engine.by_id.values()):  # prefill, then a few decode steps
                engine.step()
            windows = []  # several windows of ``steps`` steps: the machine may be shared, the minimum is reported
            for _ in range(args.repeats):
                if on_gpu:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.steps):
                    engine.step()
                if on_gpu:
                    torch.cuda.synchronize()
                windows.append((time.perf_counter() - start) / args.steps)
            while engine.has_work():
                engine.step()
            steps = args.steps
            elapsed = min(windows) * steps
            row = {"code": args.label, "batch": batch, "steps": steps, "ms_per_step": round(1000 * elapsed / steps, 4),
                   "ms_per_step_median": round(1000 * sorted(windows)[len(windows) // 2], 4),
                   "us_per_row": round(1e6 * elapsed / steps / batch, 2)}
            if overlap is not None:
                row["overlap"] = overlap
            if on_gpu or args.device_ms:
                row["tok_per_s"] = round(batch * steps / elapsed, 1)
                row["graph_replays"] = engine.runner.graphs.replays if engine.runner.graphs else 0
            row["steps_ahead"] = getattr(engine, "steps_ahead", None)
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    return rows_out


class _FakeDevice:
    """A stand-in for the GPU's stream: a replay makes it busy for ``seconds`` after its previous work; reading a
    step's results (the sampler's device->host copy) waits until the replay before it is done."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.busy_until = 0.0

    def replay(self) -> None:
        if self.seconds:
            self.busy_until = max(time.perf_counter(), self.busy_until) + self.seconds

    def wait(self, until: float) -> None:
        delay = until - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def _fake_graphs(engine, graphs_module, new_api: bool, base_vocab: int, device_seconds: float = 0.0) -> None:
    """Replace the runner's decode graphs by a DecodeGraphs whose capture and copies are no-ops and whose replay
    keeps a :class:`_FakeDevice` busy for ``device_seconds`` (0: a no-op)."""
    import torch

    device = _FakeDevice(device_seconds)
    if device_seconds:
        if new_api:  # the host reads a step's samples through PendingSample.result(): wait for "its" replay there
            from engine.runtime import sampler as sampler_module

            pending = sampler_module.PendingSample
            if not hasattr(pending, "_bench_init"):
                pending._bench_init, pending._bench_result = pending.__init__, pending.result

                def init(self, *args, **kwargs):
                    pending._bench_init(self, *args, **kwargs)
                    self._bench_done = pending._bench_device.busy_until

                def result(self):
                    pending._bench_device.wait(self._bench_done)
                    return pending._bench_result(self)

                pending.__init__, pending.result = init, result
            pending._bench_device = device
        else:  # the old engine read the samples right after the step (tolist): the step waits for its replay
            run_step = engine.runner.run_step

            def waiting_run_step(*args, **kwargs):
                logits = run_step(*args, **kwargs)
                device.wait(device.busy_until)
                return logits

            engine.runner.run_step = waiting_run_step

    runner = engine.runner
    vocab = runner.config.vocab_size
    logits = torch.randn(128, vocab, generator=torch.Generator().manual_seed(1))
    logits[:, base_vocab:] = float("-inf")

    class _Noop:
        def synchronize(self) -> None: ...
        def record(self) -> None: ...
        def replay(self) -> None: ...
        def copy_(self, *args, **kwargs) -> None: ...

    class _Graph:
        def replay(self) -> None:
            device.replay()

    class _Cap:
        def __init__(self, batch: int, keys: int) -> None:
            self.batch, self.keys, self.turn = batch, keys, 0
            self.graph, self.packed, self.output = _Graph(), _Noop(), logits[:batch]
            self.static = type("S", (), {"decode_slots": torch.empty(batch, keys, dtype=torch.long),
                                         "input_ids": torch.empty(batch, dtype=torch.long)})()
            if new_api:
                size = graphs_module.packed_size(batch, keys, runner.block_size)
                self.staging = (torch.zeros(size, dtype=torch.long), torch.zeros(size, dtype=torch.long))
                self.copied = (_Noop(), _Noop())
            else:
                self.staging = torch.zeros(4 * batch + batch * keys, dtype=torch.long)
                self.copied = _Noop()

    graphs = graphs_module.DecodeGraphs(runner)
    caps: dict[tuple[int, int], _Cap] = {}

    def entry(rows: int, max_keys: int) -> _Cap:
        key = (graphs._bucket(rows, graphs.BATCH_BUCKETS), graphs.key_bucket(max_keys))
        if key not in caps:
            caps[key] = _Cap(*key)
        return caps[key]

    graphs._entry = entry
    graphs.fused = lambda: True
    runner.graphs = graphs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 32, 1])
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3, help="windows of --steps steps; the fastest is reported")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--device-ms", type=float, default=0.0,
                        help="CPU only: each faked graph replay keeps a stand-in device busy this long (e.g. the "
                             "H100's graph time), so the overlap of host and device work shows; 0: no-op device")
    parser.add_argument("--before", help="git commit whose code is measured first, in a subprocess")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code-root", default=str(Path(__file__).resolve().parents[1]), help=argparse.SUPPRESS)
    parser.add_argument("--label", default="after", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("ROWS " + json.dumps(_worker(args)), flush=True)
        return
    root = Path(__file__).resolve().parents[1]
    results: dict[str, object] = {"device": args.device, "prompt_tokens": PROMPT, "steps": args.steps,
                                  "device_ms": args.device_ms}
    runs = []
    if args.before:
        results["before_commit"] = args.before
        base = Path(tempfile.mkdtemp())
        archive = base / "code.tar"
        subprocess.run(["git", "-C", str(root), "archive", "-o", str(archive), args.before], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(base / "code", filter="data")
        runs.append(("before", str(base / "code")))
    runs.append(("after", str(root)))
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        results["after_commit"] = head + (" + uncommitted" if subprocess.run(
            ["git", "-C", str(root), "diff", "--quiet", "HEAD"]).returncode else "")
    except OSError:
        results["after_commit"] = "unknown"
    rows = []
    for label, code_root in runs:
        cmd = [sys.executable, __file__, "--worker", "--code-root", code_root, "--label", label, "--device",
               args.device, "--steps", str(args.steps), "--repeats", str(args.repeats), "--device-ms", str(args.device_ms), "--batches", *map(str, args.batches)]
        env = os.environ | {"PYTHONPATH": code_root}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{label} run failed")
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS "))
        rows += json.loads(line[5:])
    results["rows"] = rows
    if args.before:
        for row in rows:
            if row["code"] == "after":
                base = next(r for r in rows if r["code"] == "before" and r["batch"] == row["batch"])
                row["speedup_vs_before"] = round(base["ms_per_step"] / row["ms_per_step"], 2)
    print("code    batch  overlap  ms/step  (median)  us/row")
    for row in rows:
        print(f"{row['code']:7s} {row['batch']:5d}  {str(row.get('overlap', '-')):7s} {row['ms_per_step']:8.3f} "
              f"({row['ms_per_step_median']:.3f})  {row['us_per_row']:7.2f}  {row.get('speedup_vs_before', '')}")
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
