"""`cqrs.redisio.round_trip`, the packed round trip of the projector, relay and queries:
a connection lost mid-reply is redis-py's ConnectionError (what every caller treats as
transient: back off, reconnect), never a raw socket error, and the pool recovers."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis

from cqrs.redisio import round_trip
from cqrs.wiring import Wiring
from tests.helpers import wait_until


def test_a_connection_killed_mid_reply_is_a_redis_connection_error(wiring: Wiring) -> None:
    client = wiring.redis
    key = f"{wiring.keys.ns}:redisio-{uuid.uuid4().hex}"
    name = f"redisio-{uuid.uuid4().hex[:8]}"
    outcome: list[BaseException | list] = []

    def blocked() -> None:
        try:
            outcome.append(round_trip(client, [("CLIENT", "SETNAME", name), ("BLPOP", key, 10)]))
        except Exception as exc:  # the test inspects what came out
            outcome.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    admin = redis.Redis.from_url(wiring.redis_url)
    try:
        wait_until(
            lambda: any(c.get("name") == name for c in admin.client_list()),
            timeout=10,
            what="the round trip to block in BLPOP",
        )
        killed = [c["id"] for c in admin.client_list() if c.get("name") == name]
        for client_id in killed:
            admin.execute_command("CLIENT", "KILL", "ID", client_id)
    finally:
        admin.close()
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], redis.ConnectionError), outcome
    # The broken socket was dropped: the next round trip gets a fresh connection.
    assert round_trip(client, [("PING",)]) == ["PONG"]


def test_error_replies_come_back_in_their_place(wiring: Wiring) -> None:
    key = f"{wiring.keys.ns}:redisio-{uuid.uuid4().hex}"
    wiring.redis.set(key, "a string")
    replies = round_trip(wiring.redis, [("GET", key), ("HGETALL", key), ("STRLEN", key)])
    assert replies[0] == "a string" and replies[2] == 8
    assert isinstance(replies[1], redis.ResponseError) and "WRONGTYPE" in str(replies[1])
    with pytest.raises(redis.DataError):
        round_trip(wiring.redis, [("SET", key, object())])
    wiring.redis.delete(key)
