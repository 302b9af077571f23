"""API keys, the bind guard and per-key limits of the ingress.

Keys never leave this module: :class:`ApiKeyAuth` keeps only SHA-256 digests, compares digests in constant time
against every configured key, and hands out a :class:`KeyIdentity` whose ``key_id`` (12 hex chars of a
domain-separated SHA-256) is what logs, metrics and limits see. No exception message or repr here contains a key.

Limits (:class:`KeyLimiter`) are a token bucket plus a concurrency cap per ``key_id``::

    lease = limiter.acquire(identity.key_id)    # raises RateLimited (429) at once, never waits
    async with lease:                           # or ``with lease:``, or ``lease.release()`` when a stream ends
        ...

The bucket refills at ``requests_per_minute / 60`` per second and holds ``burst = max(1, requests_per_minute // 6)``
tokens (ten seconds' worth of the rate; it starts full). A bucket with no open lease that has refilled to full is
indistinguishable from a new one, so such buckets are dropped on a periodic sweep: memory is bounded by the keys
active in roughly the last ``burst / rate`` seconds plus those holding leases.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from .config import AuthConfig

__all__ = [
    "ANONYMOUS",
    "ApiKeyAuth",
    "AuthConfigError",
    "AuthError",
    "KeyIdentity",
    "KeyLimiter",
    "Lease",
    "RateLimited",
    "bearer_token",
    "check_bind_allowed",
    "key_id_for",
    "load_api_keys",
]

_MAX_HEADER_CHARS = 8192
_KEY_ID_DOMAIN = b"kimiray-key-id\x00"


# --------------------------------------------------------------------------------------------------- errors


class AuthConfigError(ValueError):
    """The key configuration is unusable (unreadable key file, bad key, or no keys on a public bind)."""


class AuthError(Exception):
    """Authentication failed; answer ``status`` with :meth:`body` and :attr:`headers`."""

    def __init__(self, message: str = "Invalid API key.", *, status: int = 401, code: str = "invalid_api_key") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}

    def body(self) -> dict[str, Any]:
        """OpenAI-style error body."""
        return {"error": {"message": self.message, "type": "authentication_error", "param": None, "code": self.code}}

    def __repr__(self) -> str:
        return f"AuthError(status={self.status}, code={self.code!r}, message={self.message!r})"


class RateLimited(Exception):
    """A per-key limit was hit; answer 429 with :meth:`body` and :attr:`headers` (``Retry-After``)."""

    def __init__(self, message: str, *, retry_after_s: float, reason: str, status: int = 429,
                 code: str = "rate_limit_exceeded") -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = float(retry_after_s)
        self.reason = reason  # "rate" or "concurrency"
        self.status = status
        self.code = code

    @property
    def headers(self) -> dict[str, str]:
        # Retry-After is whole seconds; never 0 (that would invite an immediate retry that fails again).
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": "rate_limit_error", "param": None, "code": self.code}}

    def __repr__(self) -> str:
        return f"RateLimited(reason={self.reason!r}, retry_after_s={self.retry_after_s:.3f})"


# ----------------------------------------------------------------------------------------------- key loading


def _check_key(key: str, where: str) -> None:
    # A key that can't travel in "Authorization: Bearer <key>" could never match; say so without echoing it.
    if any(c.isspace() for c in key) or not key.isprintable() or not key.isascii():
        raise AuthConfigError(f"{where}: an API key contains whitespace or non-printable/non-ASCII characters")


def _keys_from_file(path: str, var: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AuthConfigError(f"cannot read the API key file named by {var} ({path!r}): {type(e).__name__}: "
                              f"{getattr(e, 'strerror', None) or 'unreadable'}") from None
    keys = []
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        hash_at = text.find(" #"), text.find("\t#")  # "key  # owner" comments after whitespace
        cut = min((i for i in hash_at if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut].rstrip()
        _check_key(text, f"{var} ({path!r}) line {lineno}")
        keys.append(text)
    return keys


def load_api_keys(cfg: AuthConfig | None = None, environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    """Keys from ``$<cfg.keys_env>`` (comma-separated) plus the file named by ``$<cfg.keys_file_env>``.

    The file has one key per line; blank lines and ``#`` comments (whole line, or after whitespace) are skipped.
    A named file that is missing or unreadable raises :class:`AuthConfigError`. An empty result means auth is off.
    """
    cfg = cfg or AuthConfig()
    keys: list[str] = []
    raw = environ.get(cfg.keys_env, "")
    for i, part in enumerate(raw.split(",")):
        part = part.strip()
        if part:
            _check_key(part, f"{cfg.keys_env} entry {i + 1}")
            keys.append(part)
    path = environ.get(cfg.keys_file_env, "").strip()
    if path:
        keys.extend(_keys_from_file(os.path.expanduser(path), cfg.keys_file_env))
    return frozenset(keys)


# ----------------------------------------------------------------------------------------------- identities


def key_id_for(key: str) -> str:
    """Stable, non-reversible id of a key (12 hex chars): run it on a key to find that key in logs and metrics."""
    return hashlib.sha256(_KEY_ID_DOMAIN + key.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class KeyIdentity:
    """Who made a request. Holds no key material."""

    key_id: str
    anonymous: bool = False

    def __str__(self) -> str:
        return self.key_id


ANONYMOUS = KeyIdentity(key_id="anonymous", anonymous=True)


def bearer_token(header: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (scheme case-insensitive), or None when absent/malformed."""
    if not header or len(header) > _MAX_HEADER_CHARS:
        return None
    parts = header.strip().split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


