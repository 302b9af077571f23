"""Redis Sentinel addresses: parse ``redis+sentinel://`` URLs and open clients that follow the primary.

Why this URL form: it is the one the ``limits`` package and the redis/LangChain integrations document
(``redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]``); Kombu spells the same information
``sentinel://h1:26379;sentinel://h2:26379`` plus a ``master_name`` transport option, and redis-py itself has no
URL form (only the :class:`redis.asyncio.sentinel.Sentinel` class). Kombu's form is accepted too, with the
service name in the path (``sentinel://h1:26379;sentinel://h2:26379/mymaster``) since a URL has nowhere else to
put it. Query parameters: ``sentinel_password`` (when the sentinels need their own ``requirepass``) and
``socket_timeout`` (seconds; how long a frozen primary can hold a call before the client gives up on it and asks
the sentinels again).

A client from :func:`connect_sentinel` asks the sentinels for the primary on every new connection; a connection
error, or ``READONLY`` from a primary that was demoted, drops the connection, and the retry policy of
:func:`connectors.stores.redis_store.connect` reconnects to whichever server the sentinels name now.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote

from pydantic import BaseModel, Field

from connectors.stores.base import StoreError

__all__ = ["SentinelAddress", "is_sentinel_url", "parse_sentinel_url"]

SCHEMES = ("redis+sentinel://", "rediss+sentinel://", "sentinel://")
DEFAULT_SOCKET_TIMEOUT_S = 10.0


class SentinelAddress(BaseModel):
    """What a Sentinel URL names: the sentinels, the primary's service name, the db and credentials."""

    sentinels: list[tuple[str, int]] = Field(min_length=1)
    service_name: str = Field(min_length=1)
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False
    socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S


def is_sentinel_url(url: str | None) -> bool:
    return bool(url) and url.startswith(SCHEMES)  # type: ignore[union-attr]


def _host_port(text: str, whole: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "26379"
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StoreError(f"bad sentinel address {text!r} in a sentinel URL (expected host:port), in {whole!r}")
    return host, int(port)


def parse_sentinel_url(url: str) -> SentinelAddress:
    """Parse either URL form (see the module docstring); a malformed one raises :class:`StoreError` whose message
    never contains the password."""
    from connectors.stores import redact_url  # the package imports this module lazily: no cycle at import time

    shown = redact_url(url)
    scheme = next((s for s in SCHEMES if url.startswith(s)), None)
    if scheme is None:
        raise StoreError(f"not a sentinel URL: {shown!r}")
    rest, _, query = url[len(scheme):].partition("?")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    if scheme == "sentinel://":  # Kombu: sentinel://h1:p1;sentinel://h2:p2/service
        rest = rest.replace(";sentinel://", ",")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    hosts = [_host_port(part, shown) for part in netloc.split(",") if part]
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts or len(parts) > 2:
        raise StoreError(f"a sentinel URL names the sentinels and the primary's service name: "
                         f"redis+sentinel://host:26379,host2:26379/service_name[/db], got {shown!r}")
    if len(parts) == 2 and not parts[1].isdigit():
        raise StoreError(f"the db of a sentinel URL is a number, got {shown!r}")
    try:
        timeout = float(params.get("socket_timeout", DEFAULT_SOCKET_TIMEOUT_S))
    except ValueError:
        raise StoreError(f"socket_timeout of a sentinel URL is a number of seconds, got {shown!r}") from None
    return SentinelAddress(
        sentinels=hosts, service_name=unquote(parts[0]), db=int(parts[1]) if len(parts) == 2 else 0,
        username=username, password=password, sentinel_password=params.get("sentinel_password") or None,
        ssl=scheme.startswith("rediss"), socket_timeout_s=timeout,
    )


def _following_connection_classes() -> tuple[type, type]:
    """Connection classes that ask the sentinels for the primary before *every* (re)connect.

    Why: redis-py 6.x's async ``Connection.send_packed_command`` reconnects through ``connect_check_health``,
    which skips ``SentinelManagedConnection.connect`` (the only path that asks the sentinels), so after a failover
    a dropped connection kept reconnecting to the dead primary's address until its retries ran out (seen with
    redis-py 6.4.0 against redis-server 7; tests/test_sentinel_failover.py).
    """
    from redis.asyncio.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

    class Mixin:
        _locating = False

        async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
            pool = self.connection_pool  # type: ignore[attr-defined]
            if self._reader is None and pool.is_master and not self._locating:  # type: ignore[attr-defined]
                self._locating = True
                try:
                    self.host, self.port = await pool.get_master_address()  # type: ignore[attr-defined]
                finally:
                    self._locating = False
            await super().connect_check_health(check_health=check_health,  # type: ignore[misc]
                                               retry_socket_connect=retry_socket_connect)

    class FollowingConnection(Mixin, SentinelManagedConnection):
        pass

    class FollowingSSLConnection(Mixin, SentinelManagedSSLConnection):
        pass

    return FollowingConnection, FollowingSSLConnection


def connect_sentinel(address: SentinelAddress, **client_kwargs: Any) -> Any:
    """A ``redis.asyncio.Redis`` bound to the current primary of ``address.service_name``; ``client_kwargs`` (retry,
    timeouts, decode_responses) apply to the connections to the primary."""
    from redis.asyncio import Redis
    from redis.asyncio.sentinel import Sentinel

    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": 2.0, "socket_timeout": 2.0}
    if address.sentinel_password:
        sentinel_kwargs["password"] = address.sentinel_password
    plain, tls = _following_connection_classes()
    client_kwargs = {"socket_timeout": address.socket_timeout_s, "connection_class": tls if address.ssl else plain,
                     **client_kwargs}
    sentinel = Sentinel(address.sentinels, sentinel_kwargs=sentinel_kwargs, db=address.db,
                        username=address.username, password=address.password)
    return sentinel.master_for(address.service_name, redis_class=Redis, **client_kwargs)
