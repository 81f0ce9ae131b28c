"""Changing a namespace's partition count (`cqrs repartition N`): the projector's part.

The count decides the stream of every aggregate (`cqrs.keys.partition_of`), and one
aggregate's events must stay in one stream, in order. So the streams are not re-sorted:
they are replaced, and every projection is rebuilt from the PostgreSQL log, which holds
every event whatever the streams held. The steps, and who may run meanwhile:

1. `preflight`: refuse while a worker is alive (a fresh heartbeat or a held lease; with
   `online`, workers may run: they step aside below) or a replay runs.
2. `hold`: every projection's replay lock and pause flag, under one id, renewed by a
   keeper thread: live workers finish their batch and leave the projection's slots, and
   no replay or worker build starts. `wait_for_workers` waits until no lease is held.
3. `switch_streams`, which the caller runs inside its fence (no relay pass runs meanwhile,
   see `cqrs.app.repartition`), in this order:
   a. `<ns>:meta`: `origin` partial (from now on every replay reads the log) and the
      `repartition` marker (the target count), in one HSET;
   b. every projection's state hash is deleted: workers treat it as having no valid views
      (they stay out of its slots, and would rebuild it from the log themselves, as after
      Redis lost its data), while queries keep reading the live generation (its key
      stays);
   c. every partition stream is deleted (their consumer groups with them);
   d. every projection's group is created at the start of every new stream: the relay
      never trims past a group, so the entries published meanwhile wait for the rebuild;
   e. the new count is stored.
4. `rebuild`: each projection from the log into a new generation, by the `Replayer` under
   the lock held since 2, then the switch (queries move to it with one SET, as in every
   replay). Workers take its slots under the new count from then on.
5. `finish`: the marker goes; streams outside the new count (a worker that was frozen
   across the switch may have recreated one, empty) are deleted.

Interrupted (SIGINT, SIGKILL, a lost connection): before 3a nothing changed, and the
locks and pause flags expire. From 3a on the namespace still works, under the count
stored (the old one until 3e): a projection without a state hash is rebuilt from the log
by the first worker that sees it, and served from its old generation until then. Running
`cqrs repartition N` again does every step again and clears the marker; no stream is ever
read under two counts, because no worker reads a projection whose state was deleted,
and a worker follows the stored count at its next status read.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis

from cqrs.keys import KeyMap
from cqrs.projector.projection import Projection
from cqrs.projector.replay import Progress, Replayer, ReplayResult, unlink_pattern
from cqrs.projector.scripts import Scripts
from cqrs.redisio import round_trip
from cqrs.settings import Settings
from cqrs.streams import PARTITIONS, REPARTITION, stored_partitions

# What the locks and pause flags a repartition holds say (then a unique id): a second run
# that finds them tells an interrupted repartition from a replay.
_OWNER_PREFIX = "repartition-"


class RepartitionRefused(Exception):
    """Nothing was changed: something runs that must not."""


class RepartitionInterrupted(Exception):
    """Stopped (SIGINT/SIGTERM) before anything was changed."""


class _Keeper(threading.Thread):
    """Renews the locks and pause flags the repartition holds, until each projection's
    replay takes over its own (the replay releases them when it switches; renewing a key
    someone else holds, or nobody, does nothing)."""

    def __init__(self, scripts: Scripts, keys: list[str], owner: str, ttl_ms: int) -> None:
        super().__init__(name="repartition-keeper", daemon=True)
        self.scripts = scripts
        self.keys = list(keys)
        self.owner = owner
        self.ttl_ms = ttl_ms
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.ttl_ms / 3000):
            commands = [
                self.scripts.command("renew_lease", [key], [self.owner, self.ttl_ms])
                for key in self.keys
            ]
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                self.scripts.run(commands)


class Repartitioner:
    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        projections: list[Projection],
        database_url: str | None,
        target: int,
    ) -> None:
        self.redis = client
        self.settings = settings
        self.keys = KeyMap(settings.namespace)
        self.scripts = Scripts(client)
        self.projections = projections
        self.database_url = database_url
        self.target = target
        self.owner = f"{_OWNER_PREFIX}{uuid.uuid4().hex}"
        self.lock_ms = max(settings.projector_lease_ms * 3, settings.replay_lock_ms)
        # The count before this run, as stored (None: nothing stored yet).
        self.before = stored_partitions(client, self.keys)

    # --- 1. who runs ---------------------------------------------------------------------

    def preflight(self, *, online: bool) -> None:
        """Raise RepartitionRefused while a replay runs or (unless `online`) a worker is
        alive: a fresh heartbeat (three leases, as workers count each other) or a lease
        on a slot of the current streams or the new ones."""
        names = [p.name for p in self.projections]
        commands: list[tuple[Any, ...]] = [("GET", self.keys.replay_lock(n)) for n in names]
        since_ms = int(time.time() * 1000) - 3 * self.settings.projector_lease_ms
        commands += [("ZCOUNT", self.keys.workers(n), since_ms, "+inf") for n in names]
        partitions = max(self.before or 0, self.target)
        leases = [self.keys.lease(n, p) for n in names for p in range(partitions)]
        commands += [("EXISTS", lease) for lease in leases]
        replies = round_trip(self.redis, commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        replaying = [(n, r) for n, r in zip(names, replies, strict=False) if r]
        if replaying:
            name, holder = replaying[0]
            if str(holder).startswith(_OWNER_PREFIX):
                raise RepartitionRefused(
                    f"an interrupted repartition still holds the replay lock of {name}; it "
                    f"expires within {self.lock_ms / 1000:g}s, try again then"
                )
            raise RepartitionRefused(f"a replay of {name} is running; try again when it is done")
        if online:
            return
        beats = dict(zip(names, replies[len(names) : 2 * len(names)], strict=True))
        alive = {n: int(c) for n, c in beats.items() if c}
        held = [lease for lease, r in zip(leases, replies[2 * len(names) :], strict=True) if r]
        if alive or held:
            what = (
                f"{max(alive.values())} worker(s) heartbeat for {', '.join(alive)}"
                if alive
                else f"a worker holds {held[0]}"
            )
            raise RepartitionRefused(
                f"workers are running ({what}): stop the workers and the relay first, "
                "or pass --online"
            )

    # --- 2. hold the projections -----------------------------------------------------------

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Every projection's replay lock and pause flag for the duration, renewed; given
        back at the end (those a replay has not released already)."""
        taken: list[str] = []
        keeper = _Keeper(self.scripts, [], self.owner, self.lock_ms)
        try:
            for projection in self.projections:
                lock = self.keys.replay_lock(projection.name)
                if not self.redis.set(lock, self.owner, nx=True, px=self.lock_ms):
                    raise RepartitionRefused(
                        f"a replay of {projection.name} is running; try again when it is done"
                    )
                taken.append(lock)
                keeper.keys.append(lock)
            for projection in self.projections:
                pause = self.keys.pause(projection.name)
                self.redis.set(pause, self.owner, px=self.lock_ms)
                taken.append(pause)
                keeper.keys.append(pause)
            keeper.start()
            yield
        finally:
            keeper.done.set()
            with contextlib.suppress(redis.RedisError):
                self.scripts.run(
                    [self.scripts.command("release_lease", [key], [self.owner]) for key in taken]
                )

    def wait_for_workers(self, stop: threading.Event | None = None) -> None:
        """Live workers see the pause flags at their next batch and give their leases
        back; a frozen worker's lease expires. Bounded like a replay's switch."""
        partitions = max(self.before or 0, self.target)
        leases = [self.keys.lease(p.name, n) for p in self.projections for n in range(partitions)]
        deadline = time.monotonic() + self.settings.projector_lease_ms / 1000 * 2 + 5
        while any(round_trip(self.redis, [("EXISTS", lease) for lease in leases])):
            if stop is not None and stop.is_set():
                raise RepartitionInterrupted("repartition interrupted; nothing was changed")
            if time.monotonic() > deadline:
                raise RepartitionRefused(
                    "live workers did not release their leases; nothing was changed"
                )
            time.sleep(0.02)

    # --- 3. the switch of the streams ---------------------------------------------------

    def switch_streams(self) -> int:
        """Steps 3a-3e of the module docstring; the number of stream keys deleted. The
        caller holds its fence around it."""
        keys, target = self.keys, self.target
        self.redis.hset(keys.meta(), mapping={"origin": "partial", REPARTITION: target})
        self.redis.delete(*[keys.projection_state(p.name) for p in self.projections])
        removed = unlink_pattern(self.redis, keys.stream_pattern())
        # redis-py's pipeline: it knows where XGROUP's key is (on a cluster too).
        pipe = self.redis.pipeline(transaction=False)
        for projection in self.projections:
            for n in range(target):
                pipe.xgroup_create(keys.stream(n), projection.name, id="0", mkstream=True)
        for reply in pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply
        self.redis.hset(keys.meta(), PARTITIONS, target)
        return removed

    # --- 4. rebuild ------------------------------------------------------------------------

    def rebuild(
        self,
        projection: Projection,
        *,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> ReplayResult:
        """One projection from the log into a new generation, under the lock held since
        `hold` (the replay releases it, and the pause flag, when it switches)."""
        replayer = Replayer(
            self.redis, self.settings, projection, self.database_url, replay_id=self.owner
        )
        return replayer.run("log", progress=progress, stop=stop)

    # --- 5. finish -------------------------------------------------------------------------

    def finish(self) -> int:
        """Drop the marker and any stream outside the new count; how many were deleted."""
        inside = {self.keys.stream(n) for n in range(self.target)}
        outside = unlink_pattern(
            self.redis,
            self.keys.stream_pattern(),
            keep=lambda key: (key.decode() if isinstance(key, bytes) else key) in inside,
        )
        self.redis.hdel(self.keys.meta(), REPARTITION)
        return outside