class ApiKeyAuth:
    """Checks bearer tokens against the configured keys. With no keys, ``enabled`` is False and all pass as
    :data:`ANONYMOUS` (pair that with :func:`check_bind_allowed`)."""

    def __init__(self, keys: Iterable[str], cfg: AuthConfig | None = None) -> None:
        self.cfg = cfg or AuthConfig()
        # digest -> key_id; the keys themselves are not kept.
        self._digests: tuple[tuple[bytes, str], ...] = tuple(
            (hashlib.sha256(k.encode("utf-8")).digest(), key_id_for(k)) for k in sorted(set(keys)) if k
        )
        self.enabled = bool(self._digests)

    @property
    def num_keys(self) -> int:
        return len(self._digests)

    @classmethod
    def from_env(cls, cfg: AuthConfig | None = None, environ: Mapping[str, str] = os.environ) -> "ApiKeyAuth":
        cfg = cfg or AuthConfig()
        return cls(load_api_keys(cfg, environ), cfg)

    def authenticate(self, authorization_header: str | None) -> KeyIdentity:
        if not self.enabled:
            return ANONYMOUS
        if not authorization_header:
            raise AuthError("Missing API key: send 'Authorization: Bearer <key>'.")
        token = bearer_token(authorization_header)
        if token is None:
            raise AuthError("Malformed Authorization header: expected 'Bearer <key>'.")
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        match: str | None = None
        for digest, key_id in self._digests:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(presented, digest):
                match = key_id
        if match is None:
            raise AuthError("Invalid API key.")
        return KeyIdentity(key_id=match)

    def __repr__(self) -> str:
        return f"ApiKeyAuth(enabled={self.enabled}, keys={len(self._digests)})"


# ------------------------------------------------------------------------------------------------ bind guard


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an address (brackets and an IPv6 zone id dropped, IPv4-mapped IPv6 as IPv4), or None."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        addr = ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _is_loopback(host: str) -> bool:
    h = host.strip().lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    addr = _ip(h)
    # any other host name may resolve to a public address; 127.0.0.0/8, ::1 are loopback, not 0.0.0.0 nor ::
    return addr is not None and addr.is_loopback


def check_bind_allowed(host: str, auth_enabled: bool, cfg: AuthConfig | None = None) -> None:
    """Refuse to listen beyond loopback without API keys."""
    if auth_enabled or _is_loopback(host):
        return
    cfg = cfg or AuthConfig()
    raise AuthConfigError(
        f"refusing to serve on {host!r} without API keys: anyone who can reach it could use the model. "
        f"Set {cfg.keys_env} (comma-separated keys) or {cfg.keys_file_env} (a file with one key per line), "
        f"or bind to 127.0.0.1."
    )


@functools.lru_cache(maxsize=1024)
def _bindable(addr: str) -> bool:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((addr, 0))
        return True
    except OSError:
        return False


def peer_allowed_without_keys(peer: str | None) -> bool:
    """Without API keys the service answers only callers on this machine. The bind guard above covers the
    address we listen on; this covers ports we do not choose (Serve's direct-ingress replicas listen on every
    interface so that HAProxy on other nodes can reach them). A peer is local when it is loopback or one of this
    machine's own addresses (one it can bind to). An in-process caller (an ASGI test client) has no IP peer."""
    addr = None if peer is None else _ip(peer)
    if addr is None:
        return True  # not a network peer (a TCP peer is always an address)
    return addr.is_loopback or _bindable(str(addr))


