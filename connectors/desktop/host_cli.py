"""``kimiray desktop-host``: serve one X display (an existing one, or a private Xvfb) over HTTP.

Why a token env var and not a flag: a token on the command line leaks through ``ps``. Binding beyond loopback
without a token is refused: the host gives whoever reaches it the mouse and keyboard.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import signal
import sys
from contextlib import ExitStack


def _size(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{2,5})x(\d{2,5})", value)
    if not match:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT (e.g. 1280x800), got {value!r}")
    return int(match.group(1)), int(match.group(2))


def _display(value: str) -> str:
    if not re.fullmatch(r":\d+(\.\d+)?", value):
        raise argparse.ArgumentTypeError(f"expected a local display like :0, got {value!r}")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimiray desktop-host", description="Serve an X display to OS agents.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--display", type=_display, help="an existing local X display, e.g. :0")
    where.add_argument("--xvfb", type=_size, metavar="WxH", help="start a private Xvfb of this size")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument("--token-env", metavar="NAME", default=None,
                        help="environment variable holding the bearer token clients must send")
    parser.add_argument("--action-delay", type=float, default=0.05, help="seconds to let the screen settle")
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token: str | None = None
    if args.token_env:
        token = os.environ.get(args.token_env) or None
        if token is None:
            print(f"desktop-host: environment variable {args.token_env} is not set or empty", file=sys.stderr)
            return 2
    if token is None and not _is_loopback(args.host):
        print(f"desktop-host: refusing to serve {args.host} without --token-env", file=sys.stderr)
        return 2

    import uvicorn

    from connectors.desktop.http import desktop_host_app
    from connectors.desktop.x11 import X11Executor
    from connectors.desktop.xvfb import VirtualDisplay, XvfbError

    with ExitStack() as stack:
        display = args.display
        if args.xvfb is not None:
            try:
                display = stack.enter_context(VirtualDisplay(*args.xvfb)).display
            except XvfbError as exc:
                print(f"desktop-host: {exc}", file=sys.stderr)
                return 1
            print(f"desktop-host: started Xvfb on {display}", file=sys.stderr)
        app = desktop_host_app(X11Executor(display, action_delay_s=args.action_delay), token)
        # uvicorn re-raises SIGTERM once it has shut down; make that an exception so our Xvfb is stopped too.
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
