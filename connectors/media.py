"""Safe media inputs for the OpenAI-compatible API: data URLs, remote http(s) fetches, images, video frames.

Everything here turns client-supplied references into in-memory media under ``Limits``; any refusal is a
:class:`MediaError` carrying an HTTP status and a short machine ``code`` for the JSON error body.

Remote fetches (:func:`fetch_url`) - SSRF rules:

* Only ``http`` and ``https``; no credentials in the URL (``user:pw@``); URLs up to 8 KiB.
* The host is resolved with ``loop.getaddrinfo`` and the fetch is refused (400 ``url_not_allowed``) if ANY
  resolved address is loopback, private, link-local, multicast, reserved, unspecified, shared (100.64/10) or
  otherwise not globally routable - IPv4 addresses embedded in IPv6 (``::ffff:a.b.c.d``, 6to4, Teredo, NAT64
  ``64:ff9b::/96``) are checked as the IPv4 address - unless ``limits.allow_private_urls`` is set (or the URL's
  origin is in ``trusted_origins``).
* Cloud metadata endpoints are refused ALWAYS, even with ``allow_private_urls`` (our choice: no legitimate
  image lives there): addresses 169.254.169.254, fd00:ec2::254, 169.254.170.2 (ECS), 100.100.100.200
  (Alibaba), 168.63.129.16 (Azure wire server) and host names ``metadata.google.internal``, ``metadata.goog``,
  ``metadata``, ``instance-data`` (+ ``.ec2.internal``).
* DNS rebinding: we connect to the address we vetted, not to the name. The request goes to
  ``scheme://<vetted ip>:port/path`` with the original ``Host`` header; for https the TLS SNI and certificate
  check use the original host name (httpcore's ``sni_hostname`` request extension), so verification is
  unchanged. Addresses are tried in resolver order when a connection is refused. Proxy environment variables
  are ignored (``trust_env=False``), since a proxy would defeat the check.
* Redirects are never followed by the HTTP client: we follow at most :data:`MAX_REDIRECTS` (3) ourselves and
  every hop is validated again from scratch (scheme, credentials, metadata names, resolution, addresses).
  ``trusted_origins`` (``"scheme://host:port"`` strings) exempts exact origins from the private-address rule
  (never from the metadata rule); a redirect from a trusted origin to any other private origin is refused.
* The body is streamed and the fetch stops with 413 (``image_too_large`` / ``video_too_large``) as soon as the
  decoded body exceeds the byte limit (a ``Content-Length`` over the limit is refused before reading).
* The whole fetch (resolution, every redirect hop, body) runs under one deadline,
  ``limits.url_fetch_timeout_s``; running over it is a MediaError with status **400** and code
  ``fetch_timeout`` (the client sent a URL we could not use in time; a 504 would blame our own upstream).
* Non-2xx answers, connection/TLS errors and unresolvable hosts are 400 ``fetch_failed``.

Images: :func:`load_image_part` accepts ``data:`` and ``http(s)`` URLs and decodes with
``engine.processor.load_image(bytes, max_pixels=limits.max_image_pixels)`` in a worker thread (decoding is CPU
work). Over ``max_image_pixels`` -> 413 ``image_too_large``; not an image -> 415 ``unsupported_image_format``;
corrupt -> 400 ``invalid_image``. (A ``max_image_pixels`` above PIL's own ``Image.MAX_IMAGE_PIXELS`` x 2 also
needs that global raised, see engine.processor.)

Video (:func:`load_video_part`): Kimi-VL takes a video as sampled frames (engine.processor.VideoFrames). The
API accepts a list of frame URLs (``data:`` / ``http(s)``) with optional ``fps`` or ``timestamps`` (seconds):

* Duration = ``len(frames) / fps`` when ``fps`` is given, else ``timestamps[-1] - timestamps[0]``; over
  ``limits.max_video_seconds`` -> 413 ``video_too_long`` (checked before anything is fetched).
* More frames than allowed (``max_frames``, default ``limits.max_video_frames``) are SAMPLED DOWN, not refused:
  ``sample_frame_indices(n, None, max_frames)`` picks segment centres uniformly; only the chosen frames are
  fetched. Timestamps follow the chosen frames; with only ``fps`` they are derived as ``index / fps``.
* A video file URL (``video_url``): the file (at most ``limits.max_body_bytes``, the size it could have had
  inline) is decoded with PyAV (a required dependency) in a thread and sampled with
  ``sample_frame_indices(n, fps, max_frames)`` (1 frame/s, our processor convention).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import math
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import Any

import av
import httpx
from PIL import Image

from engine.processor import ImageInputError, ProcessorError, VideoFrames, load_image, sample_frame_indices
from connectors.dicom import DicomError, is_dicom, read_frames
from connectors.limits import Limits
from connectors.errors import ClientInputError

__all__ = [
    "MediaError",
    "MAX_REDIRECTS",
    "MAX_URL_CHARS",
    "METADATA_ADDRESSES",
    "METADATA_HOSTS",
    "address_refusal",
    "fetch_url",
    "decode_data_url",
    "load_image_part",
    "load_video_part",
]

MAX_REDIRECTS = 3
MAX_URL_CHARS = 8192
FETCH_CONCURRENCY = 8
"""Frames of one video fetched/decoded at the same time."""

USER_AGENT = "kimiray-media-fetcher/0.1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200", "168.63.129.16")
)
METADATA_HOSTS: frozenset[str] = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"}
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class MediaError(ClientInputError):
    """A media input we refuse. ``status_code``: 400 (bad / not allowed / fetch failed or timed out),
    413 (over a size, pixel, count or duration limit), 415 (not an image / video), 422 (unsupported form).
    ``code``: short machine string (``url_not_allowed``, ``image_too_large``, ...). ``param``: where in the
    request (set by the API layer, e.g. ``messages[0].content[1].image_url.url``)."""

    default_status = 400
    default_code = "invalid_media"


def _short(url: str, n: int = 100) -> str:
    return repr(url if len(url) <= n else url[:n] + "...")


# ----------------------------------------------------------------------------------------------------------
# Address policy
# ----------------------------------------------------------------------------------------------------------
def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_refusal(ip: IPAddress, allow_private: bool = False) -> str | None:
    """Why ``ip`` must not be fetched from (a short phrase), or None when it may be."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        inner = _embedded_ipv4(ip)
        if inner is not None:
            why = address_refusal(inner, allow_private)
            if why:
                return f"{why} (embedded in {ip})"
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if allow_private:
        return None
    for attr, phrase in (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
    ):
        if getattr(ip, attr):
            return phrase
    if not ip.is_global:
        return "not a public address"
    return None