# -------------------------------------------------------------------------------------------- per-key limits


class _Bucket:
    __slots__ = ("tokens", "updated", "active")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now
        self.active = 0


class Lease:
    """One admitted request. Release it once (idempotent) when the request, or its stream, is done."""

    __slots__ = ("_limiter", "key_id", "_released")

    def __init__(self, limiter: "KeyLimiter", key_id: str) -> None:
        self._limiter = limiter
        self.key_id = key_id
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        self._limiter._release(self)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> "Lease":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease(key_id={self.key_id!r}, released={self._released})"


class KeyLimiter:
    """Token bucket (``requests_per_minute``) plus concurrency cap (``max_concurrent``) per key id.

    :meth:`acquire` never waits: it admits (returns a :class:`Lease`) or raises :class:`RateLimited`. The
    concurrency check comes first, so a request refused for concurrency does not spend a token. State is under a
    ``threading.Lock`` (held only for a few arithmetic operations), so it is safe from the event loop and from
    threadpool-run dependencies alike.
    """

    def __init__(self, requests_per_minute: int, max_concurrent: int, *, burst: int | None = None,
                 clock: Callable[[], float] = time.monotonic, sweep_interval_s: float = 60.0) -> None:
        if requests_per_minute < 1 or max_concurrent < 1:
            raise ValueError("requests_per_minute and max_concurrent must be >= 1")
        self.requests_per_minute = requests_per_minute
        self.max_concurrent = max_concurrent
        self.rate = requests_per_minute / 60.0  # tokens per second
        self.burst = max(1, requests_per_minute // 6) if burst is None else max(1, int(burst))
        self._clock = clock
        self._sweep_interval_s = sweep_interval_s
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._last_sweep = clock()

    @classmethod
    def from_config(cls, cfg: AuthConfig, **kwargs: Any) -> "KeyLimiter":
        return cls(cfg.requests_per_minute, cfg.max_concurrent_per_key, **kwargs)

    def _refill(self, b: _Bucket, now: float) -> None:
        elapsed = max(0.0, now - b.updated)
        b.tokens = min(float(self.burst), b.tokens + elapsed * self.rate)
        b.updated = now

    def acquire(self, key_id: str) -> Lease:
        with self._lock:
            now = self._clock()
            if now - self._last_sweep >= self._sweep_interval_s:
                self._sweep(now)
            b = self._buckets.get(key_id)
            if b is None:
                b = self._buckets[key_id] = _Bucket(float(self.burst), now)
            else:
                self._refill(b, now)
            if b.active >= self.max_concurrent:
                raise RateLimited(
                    f"Too many concurrent requests for this API key (limit {self.max_concurrent}).",
                    retry_after_s=1.0, reason="concurrency")
            if b.tokens < 1.0:
                raise RateLimited(
                    f"Rate limit exceeded for this API key ({self.requests_per_minute} requests per minute).",
                    retry_after_s=(1.0 - b.tokens) / self.rate, reason="rate")
            b.tokens -= 1.0
            b.active += 1
            return Lease(self, key_id)

    async def admit(self, key_id: str) -> Lease:
        """:meth:`acquire` with the async signature of :class:`serve_app.cluster_limits.ClusterLimiter`, so routes
        use either limiter the same way."""
        return self.acquire(key_id)

    def _release(self, lease: Lease) -> None:
        with self._lock:
            if lease._released:
                return
            lease._released = True
            b = self._buckets.get(lease.key_id)
            if b is not None and b.active > 0:
                b.active -= 1

    def _sweep(self, now: float) -> None:
        """Drop buckets that are idle and full again: forgetting them changes nothing."""
        self._last_sweep = now
        for key_id in [k for k, b in self._buckets.items()
                       if b.active == 0 and b.tokens + max(0.0, now - b.updated) * self.rate >= self.burst]:
            del self._buckets[key_id]

    def sweep(self) -> int:
        """Run the idle-bucket sweep now; returns how many buckets remain."""
        with self._lock:
            self._sweep(self._clock())
            return len(self._buckets)

    def active(self, key_id: str) -> int:
        with self._lock:
            b = self._buckets.get(key_id)
            return b.active if b else 0

    def __len__(self) -> int:
        return len(self._buckets)

    def __repr__(self) -> str:
        return (f"KeyLimiter(requests_per_minute={self.requests_per_minute}, burst={self.burst}, "
                f"max_concurrent={self.max_concurrent}, tracked={len(self._buckets)})")
