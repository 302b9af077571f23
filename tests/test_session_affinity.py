"""Session affinity routing (serve_app.routing): the pure ranking functions without Ray, then one real Ray Serve
(the kimiray app with 2 ModelServer replicas on the tiny checkpoint, plus stand-in deployments that answer with
their replica id) and the ModelServer deployment's router config."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from engine.runtime.request import GenerateRequest
from serve_app.routing import (
    SessionAffinityRouter,
    affinity_order,
    overload_limit,
    rendezvous_order,
    session_key,
)

REPLICAS = [f"replica-{i}" for i in range(4)]
SESSIONS = [f"session-{i}" for i in range(2000)]


def _pending(*args: Any, **kwargs: Any) -> SimpleNamespace:
    return SimpleNamespace(args=list(args), kwargs=kwargs,
                           routing_context=SimpleNamespace(should_backoff=False))


def test_session_key_from_request_dict_and_kwargs() -> None:
    req = GenerateRequest(prompt_token_ids=[1, 2], session_id="abc")
    assert session_key(_pending(req)) == "abc"
    assert session_key(_pending({"session_id": "d"})) == "d"
    assert session_key(_pending(request=req)) == "abc"
    assert session_key(_pending(session_id="k")) == "k"
    assert session_key(_pending(GenerateRequest(prompt_token_ids=[1]))) is None
    assert session_key(_pending({"session_id": ""})) is None
    assert session_key(_pending("text", 3)) is None
    assert session_key(_pending()) is None and session_key(None) is None


def test_rendezvous_is_stable_and_order_independent() -> None:
    for s in SESSIONS[:50]:
        first = rendezvous_order(s, REPLICAS)
        assert rendezvous_order(s, list(reversed(REPLICAS))) == first
        assert sorted(first) == sorted(REPLICAS)


def test_sessions_spread_over_replicas() -> None:
    counts = Counter(rendezvous_order(s, REPLICAS)[0] for s in SESSIONS)
    assert set(counts) == set(REPLICAS)
    expected = len(SESSIONS) / len(REPLICAS)
    assert all(abs(c - expected) < 0.15 * expected for c in counts.values()), counts


def test_removal_moves_only_that_replicas_sessions() -> None:
    before = {s: rendezvous_order(s, REPLICAS)[0] for s in SESSIONS}
    gone = REPLICAS[1]
    after = {s: rendezvous_order(s, [r for r in REPLICAS if r != gone])[0] for s in SESSIONS}
    moved = {s for s in SESSIONS if before[s] != after[s]}
    assert moved == {s for s in SESSIONS if before[s] == gone}
    # ...and each goes to its own second choice, so the spill is spread too.
    assert all(after[s] == rendezvous_order(s, REPLICAS)[1] for s in moved)
    assert len(Counter(after[s] for s in moved)) == len(REPLICAS) - 1


def test_adding_a_replica_only_takes_sessions_to_it() -> None:
    before = {s: rendezvous_order(s, REPLICAS)[0] for s in SESSIONS}
    after = {s: rendezvous_order(s, [*REPLICAS, "replica-new"])[0] for s in SESSIONS}
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert moved and all(after[s] == "replica-new" for s in moved)
    assert len(moved) < 0.3 * len(SESSIONS)  # about 1/5


def test_overload_falls_back_in_rendezvous_order() -> None:
    s = "chat-42"
    order = rendezvous_order(s, REPLICAS)
    limits = {r: 8 for r in REPLICAS}
    idle = {r: 0 for r in REPLICAS}
    assert affinity_order(s, idle, limits) == order
    assert affinity_order(s, {r: None for r in REPLICAS}, limits) == order  # unknown counts as available
    assert affinity_order(s, idle | {order[0]: 7}, limits) == order  # below the limit: stay
    busy = idle | {order[0]: 8}
    assert affinity_order(s, busy, limits) == [*order[1:], order[0]]
    both = busy | {order[1]: 9}
    assert affinity_order(s, both, limits) == [order[2], order[3], order[0], order[1]]
    assert affinity_order(s, {r: 8 for r in REPLICAS}, limits) == order  # all full: keep the order
    assert affinity_order(s, busy, limits | {order[0]: None}) == order  # no limit: Serve's probe decides
    assert overload_limit(64, 0.75) == 48 and overload_limit(4, 0.1) == 1
    assert overload_limit(64, 1.0) is None and overload_limit(1, 0.5) is None


def test_choose_replicas_ranks_one_replica_each() -> None:
    """The router method on stand-in replicas (no Ray): ranks follow affinity_order over the queue-length cache."""
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=r), max_ongoing_requests=4) for r in REPLICAS]
    queue: dict[str, int | None] = {r: 0 for r in REPLICAS}
    router = SimpleNamespace(
        _overload_fraction=0.5,
        replica_queue_len_cache=SimpleNamespace(get=lambda rid: queue[rid.unique_id]),
    )
    pending = _pending(GenerateRequest(prompt_token_ids=[1], session_id="s-1"))

    def ranks() -> list[str]:
        out = asyncio.run(SessionAffinityRouter.choose_replicas(router, replicas, pending))
        assert all(len(rank) == 1 for rank in out)
        return [rank[0].replica_id.unique_id for rank in out]

    order = rendezvous_order("s-1", REPLICAS)
    assert ranks() == order and pending.routing_context.should_backoff
    queue[order[0]] = 2  # 0.5 * 4
    assert ranks() == [*order[1:], order[0]]
    router._overload_fraction, queue[order[0]] = 1.0, 4  # at 1.0 the cache alone never moves a session
    assert ranks() == order
    queue[order[0]] = None  # unknown: Serve probes it; a second, longer probe before moving on
    assert ranks() == [order[0], *order]


# --- real Ray Serve -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_instance(tmp_path_factory):
    """One local Ray + Serve for the module: the kimiray app (tiny checkpoint) with 2 ModelServer replicas; the
    stand-in deployments are added to it as further apps."""
    from ray import serve

    from tests.serve_harness import running_service

    with running_service(tmp_path_factory.mktemp("home"), "sk-affinity", None,
                         {"ModelServer": {"num_replicas": 2}}):
        yield serve


@pytest.fixture(scope="module")
def who_deployment():
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0},
                      request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter))
    class Who:
        """Stand-in for ModelServer: answers with its replica id, after ``delay`` seconds."""

        async def who(self, request: Any, delay: float = 0.0) -> str:
            await asyncio.sleep(delay)
            return serve.get_replica_context().replica_id.unique_id

    return Who


def _gather(handle: Any, requests: list[Any], delay: float = 0.0) -> list[str]:
    async def main() -> list[str]:
        return await asyncio.gather(*(handle.who.remote(r, delay=delay) for r in requests))

    return asyncio.run(main())


def _replicas_from_sessionless_burst(handle: Any) -> list[str]:
    """Requests without a session spread over both replicas (power of two choices): 16 overlapping ones, on a
    fresh deployment (Serve's queue-length cache lags after a burst, which can skew the least-loaded pick)."""
    landed = _gather(handle, [GenerateRequest(prompt_token_ids=[1]) for _ in range(16)], delay=0.3)
    assert len(set(landed)) == 2, Counter(landed)
    return sorted(set(landed))


def test_sessions_stick_to_one_replica(serve_instance, who_deployment) -> None:
    handle = serve_instance.run(who_deployment.options(max_ongoing_requests=200).bind(), name="affinity",
                                route_prefix=None)
    replicas = _replicas_from_sessionless_burst(handle)
    # 5 sessions whose rendezvous top choices cover both replicas (random ids: fixed names could all pick one).
    tops = {f"agent-{i}": rendezvous_order(f"agent-{i}", replicas)[0] for i in range(100)}
    firsts = [next(n for n, r in tops.items() if r == replica) for replica in replicas]
    sessions = list(dict.fromkeys([*firsts, *tops]))[:5]
    requests = [GenerateRequest(prompt_token_ids=[1], session_id=s) for s in sessions for _ in range(20)]
    landed = _gather(handle, requests)  # all 100 at once, well under max_ongoing_requests
    per_session: dict[str, set[str]] = {}
    for request, replica in zip(requests, landed):
        per_session.setdefault(request.session_id, set()).add(replica)
    # Each session always lands on its rendezvous top choice, the same in every caller process.
    assert per_session == {s: {tops[s]} for s in sessions}, per_session
    assert set(landed) == set(replicas)
    # a dict with session_id works too
    assert {handle.who.remote({"session_id": sessions[0]}).result() for _ in range(5)} == {replicas[0]}


def test_overloaded_replica_spills_to_the_next(serve_instance, who_deployment) -> None:
    handle = serve_instance.run(who_deployment.options(max_ongoing_requests=2).bind(), name="spill",
                                route_prefix=None)
    top, second = rendezvous_order("busy", _replicas_from_sessionless_burst(handle))
    request = GenerateRequest(prompt_token_ids=[1], session_id="busy")
    landed = Counter(_gather(handle, [request] * 4, delay=1.0))  # 4 at once, the top replica takes only 2
    assert landed == {top: 2, second: 2}, landed
    assert handle.who.remote(request).result() == top  # back home once it has room


def test_model_server_sessions_stick(serve_instance) -> None:
    """The real ModelServer (2 replicas): each session's requests reach one replica, generation included."""
    handle = serve_instance.get_deployment_handle("ModelServer", app_name="kimiray")

    def replica_of(session: str) -> str:
        return handle.replica_id.remote(GenerateRequest(prompt_token_ids=[1], session_id=session)).result()

    sessions = [f"chat-{i}" for i in range(16)]
    seen = {s: {replica_of(s) for _ in range(4)} for s in sessions}
    assert all(len(ids) == 1 for ids in seen.values()), seen
    replicas = sorted(set().union(*seen.values()))
    assert len(replicas) == 2, seen  # 16 sessions all on one replica: 1 in 32768
    assert all(seen[s] == {rendezvous_order(s, replicas)[0]} for s in sessions)
    deltas = handle.complete.remote(
        GenerateRequest(prompt_token_ids=[1, 2, 3], max_tokens=3, ignore_eos=True, session_id=sessions[0])).result()
    assert len(deltas) >= 1 and deltas[-1].finish_reason == "length"
    assert replica_of(sessions[0]) in seen[sessions[0]]


def test_model_server_uses_the_session_router() -> None:
    from serve_app.model_server import ModelServer

    for deployment in (ModelServer, ModelServer.options(num_replicas=2, max_ongoing_requests=64)):
        config = deployment._deployment_config.request_router_config
        assert config.request_router_class == "serve_app.routing.SessionAffinityRouter"
        assert config.get_request_router_class().__qualname__ == SessionAffinityRouter.__qualname__
