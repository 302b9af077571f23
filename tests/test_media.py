"""connectors.media: data URLs, SSRF-safe fetching, size / time limits, images and video frames (no Ray, no model).

Remote fetches go to ``http.server`` threads on 127.0.0.1; refusals of private addresses happen before any
connection, so no test touches the network.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import shutil
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from connectors import media
from connectors.limits import Limits
from connectors.media import (
    MediaError,
    address_refusal,
    decode_data_url,
    fetch_url,
    load_image_part,
    load_video_part,
)
from tests.media_helpers import MediaServer, colour_frames, data_url, png_bytes


@pytest.fixture(scope="module")
def server() -> Iterator[MediaServer]:
    s = MediaServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def server_b() -> Iterator[MediaServer]:
    s = MediaServer()
    yield s
    s.close()


PRIVATE_OK = Limits(allow_private_urls=True)
STRICT = Limits()


def run(coro):
    return asyncio.run(coro)


def media_error(coro) -> MediaError:
    with pytest.raises(MediaError) as info:
        run(coro)
    return info.value


# ----------------------------------------------------------------------------------------------------------
# address policy
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.1.1", "169.254.169.254",
        "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1",
        "fd00:ec2::254", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::1", "ff02::1",
    ],
)
def test_non_public_addresses_are_refused(ip: str) -> None:
    assert address_refusal(ipaddress.ip_address(ip)) is not None


@pytest.mark.parametrize("ip", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses_pass(ip: str) -> None:
    assert address_refusal(ipaddress.ip_address(ip)) is None


@pytest.mark.parametrize("ip", ["169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254", "100.100.100.200"])
def test_metadata_addresses_refused_even_when_private_allowed(ip: str) -> None:
    assert "metadata" in address_refusal(ipaddress.ip_address(ip), allow_private=True)


def test_private_allowed_lets_loopback_through() -> None:
    assert address_refusal(ipaddress.ip_address("127.0.0.1"), allow_private=True) is None


# ----------------------------------------------------------------------------------------------------------
# SSRF refusals (no connection is made: refused before connecting)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/img.png",
        "http://localhost/img.png",
        "http://LOCALHOST./img.png",
        "http://10.0.0.1/img.png",
        "http://10.255.255.1:8080/x",
        "http://192.168.1.1/img.png",
        "http://172.16.5.4/img.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/img.png",
        "http://[::ffff:127.0.0.1]/img.png",
        "http://0.0.0.0/img.png",
        "http://2130706433/img.png",  # 127.0.0.1 as a decimal number
        "http://0x7f000001/img.png",
        "https://127.0.0.1/img.png",
        "file:///etc/passwd",
        "ftp://example.com/img.png",
        "gopher://example.com/",
        "http://user:pw@example.com/img.png",
    ],
)
def test_ssrf_refusals(url: str) -> None:
    err = media_error(fetch_url(url, STRICT))
    assert err.status_code == 400
    assert err.code == "url_not_allowed", (err.code, err.message)


@pytest.mark.parametrize(
    "url", ["http://169.254.169.254/latest/meta-data/", "http://metadata.google.internal/computeMetadata/v1/",
            "http://metadata.google.internal./x", "http://[fd00:ec2::254]/latest/"],
)
def test_metadata_refused_even_with_allow_private(url: str) -> None:
    err = media_error(fetch_url(url, PRIVATE_OK))
    assert err.code == "url_not_allowed"
    assert "metadata" in err.message


def test_hostname_resolving_to_loopback_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_resolve(host: str, port: int):
        assert host == "innocent.example"
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(media, "_resolve", fake_resolve)
    err = media_error(fetch_url("http://innocent.example/img.png", STRICT))
    assert err.code == "url_not_allowed" and "127.0.0.1" in err.message


def test_any_private_address_among_several_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_resolve(host: str, port: int):
        return [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.0.0.7")]

    monkeypatch.setattr(media, "_resolve", fake_resolve)
    err = media_error(fetch_url("https://mixed.example/img.png", STRICT))
    assert err.code == "url_not_allowed" and "10.0.0.7" in err.message


def test_connects_to_the_vetted_address_with_the_original_host_header(
    server: MediaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding defence: the name is resolved once by us and the connection goes to that address (the
    name below does not exist in DNS at all); the server still sees the original Host header."""
    calls: list[str] = []

    async def fake_resolve(host: str, port: int):
        calls.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(media, "_resolve", fake_resolve)
    data = run(fetch_url(f"http://pinned.invalid:{server.port}/img.png", PRIVATE_OK))
    assert data == png_bytes()
    assert calls == ["pinned.invalid"]
    assert server.hosts[-1] == f"pinned.invalid:{server.port}"