async def _resolve(host: str, port: int) -> list[IPAddress]:
    """All addresses of ``host`` (resolver order, duplicates removed). Tests replace this function."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    out: list[IPAddress] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in out:
            out.append(ip)
    return out


def _origin(url: httpx.URL) -> str:
    port = url.port or (443 if url.scheme == "https" else 80)
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}:{port}"


def _normalise_origin(origin: str) -> str:
    try:
        return _origin(httpx.URL(origin))
    except Exception:
        return origin


async def _vet(url: str, limits: Limits, trusted: frozenset[str]) -> tuple[httpx.URL, list[IPAddress]]:
    """Parse and check one hop; return the URL and its vetted addresses (all allowed)."""
    if len(url) > MAX_URL_CHARS:
        raise MediaError(f"URL longer than {MAX_URL_CHARS} characters", code="url_not_allowed")
    try:
        parsed = httpx.URL(url)
    except Exception as exc:
        raise MediaError(f"invalid URL {_short(url)}: {exc}", code="invalid_url") from None
    if parsed.scheme not in ("http", "https"):
        raise MediaError(f"URL scheme {parsed.scheme!r} is not allowed (only http, https and data:)",
                         code="url_not_allowed")
    if parsed.userinfo:
        raise MediaError("credentials in URLs are not accepted", code="url_not_allowed")
    host = parsed.host
    if not host:
        raise MediaError(f"URL {_short(url)} has no host", code="invalid_url")
    name = host.rstrip(".").lower()
    if name in METADATA_HOSTS:
        raise MediaError(f"host {name!r} is a cloud metadata endpoint", code="url_not_allowed")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    allow_private = limits.allow_private_urls or _origin(parsed) in trusted
    try:
        addresses = [ipaddress.ip_address(name)]
    except ValueError:
        try:
            addresses = await _resolve(name, port)
        except (socket.gaierror, UnicodeError, OSError) as exc:
            raise MediaError(f"cannot resolve host {name!r}: {exc}", code="fetch_failed") from None
    if not addresses:
        raise MediaError(f"host {name!r} has no address", code="fetch_failed")
    for ip in addresses:
        why = address_refusal(ip, allow_private)
        if why:
            raise MediaError(
                f"URL host {name!r} resolves to {ip}, {why}; only public addresses may be fetched",
                code="url_not_allowed",
            )
    return parsed, addresses


# ----------------------------------------------------------------------------------------------------------
# Fetching
# ----------------------------------------------------------------------------------------------------------
def _too_large(what: str, limit: int) -> MediaError:
    return MediaError(f"{what} is larger than the limit of {limit} bytes", status_code=413,
                      code=f"{what}_too_large")


async def _fetch(url: str, limits: Limits, trusted: frozenset[str], max_bytes: int, what: str) -> bytes:
    headers = {"User-Agent": USER_AGENT, "Accept": "image/*, video/*;q=0.9, */*;q=0.5",
               "Accept-Encoding": "identity"}  # the byte limit is counted on decoded bytes either way
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False, verify=True,
                                 timeout=httpx.Timeout(limits.url_fetch_timeout_s)) as client:
        current = url
        for hop in range(MAX_REDIRECTS + 1):
            parsed, addresses = await _vet(current, limits, trusted)
            resp = await _send_pinned(client, parsed, addresses, headers)
            try:
                if resp.status_code in _REDIRECT_STATUSES:
                    location = resp.headers.get("location")
                    if not location:
                        raise MediaError(f"redirect without Location from {_short(current)}", code="fetch_failed")
                    if hop == MAX_REDIRECTS:
                        raise MediaError(f"more than {MAX_REDIRECTS} redirects fetching {_short(url)}",
                                         code="too_many_redirects")
                    try:
                        current = str(parsed.join(location))
                    except Exception as exc:
                        raise MediaError(f"bad redirect Location {location[:100]!r}: {exc}",
                                         code="fetch_failed") from None
                    continue
                if not 200 <= resp.status_code < 300:
                    raise MediaError(f"fetching {_short(current)} failed with HTTP {resp.status_code}",
                                     code="fetch_failed")
                declared = resp.headers.get("content-length")
                if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
                    raise _too_large(what, max_bytes)
                body = bytearray()
                async for piece in resp.aiter_bytes():
                    body += piece
                    if len(body) > max_bytes:
                        raise _too_large(what, max_bytes)
                if not body:
                    raise MediaError(f"{_short(current)} returned an empty body", code="fetch_failed")
                return bytes(body)
            finally:
                await resp.aclose()
    raise AssertionError("unreachable")


async def _send_pinned(client: httpx.AsyncClient, parsed: httpx.URL, addresses: Sequence[IPAddress],
                       headers: dict[str, str]) -> httpx.Response:
    """GET ``parsed`` from one of its vetted ``addresses`` (not from a fresh resolution)."""
    host_header = parsed.netloc.decode("ascii")
    is_ip_literal = True
    try:
        ipaddress.ip_address(parsed.host)
    except ValueError:
        is_ip_literal = False
    extensions = {"sni_hostname": parsed.host.rstrip(".")} if parsed.scheme == "https" and not is_ip_literal else {}
    last: Exception | None = None
    for ip in addresses:
        request = client.build_request("GET", parsed.copy_with(host=str(ip)),
                                       headers={**headers, "Host": host_header}, extensions=extensions)
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as exc:
            last = exc
            continue
        except httpx.TimeoutException:
            raise
        except httpx.HTTPError as exc:
            raise MediaError(f"fetching {_short(str(parsed))} failed: {type(exc).__name__}: {exc}",
                             code="fetch_failed") from None
    raise MediaError(f"cannot connect to {_short(str(parsed))}: {last}", code="fetch_failed")


async def fetch_url(url: str, limits: Limits, *, trusted_origins: Collection[str] = (),
                    max_bytes: int | None = None, what: str = "image") -> bytes:
    """GET an http(s) URL under the SSRF rules of this module; returns the body.

    ``max_bytes`` defaults to ``limits.max_image_bytes``; ``what`` names the thing in errors
    (``image`` -> ``image_too_large``). ``trusted_origins``: exact ``scheme://host:port`` origins exempt from
    the private-address rule (e.g. an internal media server); redirects out of them are validated normally.
    """
    limit = limits.max_image_bytes if max_bytes is None else int(max_bytes)
    trusted = frozenset(_normalise_origin(o) for o in trusted_origins)
    try:
        return await asyncio.wait_for(_fetch(url, limits, trusted, limit, what), timeout=limits.url_fetch_timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise MediaError(f"fetching {_short(url)} took longer than {limits.url_fetch_timeout_s:g} s",
                         code="fetch_timeout") from None
    except httpx.HTTPError as exc:  # errors while streaming the body (reset connection, bad encoding...)
        raise MediaError(f"fetching {_short(url)} failed: {type(exc).__name__}: {exc}", code="fetch_failed") from None


# ----------------------------------------------------------------------------------------------------------
# data: URLs
# ----------------------------------------------------------------------------------------------------------
def decode_data_url(url: str, limits: Limits, *, max_bytes: int | None = None, media_types: tuple[str, ...] = ("image/",),
                    what: str = "image") -> bytes:
    """Payload of a ``data:`` URL (base64 or percent-encoded). ``max_bytes`` defaults to
    ``limits.max_image_bytes``; the size is checked on the encoded length before decoding. A declared media
    type must start with one of ``media_types`` (else 415); an empty one is accepted."""
    limit = limits.max_image_bytes if max_bytes is None else int(max_bytes)
    head, sep, payload = url.strip().partition(",")
    if not head.lower().startswith("data:") or not sep:
        raise MediaError("malformed data URL (expected data:<type>;base64,<payload>)", code="invalid_data_url")
    params = [p.strip() for p in head[len("data:"):].split(";")]
    media_type = params[0].lower()
    if media_type and not media_type.startswith(media_types):
        raise MediaError(f"data URL media type {params[0]!r} is not supported here (expected {', '.join(media_types)}*)",
                         status_code=415, code="unsupported_media_type")
    if any(p.lower() == "base64" for p in params[1:]):
        compact = "".join(payload.split())
        if "%" in compact:
            compact = urllib.parse.unquote(compact)
        if len(compact) // 4 * 3 > limit + 3:
            raise _too_large(what, limit)
        if "-" in compact or "_" in compact:  # base64url alphabet
            compact = compact.translate(str.maketrans("-_", "+/"))
        compact += "=" * (-len(compact) % 4)
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"data URL has an invalid base64 payload: {exc}", code="invalid_base64") from None
    else:
        if len(payload) > 3 * limit + 3:
            raise _too_large(what, limit)
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > limit:
        raise _too_large(what, limit)
    if not data:
        raise MediaError("data URL has an empty payload", code="invalid_data_url")
    return data


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------
def _scheme(url: str) -> str:
    head, sep, _ = url.partition(":")
    return head.strip().lower() if sep else ""


def _decode_image(data: bytes, limits: Limits) -> Image.Image:
    if is_dicom(data):
        return _decode_dicom(data)
    try:
        return load_image(data, max_pixels=limits.max_image_pixels)
    except ImageInputError as exc:
        msg = str(exc)
        if "exceeds the limit" in msg or "too large" in msg:
            raise MediaError(msg, status_code=413, code="image_too_large") from None
        if "not a recognised image format" in msg:
            raise MediaError(msg, status_code=415, code="unsupported_image_format") from None
        raise MediaError(msg, code="invalid_image") from None


def _decode_dicom(data: bytes) -> Image.Image:
    """A DICOM image in chat: de-identified (the decoded image carries pixels only), its own window (else its
    range), the middle frame of a multi-frame file; for a series or a preset window use the medical_image task."""
    try:
        frames = read_frames([data], window="auto", max_frames=1)
    except DicomError as exc:
        status = 415 if exc.code == "codec_unavailable" else 413 if exc.code in ("too_large", "too_many_slices") \
            else 400
        raise MediaError(f"DICOM image: {exc.message}", status_code=status, code=f"dicom_{exc.code}") from None
    return frames.slices[0].image


async def _image_bytes(url: Any, limits: Limits, trusted_origins: Collection[str]) -> bytes:
    if not isinstance(url, str) or not url.strip():
        raise MediaError("image URL must be a non-empty string", code="invalid_url")
    url = url.strip()
    scheme = _scheme(url)
    if scheme == "data":
        return decode_data_url(url, limits, media_types=("image/", "application/dicom"))
    if scheme in ("http", "https"):
        return await fetch_url(url, limits, trusted_origins=trusted_origins)
    raise MediaError(f"URL scheme {scheme or '(none)'!r} is not allowed (only http, https and data:)",
                     code="url_not_allowed")


async def load_image_part(url: str, limits: Limits, *, trusted_origins: Collection[str] = ()) -> Image.Image:
    """``data:`` or ``http(s)`` image URL -> decoded RGB ``PIL.Image`` (decoding runs in a worker thread)."""
    data = await _image_bytes(url, limits, trusted_origins)
    return await asyncio.to_thread(_decode_image, data, limits)


# ----------------------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------------------
def _plain(part: Any) -> Any:
    dump = getattr(part, "model_dump", None)
    return dump(by_alias=True, exclude_none=True) if callable(dump) and not isinstance(part, dict) else part


def _frame_url(ref: Any, k: int) -> str:
    ref = _plain(ref)
    if isinstance(ref, dict):
        if "image_url" in ref:
            ref = ref["image_url"]
            ref = ref.get("url") if isinstance(ref, dict) else ref
        else:
            ref = ref.get("url")
    if not isinstance(ref, str) or not ref.strip():
        raise MediaError(f"video frame #{k} must be a URL string or {{'url': ...}}", code="invalid_video")
    return ref


def _finite_number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise MediaError(f"{what} must be a finite number, got {v!r}", code="invalid_video")
    return float(v)


async def _bounded_gather(factories: Iterable[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """Run coroutines with at most ``limit`` at a time; the first failure cancels the rest and is raised."""
    sem = asyncio.Semaphore(max(1, limit))

    async def one(f: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await f()

    tasks = [asyncio.ensure_future(one(f)) for f in factories]
    if not tasks:
        return []
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def load_video_part(part: Any, limits: Limits, *, max_frames: int | None = None,
                          trusted_origins: Collection[str] = ()) -> VideoFrames:
    """A video content part -> ``VideoFrames`` of decoded RGB images (+ timestamps in seconds when known).

    ``part`` (dict or pydantic model): ``{"type": "video", "video": {"frames": [url | {"url": url}, ...],
    "fps": float?, "timestamps": [float, ...]?}}`` (``video`` may also be the bare frame list, and the frame
    fields may sit on the part itself), or ``{"type": "video_url", "video_url": {"url": url}}``.
    ``max_frames`` (default ``limits.max_video_frames``) is this video's frame budget: more frames are sampled
    down to it. See the module docstring for the duration rule and the PyAV path.
    """
    budget = limits.max_video_frames if max_frames is None else int(max_frames)
    if budget < 1:
        raise MediaError("no video frames left in this request's budget", status_code=413, code="too_many_video_frames")
    part = _plain(part)
    if not isinstance(part, dict):
        raise MediaError("video part must be an object", code="invalid_video")
    if part.get("type") == "video_url" or ("video_url" in part and "video" not in part):
        ref = part.get("video_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        return await _load_video_url(url, limits, budget, trusted_origins)

    spec = part.get("video", part)
    spec = _plain(spec)
    if isinstance(spec, (list, tuple)):
        spec = {"frames": list(spec)}
    if not isinstance(spec, dict):
        raise MediaError("'video' must be an object {'frames': [...], 'fps'?: number}", code="invalid_video")
    frames = spec.get("frames")
    if not isinstance(frames, (list, tuple)) or not frames:
        raise MediaError("a video needs a non-empty 'frames' list of image URLs", code="invalid_video")
    urls = [_frame_url(f, k) for k, f in enumerate(frames)]
    n = len(urls)
    fps = spec.get("fps")
    if fps is not None:
        fps = _finite_number(fps, "video fps")
        if fps <= 0:
            raise MediaError(f"video fps must be > 0, got {fps}", code="invalid_video")
    timestamps = spec.get("timestamps")
    if timestamps is not None:
        if not isinstance(timestamps, (list, tuple)) or len(timestamps) != n:
            raise MediaError(f"video has {n} frames but {len(timestamps) if isinstance(timestamps, (list, tuple)) else 'no list of'} "
                             "timestamps", code="invalid_video")
        timestamps = [_finite_number(t, "video timestamp") for t in timestamps]
        if any(t < 0 for t in timestamps) or any(b < a for a, b in zip(timestamps, timestamps[1:])):
            raise MediaError("video timestamps must be >= 0 and non-decreasing", code="invalid_video")
    elif fps is not None:
        timestamps = [k / fps for k in range(n)]

    if fps is not None and spec.get("timestamps") is None:
        duration = n / fps
    elif timestamps is not None:
        duration = timestamps[-1] - timestamps[0]
    else:
        duration = 0.0
    if duration > limits.max_video_seconds:
        raise MediaError(f"video lasts {duration:.1f} s, over the limit of {limits.max_video_seconds:g} s",
                         status_code=413, code="video_too_long")

    if n > budget:
        idx = sample_frame_indices(n, None, budget)
        urls = [urls[i] for i in idx]
        timestamps = [timestamps[i] for i in idx] if timestamps is not None else None

    async def load(k: int) -> Image.Image:
        try:
            return await load_image_part(urls[k], limits, trusted_origins=trusted_origins)
        except MediaError as exc:
            exc.message = f"video frame {k}: {exc.message}"
            exc.args = (exc.message,)
            raise

    images = await _bounded_gather([lambda k=k: load(k) for k in range(len(urls))], FETCH_CONCURRENCY)
    try:
        return VideoFrames(tuple(images), tuple(timestamps) if timestamps is not None else None)
    except ProcessorError as exc:
        raise MediaError(str(exc), code="invalid_video") from None


async def _load_video_url(url: Any, limits: Limits, budget: int, trusted_origins: Collection[str]) -> VideoFrames:
    if not isinstance(url, str) or not url.strip():
        raise MediaError("video_url needs {'url': ...}", code="invalid_url")
    url = url.strip()
    scheme = _scheme(url)
    if scheme == "data":
        data = decode_data_url(url, limits, max_bytes=limits.max_body_bytes, media_types=("video/", "application/octet-stream"),
                               what="video")
    elif scheme in ("http", "https"):
        data = await fetch_url(url, limits, trusted_origins=trusted_origins, max_bytes=limits.max_body_bytes,
                               what="video")
    else:
        raise MediaError(f"URL scheme {scheme or '(none)'!r} is not allowed (only http, https and data:)",
                         code="url_not_allowed")
    return await asyncio.to_thread(_decode_video, data, limits, budget)


def _decode_video(data: bytes, limits: Limits, budget: int) -> VideoFrames:
    """Decode with PyAV and sample ~1 frame/s (``sample_frame_indices``), at most ``budget`` frames."""
    def open_container() -> Any:
        try:
            return av.open(io.BytesIO(data), mode="r")
        except Exception as exc:
            raise MediaError(f"cannot open video: {exc}", status_code=415, code="unsupported_video_format") from None

    def too_long(seconds: float) -> MediaError:
        return MediaError(f"video lasts {seconds:.1f} s, over the limit of {limits.max_video_seconds:g} s",
                          status_code=413, code="video_too_long")

    try:
        with open_container() as container:
            if not container.streams.video:
                raise MediaError("the file has no video stream", status_code=415, code="unsupported_video_format")
            stream = container.streams.video[0]
            width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
            if width * height > limits.max_image_pixels:
                raise MediaError(f"video frames of {width}x{height} exceed {limits.max_image_pixels} pixels",
                                 status_code=413, code="image_too_large")
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None
            duration = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            if duration is not None and duration > limits.max_video_seconds:
                raise too_long(duration)
            n = int(stream.frames or 0)
            if n <= 0:  # unknown frame count: count in a first pass (no pixel conversion)
                for frame in container.decode(stream):
                    n += 1
                    if frame.time is not None and frame.time > limits.max_video_seconds:
                        raise too_long(frame.time)
        if n <= 0:
            raise MediaError("the video has no frames", code="invalid_video")
        wanted = sample_frame_indices(n, fps, budget)
        wanted_set = set(wanted)
        images: list[Image.Image] = []
        times: list[float] = []
        with open_container() as container:
            stream = container.streams.video[0]
            for k, frame in enumerate(container.decode(stream)):
                if frame.time is not None and frame.time > limits.max_video_seconds:
                    raise too_long(frame.time)
                if k in wanted_set:
                    images.append(frame.to_image().convert("RGB"))
                    times.append(float(frame.time) if frame.time is not None else (k / fps if fps else float(k)))
                if k >= wanted[-1]:
                    break
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot decode video: {type(exc).__name__}: {exc}", code="invalid_video") from None
    if not images:
        raise MediaError("no frames could be decoded from the video", code="invalid_video")
    for k in range(1, len(times)):  # VideoFrames wants non-decreasing timestamps
        times[k] = max(times[k], times[k - 1])
    return VideoFrames(tuple(images), tuple(max(0.0, t) for t in times))
