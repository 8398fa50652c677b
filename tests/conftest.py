"""Fixtures shared by the test modules: shards and their index, and real servers on 127.0.0.1.

Helpers that are plain functions (shard writers, loaders, the fixed loss) are in ``helpers``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest

from infobatch_stream import DatasetIndex
from infobatch_stream.rangeserver import RangeServer
from tests.helpers.data import make_index
from tests.helpers.servers import S3Server


@pytest.fixture(scope="session")
def shared_shards(tmp_path_factory) -> Callable[..., tuple[list[str], DatasetIndex]]:
    """``shared_shards(num_shards, per_shard)``: ``make_index``'s shards and index, written once per
    session for each size and shared by every test that asks for that size. Read-only: a test
    that changes shards or the index writes its own with ``make_index``."""
    made: dict[tuple[int, int], tuple[list[str], DatasetIndex]] = {}

    def get(num_shards: int, per_shard: int) -> tuple[list[str], DatasetIndex]:
        if (num_shards, per_shard) not in made:
            folder = tmp_path_factory.mktemp(f"shards-{num_shards}x{per_shard}")
            made[num_shards, per_shard] = make_index(str(folder), num_shards=num_shards, per_shard=per_shard)
        return made[num_shards, per_shard]

    return get


@pytest.fixture
def range_server() -> Iterator[Callable[..., str]]:
    """``range_server(root, **behaviour)``: ``RangeServer(root, **behaviour)`` started in this
    process; its base URL. Stopped when the test ends."""
    with contextlib.ExitStack() as running:
        yield lambda root, **behaviour: running.enter_context(RangeServer(os.fspath(root), **behaviour))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # DataLoader workers (fork or spawn) inherit it
    os.environ.setdefault("NO_PROXY", "127.0.0.1")
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