# ----------------------------------------------------------------------------------------------------------
# fetching
# ----------------------------------------------------------------------------------------------------------
def test_fetch_and_decode_http_image(server: MediaServer) -> None:
    im = run(load_image_part(server.url("/img.png?c=0,255,0"), PRIVATE_OK))
    assert im.mode == "RGB" and im.size == (8, 6) and im.getpixel((0, 0)) == (0, 255, 0)


def test_loopback_server_refused_without_allow_private(server: MediaServer) -> None:
    n = len(server.paths)
    err = media_error(load_image_part(server.url("/img.png"), STRICT))
    assert err.code == "url_not_allowed"
    assert len(server.paths) == n  # never connected


def test_redirect_is_followed_and_revalidated(server: MediaServer, server_b: MediaServer) -> None:
    """Private addresses are allowed for server A's exact origin only (first hop). A redirect inside A works;
    a redirect to another loopback origin (server B, or A under another name) is refused."""
    trusted = [server.origin]
    same = server.url("/redirect?to=" + urllib.parse.quote(server.url("/img.png?c=0,0,255"), safe=""))
    assert run(fetch_url(same, STRICT, trusted_origins=trusted)) == png_bytes((0, 0, 255))

    n_b = len(server_b.paths)
    for target in (server_b.url("/img.png"), f"http://localhost:{server.port}/img.png", "file:///etc/passwd",
                   "http://169.254.169.254/latest/meta-data/"):
        url = server.url("/redirect?to=" + urllib.parse.quote(target, safe=""))
        err = media_error(fetch_url(url, STRICT, trusted_origins=trusted))
        assert err.code == "url_not_allowed", (target, err.code, err.message)
    assert len(server_b.paths) == n_b  # server B never saw a request
    # without the trust the first hop itself is refused
    assert media_error(fetch_url(same, STRICT)).code == "url_not_allowed"


def test_relative_redirect_and_redirect_limit(server: MediaServer) -> None:
    rel = server.url("/redirect?to=" + urllib.parse.quote("/img.png", safe=""))
    assert run(fetch_url(rel, PRIVATE_OK)) == png_bytes()
    # a chain of 4 redirects is one too many
    url = server.url("/img.png")
    for _ in range(4):
        url = server.url("/redirect?to=" + urllib.parse.quote(url, safe=""))
    err = media_error(fetch_url(url, PRIVATE_OK))
    assert err.code == "too_many_redirects"
    # 3 redirects are fine
    url = server.url("/img.png")
    for _ in range(3):
        url = server.url("/redirect?to=" + urllib.parse.quote(url, safe=""))
    assert run(fetch_url(url, PRIVATE_OK)) == png_bytes()


def test_streamed_body_over_limit_is_413(server: MediaServer) -> None:
    limits = Limits(allow_private_urls=True, max_image_bytes=100_000)
    err = media_error(fetch_url(server.url("/big"), limits))
    assert err.status_code == 413 and err.code == "image_too_large"


def test_declared_length_over_limit_is_413(server: MediaServer) -> None:
    limits = Limits(allow_private_urls=True, max_image_bytes=100_000)
    err = media_error(fetch_url(server.url("/biglen"), limits))
    assert err.status_code == 413 and err.code == "image_too_large"


def test_timeout(server: MediaServer) -> None:
    limits = Limits(allow_private_urls=True, url_fetch_timeout_s=0.3)
    t0 = time.monotonic()
    err = media_error(fetch_url(server.url("/slow"), limits))
    assert time.monotonic() - t0 < 2.0
    assert err.status_code == 400 and err.code == "fetch_timeout"


