"""Views a Redis failover may have set back, and their repair.

Redis replicates asynchronously. A master can acknowledge view updates (and the XACKs of
their stream entries) and die before its replica has them: the promoted replica then
serves views whose versions went backwards while the entries that made them are
acknowledged, so nothing delivers them again. A view does not say that it lost an update,
but its master does say that its history changed: a promoted replica, or a master that
restarted without its data, starts a new replication id (`master_replid` in `INFO
replication`; the old one becomes `master_replid2`).

Detection (`Repairs.poll`): at start, after every reconnect and every
`projector_failover_check_seconds`, a worker asks every master for its replication id.
Ids this process has seen cost nothing more. An id new to it is looked up in PostgreSQL,
which never loses what it recorded (`events.redis_replids`, per namespace; Redis could
lose the record together with what it is about):
- no record for the namespace yet: a first run, recorded; nothing can have been lost
  before it (also what an upgrade to this release does once);
- recorded already: nothing to do;
- not recorded: the history changed. The worker whose INSERT records the id (another one
  racing it waits on the row and then finds it recorded) flags every projection for
  repair (`KeyMap.repair`, the value naming the new ids) and marks the streams' origin
  `partial` (they may have lost entries too, so replays read the log), before its
  transaction commits: a crash in between leaves the id unrecorded, for the next worker.

Repair (`Repairs.run`): every worker reads the flags with its status (no trip of its own)
and leaves a flagged projection alone, as it does a paused one: its live generation keeps
serving, frozen (applying to views that lost updates only piles up gaps), until the
rebuilt one replaces it. One worker gives its leases back and rebuilds the projection from
the PostgreSQL log into a new generation (`Replayer`, source `log`; it reads the streams
to their tails and moves the groups there at the switch). Then `finish`, while the flag
still keeps the other workers out:
- it acknowledges every entry still pending in the projection's groups: all were
  delivered before the switch, so the rebuild applied them (a malformed one, the replay
  dead-lettered itself). Left pending, one that had failed `projector_max_deliveries`
  times against the set-back views would be dead-lettered at its next claim without
  another try;
- it removes the flag, only if it still names the same change (a second failover
  meanwhile asks for another rebuild);
- it re-applies the projection's dead letters: a version the lost updates were missing
  made later events of the same aggregates fail their gates until they were
  dead-lettered; the rebuilt views hold them, so those letters are now applied or already
  applied, and go. Letters that still fail stay as they were.
A rebuild that cannot run now (PostgreSQL unreachable, another replay holding the lock) is
tried again after `projector_failover_check_seconds`. A projection whose state was lost
too (its views must be built from scratch, `Worker.build_missing`) is finished the same
way after that build, when a flag was raised before it began.

A worker frozen (SIGSTOP, a swap storm) across a whole repair can still file, when it
wakes, a dead letter of an entry it had claimed before: that letter stays (its event is
in the views; `cqrs dlq retry` removes it).

Why a rebuild and not a targeted re-apply: the keys of one aggregate's views sit on
several masters (an order's view, its customer's counters and name copy, the catalog
indexes); a master's slots hold a share of every projection; re-deriving only the
affected keys would need per-view logic that a rebuild, which `cqrs verify` already
proves, has for free. The cost is one replay per projection per failover. It is also
sometimes spent for nothing, never wrongly: a manual `CLUSTER FAILOVER`, a master added
to the cluster, or a restart that did keep its data all show a new replication id.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
import redis

from cqrs.keys import KeyMap
from cqrs.projector.deadletters import DeadLetter, drop_dead_letters, list_dead_letters
from cqrs.projector.projection import Projection
from cqrs.projector.replay import Replayer, ReplayError
from cqrs.projector.scripts import Scripts
from cqrs.redisio import is_cluster_client, round_trip
from cqrs.settings import Settings
from cqrs.urls import libpq_url

log = logging.getLogger(__name__)

_KNOWN = "SELECT replid FROM events.redis_replids WHERE namespace = %s"
_RECORD = """
    INSERT INTO events.redis_replids (namespace, replid) SELECT %s, unnest(%s::text[])
    ON CONFLICT DO NOTHING RETURNING replid
