"""Replay: build a projection's views from history into a new generation, then switch.

The live generation keeps serving (and live workers keep it current) while the new one is
built beside it under other keys, so no query ever sees a half-built or mixed view:

1. take the projection's replay lock (a second replay refuses) and allocate a generation
   number never used before; delete leftovers of generations that are neither live nor
   this one (an interrupted replay's keys) with SCAN + UNLINK in batches;
2. source: the streams from their first entry when they still hold the whole history,
   else the PostgreSQL event log (a consistent snapshot, in position order) followed by
   the streams from their first entry; events seen twice are no-ops for the version gates;
3. switch: raise the projection's pause flag (live workers finish their batch and leave
   the projection's slots), catch up with the streams' tails, move every consumer group
   to the last entry applied, write the new state (the generation key last: that single
   SET is the atomic switch for queries), drop the pause flag;
4. after a short grace period for reads in flight, delete the old generation's keys.

Interrupted at any point (SIGINT, SIGKILL), the live generation is untouched: the lock
and the pause flag expire, and the next replay cleans up what this one left.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import redis

from cqrs.eventlog import STREAM_FIELDS, STREAM_FIELDS_SQL
from cqrs.events import EventEnvelope
from cqrs.keys import KeyMap, ViewKeys
from cqrs.projector.deadletters import dead_letter_fields
from cqrs.projector.projection import Projection
from cqrs.projector.scripts import Scripts
from cqrs.projector.state import ProjectionState, live_generation, read_state, write_state
from cqrs.projector.steps import Step, run_steps
from cqrs.redisio import publish
from cqrs.settings import Settings
from cqrs.streams import stream_partitions
from cqrs.urls import libpq_url

# Columns of a log row as the replay selects it: the position, then STREAM_FIELDS.
_TYPE_FIELD = 1 + STREAM_FIELDS.index("type")
_OCCURRED_FIELD = 1 + STREAM_FIELDS.index("occurred_at")

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class ReplayError(Exception):
    """The replay did not run or did not finish; the live views are untouched."""


class ReplayInterrupted(ReplayError):
    pass


class AlreadyBuilt(ReplayError):
    """Nothing to build: another process gave the projection valid views meanwhile."""


@dataclass
class ReplayResult:
    projection: str
    source: str
    events: int
    seconds: float
    old_generation: int
    new_generation: int
    dead_lettered: int = 0
    removed_keys: int = 0

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "projection": self.projection,
            "source": self.source,
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.events_per_second, 1),
            "old_generation": self.old_generation,
            "new_generation": self.new_generation,
            "dead_lettered": self.dead_lettered,
            "removed_keys": self.removed_keys,
        }


def unlink_pattern(
    client: redis.Redis, pattern: str, keep: Callable[[str], bool] = lambda _k: False
) -> int:
    """Delete keys matching `pattern` in batches (SCAN + UNLINK; never KEYS, never one
    huge DEL, so Redis is not blocked and memory is freed in the background)."""
    removed = 0
    batch: list[str] = []
    for key in client.scan_iter(match=pattern, count=1000):
        if keep(key):
            continue
        batch.append(key)
        if len(batch) >= 500:
            removed += client.unlink(*batch)
            batch.clear()
    if batch:
        removed += client.unlink(*batch)
    return removed


def generation_of(key: str, projection_prefix: str) -> int | None:
    """The generation number in a view key `<ns>:<projection>:g<N>:...`."""
    rest = key[len(projection_prefix) :]
    digits = rest.split(":", 1)[0]
    return int(digits) if digits.isdigit() else None


def stream_holds_history(client: redis.Redis, keys: KeyMap, partitions: int) -> bool:
    """True when the streams still hold every event ever published: the relay recorded
    that they were started before anything was published, and nothing was ever trimmed
    or deleted from any of them since."""
    if client.hget(keys.meta(), "origin") != "complete":
        return False
    pipe = client.pipeline(transaction=False)
    for partition in range(partitions):
        pipe.xinfo_stream(keys.stream(partition))
    for info in pipe.execute(raise_on_error=False):
        if isinstance(info, redis.ResponseError):
            continue  # no stream: nothing published to that partition
        if isinstance(info, Exception):
            raise info
        # XTRIM (the relay's retention, MAXLEN or MINID) does not move
        # max-deleted-entry-id, only XDEL does (redis/redis#13473): compare the entries
        # ever added with the entries still there, which counts both.
        added = info.get("entries-added")
        if added is None or int(added) != int(info["length"]):
            return False
        deleted = info.get("max-deleted-entry-id")
        if deleted is None or str(deleted) != "0-0":
            return False
    return True


class _Keeper(threading.Thread):
    """Renews the replay lock (and the pause flag once raised) while the replay runs."""

    def __init__(self, replayer: Replayer) -> None:
        super().__init__(name=f"replay-keeper-{replayer.projection.name}", daemon=True)
        self.replayer = replayer
        self.done = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        r = self.replayer
        while not self.done.wait(r.lock_ms / 3000):
            try:
                held = r.scripts["renew_lease"](
                    keys=[r.keys.replay_lock(r.projection.name)], args=[r.replay_id, r.lock_ms]
                )
                if r.paused:
                    r.scripts["renew_lease"](
                        keys=[r.keys.pause(r.projection.name)], args=[r.replay_id, r.lock_ms]
                    )
                if not held:
                    self.lost.set()
                    return
            except (redis.ConnectionError, redis.TimeoutError):
                continue


class Replayer:
    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        projection: Projection,
        database_url: str | None,
        *,
        batch_size: int = 1000,
        replay_id: str | None = None,
    ) -> None:
        self.redis = client
        self.settings = settings
        self.keys = KeyMap(settings.namespace)
        self.scripts = Scripts(client)
        self.projection = projection
        self.database_url = database_url
        self.batch_size = batch_size
        # Who holds the lock. A caller that took the lock itself under this id (`cqrs
        # repartition` holds every projection's lock from before its switch of the streams
        # until that projection is rebuilt) passes it: the replay then runs under it.
        self.replay_id = replay_id or uuid.uuid4().hex
        self.lock_ms = max(settings.projector_lease_ms * 3, settings.replay_lock_ms)
        self.paused = False
        self.dead_lettered = 0
        # What the log part of a replay read, so the streams part counts only events it
        # did not already count: the streams hold the same events again (a replay "from the
        # log" reads the log, then the streams from their first entry). Positions up to
        # `_log_last` were read unless listed in `_log_gaps` (positions not visible in the
        # snapshot: rolled back, or committed after it); gaps are rare, so this stays small
        # where a set of every position read would not.
        self._log_last = 0
        self._log_gaps: set[int] = set()

    # --- the steps of one event --------------------------------------------------------

    def _apply(
        self, views: ViewKeys, items: list[tuple[str, str, dict[str, str] | EventEnvelope]]
    ) -> None:
        """Apply (source, entry id, stream fields or log event) items in order; failures
        are filed as dead letters, as the live worker would, and never stop the replay."""
        errors: list[str | None] = []
        projection = self.projection

        def per_event() -> Iterator[list[Step]]:
            # A generator: run_steps sends the first steps while later items are parsed.
            for _source, _entry_id, record in items:
                try:
                    steps = projection.steps(record, views)
                    errors.append(None)
                    yield steps or []
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc))
                    yield []

        outcome = run_steps(self.redis, self.scripts, per_event())
        failed = [
            (item, e1 or e2)
            for item, e1, e2 in zip(items, errors, outcome.errors, strict=True)
            if e1 or e2
        ]
        if failed:
            # A gap may only mean that Redis lost this generation's keys meanwhile: then
            # these events are not poison, and filing them would flood the dead letters.
            if not self._holds_lock():
                raise ReplayError(f"replay of {self.projection.name} lost its lock")
            pipe = self.redis.pipeline(transaction=False)
            for (source, entry_id, record), error in failed:
                fields = record.to_stream_fields() if isinstance(record, EventEnvelope) else record
                pipe.xadd(
                    self.keys.dead_letters(self.projection.name),
                    dead_letter_fields(self.projection.name, source, entry_id, fields, error, 1),
                )
            pipe.execute()
            self.dead_lettered += len(failed)

    # --- sources -----------------------------------------------------------------------

    def _replay_log(
        self, views: ViewKeys, progress: Progress, stop: threading.Event | None, keeper: _Keeper
    ) -> int:
        """Every event of the log visible now, in position order (per aggregate that is
        version order, and a customer's rename is after the orders it waited for)."""
        if not self.database_url:
            raise ReplayError("replaying from the log needs CQRS_DATABASE_URL")
        done = 0
        with psycopg.connect(libpq_url(self.database_url)) as conn:
            total = conn.execute("SELECT count(*) FROM events.event_log").fetchone()[0]
            progress(0, total)
            # A server-side cursor: one consistent snapshot, streamed in batches.
            with conn.cursor(name=f"replay_{self.replay_id}") as cursor:
                cursor.itersize = self.batch_size
                # Each row as the stream entry the relay publishes for it (the relay's
                # own SQL: every field as text), so a replay from the log parses it as the
                # live worker parses an entry, on the same fast path (docs/benchmarks.md,
                # "rebuild": an envelope per row ran at 0.79x the live worker).
                cursor.execute(
                    f"SELECT e.position, {STREAM_FIELDS_SQL} FROM events.event_log e"
                    " ORDER BY e.position"
                )
                while rows := cursor.fetchmany(self.batch_size):
                    self._check(stop, keeper)
                    items: list[tuple[str, str, dict[str, str] | EventEnvelope]] = []
                    for row in rows:
                        position = row[0]
                        if position > self._log_last + 1:
                            self._log_gaps.update(range(self._log_last + 1, position))
                        self._log_last = max(self._log_last, position)
                        # Rows of types the projection skips are not even turned into
                        # fields.
                        if self.projection.skips(row[_TYPE_FIELD]):
                            continue
                        fields = dict(zip(STREAM_FIELDS, row[1:], strict=True))
                        fields["occurred_at"] = row[_OCCURRED_FIELD].isoformat()
                        items.append(("log", fields["position"], fields))
                    self._apply(views, items)
                    done += len(rows)
                    progress(done, total)
        return done

    def _read_from_log(self, fields: dict[str, str]) -> bool:
        """The log part of this replay already read (and counted) this stream entry."""
        try:
            position = int(fields.get("position", ""))
        except ValueError:
            return False  # malformed: never in the log; it is counted (and dead-lettered)
        return position <= self._log_last and position not in self._log_gaps

    def _replay_streams(
        self,
        views: ViewKeys,
        last_ids: dict[int, str],
        progress: Progress,
        stop: threading.Event | None,
        keeper: _Keeper,
    ) -> int:
        """Every stream entry after `last_ids` (updated in place), partition by partition,
        until the tails as they are now. Returns the number of events among them that the
        log part of the replay had not read: each event is counted once."""
        done = 0
        for partition, last in last_ids.items():
            stream = self.keys.stream(partition)
            while True:
                self._check(stop, keeper)
                start = "-" if last == "0-0" else f"({last}"
                rows = self.redis.xrange(stream, start, "+", count=self.batch_size)
                if not rows:
                    break
                self._apply(views, [(stream, entry_id, fields) for entry_id, fields in rows])
                last = rows[-1][0]
                last_ids[partition] = last
                if self._log_last:
                    done += sum(not self._read_from_log(fields) for _id, fields in rows)
                else:
                    done += len(rows)
                progress(done, 0)
                if len(rows) < self.batch_size:
                    break
        return done

    def _holds_lock(self) -> bool:
        held = self.redis.get(self.keys.replay_lock(self.projection.name))
        return held in (self.replay_id, self.replay_id.encode())

    def _check(self, stop: threading.Event | None, keeper: _Keeper) -> None:
        """Before every batch and before the switch. The keeper notices a lost lock only
        when it next renews it (every lock_ms / 3); if Redis lost its data meanwhile
        (FLUSHALL, restart without persistence), the keys built so far are gone with the
        lock, and going on would switch to a generation missing all of them. One GET per
        batch closes that window."""
        if stop is not None and stop.is_set():
            raise ReplayInterrupted(f"replay of {self.projection.name} interrupted")
        if keeper.lost.is_set() or not self._holds_lock():
            raise ReplayError(f"replay of {self.projection.name} lost its lock")

    # --- generations -------------------------------------------------------------------

    def _allocate_generation(self, live: int) -> int:
        counter = self.keys.generation_counter(self.projection.name)
        new = int(self.redis.incr(counter))
        if new <= live:  # the counter was lost (Redis data loss) but views survived
            self.redis.set(counter, live + 1)
            new = live + 1
        return new

    def _remove_generations(self, keep: set[int]) -> int:
        prefix = f"{self.keys.ns}:{self.projection.name}:g"
        return unlink_pattern(
            self.redis,
            self.keys.projection_pattern(self.projection.name),
            keep=lambda key: generation_of(key, prefix) in keep,
        )

    def _remove_own_generation(self, generation: int) -> int:
        """Delete one generation this replay answers for (its old one after the switch,
        its unfinished new one after a failure), and only while it still holds the lock:
        a replay that lost it (stalled past the TTL, or Redis lost its data and with it the
        generation counter) may share generation numbers with the replay that holds it
        now. Anything left is removed by the next replay, under its lock."""
        if not self._holds_lock():
            log.warning(
                "replay of %s lost its lock; generation %d is left to the next replay",
                self.projection.name,
                generation,
            )
            return 0
        return unlink_pattern(
            self.redis, self.keys.views(self.projection.name, generation).pattern()
        )

    def _wait_for_live_workers(self, stop: threading.Event | None, keeper: _Keeper) -> None:
        """Live workers see the pause flag at their next batch, finish it, acknowledge it
        and give the projection's leases back; a frozen worker's lease simply expires."""
        partitions = stream_partitions(self.redis, self.keys, self.settings.partitions)
        leases = [self.keys.lease(self.projection.name, p) for p in range(partitions)]
        deadline = time.monotonic() + self.settings.projector_lease_ms / 1000 * 2 + 5
        while self.redis.exists(*leases):
            self._check(stop, keeper)
            if time.monotonic() > deadline:
                raise ReplayError(
                    f"live workers of {self.projection.name} did not release their leases"
                )
            time.sleep(0.02)

    def _move_groups(self, last_ids: dict[int, str]) -> None:
        """Live consumption resumes right after the last entry the new generation has."""
        group = self.projection.name
        for partition, last in last_ids.items():
            stream = self.keys.stream(partition)
            try:
                self.redis.xgroup_setid(stream, group, last)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc) and "requires the key to exist" not in str(exc):
                    raise
                self.redis.xgroup_create(stream, group, id=last, mkstream=True)

    # --- the whole replay --------------------------------------------------------------

    def run(
        self,
        source: str = "auto",
        *,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        only_if_invalid: bool = False,
    ) -> ReplayResult:
        """Build and switch to a new generation. With `only_if_invalid` (a worker building
        missing views), raise AlreadyBuilt instead when, once the lock is ours, the views
        turn out valid: another worker built them since this one last looked."""
        if source not in ("auto", "stream", "log"):
            raise ReplayError(f"unknown source {source!r} (auto, stream or log)")
        name = self.projection.name
        progress = progress or (lambda _done, _total: None)
        started = time.monotonic()
        taken = self.redis.set(
            self.keys.replay_lock(name), self.replay_id, nx=True, px=self.lock_ms
        )
        if not taken and not self._holds_lock():
            raise ReplayError(f"a replay of {name} is already running; try again when it is done")
        keeper = _Keeper(self)
        keeper.start()
        old = live_generation(self.redis, self.keys, name)
        new = 0
        switched = False
        try:
            if only_if_invalid:
                state = read_state(self.redis, self.keys, name)
                if state is not None and state.version >= self.projection.version:
                    raise AlreadyBuilt(f"{name} was built meanwhile (generation {old})")
            new = self._allocate_generation(old)
            removed = self._remove_generations({old, new})
            partitions = stream_partitions(self.redis, self.keys, self.settings.partitions)
            chosen = source
            if source == "auto":
                holds = stream_holds_history(self.redis, self.keys, partitions)
                chosen = "stream" if holds or not self.database_url else "log"
            views = self.keys.views(name, new)
            log.info("replaying %s into generation %d from the %s", name, new, chosen)
            events = 0
            if chosen == "log":
                events += self._replay_log(views, progress, stop, keeper)
            last_ids = {p: "0-0" for p in range(partitions)}
            offset = events
            events += self._replay_streams(
                views, last_ids, lambda d, _t: progress(offset + d, 0), stop, keeper
            )
            # The switch: live workers step aside, we catch up with the tails, move the
            # groups, and flip the generation.
            self.redis.set(self.keys.pause(name), self.replay_id, px=self.lock_ms)
            self.paused = True
            self._wait_for_live_workers(stop, keeper)
            offset = events
            events += self._replay_streams(
                views, last_ids, lambda d, _t: progress(offset + d, 0), stop, keeper
            )
            self._move_groups(last_ids)
            self._check(stop, keeper)
            write_state(self.redis, self.keys, name, ProjectionState(new, self.projection.version))
            switched = True
            self.scripts["release_lease"](keys=[self.keys.pause(name)], args=[self.replay_id])
            self.paused = False
            publish(self.redis, self.keys.applied_channel(), 0)
            log.info("%s now serves generation %d", name, new)
            # Reads that fetched the old generation number a moment ago may still be
            # reading its keys: give them a moment before deleting.
            grace = stop if stop is not None else threading.Event()
            if old and not grace.wait(self.settings.replay_grace_seconds):
                removed += self._remove_own_generation(old)
            return ReplayResult(
                projection=name,
                source=chosen,
                events=events,
                seconds=time.monotonic() - started,
                old_generation=old,
                new_generation=new,
                dead_lettered=self.dead_lettered,
                removed_keys=removed,
            )
        except BaseException:
            if not switched and new:
                # Best effort; the next replay removes whatever is left.
                with contextlib.suppress(redis.RedisError):
                    self._remove_own_generation(new)
            raise
        finally:
            keeper.done.set()
            try:
                if self.paused:
                    self.scripts["release_lease"](
                        keys=[self.keys.pause(name)], args=[self.replay_id]
                    )
                self.scripts["release_lease"](
                    keys=[self.keys.replay_lock(name)], args=[self.replay_id]
                )
            except redis.RedisError:
                pass  # both expire on their own