def test_non_2xx_and_connection_refused_are_fetch_failed(server: MediaServer) -> None:
    err = media_error(fetch_url(server.url("/missing"), PRIVATE_OK))
    assert err.status_code == 400 and err.code == "fetch_failed" and "404" in err.message
    dead = MediaServer()
    port = dead.port
    dead.close()
    err = media_error(fetch_url(f"http://127.0.0.1:{port}/img.png", PRIVATE_OK))
    assert err.code == "fetch_failed"


def test_html_is_not_an_image(server: MediaServer) -> None:
    err = media_error(load_image_part(server.url("/html"), PRIVATE_OK))
    assert err.status_code == 415 and err.code == "unsupported_image_format"


# ----------------------------------------------------------------------------------------------------------
# data URLs and images
# ----------------------------------------------------------------------------------------------------------
def test_decode_data_url() -> None:
    raw = png_bytes()
    assert decode_data_url(data_url(raw), STRICT) == raw
    # whitespace / line breaks inside the payload, missing padding, base64url alphabet
    b64 = base64.b64encode(raw).decode()
    assert decode_data_url("data:image/png;base64," + "\n".join([b64[:10], b64[10:]]), STRICT) == raw
    assert decode_data_url("data:image/png;base64," + base64.urlsafe_b64encode(raw).decode().rstrip("="), STRICT) == raw
    assert decode_data_url("data:;base64," + b64, STRICT) == raw


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("data:image/png;base64,@@@not base64!!", 400, "invalid_base64"),
        ("data:image/png;base64", 400, "invalid_data_url"),
        ("data:image/png;base64,", 400, "invalid_data_url"),
        ("data:text/plain;base64,aGVsbG8=", 415, "unsupported_media_type"),
    ],
)
def test_bad_data_urls(url: str, status: int, code: str) -> None:
    with pytest.raises(MediaError) as info:
        decode_data_url(url, STRICT)
    assert (info.value.status_code, info.value.code) == (status, code)


def test_data_url_size_limit() -> None:
    limits = Limits(max_image_bytes=1000)
    with pytest.raises(MediaError) as info:
        decode_data_url(data_url(b"\0" * 5000), limits)
    assert (info.value.status_code, info.value.code) == (413, "image_too_large")
    assert decode_data_url(data_url(b"\1" * 1000), limits) == b"\1" * 1000


def test_image_pixel_limit_is_413() -> None:
    limits = Limits(max_image_pixels=1000)
    err = media_error(load_image_part(data_url(png_bytes(size=(40, 40))), limits))
    assert (err.status_code, err.code) == (413, "image_too_large")


def test_corrupt_and_unknown_images() -> None:
    noisy = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    buf = io.BytesIO()
    noisy.save(buf, "PNG")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]  # header fine, pixel data cut
    err = media_error(load_image_part(data_url(truncated), STRICT))
    assert err.status_code == 400 and err.code == "invalid_image"
    err = media_error(load_image_part(data_url(b"hello world, not an image"), STRICT))
    assert err.status_code == 415 and err.code == "unsupported_image_format"


@pytest.mark.parametrize("url", ["/etc/passwd", "file:///etc/passwd", "javascript:alert(1)", ""])
def test_image_url_schemes(url: str) -> None:
    err = media_error(load_image_part(url, PRIVATE_OK))
    assert err.status_code == 400 and err.code in ("url_not_allowed", "invalid_url")


# ----------------------------------------------------------------------------------------------------------
# video
# ----------------------------------------------------------------------------------------------------------
def test_video_frames_with_fps() -> None:
    frames = run(load_video_part({"type": "video", "video": {"frames": colour_frames(4), "fps": 2.0}}, STRICT))
    assert len(frames) == 4
    assert frames.timestamps == (0.0, 0.5, 1.0, 1.5)
    assert [im.getpixel((0, 0))[0] for im in frames.frames] == [0, 1, 2, 3]


