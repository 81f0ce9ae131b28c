"""The fault injector: on the seeded schedule, it breaks processes, servers and data.

Each fault is a method named after its kind (`KINDS`); a fault that could not be injected
is recorded, never fatal, and the servers are brought back before the next one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter

from bench.soak.config import (
    LEASE_MS,
    NAMESPACE,
    PARTITIONS,
    PROJECTIONS,
    REDIS_DOWN,
    Config,
    fault_schedule,
    log,
)
from bench.soak.fleet import Fleet, Managed, Servers
from cqrs.keys import KeyMap
from cqrs.projector.deadletters import list_dead_letters
from cqrs.settings import Settings
from cqrs.wiring import make_redis


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def poison_entries(rng: random.Random) -> list[tuple[str, dict[str, str]]]:
    """Foreign entries no relay wrote: each is malformed in its own way."""
    good = {
        "event_id": str(_uuid(rng)),
        "type": "ProductCreated",
        "schema": "1",
        "aggregate_type": "product",
        "aggregate_id": str(_uuid(rng)),
        "version": "1",
        "partition_key": str(_uuid(rng)),
        "position": "0",
        "occurred_at": "2024-01-01T00:00:00+00:00",
        "payload": json.dumps({"sku": "F-1", "name": "Foreign", "price": "1.00", "stock": 1}),
    }
    cases = [
        ("missing-fields", {"hello": "world"}),
        ("unknown-type", {**good, "type": "ProductTeleported"}),
        ("future-schema", {**good, "schema": "99"}),
        ("wrong-types", {**good, "payload": json.dumps({"price": "free", "stock": "many"})}),
        ("not-json", {**good, "payload": "{not json"}),
        ("bad-version", {**good, "version": "seven"}),
        ("bad-uuid", {**good, "aggregate_id": "'; DROP TABLE x; --"}),
        ("protocol", {**good, "type": "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"}),
        ("huge", {**good, "payload": '{"sku":"' + "x" * 1_000_000}),
    ]
    picked = rng.sample(cases, rng.randint(1, 3))
    return [(why, {**fields, "event_id": str(_uuid(rng))}) for why, fields in picked]


class Injector(threading.Thread):
    """Fires the seeded fault schedule and records what it injected (poisons, dead letters)."""

    def __init__(
        self,
        config: Config,
        servers: Servers,
        fleet: Fleet,
        env: dict[str, str],
        started: float,
    ) -> None:
        super().__init__(name="injector", daemon=True)
        self.rng = random.Random(f"{config.seed}-injector")
        self.schedule = fault_schedule(config)
        self.servers = servers
        self.fleet = fleet
        self.env = env
        self.started = started
        self.halt = threading.Event()
        self.fired: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.poisons: set[tuple[str, str]] = set()  # (stream, entry id) of injected entries
        self.dead_letters: dict[tuple[str, str, str], dict[str, str]] = {}
        self.replays: list[threading.Thread] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.client = make_redis(servers.redis_url, Settings(redis_socket_timeout=5))
        self.keys = KeyMap(NAMESPACE)

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        for at, kind in self.schedule:
            if self.halt.wait(max(0.0, self.started + at - time.monotonic())):
                return
            log(f"fault: {kind}")
            try:
                getattr(self, kind)()
                self.fired[kind] += 1
            except Exception:
                self.errors.append(f"{kind}: {traceback.format_exc()}")
                log(f"fault {kind} could not be injected: {traceback.format_exc(limit=2)}")
                with contextlib.suppress(Exception):
                    self.servers.ensure()

    def workers(self) -> list[Managed]:
        return [p for name, p in self.fleet.procs.items() if name.startswith("w")]

    # -- process faults ---------------------------------------------------------------

    def _kill_and_restart(self, proc: Managed) -> None:
        self.fleet.kill(proc)
        self.halt.wait(self.rng.uniform(0.0, 1.5))
        self.fleet.start(proc)

    def kill_relay(self) -> None:
        self._kill_and_restart(self.fleet.procs["relay"])

    def kill_worker(self) -> None:
        self._kill_and_restart(self.rng.choice(self.workers()))

    def stop_worker(self) -> None:
        """Frozen for longer than its lease: others take its slots over; when it wakes up,
        it still holds the batch it read before and applies it."""
        proc = self.rng.choice(self.workers())
        frozen = self.rng.uniform(LEASE_MS / 1000 * 1.5, LEASE_MS / 1000 * 4)
        if self.fleet.pause(proc):
            self.halt.wait(frozen)
            self.fleet.resume(proc)

    # -- server faults ----------------------------------------------------------------

    def redis_restart(self) -> None:
        """Valkey crashes (SIGKILL) and comes back from its append-only file."""
        pid = self.servers.pid("redis")
        if pid is None:
            raise RuntimeError("Valkey is not running")
        self.collect_dead_letters()
        os.kill(pid, signal.SIGKILL)
        self.servers.wait_gone("redis")
        self.halt.wait(self.rng.uniform(0.0, 1.0))
        self.servers.ensure()

    def redis_flushall(self) -> None:
        self.collect_dead_letters()
        self.client.flushall()

    def pg_restart(self) -> None:
        """Fast shutdown (SIGINT: disconnect everyone, roll back what is in flight), start."""
        pid = self.servers.pid("postgres")
        if pid is None:
            raise RuntimeError("PostgreSQL is not running")
        os.kill(pid, signal.SIGINT)
        self.servers.wait_gone("postgres")
        self.halt.wait(self.rng.uniform(0.0, 1.0))
        self.servers.ensure()

    # -- data faults ------------------------------------------------------------------

    def replay(self) -> None:
        """In the background: a rebuild takes a while and the other faults go on meanwhile."""
        name = self.rng.choice(PROJECTIONS)

        def run() -> None:
            try:
                done = self.fleet.children.run(
                    [sys.executable, "-m", "cqrs.app", "replay", name, "--yes", "--json"],
                    env=self.env,
                    timeout=600,
                )
                outcome = "ok" if done.returncode == 0 else "refused"
                if done.returncode != 0:
                    log(f"replay {name}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
            except subprocess.TimeoutExpired:
                outcome = "timeout"
            except RuntimeError:
                return  # the run is stopping
            with self.lock:
                self.outcomes[f"replay:{outcome}"] += 1

        thread = threading.Thread(target=run, name=f"replay-{name}", daemon=True)
        thread.start()
        self.replays.append(thread)

    def poison(self) -> None:
        for why, fields in poison_entries(self.rng):
            stream = self.keys.stream(self.rng.randrange(PARTITIONS))
            entry_id = self.client.xadd(stream, fields)
            self.poisons.add((stream, entry_id))
            self.outcomes[f"poison:{why}"] += 1

    def collect_dead_letters(self) -> None:
        """Dead letters live in Redis: keep a copy before a fault may take them away."""
        with contextlib.suppress(*REDIS_DOWN):
            for projection in PROJECTIONS:
                for d in list_dead_letters(self.client, self.keys, projection):
                    self.dead_letters[(projection, d.stream, d.entry_id)] = {
                        "error": d.error[:300],
                        "type": str(d.fields.get("type", "?"))[:60],
                        "aggregate_id": str(d.fields.get("aggregate_id", ""))[:60],
                        "version": str(d.fields.get("version", ""))[:20],
                    }

    def close(self) -> None:
        for thread in self.replays:
            thread.join(timeout=600)
        self.collect_dead_letters()
        self.client.close()
