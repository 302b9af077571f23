"""``kimiray`` command line: ``contract-demo`` (the main job), ``demo``, ``serve``, ``submit``, ``tasks``, ``worker``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _sample_image(path: Path) -> Path:
    """A small synthetic 'screenshot' (title bar, a button, some text) so the demo needs no input file."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 200), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, 319, 24], fill=(40, 60, 120))
    draw.text((8, 6), "Quarterly report - kimiray", fill=(255, 255, 255))
    draw.rectangle([200, 150, 300, 185], fill=(30, 140, 60), outline=(0, 0, 0))
    draw.text((225, 160), "Submit", fill=(255, 255, 255))
    draw.text((16, 50), "Revenue: 1.2M  (+8%)", fill=(0, 0, 0))
    draw.ellipse([20, 90, 80, 150], fill=(220, 80, 60))
    image.save(path)
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from engine.generate import SamplingParams, generate
    from engine.loader import load
    from connectors.paths import data_dir, tiny_checkpoint_dir

    model_path = args.model or str(tiny_checkpoint_dir())
    image_path = Path(args.image) if args.image else _sample_image(data_dir() / "demo-screenshot.png")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"[kimiray] model: {model_path}{'' if args.model else ' (tiny random-weight checkpoint)'}")
    print(f"[kimiray] image: {image_path}   device: {device}")
    started = time.perf_counter()
    bundle = load(model_path, device=device)
    loaded = time.perf_counter()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(image_path)},
                {"type": "text", "text": args.question},
            ],
        }
    ]
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    result = generate(bundle, messages, params)
    done = time.perf_counter()
    print(f"[kimiray] question: {args.question}")
    print(f"[kimiray] reply ({len(result.token_ids)} tokens, finish={result.finish_reason}):")
    print(result.text)
    print(
        f"[kimiray] prompt {result.prompt_tokens} tokens; load {loaded - started:.2f}s, "
        f"generate {done - loaded:.2f}s"
    )
    if not args.model:
        print("[kimiray] (random weights: the reply is noise by design; pass --model PATH_OR_HF_ID for a real one)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from kimiray.serve_cli import run_serve

    return run_serve(args.config, address=args.address, timeout_s=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimiray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="answer a question about an image with Kimi-VL (tiny checkpoint by default)")
    demo.add_argument("--model", help="checkpoint directory or Hugging Face id (default: the tiny checkpoint)")
    demo.add_argument("--image", help="image file (default: a generated sample screenshot)")
    demo.add_argument("--question", default="What is shown in this screenshot?")
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.add_argument("--temperature", type=float, default=0.0)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    demo.set_defaults(func=cmd_demo)
    serve = sub.add_parser("serve", help="run the Ray Serve application from ray_config.yaml")
    serve.add_argument("config", nargs="?", default="ray_config.yaml")
    serve.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    serve.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the app to be ready")
    serve.set_defaults(func=cmd_serve)
    from agents.worker import add_worker_command
    from kimiray.contract_demo import add_contract_demo_command
    from kimiray.task_cli import add_task_commands

    host = sub.add_parser("desktop-host", add_help=False,
                          help="serve an X display (or a private Xvfb) to OS agents over HTTP; see --help")
    host.set_defaults(func=None)
    add_contract_demo_command(sub)
    add_task_commands(sub)
    add_worker_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["desktop-host"]:  # its own parser (connectors.desktop.host_cli)
        from connectors.desktop.host_cli import main as desktop_host

        return desktop_host(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