def test_video_frames_sampled_down_to_the_limit() -> None:
    limits = Limits(max_video_frames=4)
    part = {"type": "video", "video": {"frames": colour_frames(10), "timestamps": [float(k) for k in range(10)]}}
    frames = run(load_video_part(part, limits))
    # sample_frame_indices(10, None, 4): segment centres floor((i + 0.5) * 10 / 4) = 1, 3, 6, 8
    assert [im.getpixel((0, 0))[0] for im in frames.frames] == [1, 3, 6, 8]
    assert frames.timestamps == (1.0, 3.0, 6.0, 8.0)
    # an explicit smaller budget (the request's share) wins
    frames = run(load_video_part(part, limits, max_frames=2))
    assert len(frames) == 2


def test_video_frame_forms_and_no_timing() -> None:
    urls = colour_frames(2)
    frames = run(load_video_part({"type": "video", "video": [{"url": urls[0]}, urls[1]]}, STRICT))
    assert len(frames) == 2 and frames.timestamps is None


def test_video_too_long_is_checked_before_fetching() -> None:
    limits = Limits(max_video_seconds=10)
    # the frames point at a refused address: the duration check must come first
    part = {"type": "video", "video": {"frames": ["http://10.0.0.1/f.png"] * 30, "fps": 1.0}}
    err = media_error(load_video_part(part, limits))
    assert (err.status_code, err.code) == (413, "video_too_long")
    part = {"type": "video", "video": {"frames": ["http://10.0.0.1/f.png"] * 2, "timestamps": [0.0, 60.0]}}
    err = media_error(load_video_part(part, limits))
    assert (err.status_code, err.code) == (413, "video_too_long")


@pytest.mark.parametrize(
    "video",
    [
        {"frames": []},
        {"frames": ["data:image/png;base64,AAAA"], "timestamps": [0.0, 1.0]},
        {"frames": ["x", "y"], "timestamps": [2.0, 1.0]},
        {"frames": ["x"], "fps": 0},
        {"frames": [3]},
    ],
)
def test_invalid_videos(video: dict) -> None:
    err = media_error(load_video_part({"type": "video", "video": video}, STRICT))
    assert err.status_code == 400 and err.code == "invalid_video"


def test_bad_frame_names_the_frame() -> None:
    urls = colour_frames(3)
    urls[1] = "data:image/png;base64,%%%%"
    err = media_error(load_video_part({"type": "video", "video": {"frames": urls}}, STRICT))
    assert err.code == "invalid_base64" and "video frame 1" in err.message


def test_http_video_frames(server: MediaServer) -> None:
    urls = [server.url(f"/img.png?c={k},{k},{k}") for k in range(3)]
    frames = run(load_video_part({"type": "video", "video": {"frames": urls, "fps": 1}}, PRIVATE_OK))
    assert [im.getpixel((0, 0)) for im in frames.frames] == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test certificate")
def test_https_pinning_keeps_sni_and_certificate_checks(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """https to a pinned address: SNI and certificate verification still use the URL's host name."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=pinned.test", "-addext", "subjectAltName=DNS:pinned.test"],
                   check=True, capture_output=True)
    sni: list[str | None] = []
    srv = MediaServer()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.sni_callback = lambda sock, name, c: sni.append(name)
    srv.httpd.socket = ctx.wrap_socket(srv.httpd.socket, server_side=True)
    try:
        async def fake_resolve(host: str, port: int):
            return [ipaddress.ip_address("127.0.0.1")]

        monkeypatch.setattr(media, "_resolve", fake_resolve)
        client_ctx = ssl.create_default_context(cafile=str(cert))
        real_client = httpx.AsyncClient
        monkeypatch.setattr(media.httpx, "AsyncClient", lambda **kw: real_client(**{**kw, "verify": client_ctx}))
        assert run(fetch_url(f"https://pinned.test:{srv.port}/img.png", PRIVATE_OK)) == png_bytes()
        assert sni == ["pinned.test"]
        err = media_error(fetch_url(f"https://elsewhere.test:{srv.port}/img.png", PRIVATE_OK))
        assert err.code == "fetch_failed" and "certificate" in err.message.lower()
    finally:
        srv.close()
