"""Test helpers for media inputs: small images, data URLs, and a loopback HTTP server with the routes the media
and OpenAI-conversion tests fetch from (no network)."""

from __future__ import annotations

import base64
import io
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import numpy as np
from PIL import Image


def png_bytes(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


class MediaServer:
    """A tiny threaded HTTP server on 127.0.0.1 with the routes the tests need.

    /img.png (?c=r,g,b colour), /big (1 MiB streamed without Content-Length), /biglen (declares 50 MB),
    /slow (sleeps 3 s), /redirect?to=URL (302), /missing (404), /html (a web page).
    """

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.paths: list[str] = []
        self.big_bytes_sent = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer.hosts.append(self.headers.get("Host", ""))
                outer.paths.append(self.path)
                parsed = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(parsed.query)
                route = parsed.path
                try:
                    if route == "/img.png":
                        color = tuple(int(c) for c in query.get("c", ["255,0,0"])[0].split(","))
                        self._send(200, png_bytes(color), "image/png")  # type: ignore[arg-type]
                    elif route == "/big":
                        self.send_response(200)
                        self.send_header("Content-Type", "image/png")
                        self.end_headers()
                        for _ in range(16):
                            self.wfile.write(b"\0" * 65536)
                            outer.big_bytes_sent += 65536
                    elif route == "/biglen":
                        self.send_response(200)
                        self.send_header("Content-Type", "image/png")
                        self.send_header("Content-Length", str(50_000_000))
                        self.end_headers()
                        self.wfile.write(b"\0" * 1024)
                    elif route == "/slow":
                        time.sleep(3)
                        self._send(200, png_bytes(), "image/png")
                    elif route == "/redirect":
                        self.send_response(302)
                        self.send_header("Location", query["to"][0])
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    elif route == "/html":
                        self._send(200, b"<html><body>not an image</body></html>", "text/html")
                    else:
                        self._send(404, b"not found", "text/plain")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.origin}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def colour_frames(n: int) -> list[str]:
    return [data_url(png_bytes((k, 0, 0))) for k in range(n)]


def make_video(seconds: float, fps: int = 10, size=(64, 48)) -> bytes:
    """A real MPEG-4 file: each second has its own colour, so sampled frames can be told apart."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for k in range(int(seconds * fps)):
            colour = (k // fps * 60) % 256
            pixels = np.full((size[1], size[0], 3), colour, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
