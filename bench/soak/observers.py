"""Observers of a soak run: the consumer-group lag and relay backlog, and commit-to-view
latency measured with consistency tokens, while the faults go on."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import psycopg
import redis

from bench.soak.config import NAMESPACE, PARTITIONS, PROJECTIONS, REDIS_DOWN
from cqrs.commands.results import CommandResult
from cqrs.keys import KeyMap
from cqrs.queries.service import QueryService
from cqrs.settings import Settings
from cqrs.streams import group_lag
from cqrs.urls import libpq_url
from cqrs.wiring import make_redis


@dataclass
class LagStats:
    """The worst lag and backlog seen, and commit-to-view latencies (the report's "lag")."""

    max_entries: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROJECTIONS, 0))
    max_backlog: int = 0  # events committed but not yet relayed (outbox rows)
    latencies: list[float] = field(default_factory=list)  # commit -> visible in every view
    unresolved: float = 0.0  # longest wait that the run's end cut short


class Sampler(threading.Thread):
    """Every half second: each projection's lag + pending entries over all partitions, and
    the relay's backlog (outbox rows)."""

    def __init__(self, database_url: str, redis_url: str, stats: LagStats) -> None:
        super().__init__(name="sampler", daemon=True)
        self.database_url = database_url
        self.client = make_redis(redis_url, Settings(redis_socket_timeout=5))
        self.stats = stats
        self.halt = threading.Event()

    def run(self) -> None:
        keys = KeyMap(NAMESPACE)
        while not self.halt.wait(0.5):
            with contextlib.suppress(*REDIS_DOWN, redis.ResponseError):
                for projection in PROJECTIONS:
                    lag = group_lag(self.client, keys, projection, PARTITIONS)
                    total = lag["lag"] + lag["pending"]
                    self.stats.max_entries[projection] = max(
                        self.stats.max_entries[projection], total
                    )
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(libpq_url(self.database_url), connect_timeout=2) as conn,
            ):
                backlog = conn.execute("SELECT count(*) FROM events.outbox").fetchone()[0]
                self.stats.max_backlog = max(self.stats.max_backlog, int(backlog))
        self.client.close()


class Probe(threading.Thread):
    """Commit-to-view latency: take the newest committed token, wait until every projection
    reflects it (the token names the versions to wait for), measure, repeat."""

    def __init__(self, redis_url: str, stats: LagStats) -> None:
        super().__init__(name="probe", daemon=True)
        self.client = make_redis(redis_url, Settings(redis_socket_timeout=5))
        self.service = QueryService(self.client, KeyMap(NAMESPACE), partitions=PARTITIONS)
        self.stats = stats
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.last_commit: tuple[float, str] | None = None  # (monotonic, token)

    def committed(self, result: CommandResult) -> None:
        """The workload's `after_commit` hook (runs in a writer's thread)."""
        with self.lock:
            self.last_commit = (time.monotonic(), result.token)

    def run(self) -> None:
        while not self.halt.wait(1.0):
            with self.lock:
                last = self.last_commit
            if last is None:
                continue
            committed, token = last
            while not self.halt.is_set():
                try:
                    if not self.service.behind(token):
                        self.stats.latencies.append(time.monotonic() - committed)
                        break
                except (*REDIS_DOWN, redis.ResponseError):
                    pass
                self.halt.wait(0.02)
            else:
                self.stats.unresolved = max(self.stats.unresolved, time.monotonic() - committed)
        self.client.close()
