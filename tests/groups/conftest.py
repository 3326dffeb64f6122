"""Groups on the real broker and Redis: database 9 of the shared Redis, every key a test made
deleted afterwards (status keys of its jobs, the group's hashes, its final job's hold)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from leveret.consumer.features.locks import DEFAULT_LOCK_PREFIX
from leveret.producers.groups import DEFAULT_GROUP_PREFIX
from leveret.producers.stores.status import DEFAULT_PREFIX

STATUS_URL = "redis://127.0.0.1:6379/9"


class Made:
    """What a test made in Redis: group ids (their members' and final job's statuses go too)."""

    def __init__(self) -> None:
        self.groups: list[str] = []
        self.jobs: list[str] = []


@pytest.fixture
def made() -> Iterator[Made]:
    m = Made()
    yield m
    client = redis.Redis.from_url(STATUS_URL, decode_responses=True)
    try:
        keys: list[str] = [DEFAULT_PREFIX + j for j in m.jobs]
        for gid in m.groups:
            key = DEFAULT_GROUP_PREFIX + gid
            members = client.hkeys(key + ":members")
            keys += [key, key + ":members", DEFAULT_PREFIX + gid + ".then"]
            keys.append(DEFAULT_LOCK_PREFIX + "key:" + gid + ".then")
            keys += [DEFAULT_PREFIX + mid for mid in members]
        if keys:
            client.delete(*keys)
    finally:
        client.close()
