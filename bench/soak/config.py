"""What a soak run is: its length, its seed, its shape, and the fault schedule both derive.

Everything here is data or a pure function of the seed, so a run's workload and fault
schedule repeat with its seed; only the timing (and so the interleaving) differs.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis
import sqlalchemy.exc

NAMESPACE = "soak"
PROJECTIONS = ("products", "customers", "orders")
PARTITIONS = 8
KINDS = (
    "kill_relay",
    "kill_worker",
    "stop_worker",
    "redis_restart",
    "redis_flushall",
    "pg_restart",
    "replay",
    "poison",
)
# Extra faults beyond the guaranteed minimum are drawn with these weights: the cheap ones
# often, the ones that force a full rebuild (FLUSHALL) or stall every writer (PostgreSQL)
# less, so the system spends most of the run working, not recovering.
WEIGHTS = {
    "kill_relay": 3,
    "kill_worker": 4,
    "stop_worker": 4,
    "redis_restart": 2,
    "redis_flushall": 1,
    "pg_restart": 2,
    "replay": 2,
    "poison": 3,
}
LEASE_MS = 1000
# Errors a writer or reader meets while a server is down or restarting: counted, retried.
PG_DOWN = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, psycopg.Error)
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)

# Share of the writers' commands that must write nothing (bad input, unknown ids, a taken
# email): the command side's refusals are exercised under the same faults.
HOSTILE = 0.1


def log(message: str) -> None:
    """Progress on stderr, so the report on stdout stays clean."""
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Config:
    """One run's shape; with the seed, it decides the workload and the fault schedule."""

    seconds: float
    seed: int
    writers: int = 3
    readers: int = 2
    workers: int = 3
    # Faults of every kind at least this often (3 for long runs, 1 for short ones).
    min_each: int = 3
    mean_interval: float = 8.0
    retention: int = 5000
    keep: bool = False
    json_path: Path | None = None


def fault_schedule(config: Config) -> list[tuple[float, str]]:
    """(seconds after start, kind): every kind `min_each` times plus weighted extras, spread
    over the run with seeded jitter. Leaves a warm-up at the start and a quiet end."""
    rng = random.Random(f"{config.seed}-faults")
    warmup = min(5.0, config.seconds * 0.1)
    window = max(config.seconds * 0.9 - warmup, 1.0)
    total = max(len(KINDS) * config.min_each, int(window / config.mean_interval))
    kinds = [k for k in KINDS for _ in range(config.min_each)]
    kinds += rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()), k=total - len(kinds))
    rng.shuffle(kinds)
    step = window / len(kinds)
    return [(warmup + i * step + rng.uniform(0, step * 0.5), kind) for i, kind in enumerate(kinds)]
