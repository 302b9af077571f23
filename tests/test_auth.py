"""API keys, bind guard and per-key limits (serve_app/auth.py); pure Python, no Ray."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from serve_app.auth import (
    ANONYMOUS,
    ApiKeyAuth,
    AuthConfigError,
    AuthError,
    KeyIdentity,
    KeyLimiter,
    RateLimited,
    bearer_token,
    check_bind_allowed,
    key_id_for,
    load_api_keys,
)
from serve_app.config import AuthConfig

KEY_A = "sk-alpha-0123456789abcdef"
KEY_B = "sk-bravo-fedcba9876543210"


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


# ------------------------------------------------------------------------------------------------ key loading


def test_keys_from_env_strips_and_drops_empties():
    keys = load_api_keys(AuthConfig(), {"KIMIRAY_API_KEYS": f" {KEY_A} ,, {KEY_B},  ,"})
    assert keys == frozenset({KEY_A, KEY_B})


def test_no_keys_configured_is_empty():
    assert load_api_keys(AuthConfig(), {}) == frozenset()
    assert load_api_keys(AuthConfig(), {"KIMIRAY_API_KEYS": " , ", "KIMIRAY_API_KEYS_FILE": " "}) == frozenset()


def test_keys_from_file_with_comments_and_blanks(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text(f"# production keys\n\n   {KEY_A}   \n  # {KEY_B} is revoked\n\nsk-gamma  # owned by carol\n\t\n")
    keys = load_api_keys(AuthConfig(), {"KIMIRAY_API_KEYS_FILE": str(f)})
    assert keys == frozenset({KEY_A, "sk-gamma"})


def test_keys_from_env_and_file_are_merged(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"{KEY_B}\n{KEY_A}\n")
    keys = load_api_keys(AuthConfig(), {"KIMIRAY_API_KEYS": KEY_A, "KIMIRAY_API_KEYS_FILE": str(f)})
    assert keys == frozenset({KEY_A, KEY_B})


def test_custom_env_names(tmp_path):
    cfg = AuthConfig(keys_env="MY_KEYS", keys_file_env="MY_KEYS_FILE")
    f = tmp_path / "k"
    f.write_text("sk-file\n")
    env = {"MY_KEYS": "sk-env", "MY_KEYS_FILE": str(f), "KIMIRAY_API_KEYS": "ignored"}
    assert load_api_keys(cfg, env) == frozenset({"sk-env", "sk-file"})


def test_missing_key_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope" / "keys.txt"
    with pytest.raises(AuthConfigError) as ei:
        load_api_keys(AuthConfig(), {"KIMIRAY_API_KEYS": KEY_A, "KIMIRAY_API_KEYS_FILE": str(missing)})
    msg = str(ei.value)
    assert "KIMIRAY_API_KEYS_FILE" in msg and str(missing) in msg
    assert KEY_A not in msg


def test_unreadable_key_file_is_a_clear_error(tmp_path):
    d = tmp_path / "a-directory"
    d.mkdir()
    with pytest.raises(AuthConfigError, match="KIMIRAY_API_KEYS_FILE"):
        load_api_keys(AuthConfig(), {"KIMIRAY_API_KEYS_FILE": str(d)})
    if os.geteuid() != 0:  # root reads anything
        f = tmp_path / "secret"
        f.write_text(KEY_A)
        f.chmod(0)
        with pytest.raises(AuthConfigError, match="KIMIRAY_API_KEYS_FILE"):
            load_api_keys(AuthConfig(), {"KIMIRAY_API_KEYS_FILE": str(f)})


def test_key_with_inner_whitespace_is_rejected_without_echo(tmp_path):
    f = tmp_path / "keys"
    f.write_text("sk-ok\nsk-has space-secret\n")
    with pytest.raises(AuthConfigError, match="line 2") as ei:
        load_api_keys(AuthConfig(), {"KIMIRAY_API_KEYS_FILE": str(f)})
    assert "secret" not in str(ei.value)


def test_load_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("KIMIRAY_API_KEYS", KEY_A)
    monkeypatch.delenv("KIMIRAY_API_KEYS_FILE", raising=False)
    assert load_api_keys(AuthConfig()) == frozenset({KEY_A})
    assert ApiKeyAuth.from_env().enabled


# ---------------------------------------------------------------------------------------------- authenticate


@pytest.fixture
def auth() -> ApiKeyAuth:
    return ApiKeyAuth(frozenset({KEY_A, KEY_B}), AuthConfig())


def test_valid_key_gives_stable_identity(auth):
    ident = auth.authenticate(f"Bearer {KEY_A}")
    assert ident == KeyIdentity(key_id=key_id_for(KEY_A))
    assert not ident.anonymous
    assert re.fullmatch(r"[0-9a-f]{12}", ident.key_id)
    assert auth.authenticate(f"bearer   {KEY_A}  ").key_id == ident.key_id  # scheme case, extra spaces
    assert auth.authenticate(f"Bearer {KEY_B}").key_id != ident.key_id
    # stable across instances (and so across replicas and restarts)
    assert ApiKeyAuth([KEY_A]).authenticate(f"Bearer {KEY_A}").key_id == ident.key_id


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "   ",
        KEY_A,  # no scheme
        f"Basic {KEY_A}",  # wrong scheme
        f"Token {KEY_A}",
        "Bearer",  # scheme only
        "Bearer ",
        f"Bearer {KEY_A} extra",
        f"Bearer {KEY_A}x",  # wrong key
        f"Bearer {KEY_A[:-1]}",
        "Bearer sk-unknown",
        "Bearer ключ",  # non-ASCII
        "Bearer " + "x" * 10_000,
    ],
)
def test_401_cases(auth, header):
    with pytest.raises(AuthError) as ei:
        auth.authenticate(header)
    e = ei.value
    assert e.status == 401 and e.code == "invalid_api_key"
    assert e.headers == {"WWW-Authenticate": "Bearer"}
    assert e.body()["error"]["code"] == "invalid_api_key"
    for text in (str(e), repr(e), str(e.body())):
        assert KEY_A not in text and KEY_A[:-1] not in text and "sk-unknown" not in text


def test_identity_and_auth_never_contain_the_key(auth):
    ident = auth.authenticate(f"Bearer {KEY_A}")
    for text in (repr(ident), str(ident), f"{ident}", repr(auth), str(auth), str(vars(ident))):
        assert KEY_A not in text and KEY_B not in text
    # and the authenticator does not keep the keys themselves
    assert KEY_A not in repr(vars(auth))
    assert str(ident) == ident.key_id


def test_key_id_is_not_the_plain_sha256_prefix_of_the_key():
    import hashlib

    assert key_id_for(KEY_A) != hashlib.sha256(KEY_A.encode()).hexdigest()[:12]


def test_no_keys_means_disabled_and_anonymous():
    auth = ApiKeyAuth(frozenset(), AuthConfig())
    assert not auth.enabled and auth.num_keys == 0
    assert auth.authenticate(None) is ANONYMOUS
    assert auth.authenticate("Bearer anything") is ANONYMOUS
    assert ANONYMOUS.anonymous and ANONYMOUS.key_id == "anonymous"
    assert ApiKeyAuth([KEY_A]).enabled


def test_bearer_token():
    assert bearer_token(f"Bearer {KEY_A}") == KEY_A
    assert bearer_token(f"BEARER {KEY_A}") == KEY_A
    assert bearer_token(None) is None
    assert bearer_token("") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(f"Basic {KEY_A}") is None
    assert bearer_token("Bearer a b") is None


# -------------------------------------------------------------------------------------------------- bind check


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST", "localhost.",
                                  "::ffff:127.0.0.1"])
@pytest.mark.parametrize("auth_enabled", [False, True])
def test_loopback_binds_always_allowed(host, auth_enabled):
    check_bind_allowed(host, auth_enabled)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "", "10.0.0.5", "192.168.1.1", "8.8.8.8", "fe80::1",
                                  "example.com", "my-host", "128.0.0.1"])
def test_public_binds_need_keys(host):
    check_bind_allowed(host, True)  # fine with keys
    with pytest.raises(AuthConfigError) as ei:
        check_bind_allowed(host, False)
    assert "KIMIRAY_API_KEYS" in str(ei.value)


def test_bind_error_names_configured_env():
    with pytest.raises(AuthConfigError, match="MY_KEYS"):
        check_bind_allowed("0.0.0.0", False, AuthConfig(keys_env="MY_KEYS"))


# ------------------------------------------------------------------------------------------------- rate limits


def test_burst_default():
    assert KeyLimiter(600, 4).burst == 100
    assert KeyLimiter(60, 4).burst == 10
    assert KeyLimiter(5, 4).burst == 1
    assert KeyLimiter(1, 1).burst == 1
    lim = KeyLimiter.from_config(AuthConfig(requests_per_minute=120, max_concurrent_per_key=3))
    assert (lim.burst, lim.max_concurrent, lim.rate) == (20, 3, 2.0)


def test_burst_then_429_then_refill():
    clock = FakeClock()
    lim = KeyLimiter(60, 1000, clock=clock)  # 1 token/s, burst 10
    for _ in range(10):
        lim.acquire("k").release()
    with pytest.raises(RateLimited) as ei:
        lim.acquire("k")
    e = ei.value
    assert e.status == 429 and e.code == "rate_limit_exceeded" and e.reason == "rate"
    assert e.retry_after_s == pytest.approx(1.0)
    assert int(e.headers["Retry-After"]) >= 1
    assert e.body()["error"]["type"] == "rate_limit_error"

    clock.advance(0.5)
    with pytest.raises(RateLimited) as ei:
        lim.acquire("k")
    assert 0 < ei.value.retry_after_s == pytest.approx(0.5)
    assert ei.value.headers["Retry-After"] == "1"  # rounded up, never 0

    clock.advance(0.5)
    lim.acquire("k").release()  # one token refilled
    with pytest.raises(RateLimited):
        lim.acquire("k")

    clock.advance(3600)  # refill is capped at the burst
    for _ in range(10):
        lim.acquire("k").release()
    with pytest.raises(RateLimited):
        lim.acquire("k")


def test_keys_are_limited_independently():
    clock = FakeClock()
    lim = KeyLimiter(6, 10, clock=clock)  # burst 1
    lim.acquire("a").release()
    with pytest.raises(RateLimited):
        lim.acquire("a")
    lim.acquire("b").release()
    with pytest.raises(RateLimited) as ei:
        lim.acquire("a")
    assert ei.value.retry_after_s == pytest.approx(10.0)  # 6 rpm -> a token every 10 s


def test_concurrency_limit_and_release():
    clock = FakeClock()
    lim = KeyLimiter(6000, 2, clock=clock)
    l1, l2 = lim.acquire("k"), lim.acquire("k")
    assert lim.active("k") == 2
    with pytest.raises(RateLimited) as ei:
        lim.acquire("k")
    assert ei.value.reason == "concurrency" and ei.value.status == 429 and ei.value.retry_after_s > 0
    lim.acquire("other").release()  # other keys unaffected
    l1.release()
    l1.release()  # idempotent: must not free a second slot
    assert lim.active("k") == 1
    l3 = lim.acquire("k")
    with pytest.raises(RateLimited):
        lim.acquire("k")
    l2.release()
    l3.release()
    assert lim.active("k") == 0


def test_concurrency_refusal_spends_no_token():
    clock = FakeClock()
    lim = KeyLimiter(6, 1, clock=clock)  # burst 1, one at a time
    held = lim.acquire("k")
    clock.advance(10)  # token back
    with pytest.raises(RateLimited) as ei:
        lim.acquire("k")
    assert ei.value.reason == "concurrency"
    held.release()
    lim.acquire("k").release()  # the token is still there


def test_async_context_manager_releases_on_exception():
    lim = KeyLimiter(6000, 1, clock=FakeClock())

    async def main():
        with pytest.raises(ValueError):
            async with lim.acquire("k") as lease:
                assert lim.active("k") == 1 and not lease.released
                raise ValueError("boom")
        assert lease.released and lim.active("k") == 0
        async with lim.acquire("k"):
            with pytest.raises(RateLimited):
                async with lim.acquire("k"):
                    pass  # pragma: no cover
        assert lim.active("k") == 0

        async def task():
            async with lim.acquire("k"):
                await asyncio.sleep(0.01)

        results = await asyncio.gather(task(), task(), return_exceptions=True)
        assert sum(isinstance(r, RateLimited) for r in results) == 1
        assert lim.active("k") == 0

    asyncio.run(main())


def test_sync_context_manager_releases_on_exception():
    lim = KeyLimiter(6000, 1, clock=FakeClock())
    with pytest.raises(KeyError):
        with lim.acquire("k"):
            raise KeyError("x")
    assert lim.active("k") == 0


def test_idle_buckets_are_dropped():
    clock = FakeClock()
    lim = KeyLimiter(60, 5, clock=clock, sweep_interval_s=30)  # 1 token/s: one spent token is back after 1 s
    for i in range(1000):
        lim.acquire(f"client-{i}").release()
    held = lim.acquire("busy")
    assert len(lim) == 1001
    clock.advance(0.5)
    assert lim.sweep() == 1001  # not yet refilled: dropping would forgive the spent tokens
    clock.advance(30)
    lim.acquire("new").release()  # acquire triggers the periodic sweep
    assert len(lim) == 2  # "busy" holds a lease, "new" was just used
    held.release()
    clock.advance(60)
    assert lim.sweep() == 0


def test_dropping_buckets_keeps_limits_exact():
    clock = FakeClock()
    lim = KeyLimiter(6, 5, clock=clock, sweep_interval_s=1)  # burst 1, 10 s per token
    lim.acquire("k").release()
    clock.advance(5)
    assert lim.sweep() == 1  # half refilled: kept
    with pytest.raises(RateLimited):
        lim.acquire("k")


def test_limiter_repr_and_validation():
    assert "tracked=0" in repr(KeyLimiter(60, 2))
    with pytest.raises(ValueError):
        KeyLimiter(0, 1)
    with pytest.raises(ValueError):
        KeyLimiter(1, 0)
