"""The projector worker: consumer groups, partition leases, batches, recovery.

Work is split into *slots*, one per (projection, partition stream). A slot is processed
by exactly one worker at a time, which holds its lease (a Redis key with a TTL, renewed
while the worker lives). That is how several worker processes share the work while the
events of one aggregate (all in one partition) are still applied one at a time, in
stream order. Each projection has its own consumer group on every partition stream.

A worker that dies loses its leases when they expire; whoever takes a slot over first
claims every entry still pending in that slot's group (XAUTOCLAIM, min-idle 0: holding
the lease proves the previous owner is gone) and applies them before reading new ones.
Applying is idempotent (version gates), so an entry the dead worker had applied but not
acknowledged changes nothing the second time.

An entry that fails stays pending and is retried after a short idle time (XPENDING IDLE
+ XCLAIM, which counts deliveries); after `max_deliveries` it moves to the projection's
dead-letter stream and is acknowledged, so a poison event never stops a projection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import redis

from cqrs.events import PAYLOAD_TYPES, EventError
from cqrs.keys import KeyMap, ViewKeys
from cqrs.projector.deadletters import DeadLetter, file_dead_letters
from cqrs.projector.leases import Leases
from cqrs.projector.projection import ParseOnce, Projection
from cqrs.projector.repair import Repairs
from cqrs.projector.scripts import Scripts
from cqrs.projector.state import live_generation
from cqrs.projector.steps import Step, run_steps
from cqrs.redisio import Subscription, hash_fields, publish, publish_command, round_trip
from cqrs.settings import Settings
from cqrs.startup import EvictionWatch
from cqrs.streams import parse_entry_id, stream_partitions

log = logging.getLogger(__name__)

# Commands per projection in `_status_commands`.
_STATUS_COMMANDS = 5
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


class WorkerMetrics(Protocol):
    """What the worker reports to, once per batch (`cqrs.metrics.Metrics` implements it)."""

    def projected(
        self, applied: dict[tuple[str, str], int], failed: dict[str, int], seconds: float
    ) -> None: ...

    def dead_lettered(self, projection: str, count: int) -> None: ...

    def reconnected(self, component: str) -> None: ...

    def repaired(self, projection: str) -> None: ...


@dataclass
class Slot:
    projection: Projection
    partition: int
    stream: str
    lease: str
    # Taken over (or its group recreated, or the connection lost): the pending entries
    # are claimed, page by page from `cursor`, before new ones are read.
    recovering: bool = True
    cursor: str = "-"
    # When entries that failed are due for another delivery (monotonic seconds); None
    # while nothing waits.
    retry_at: float | None = None


@dataclass
class Entry:
    slot: Slot
    entry_id: str
    fields: dict[str, str] | None  # None: the entry was trimmed/deleted while pending


@dataclass
class WorkerStats:
    batches: int = 0
    applied: int = 0
    duplicates: int = 0
    acked: int = 0
    failed: int = 0
    dead_lettered: int = 0
    skipped: int = 0


def _as_dict(flat: Any) -> dict[str, str] | None:
    """Entry fields from a raw reply: a flat [field, value, ...] list (RESP2), a dict
    (RESP3), or None for an entry that no longer exists."""
    if flat is None or type(flat) is dict:
        return flat
    it = iter(flat)
    return dict(zip(it, it, strict=False))  # Redis sends fields as pairs, always


class Worker:
    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        projections: Iterable[Projection],
        consumer: str | None = None,
        *,
        database_url: str | None = None,
    ) -> None:
        self.redis = client
        self.database_url = database_url
        self.active: set[str] = set()
        self.needs_build: set[str] = set()
        self.rebuilding: set[str] = set()
        self._newer_warned: set[str] = set()
        self.newer: set[str] = set()  # built by a newer release: not ours to touch
        self.settings = settings
        self.keys = KeyMap(settings.namespace)
        self.scripts = Scripts(client)
        self.projections = list(projections)
        # Per projection, the known event types it has no handler for (`Projection.skips`).
        self._skipped = {
            p.name: frozenset(t for t in PAYLOAD_TYPES if p.skips(t)) for p in self.projections
        }
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.leases = Leases(
            client, self.keys, self.scripts, self.consumer, settings.projector_lease_ms
        )
        self.partitions = stream_partitions(client, self.keys, settings.partitions)
        self.owned: dict[tuple[str, int], Slot] = {}
        self.views: dict[str, ViewKeys] = {}
        self.stats = WorkerStats()
        self._last_maintenance = 0.0
        self._pubsub: Subscription | None = None
        # Last error per pending entry, carried into its dead letter.
        self._last_errors: dict[tuple[str, str, str], str] = {}
        self._stuck_reads = 0  # reads in a row with entries and no progress
        # Says so loudly if Redis starts evicting while we run (a start on an evicting
        # Redis is refused by the entry points, `cqrs.startup`).
        self.eviction_watch = EvictionWatch(
            client, every=settings.eviction_check_seconds, allowed=settings.allow_eviction
        )
        # Instrumentation: None = metrics off (the hot path then only skips a branch).
        self.metrics: WorkerMetrics | None = None
        self._batch_applied: dict[tuple[str, str], int] = {}
        self._batch_failed: dict[str, int] = {}
        self._log = {"consumer": self.consumer}
        # Failover check and repairs (projector/repair.py): they need the log to rebuild.
        self.repairs = (
            Repairs(client, self.scripts, settings, database_url, self.projections, self._log)
            if database_url
            else None
        )
        self.repair_flags: dict[str, str] = {}  # projection -> the change its flag names

    # --- leases ------------------------------------------------------------------------

    def _all_slots(self) -> list[tuple[Projection, int]]:
        """Slots of the projections live workers may touch now."""
        return [
            (p, n)
            for p in self.projections
            if p.name in self.active
            for n in range(self.partitions)
        ]

    def _fair_share(self, drain: bool) -> int:
        total = len(self._all_slots())
        if drain:
            return total
        return self.leases.fair_share((p.name for p in self.projections), total)

    def refresh_status(self) -> None:
        """Which projections live workers may touch right now: a projection with no valid
        views must first be built, and a paused one is being switched to a new generation
        by a replay. Slots of those are given back at once. In the steady state this
        rides along with every batch's read (`_read`), costing no round trip of its own."""
        self._apply_status(round_trip(self.redis, self._status_commands()))

    def _status_commands(self) -> list[tuple[Any, ...]]:
        """Per projection: its state hash, its pause flag, its replay lock, the
        generation key queries read and its repair flag (`_STATUS_COMMANDS` of them)."""
        commands: list[tuple[Any, ...]] = []
        for projection in self.projections:
            commands += [
                ("HGETALL", self.keys.projection_state(projection.name)),
                ("EXISTS", self.keys.pause(projection.name)),
                ("EXISTS", self.keys.replay_lock(projection.name)),
                ("GET", self.keys.generation(projection.name)),
                ("GET", self.keys.repair(projection.name)),
            ]
        # Last: the partition count, which `cqrs repartition` changes (`_apply_status`).
        commands.append(("HGET", self.keys.meta(), "partitions"))
        return commands

    def _apply_status(self, results: list[Any]) -> None:
        for result in results:
            if isinstance(result, Exception):
                raise result
        self.active.clear()
        self.needs_build.clear()
        self.rebuilding.clear()
        self.newer.clear()
        self.repair_flags.clear()
        for i, projection in enumerate(self.projections):
            n = _STATUS_COMMANDS * i
            raw_state, paused, replaying, served, repair = results[n : n + _STATUS_COMMANDS]
            if repair is not None:
                self.repair_flags[projection.name] = repair
            state = hash_fields(raw_state)  # a dict (RESP3) or a flat list (RESP2)
            name = projection.name
            built = int(state.get("version", 0)) if state.get("generation") else 0
            if replaying:
                self.rebuilding.add(name)
            if built > projection.version:
                # A newer release built these views (rolling deploy): an older worker
                # stays out of the way instead of rebuilding them back.
                if name not in self._newer_warned:
                    log.warning(
                        "%s views are version %d, this worker has %d: skipping it",
                        name,
                        built,
                        projection.version,
                    )
                    self._newer_warned.add(name)
                self.newer.add(name)
                continue
            if built != projection.version:
                self.needs_build.add(name)
            elif not paused and repair is None:
                # Flagged after a failover: left alone, like a paused one, until it is
                # rebuilt (projector/repair.py says why).
                self.active.add(name)
                self.views[name] = self.keys.views(name, int(state["generation"]))
                if served is None and not replaying:
                    self._restore_generation_key(name, state["generation"])
        stored = results[-1]
        if stored is not None and int(stored) != self.partitions:
            # `cqrs repartition` replaced the streams: leave every slot (this read's
            # entries stay unapplied) and take slots of the new streams from now on.
            log.warning(
                "the partition count changed from %d to %s: following it",
                self.partitions,
                stored,
                extra={**self._log},
            )
            self.partitions = int(stored)
            self.active.clear()
        for key, slot in list(self.owned.items()):
            if slot.projection.name not in self.active:
                self._release(slot)
                del self.owned[key]

    def _restore_generation_key(self, name: str, generation: str) -> None:
        """The state hash records live views but the key queries read is gone (a crash
        between the two writes of `write_state`, or a stray DEL): queries would find no
        views while we keep them up to date. Restore it from the state hash. SET NX, so
        a replay switching meanwhile (it writes the key after the hash, plainly) always
        has the last word."""
        if self.redis.set(self.keys.generation(name), generation, nx=True):
            log.warning(
                "%s: %s was missing; restored it to generation %s from %s",
                name,
                self.keys.generation(name),
                generation,
                self.keys.projection_state(name),
                extra={**self._log, "projection": name},
            )

    def maintain(self, *, drain: bool = False, force: bool = False, status: bool = True) -> None:
        """Heartbeat, renew held leases, take free slots up to a fair share, give back extras.
        `status=False`: the projections' status is taken as the last read left it."""
        if status:
            self.refresh_status()
        lease_ms = self.settings.projector_lease_ms
        if not force and (time.monotonic() - self._last_maintenance) * 1000 < lease_ms / 3:
            return
        self._last_maintenance = time.monotonic()
        slots = list(self.owned.values())
        renewed = self.leases.beat_and_renew(
            [p.name for p in self.projections], [slot.lease for slot in slots]
        )
        for slot, ours in zip(slots, renewed, strict=True):
            if not ours:
                log.warning(
                    "lost lease on %s partition %d",
                    slot.projection.name,
                    slot.partition,
                    extra={
                        **self._log,
                        "projection": slot.projection.name,
                        "partition": slot.partition,
                    },
                )
                self.owned.pop((slot.projection.name, slot.partition), None)

        share = self._fair_share(drain)
        for projection, partition in self._all_slots():
            if len(self.owned) >= share:
                break
            if (projection.name, partition) in self.owned:
                continue
            lease = self.keys.lease(projection.name, partition)
            if self.leases.take(lease):
                self._take(projection, partition, lease)
        while len(self.owned) > share:
            key, slot = next(reversed(self.owned.items()))
            self._release(slot)
            del self.owned[key]

    def build_missing(self, stop: threading.Event) -> bool:
        """Build, from history, every projection of ours that has no valid views (new,
        version bumped, or Redis lost its data) and that nobody else is building.
        Returns True when a build ran (or another worker's build was found done)."""
        from cqrs.projector.replay import AlreadyBuilt, Replayer, ReplayError

        ran = False
        for projection in self.projections:
            name = projection.name
            if name not in self.needs_build or name in self.rebuilding or stop.is_set():
                continue
            if self.database_url is None:
                log.error(
                    "%s has no views and no database is configured to build them",
                    name,
                    extra={**self._log, "projection": name},
                )
                continue
            # A repair flag raised before this build began asks for nothing more.
            change = self.repair_flags.get(name)
            try:
                # `needs_build` may be stale by now (another worker may have built it while
                # we built another projection): the replayer checks again under its lock.
                result = Replayer(self.redis, self.settings, projection, self.database_url).run(
                    "auto", stop=stop, only_if_invalid=True
                )
                if change is not None and self.repairs is not None:
                    self.repairs.finish(projection, change, self.partitions, self.reapply)
                log.info(
                    "built %s from the %s: %d events in %.1fs",
                    name,
                    result.source,
                    result.events,
                    result.seconds,
                    extra={**self._log, "projection": name, "events": result.events},
                )
                ran = True
            except AlreadyBuilt:
                log.info(
                    "%s was built by another worker meanwhile",
                    name,
                    extra={**self._log, "projection": name},
                )
                ran = True  # refresh the status below
            except ReplayError as exc:
                log.warning(
                    "could not build %s now: %s", name, exc, extra={**self._log, "projection": name}
                )
            except psycopg.OperationalError as exc:
                log.warning(
                    "could not build %s now (PostgreSQL): %s",
                    name,
                    exc,
                    extra={**self._log, "projection": name},
                )
        if ran:
            self.refresh_status()
        return ran

    def repair_views(self, stop: threading.Event) -> bool:
        """Rebuild from the log every projection of ours flagged after a Redis failover
        (projector/repair.py) that has views (one without is built from scratch) and
        that no replay is building, at most one try per check interval each; True when
        one was rebuilt."""
        if self.repairs is None:
            return False
        ran = False
        for projection in self.projections:
            name = projection.name
            change = self.repair_flags.get(name)
            if change is None or name in self.rebuilding:
                continue
            if name in self.needs_build or name in self.newer:
                continue  # a build from scratch settles it; a newer release's views
            if stop.is_set() or not self.repairs.due(name):
                continue
            self.release_all()  # the rebuild's switch waits for every lease of it
            if self.repairs.run(projection, change, self.partitions, stop, self.reapply):
                ran = True
                if self.metrics is not None:
                    self.metrics.repaired(name)
        if ran:
            self.refresh_status()
        return ran

    def _take(self, projection: Projection, partition: int, lease: str) -> None:
        stream = self.keys.stream(partition)
        self._ensure_group(stream, projection.name)
        self.owned[(projection.name, partition)] = Slot(projection, partition, stream, lease)
        log.debug(  # one line per slot: `cqrs run` logs a summary instead
            "took %s partition %d",
            projection.name,
            partition,
            extra={**self._log, "projection": projection.name, "partition": partition},
        )

    def _ensure_group(self, stream: str, group: str) -> None:
        # From the beginning of the stream, never "$": a new (or recreated) group must see
        # every event the stream still holds; gates make the re-applied ones no-ops.
        try:
            self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _release(self, slot: Slot) -> None:
        self.leases.release(slot.lease)

    def release_all(self) -> None:
        self.leases.leave(
            [p.name for p in self.projections], [slot.lease for slot in self.owned.values()]
        )
        self.owned.clear()

    # --- reading -----------------------------------------------------------------------

    def _read(self) -> list[Entry]:
        """One packed read over every owned slot; non-blocking (the caller waits for a
        wake-up when idle).

        Per slot, in this order of precedence:
        - recovering (just taken over, group recreated, reconnected): the next page of the
          group's pending entries idle for at least the retry delay, followed by a cursor
          to the end of the list, before any new entry (an earlier owner's entries come
          before later ones of the same aggregates). New entries are read again as soon
          as the scan reaches the end.
        - otherwise new entries (XREADGROUP >), always, so a slot whose old entries keep
          failing never starves; and, once the retry delay of its failed entries has
          passed, the ones idle that long. A later event of an aggregate whose earlier one
          is still failing fails its version gate and waits (or is parked) behind it.
        Every redelivery, recovery included, goes through `_claim_pending`, which counts
        deliveries and dead-letters at `projector_max_deliveries`."""
        if not self.owned:
            return []
        slots = list(self.owned.values())
        now = time.monotonic()
        count = self._per_slot_count(len(slots))
        delay = self.settings.projector_retry_delay_ms
        commands = self._status_commands()
        plan: list[tuple[Slot, str]] = []
        for slot in slots:
            stream, group = slot.stream, slot.projection.name
            if slot.recovering:
                commands.append(("XPENDING", stream, group, "IDLE", delay, slot.cursor, "+", count))
                plan.append((slot, "recover"))
                continue
            if slot.retry_at is not None and slot.retry_at <= now:
                commands.append(("XPENDING", stream, group, "IDLE", delay, "-", "+", count))
                commands.append(("XPENDING", stream, group))
                plan += [(slot, "retry"), (slot, "left")]
            commands.append(self._xreadgroup(slot, count))
            plan.append((slot, "new"))
        results = round_trip(self.redis, commands)
        n_status = _STATUS_COMMANDS * len(self.projections) + 1  # + the partition count
        # The status comes in the same round trip: entries of a projection that is no
        # longer active (paused for a switch, to be rebuilt) are left pending, unapplied;
        # whoever holds the slot next claims them (a slot is taken over "recovering").
        self._apply_status(results[:n_status])
        claimed: list[Entry] = []
        new: list[Entry] = []
        gone: set[int] = set()
        due: dict[int, list[list[Any]]] = {}
        for (slot, kind), result in zip(plan, results[n_status:], strict=True):
            if slot.projection.name not in self.active or id(slot) in gone:
                continue
            if isinstance(result, Exception):
                if "NOGROUP" not in str(result):
                    raise result
                gone.add(id(slot))
                self._group_gone(slot)
                continue
            if kind == "recover":
                rows = result or []
                if len(rows) < count:
                    # The scan reached the end. Entries it passed over had failed less
                    # than the retry delay ago: they wait for it like any other retry.
                    slot.recovering, slot.cursor = False, "-"
                    slot.retry_at = now + delay / 1000
                else:
                    slot.cursor = f"({rows[-1][0]}"
                if rows:
                    claimed += self._claim_pending(slot, rows)
            elif kind == "retry":
                due[id(slot)] = result or []
            elif kind == "left":
                # Entries still pending beyond the ones due now are not idle long enough
                # yet: look again once they are. A full page may leave more due at once.
                rows = due.pop(id(slot), [])
                waiting = int(result[0] or 0) if result else 0
                if len(rows) >= count:
                    slot.retry_at = now
                elif waiting > len(rows):
                    slot.retry_at = now + delay / 1000
                else:
                    slot.retry_at = None
                if rows:
                    claimed += self._claim_pending(slot, rows)
            else:
                new += self._entries(slot, result)
        # Redelivered entries first: a retry that succeeds now lets the same aggregate's
        # later events in this batch pass their gates.
        return claimed + new

    def _per_slot_count(self, slots: int) -> int:
        """Entries one batch reads per slot: `projector_batch_size`, or an equal share of
        `projector_batch_max` when the worker holds many slots. Leases are renewed between
        batches, so a batch of every slot's full page (64 slots x 500 = 32,000 entries)
        could outlast its leases on a loaded machine and hand its slots to another worker
        midway (seen in the cluster benchmark)."""
        settings = self.settings
        return max(1, min(settings.projector_batch_size, settings.projector_batch_max // slots))

    def _xreadgroup(self, slot: Slot, count: int) -> tuple[Any, ...]:
        return ("XREADGROUP", "GROUP", slot.projection.name, self.consumer, "COUNT",
                count, "STREAMS", slot.stream, ">")  # fmt: skip

    @staticmethod
    def _entries(slot: Slot, result: Any) -> list[Entry]:
        """Entries of one raw XREADGROUP reply: RESP3 {stream: rows}, RESP2 [[stream, rows]]."""
        entries: list[Entry] = []
        if not result:
            return entries
        append = entries.append
        for rows in result.values() if isinstance(result, dict) else (r[1] for r in result):
            for entry_id, flat in rows:
                if flat is None or type(flat) is dict:
                    append(Entry(slot, entry_id, flat))
                else:  # `_as_dict`, inlined: this runs once per delivery
                    it = iter(flat)
                    append(Entry(slot, entry_id, dict(zip(it, it, strict=False))))
        return entries

    def _group_gone(self, slot: Slot) -> None:
        """NOGROUP from any call of a slot: Redis restarted, flushed or lost the key. The
        group is recreated from the start of the stream (never `$`, which would skip what
        it holds), loudly; its entries are delivered again with fresh delivery counts,
        and the version gates make the re-applied ones no-ops."""
        log.error(
            "consumer group %s on %s is gone (Redis restarted or flushed?); "
            "recreating it from the start of the stream",
            slot.projection.name,
            slot.stream,
            extra={**self._log, "projection": slot.projection.name, "stream": slot.stream},
        )
        self._ensure_group(slot.stream, slot.projection.name)
        slot.recovering, slot.cursor, slot.retry_at = True, "-", None

    def _claim_pending(self, slot: Slot, rows: list[list[Any]]) -> list[Entry]:
        """Take pending entries (raw XPENDING rows: id, consumer, idle ms, deliveries) for
        another delivery, or dead-letter the ones delivered `projector_max_deliveries`
        times already. The one path every redelivery takes (recovery, retries), so none
        can redeliver an entry forever.

        XCLAIM with min-idle 0: holding the slot's lease makes its whole pending list
        ours, and XCLAIM counts the delivery. An entry that no longer exists in the
        stream (trimmed or deleted while pending) comes back empty, or not at all
        (Redis >= 7 drops it from the list): it becomes an entry with no fields, which
        is acknowledged away."""
        limit = self.settings.projector_max_deliveries
        exhausted = {str(r[0]): int(r[3]) for r in rows if int(r[3]) >= limit}
        retry = [str(r[0]) for r in rows if str(r[0]) not in exhausted]
        stream, group = slot.stream, slot.projection.name
        commands: list[tuple[Any, ...]] = []
        if retry:
            commands.append(("XCLAIM", stream, group, self.consumer, 0, *retry))
        commands += [("XRANGE", stream, eid, eid) for eid in exhausted]
        replies = round_trip(self.redis, commands)
        for reply in replies:
            if isinstance(reply, Exception):
                if "NOGROUP" not in str(reply):
                    raise reply
                self._group_gone(slot)
                return []
        entries: list[Entry] = []
        if retry:
            found = {str(eid): flat for eid, flat in replies[0] or []}
            entries = [Entry(slot, eid, _as_dict(found.get(eid))) for eid in retry]
            replies = replies[1:]
        if exhausted:
            letters = {
                eid: _as_dict(rows[0][1]) if rows else {}
                for eid, rows in zip(exhausted, replies, strict=True)
            }
            self._dead_letter(slot, letters, exhausted)
        return entries

    def _dead_letter(
        self, slot: Slot, letters: dict[str, dict[str, str] | None], deliveries: dict[str, int]
    ) -> None:
        name = slot.projection.name
        errors = {
            eid: self._last_errors.pop((name, slot.stream, eid), "failed repeatedly")
            for eid in letters
        }
        file_dead_letters(
            self.redis, self.keys, name, slot.stream, letters, deliveries, errors, self._log
        )
        self.stats.dead_lettered += len(letters)
        if self.metrics is not None:
            self.metrics.dead_lettered(name, len(letters))

    # --- applying ----------------------------------------------------------------------

    def reapply(self, projection: Projection, letters: list[DeadLetter]) -> list[str | None]:
        """Apply dead letters again, oldest first, in one batch; the error per letter (None
        when it applied or was already applied)."""
        generation = live_generation(self.redis, self.keys, projection.name)
        self.views[projection.name] = self.keys.views(projection.name, generation)
        per_event: list[list[Step]] = []
        errors: list[str | None] = []
        for letter in letters:
            try:
                per_event.append(projection.steps(letter.fields, self.views[projection.name]) or [])
                errors.append(None)
            except Exception as exc:
                per_event.append([])
                errors.append(f"{type(exc).__name__}: {exc}")
        outcome = run_steps(self.redis, self.scripts, per_event)
        results = [e1 or e2 for e1, e2 in zip(errors, outcome.errors, strict=True)]
        if any(r is None for r in results):
            publish(self.redis, self.keys.applied_channel(), len(results))
        return results

    def process(self, entries: list[Entry]) -> None:
        errors: list[str | None] = []  # per entry: why it could not even be turned into steps
        handled: list[bool] = []  # instrumentation: the projection handles the event type
        views = self.views
        parse = ParseOnce()  # an entry two projections handle is parsed once per batch

        skipped = self._skipped
        stats = self.stats

        def per_event() -> Iterator[list[Step]]:
            # A generator: run_steps sends the first steps while later entries are parsed.
            for entry in entries:
                fields = entry.fields
                if fields is None:
                    errors.append(None)  # trimmed while pending: nothing left to apply
                    handled.append(False)
                    yield []
                    continue
                projection = entry.slot.projection
                if fields.get("type") in skipped[projection.name]:
                    # Most deliveries (every group reads every event of its partitions):
                    # acknowledged unparsed, without a call (`Projection.skips`).
                    errors.append(None)
                    stats.skipped += 1
                    handled.append(False)
                    yield []
                    continue
                try:
                    steps = projection.steps(fields, views[projection.name], parse)
                except EventError as exc:
                    errors.append(str(exc))
                    handled.append(False)
                    yield []
                    continue
                except Exception as exc:  # a handler bug must not stop the projection
                    errors.append(f"{type(exc).__name__}: {exc}")
                    handled.append(False)
                    yield []
                    continue
                errors.append(None)
                if steps is None:
                    self.stats.skipped += 1
                    handled.append(False)
                    yield []
                else:
                    handled.append(True)
                    yield steps

        # Waiters (`?after=`, `--after`) are woken behind every round, where the version
        # gates the round applied are written (round 1 for most events, round 2 for an
        # order's creation), and once more after the acknowledgements. A wake-up only
        # makes them look at the gates again, so an early one is never wrong, only sooner.
        early = publish_command(self.redis, self.keys.applied_channel(), len(entries))
        outcome = run_steps(self.redis, self.scripts, per_event(), after_each_round=early)
        self.stats.applied += outcome.applied
        self.stats.duplicates += outcome.duplicates
        acks: dict[tuple[str, str], list[str]] = {}
        # Instrumentation: the last acknowledged entry per slot (for the progress record)
        # and, with metrics on, counts per (projection, event type).
        last_acked: dict[tuple[str, str], Entry] = {}
        counting = self.metrics is not None
        applied_counts: dict[tuple[str, str], int] = {}
        failed_counts: dict[str, int] = {}
        last_errors = self._last_errors
        # Entries come slot by slot (one XREADGROUP reply each): look the slot's list up
        # only when the slot changes.
        current: Slot | None = None
        ids: list[str] = []
        for entry, parse_error, step_error, is_handled in zip(
            entries, errors, outcome.errors, handled, strict=True
        ):
            error = parse_error or step_error
            slot = entry.slot
            if error is None:
                if slot is not current:
                    current = slot
                    ids = acks.setdefault((slot.stream, slot.projection.name), [])
                ids.append(entry.entry_id)
                if last_errors:
                    last_errors.pop((slot.projection.name, slot.stream, entry.entry_id), None)
                if entry.fields is not None:
                    last_acked[(slot.projection.name, slot.stream)] = entry
                    if counting and is_handled:
                        key = (slot.projection.name, entry.fields.get("type", "?"))
                        applied_counts[key] = applied_counts.get(key, 0) + 1
            else:
                self.stats.failed += 1
                due = time.monotonic() + self.settings.projector_retry_delay_ms / 1000
                if slot.retry_at is None or slot.retry_at > due:
                    slot.retry_at = due
                self._last_errors[(slot.projection.name, slot.stream, entry.entry_id)] = error
                if counting:
                    name = slot.projection.name
                    failed_counts[name] = failed_counts.get(name, 0) + 1
                fields = entry.fields or {}
                log.warning(
                    "%s %s failed: %s",
                    slot.projection.name,
                    entry.entry_id,
                    error,
                    extra={
                        **self._log,
                        "projection": slot.projection.name,
                        "entry_id": entry.entry_id,
                        "event_id": fields.get("event_id"),
                        "event_type": fields.get("type"),
                    },
                )
        finish: list[tuple[Any, ...]] = []
        for (stream, group), ids in acks.items():
            finish.append(("XACK", stream, group, *ids))
            self.stats.acked += len(ids)
        if acks:
            finish.append(publish_command(self.redis, self.keys.applied_channel(), len(entries)))
            finish += self._progress_commands(last_acked)
            # Packed like the reads (`cqrs.redisio` says why); an error reply here is
            # raised as the Pipeline would.
            for reply in round_trip(self.redis, finish):
                if isinstance(reply, Exception):
                    raise reply
        self.stats.batches += 1
        self._batch_applied, self._batch_failed = applied_counts, failed_counts
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch of %d: %d applied, %d duplicates, %d acknowledged",
                len(entries),
                outcome.applied,
                outcome.duplicates,
                sum(len(ids) for ids in acks.values()),
                extra={
                    **self._log,
                    "entries": len(entries),
                    "applied": outcome.applied,
                    "duplicates": outcome.duplicates,
                    "failed": len(entries) - sum(len(ids) for ids in acks.values()),
                    "projections": sorted({name for _stream, name in acks}),
                },
            )

    def _progress_commands(self, last_acked: dict[tuple[str, str], Entry]) -> list[tuple[Any, ...]]:
        """Instrumentation for `cqrs status`: per projection, the event-log position of the
        latest entry this batch acknowledged and when. Several workers write the same hash,
        so it says "some worker made progress at `at_ms`"; the position is indicative."""
        now_ms = int(time.time() * 1000)
        best: dict[str, tuple[int, str]] = {}
        for (name, _stream), entry in last_acked.items():
            try:
                position = int((entry.fields or {}).get("position", 0))
            except ValueError:
                position = 0
            if name not in best or position > best[name][0]:
                best[name] = (position, entry.entry_id)
        return [
            ("HSET", self.keys.progress(name), "position", position, "entry", entry_id,
             "at_ms", now_ms)
            for name, (position, entry_id) in best.items()
        ]  # fmt: skip

    # --- loop --------------------------------------------------------------------------

    def run_once(self, *, drain: bool = False) -> int:
        """Maintain leases, read one batch over all owned slots, apply it; returns the
        number of entries handled."""
        # With slots in hand, the status comes with the read; without, it is needed now
        # to take slots at all.
        self.maintain(drain=drain, status=not self.owned)
        started = time.perf_counter()
        entries = self._read()
        if entries:
            self.process(entries)
            if self.metrics is not None:
                self.metrics.projected(
                    self._batch_applied, self._batch_failed, time.perf_counter() - started
                )
        return len(entries)

    def caught_up(self) -> bool:
        """Every group of every projection has read its whole stream and has nothing
        pending (dead letters are acknowledged, so they do not hold this up), and no
        projection waits to be rebuilt after a failover (checked here too, when due)."""
        if self.repairs is not None:
            self.repairs.poll()
        self.refresh_status()
        if len(self.active) + len(self.newer) < len(self.projections):
            return False  # something is being built or switched
        pipe = self.redis.pipeline(transaction=False)
        pairs = self._all_slots()
        for _projection, partition in pairs:
            pipe.xinfo_groups(self.keys.stream(partition))
            pipe.xinfo_stream(self.keys.stream(partition))
        results = pipe.execute(raise_on_error=False)
        for i, (projection, _partition) in enumerate(pairs):
            groups, info = results[2 * i], results[2 * i + 1]
            if isinstance(info, Exception) or isinstance(groups, Exception):
                continue  # no stream yet: nothing to project there
            group = next((g for g in groups if g["name"] == projection.name), None)
            if info["length"] and group is None:
                return False
            if group is None:
                continue
            behind = parse_entry_id(group["last-delivered-id"]) < parse_entry_id(
                info["last-generated-id"]
            )
            if group["pending"] or behind:
                return False
        return True

    def _wait_for_work(self, stop: threading.Event, timeout: float) -> None:
        if self._pubsub is None:
            self._pubsub = Subscription(self.redis, self.keys.relay_wakeup_channel())
        deadline = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < deadline:
            message = self._pubsub.get_message(
                timeout=min(0.2, max(deadline - time.monotonic(), 0))
            )
            if message is not None:
                # Drain whatever else queued up so one burst means one wake-up.
                while self._pubsub.get_message(timeout=0) is not None:
                    pass
                return

    def _idle_wait(self, drain: bool) -> float:
        """How long an idle worker waits for a wake-up: until its earliest failed entry is
        due again, at most the block time (shorter when draining, whose end is checked
        by polling), and never past the lease renewal period (a lease shorter than the
        block time would lapse while idle)."""
        wait = self.settings.projector_block_ms / 1000
        if drain:
            wait = min(wait, max(self.settings.projector_retry_delay_ms, 100) / 1000)
        due = [s.retry_at for s in self.owned.values() if s.retry_at is not None]
        if due:
            wait = min(wait, max(min(due) - time.monotonic(), 0.0))
        return min(wait, self.settings.projector_lease_ms / 3000)

    def _check_progress(self, handled: int, progress_before: int) -> float:
        """The busy-loop guard: the seconds to back off after this read (0: none).

        Every redelivery path is bounded (retry delay, max deliveries), so a worker that
        keeps reading entries and applies, acknowledges and dead-letters none of them
        has hit a loop nobody foresaw. Rather than burn a core and hammer Redis, it backs
        off (doubling up to 5 s), says why once in the log, and leaves the reason in the
        projections' progress records for `cqrs status`; both clear on the next progress.
        Reads that find nothing are idle, not stuck: they wait for a wake-up anyway."""
        if not handled:
            return 0.0
        if self.stats.acked + self.stats.dead_lettered > progress_before:
            if self._stuck_reads >= self.settings.projector_stuck_reads:
                log.warning("making progress again", extra={**self._log})
                self._report_stuck(None)
            self._stuck_reads = 0
            return 0.0
        self._stuck_reads += 1
        over = self._stuck_reads - self.settings.projector_stuck_reads
        if over < 0:
            return 0.0
        if over == 0:
            reason = (
                f"no progress in {self._stuck_reads} reads in a row (every entry read failed "
                f"and none was dead-lettered): backing off; last error: "
                f"{next(reversed(self._last_errors.values()), 'unknown')}"
            )
            log.error(reason, extra={**self._log})
            self._report_stuck(reason)
        return min(0.1 * 2 ** min(over, 6), 5.0)

    def _report_stuck(self, reason: str | None) -> None:
        names = {slot.projection.name for slot in self.owned.values()} or {
            p.name for p in self.projections
        }
        commands: list[tuple[Any, ...]] = []
        for name in sorted(names):
            key = self.keys.progress(name)
            if reason is None:
                commands.append(("HDEL", key, "stuck", "stuck_consumer", "stuck_at_ms"))
            else:
                commands.append(
                    ("HSET", key, "stuck", reason, "stuck_consumer", self.consumer,
                     "stuck_at_ms", int(time.time() * 1000))
                )  # fmt: skip
        with contextlib.suppress(*_TRANSIENT):
            round_trip(self.redis, commands)

    def _pause(self, stop: threading.Event, seconds: float, drain: bool) -> None:
        """Back off without letting the leases lapse: a pause longer than the renewal
        period would lose every slot, and a slot taken back starts with its recovery
        scan, so a backing-off worker would never get as far as its new entries."""
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            stop.wait(min(left, self.settings.projector_lease_ms / 3000))
            self.maintain(drain=drain)

    def run(self, stop: threading.Event, *, drain: bool = False) -> None:
        """Project until `stop` is set (or, with `drain`, until everything is applied).
        Process-wide GC tuning is the entry point's (`cqrs.tuning.tune_gc`), not ours."""
        backoff = 0.1
        try:
            while not stop.is_set():
                try:
                    if self.repairs is not None and self.repairs.poll():
                        self.refresh_status()
                    if self.needs_build and self.build_missing(stop):
                        continue
                    if self.repair_flags and self.repair_views(stop):
                        continue
                    self.eviction_watch.poll()
                    progress_before = self.stats.acked + self.stats.dead_lettered
                    handled = self.run_once(drain=drain)
                    backoff = 0.1
                    pause = self._check_progress(handled, progress_before)
                    if pause:
                        self._pause(stop, pause, drain)
                        continue
                    if drain and not handled and self.caught_up():
                        return
                    if not handled:
                        self._wait_for_work(stop, self._idle_wait(drain))
                except _TRANSIENT as exc:
                    log.warning(
                        "redis unavailable (%s); retrying in %.1fs",
                        exc,
                        backoff,
                        extra={**self._log},
                    )
                    if self.metrics is not None:
                        self.metrics.reconnected("projector")
                    if self._pubsub is not None:
                        self._pubsub.close()
                    self._pubsub = None
                    if self.repairs is not None:
                        self.repairs.soon()  # a failover may be why
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    for slot in self.owned.values():
                        # Whatever was in flight is pending again: claim it first.
                        slot.recovering, slot.cursor = True, "-"
        finally:
            self.release_all()
            if self._pubsub is not None:
                self._pubsub.close()
