"""Shared fixtures: a real embedded etcd per test session, and a fresh key prefix per test."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from locksmith.embedded import EmbeddedEtcd
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.keys import Layout
from locksmith.semaphore import Semaphore

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


@pytest.fixture
def layout(prefix: str) -> Layout:
    """The layout of group "g" under this test's prefix (the semaphore tests' group)."""
    return Layout("g", prefix)


@pytest.fixture
async def sem(etcd: Etcd, prefix: str) -> AsyncIterator[Semaphore]:
    """A Semaphore on group "g" under this test's prefix, closed after the test."""
    s = Semaphore(etcd, "g", prefix=prefix)
    try:
        yield s
    finally:
        await s.close()
