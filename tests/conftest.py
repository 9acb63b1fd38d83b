"""Shared fixtures: a real embedded etcd per test session, and a fresh key prefix per test."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from locksmith.embedded import EmbeddedEtcd
from locksmith.etcd import Etcd, EtcdConfig

# The update agent's shared fixtures (disk, rig, bus).
pytest_plugins = ["agentfixtures"]


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EmbeddedEtcd]:
    with EmbeddedEtcd() as server:
        yield server


@pytest.fixture
def etcd_config(etcd_server: EmbeddedEtcd) -> EtcdConfig:
    return etcd_server.config()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests sharing the session's etcd never see each other."""
    return f"t-{secrets.token_hex(4)}/"


@pytest.fixture
async def etcd(etcd_config: EtcdConfig) -> AsyncIterator[Etcd]:
    client = await Etcd.connect(etcd_config)
    try:
        yield client
    finally:
        await client.close()
