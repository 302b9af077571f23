"""The store guard: a cluster (more than one Ray node) never runs on each node's private embedded store."""

from __future__ import annotations

import pytest

from serve_app.config import TasksConfig
from serve_app.store_guard import PrivateStoreOnCluster, check_shared_stores


@pytest.fixture(autouse=True)
def _no_store_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KIMIRAY_STORES_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)


@pytest.mark.parametrize("url", [None, "embedded"])
def test_several_nodes_on_the_embedded_store_are_refused_with_the_fix_named(url: str | None) -> None:
    with pytest.raises(PrivateStoreOnCluster) as err:
        check_shared_stores(TasksConfig(stores_url=url), alive_nodes=2)
    message = str(err.value)
    assert "2 nodes" in message and "redis+sentinel://" in message and "sqlite:///" in message


@pytest.mark.parametrize("url", ["redis://10.0.0.5:6379/0", "redis+sentinel://s1:26379,s2:26379/kr",
                                 "sqlite:///mnt/shared/kimiray"])
def test_a_shared_store_or_an_explicit_directory_is_allowed_on_a_cluster(url: str) -> None:
    check_shared_stores(TasksConfig(stores_url=url), alive_nodes=5)


def test_the_environment_url_counts_as_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIMIRAY_STORES_URL", "redis://10.0.0.5:6379/0")
    check_shared_stores(TasksConfig(), alive_nodes=3)


def test_one_node_keeps_the_zero_setup_embedded_store() -> None:
    check_shared_stores(TasksConfig(), alive_nodes=1)
