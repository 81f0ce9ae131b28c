"""The pure rules of cqrs/startup.py: which start-up timeout applies, which errors are worth
waiting for, and which maxmemory-policy refuses a start (the one doctor applies too)."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
import redis

from cqrs.settings import Settings
from cqrs.startup import (
    ERROR,
    OK,
    ONE_SHOT_TIMEOUT,
    WARNING,
    ServerUnreachable,
    StartupStopped,
    judge_eviction_policy,
    postgres_unavailable,
    redis_unavailable,
    startup_timeout,
    wait_until_reachable,
)


@pytest.mark.parametrize(
    ("value", "long_running", "expected"),
    [
        (None, True, None),
        (None, False, ONE_SHOT_TIMEOUT),
        (0, True, None),
        (0, False, None),
        (2.5, True, 2.5),
        (2.5, False, 2.5),
    ],
)
def test_startup_timeout(value: float | None, long_running: bool, expected: float | None) -> None:
    settings = Settings(startup_timeout=value)
    assert startup_timeout(settings, long_running=long_running) == expected


def test_startup_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CQRS_STARTUP_TIMEOUT", "")
    assert Settings().startup_timeout is None
    monkeypatch.setenv("CQRS_STARTUP_TIMEOUT", "7")
    assert Settings().startup_timeout == 7.0


def test_which_errors_are_waited_for() -> None:
    assert redis_unavailable(redis.ConnectionError("Error 111 connecting. Connection refused."))
    assert redis_unavailable(redis.TimeoutError("Timeout connecting to server"))
    assert redis_unavailable(redis.BusyLoadingError("Redis is loading the dataset in memory"))
    assert not redis_unavailable(redis.AuthenticationError("invalid username-password pair"))
    assert not redis_unavailable(redis.ResponseError("NOAUTH Authentication required."))

    refused = 'connection failed: connection to server at "127.0.0.1", port 1 failed: refused'
    assert postgres_unavailable(psycopg.OperationalError(refused))
    starting = "connection failed: ... FATAL:  the database system is starting up"
    assert postgres_unavailable(psycopg.OperationalError(starting))
    assert postgres_unavailable(psycopg.OperationalError("FATAL:  sorry, too many clients already"))
    missing = 'connection failed: ... FATAL:  database "nope" does not exist'
    assert not postgres_unavailable(psycopg.OperationalError(missing))
    password = 'FATAL:  password authentication failed for user "cqrs"'
    assert not postgres_unavailable(psycopg.OperationalError(password))
    assert not postgres_unavailable(ValueError("not a driver error"))


@pytest.mark.parametrize(
    ("policy", "maxmemory", "status"),
    [
        ("allkeys-lru", 0, ERROR),
        ("allkeys-lfu", 2**30, ERROR),
        ("allkeys-random", 2**30, ERROR),
        ("volatile-lru", 2**30, WARNING),
        ("volatile-ttl", 2**30, WARNING),
        ("noeviction", 0, WARNING),
        ("noeviction", 2**30, OK),
        (None, 0, WARNING),
    ],
)
def test_the_eviction_rule(policy: str | None, maxmemory: int, status: str) -> None:
    verdict = judge_eviction_policy(policy, maxmemory)
    assert verdict.status == status
    if status == ERROR:
        assert policy is not None and policy in verdict.detail
        assert "noeviction" in verdict.fix


def test_a_wait_gives_up_at_its_deadline_and_stops_on_request() -> None:
    calls: list[int] = []

    def refused() -> None:
        calls.append(1)
        raise redis.ConnectionError("Connection refused.")

    with pytest.raises(ServerUnreachable, match=r"cannot reach Redis at redis://h:1/0: Conn"):
        wait_until_reachable(
            "Redis",
            "redis://h:1/0",
            refused,
            unavailable=redis_unavailable,
            stop=threading.Event(),
            deadline=time.monotonic() + 0.5,
        )
    assert len(calls) >= 3  # 0.1 s, 0.2 s, ... then the deadline

    stop = threading.Event()
    stop.set()
    with pytest.raises(StartupStopped):
        wait_until_reachable(
            "Redis",
            "redis://h:1/0",
            refused,
            unavailable=redis_unavailable,
            stop=stop,
            deadline=None,
        )

    def wrong_password() -> None:
        raise redis.AuthenticationError("invalid password")

    with pytest.raises(redis.AuthenticationError):  # not waited for: reported at once
        wait_until_reachable(
            "Redis",
            "redis://h:1/0",
            wrong_password,
            unavailable=redis_unavailable,
            stop=threading.Event(),
            deadline=None,
        )
