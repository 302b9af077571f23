"""Sentinel URL forms (``redis+sentinel://`` and Kombu's ``sentinel://``) and the default replica acks."""

from __future__ import annotations

import pytest

from connectors.stores import default_replica_acks, open_stores
from connectors.stores.base import StoreError
from connectors.stores.sentinel import parse_sentinel_url


def test_redis_sentinel_url_names_sentinels_service_db_and_credentials() -> None:
    a = parse_sentinel_url("redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380,sentinel-3/kr-main/2"
                           "?sentinel_password=sp&socket_timeout=4")
    assert a.sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-3", 26379)]
    assert (a.service_name, a.db, a.password, a.sentinel_password, a.socket_timeout_s) == ("kr-main", 2, "s3cret",
                                                                                         "sp", 4.0)
    assert not a.ssl and parse_sentinel_url("rediss+sentinel://h:1/s").ssl


def test_kombu_form_is_accepted() -> None:
    a = parse_sentinel_url("sentinel://h1:26379;sentinel://h2:26379;sentinel://h3:26379/mymaster")
    assert a.sentinels == [("h1", 26379), ("h2", 26379), ("h3", 26379)] and a.service_name == "mymaster"


@pytest.mark.parametrize("url", ["redis+sentinel://h1:26379", "redis+sentinel:///svc", "redis+sentinel://h:x/svc",
                                 "redis+sentinel://h:1/svc/notadb", "redis+sentinel://:pw@h:1/a/b/c"])
def test_malformed_sentinel_urls_are_refused_without_echoing_the_password(url: str) -> None:
    with pytest.raises(StoreError) as err:
        parse_sentinel_url(url)
    assert "pw@" not in str(err.value)


def test_replica_acks_default_to_one_behind_sentinel_and_zero_otherwise() -> None:
    assert default_replica_acks("redis+sentinel://h:26379/kr") == 1
    assert default_replica_acks("redis://h:6379/0") == 0 and default_replica_acks(None) == 0
    stores = open_stores("redis+sentinel://h:26379/kr")  # nothing connects until the first call
    assert stores.tasks.acks.count == 1 and stores.sessions.acks.count == 1
    assert open_stores("redis://h:6379/0", min_replica_acks=2).tasks.acks.count == 2
