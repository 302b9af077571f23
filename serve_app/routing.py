"""Session affinity for ModelServer replicas: a session's requests go to the replica holding its prefix cache.

Why rendezvous (highest-random-weight) hashing: every caller (each Ingress replica has its own router) computes
the same ranking from nothing but the session id and the replica ids, so no shared state or coordination is
needed; adding a replica only moves the sessions it now wins, and removing one only moves the sessions it held.
A stable hash (blake2b), not Python's per-process salted ``hash()``, keeps the ranking equal in every process.

The top replica is skipped while its known queue is at/over a threshold (overload) or when it is gone; the next
replica in the session's rendezvous order takes over, so spill-over is also stable. Requests without a session
use Serve's default power-of-two-choices procedure.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import LocalityMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica


def session_key(pending_request: PendingRequest | None) -> str | None:
    """The request's session id: a ``session_id`` kwarg, or the ``session_id`` of the first positional arg or of a
    kwarg value (a ``GenerateRequest`` or a dict). None when the request has none."""
    if pending_request is None:
        return None
    kwargs = pending_request.kwargs or {}
    direct = kwargs.get("session_id")
    if isinstance(direct, str) and direct:
        return direct
    for value in [*(pending_request.args or [])[:1], *kwargs.values()]:
        sid = value.get("session_id") if isinstance(value, Mapping) else getattr(value, "session_id", None)
        if isinstance(sid, str) and sid:
            return sid
    return None


def rendezvous_score(session: str, replica_id: str) -> int:
    """The (session, replica) weight; the same in every process."""
    digest = hashlib.blake2b(f"{session}\x00{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(session: str, replica_ids: Iterable[str]) -> list[str]:
    """Replica ids from most to least preferred for ``session`` (ties, practically impossible, break by id)."""
    return sorted(replica_ids, key=lambda rid: (-rendezvous_score(session, rid), rid))


def overload_limit(max_ongoing_requests: int, fraction: float) -> int | None:
    """Cached queue length at which a replica is passed over: ``fraction`` of its max_ongoing_requests (at least
    1). None at a fraction of 1: Serve itself probes a replica whose cached queue is full and skips it only if it
    really is, so a stale cache entry can't push a session off its replica."""
    limit = max(1, math.ceil(max_ongoing_requests * fraction))
    return None if limit >= max_ongoing_requests else limit


def affinity_order(session: str, queue_lens: Mapping[str, int | None], limits: Mapping[str, int | None]) -> list[str]:
    """Rendezvous order with overloaded replicas (known queue length >= their limit) moved behind the others, each
    group keeping its rendezvous order. An unknown queue length or limit (None) counts as not overloaded."""
    order = rendezvous_order(session, queue_lens)

    def overloaded(rid: str) -> bool:
        q, limit = queue_lens[rid], limits[rid]
        return q is not None and limit is not None and q >= limit

    return [rid for rid in order if not overloaded(rid)] + [rid for rid in order if overloaded(rid)]


class SessionAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Routes a session's requests by rendezvous hashing; requests without a session by power of two choices.

    No ``FIFOMixin`` on purpose: with it, a replica chosen for one request may be handed to whichever request is
    first in the queue, which would break affinity. The base class hands it to the request it was chosen for.

    ``request_router_kwargs``: ``overload_fraction`` (default 1.0). At 1.0 a session leaves its replica only when
    that replica is full (max_ongoing_requests, checked by Serve's probe) or gone. Below 1.0 the replica is also
    passed over while its cached queue length is at/over that fraction of max_ongoing_requests: sessions spill
    earlier, trading prefix-cache hits for less queueing.
    """

    def initialize_state(self, overload_fraction: float = 1.0, **kwargs: Any) -> None:
        if not 0.0 < overload_fraction <= 1.0:
            raise ValueError(f"overload_fraction must be in (0, 1], got {overload_fraction}")
        self._overload_fraction = overload_fraction

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """One replica per rank, in the session's affinity order. Serve tries the ranks in turn: a replica that is
        full when probed (or whose actor died) is skipped for the next; when all fail it backs off and asks again.
        (Pure ranking in ``affinity_order``.)"""
        session = session_key(pending_request)
        if session is None or not candidate_replicas:
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        assert pending_request is not None
        pending_request.routing_context.should_backoff = True  # every rank is already tried: back off between rounds
        fraction = getattr(self, "_overload_fraction", 1.0)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        queue_lens = {rid: self.replica_queue_len_cache.get(r.replica_id) for rid, r in by_id.items()}
        limits = {rid: overload_limit(r.max_ongoing_requests, fraction) for rid, r in by_id.items()}
        ranks = [[by_id[rid]] for rid in affinity_order(session, queue_lens, limits)]
        if len(ranks) > 1 and queue_lens[ranks[0][0].replica_id.unique_id] is None:
            # Not in the cache: Serve probes it, and a probe that misses its short deadline skips the replica.
            # A second, longer probe first, so one slow answer doesn't move the session off its cache.
            ranks.insert(1, ranks[0])
        return ranks