"""

Reapply = Callable[[Projection, list[DeadLetter]], list[str | None]]


def master_replids(client: redis.Redis) -> dict[str, str]:
    """Every master's address -> its replication id. On a cluster, the masters of the
    client's slot map, one INFO each; a master that does not answer refreshes the map
    and raises the connection error (the caller's back-off, then the next check)."""
    if not is_cluster_client(client):
        info = client.info("replication")
        where = client.connection_pool.connection_kwargs
        name = f"{where.get('host', '')}:{where.get('port', '')}".strip(":") or "redis"
        return {name: str(info["master_replid"])}
    found: dict[str, str] = {}
    for node in client.get_primaries():  # type: ignore[attr-defined]
        try:
            info = client.get_redis_connection(node).info("replication")  # type: ignore[attr-defined]
        except (redis.ConnectionError, redis.TimeoutError):
            with contextlib.suppress(redis.RedisError, OSError):
                client.nodes_manager.initialize()  # type: ignore[attr-defined]
            raise
        if info.get("role") == "master":
            found[node.name] = str(info["master_replid"])
    return found


class Repairs:
    """One worker's failover check and repairs (module docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        scripts: Scripts,
        settings: Settings,
        database_url: str,
        projections: Iterable[Projection],
        log_extra: dict[str, Any],
    ) -> None:
        self.redis = client
        self.scripts = scripts
        self.settings = settings
        self.keys = KeyMap(settings.namespace)
        self.database_url = database_url
        self.projections = list(projections)
        self.every = settings.projector_failover_check_seconds
        self._log = log_extra
        self._known: set[str] = set()  # ids recorded in PostgreSQL, as far as we know
        self._next_check = 0.0  # at start
        self._next_try: dict[str, float] = {}  # projection -> earliest next rebuild
        self.repaired = 0  # rebuilds done by this process

    # --- detection ---------------------------------------------------------------------

    def soon(self) -> None:
        """Check at the next poll (after a reconnect: a failover may be why)."""
        self._next_check = 0.0

    def poll(self, now: float | None = None) -> bool:
        """Check when due (otherwise one clock read); True when it flagged projections.
        Redis errors propagate (the worker backs off and calls `soon`); a PostgreSQL
        error is logged and the check tried again when next due."""
        now = time.monotonic() if now is None else now
        if now < self._next_check:
            return False
        self._next_check = now + self.every
        replids = master_replids(self.redis)
        if set(replids.values()) <= self._known:
            return False
        try:
            return self._record(replids)
        except psycopg.Error as exc:
            log.warning(
                "failover check: cannot read or record the Redis replication ids in "
                "PostgreSQL (%s); trying again in %.0fs",
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                self.every,
                extra=self._log,
            )
            return False

    def _record(self, replids: dict[str, str]) -> bool:
        current = set(replids.values())
        flagged = False
        with (
            psycopg.connect(libpq_url(self.database_url), autocommit=True) as conn,
            conn.transaction(),
        ):
            known = {r for (r,) in conn.execute(_KNOWN, (self.keys.ns,))}
            fresh = sorted(current - known)
            if fresh:
                recorded = [r for (r,) in conn.execute(_RECORD, (self.keys.ns, fresh))]
                if known and recorded:
                    nodes = sorted(node for node, r in replids.items() if r in recorded)
                    self._flag(",".join(recorded), nodes)
                    flagged = True
        self._known = known | current
        return flagged

    def _flag(self, change: str, nodes: list[str]) -> None:
        commands: list[tuple[Any, ...]] = [
            ("SET", self.keys.repair(p.name), change) for p in self.projections
        ]
        commands.append(("HSET", self.keys.meta(), "origin", "partial"))
        for reply in round_trip(self.redis, commands):
            if isinstance(reply, Exception):
                raise reply
        log.warning(
            "Redis master(s) %s started a new replication history (a failover, or a restart "
            "without its data): writes they acknowledged may be lost; rebuilding %s from "
            "the log",
            ", ".join(nodes),
            ", ".join(p.name for p in self.projections),
            extra={**self._log, "masters": nodes, "replids": change},
        )

    # --- repair ------------------------------------------------------------------------

    def due(self, name: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return now >= self._next_try.get(name, 0.0)

    def run(
        self,
        projection: Projection,
        change: str,
        partitions: int,
        stop: threading.Event,
        reapply: Reapply,
    ) -> bool:
        """Rebuild one flagged projection from the log and `finish`; True when done."""
        name = projection.name
        self._next_try[name] = time.monotonic() + self.every
        extra = {**self._log, "projection": name}
        try:
            result = Replayer(self.redis, self.settings, projection, self.database_url).run(
                "log", stop=stop
            )
        except ReplayError as exc:
            log.warning("could not rebuild %s after a failover now: %s", name, exc, extra=extra)
            return False
        except psycopg.OperationalError as exc:
            log.warning(
                "could not rebuild %s after a failover now (PostgreSQL): %s", name, exc, extra=extra
            )
            return False
        acked, settled, letters = self.finish(projection, change, partitions, reapply)
        self.redis.hincrby(self.keys.progress(name), "repairs", 1)
        self.repaired += 1
        log.warning(
            "rebuilt %s from the log after a Redis failover: %d events in %.1fs, generation "
            "%d; %d pending entries acknowledged (the rebuild applied them); %d of %d dead "
            "letter(s) now applied and removed",
            name,
            result.events,
            result.seconds,
            result.new_generation,
            acked,
            settled,
            letters,
            extra={**extra, "events": result.events, "acknowledged": acked,
                   "dead_letters_settled": settled},
        )  # fmt: skip
        return True

    def finish(
        self, projection: Projection, change: str, partitions: int, reapply: Reapply
    ) -> tuple[int, int, int]:
        """After a rebuild that began once the flag was up (module docstring): acknowledge
        what is pending in the projection's groups, remove the flag if it still names
        `change`, settle the dead letters. Returns (acknowledged, settled, letters)."""
        name = projection.name
        acked = sum(self._ack_pending(self.keys.stream(p), name) for p in range(partitions))
        self.scripts["release_lease"](keys=[self.keys.repair(name)], args=[change])
        letters = list_dead_letters(self.redis, self.keys, name)
        settled = settle_dead_letters(self.redis, self.keys, projection, letters, reapply)
        return acked, settled, len(letters)

    def _ack_pending(self, stream: str, group: str) -> int:
        acked = 0
        while True:
            try:
                rows = self.redis.xpending_range(stream, group, min="-", max="+", count=1000)
            except redis.ResponseError:
                return acked  # no stream or no group: nothing pending
            if not rows:
                return acked
            done = int(self.redis.xack(stream, group, *[row["message_id"] for row in rows]))
            if not done:
                return acked  # acknowledged meanwhile by someone else: nothing more to do
            acked += done


def settle_dead_letters(
    client: redis.Redis,
    keys: KeyMap,
    projection: Projection,
    letters: list[DeadLetter],
    reapply: Reapply,
) -> int:
    """Apply dead letters again on the live views and remove the ones that applied or
    were applied already; the others are left exactly as they were (this is not an
    operator's `dlq retry`, so it counts no delivery). Returns how many went."""
    if not letters:
        return 0
    results = reapply(projection, letters)
    done = [letter for letter, error in zip(letters, results, strict=True) if error is None]
    if done:
        drop_dead_letters(client, keys, projection.name, done)
    return len(done)
