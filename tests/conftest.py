"""Shared fixtures: a session-wide real etcd; per-test control plane, Envoy and upstreams."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.harness import Etcd, Stack, Upstreams, make_stack, new_etcd


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    etcd = new_etcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield etcd
    finally:
        etcd.stop()


@pytest.fixture
def prefix() -> str:
    """Each test has a key prefix of its own on the shared etcd."""
    return f"/test-{uuid.uuid4().hex[:10]}/"


@pytest.fixture
def stack(tmp_path: Path, etcd_server: Etcd, prefix: str) -> Iterator[Stack]:
    stack = make_stack(tmp_path, etcd_server.url, prefix)
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    servers = Upstreams()
    try:
        yield servers
    finally:
        await servers.close()
