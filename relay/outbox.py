"""The outbox relay: moves committed events from the PostgreSQL log to Redis Streams.

Correctness argument (the classic outbox trap and how we avoid it)
------------------------------------------------------------------
An identity value is taken when a row is INSERTed but becomes visible at COMMIT, so a relay
that remembers "last position published" and reads `position > last` silently skips the
rows of a slow transaction that took an early position and committed late. We keep no
cursor at all: every unpublished event has a row in `events.outbox`, and a pass claims
whatever outbox rows are *visible*, oldest position first, publishes them, and commits. A
slow transaction's rows simply show up in a later pass. Claiming is one statement: it locks
the rows in position order (`FOR UPDATE`), deletes them and returns their log rows; the
delete commits only after the XADDs succeeded (see "At least once").

Per-aggregate order: version n+1 of an aggregate is written by a transaction that saw
version n committed (the aggregate row is locked/version-checked), so n is visible in every
snapshot that shows n+1, and n has the smaller position. Ordering a pass by position and
running passes one at a time therefore never publishes n+1 before n. Passes are serialised
twice over: a session advisory lock elects one active relay (others stand by and take over
when its connection dies), and the pass locks the rows it publishes (`FOR UPDATE`, then its
own uncommitted DELETE holds them), so even two overlapping passes queue behind each other
instead of interleaving: a second pass blocks on the first row the first pass holds, and
when that pass commits, skips the rows it deleted and claims the next ones.

At least once: the XADDs happen before the DELETE commits. A relay killed in between (or a
failed XADD, which rolls the transaction back) leaves the outbox rows in place, and the next
pass publishes those events again; the copies carry the same event id and version, and
projections drop them (they apply version n only once).

Entries Redis lost (a failover)
-------------------------------
Redis replicates asynchronously: a master can acknowledge XADDs and die before its replica
has them, and the promoted replica then lacks the stream's last entries, whose outbox rows
are long deleted. PostgreSQL is the truth, so each pass records, per partition, the highest
log position it published twice: next to the stream (`KeyMap.relay_mark`, written by the
script that appends, so a replica gets the entries and the mark together or neither), and
in `events.relay_marks`, in the transaction that deletes the outbox rows (so it is never
ahead of Redis unless Redis lost something). A pass hands each stream's script the mark
PostgreSQL holds for it; a stream whose own mark is lower appends nothing and answers with
its mark ("behind"): the pass rolls back, the relay re-publishes from the log that
partition's events with positions between the two marks (`_republish`, in position order,
through the same script, so the mark climbs with them), and the pass runs again. So a lost
tail is always re-published before any newer event of the partition, and per-aggregate
order holds. An audit (`audit`: when the relay becomes the leader, hence after every
reconnect, and every `relay_audit_seconds`) compares all marks the same way, for streams
no new event touches. A stream with no mark at all while PostgreSQL has one lost
everything (its master restarted empty, or a replica that never had it was promoted): its
whole history is not re-published (it may be the whole log); the mark is set to
PostgreSQL's and the views are rebuilt from the log by the projector, which sees the
master's new replication id (`cqrs.projector.repair`). Either way the streams no longer
hold a complete history, so `origin` becomes `partial` (replays read the log).

One blind spot, covered by that rebuild: the marks are maxima, so an event that committed
out of position order (a slow transaction, published after higher positions) and was lost
with a mark that survived is not seen here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from operator import itemgetter
from typing import Any, Protocol
from uuid import UUID

import psycopg
import redis

from cqrs.eventlog import NOTIFY_CHANNEL, STREAM_FIELDS, STREAM_FIELDS_SQL
from cqrs.keys import KeyMap, partition_of
from cqrs.redisio import publish_command, round_trip
from cqrs.settings import Settings
from cqrs.startup import EvictionWatch
from cqrs.streams import parse_entry_id, stream_partitions
from cqrs.urls import libpq_url, mask_url

log = logging.getLogger(__name__)

_RELAY_LOCK = 0x637172735F72656C

# One pass's claim (module docstring): lock the oldest visible outbox rows in position order,
# delete them and return their events as stream field values (`STREAM_FIELDS_SQL`). The
# positions are collected first (`ARRAY(...)`) so the delete and the join with the log are
# index lookups whatever the sizes of the outbox and the log. RETURNING has no order: the
# rows are sorted by position in Python (cheaper than a CTE and a sort in the server).
_CLAIM_BATCH = f"""
    DELETE FROM events.outbox o
    USING events.event_log e
    WHERE o.position = ANY(ARRAY(
            SELECT position FROM events.outbox ORDER BY position LIMIT %s FOR UPDATE
        ))
        AND e.position = o.position
    RETURNING e.position, {STREAM_FIELDS_SQL}
"""

# XADDs every event of a pass that maps to one partition stream, in position order, in one
# call, and raises the stream's relay mark to the highest position among them (KEYS: the
# stream, its mark; the mark is a hash field per partition count). ARGV: the partition
# count, the mark PostgreSQL holds for the stream (0: check nothing), the highest position,
# then each event's field values in `STREAM_FIELDS` order; the entries are exactly those
# `XADD <stream> * <field> <value> ...` would write. A stream whose mark is below
# PostgreSQL's lost entries (module docstring): nothing is appended and the answer is
# `{mark}` (-1: no mark), not a count. Why a script: a redis-py pipeline
# spends more Python per XADD (packing each command, parsing each reply) than the rest of a
# pass; one call per stream packs far less per event for a little more Redis CPU than a
# plain XADD (figures: docs/benchmarks.md, "Costs the code's comments rely on"). It keeps
# the pass's writes in one packed round trip (`Relay._publish`), touches one key
# (Redis-Cluster-safe), and needs nothing new from Redis: the projector already runs scripts.
_XADD_EVENTS_LUA = (
    "local mark = redis.call('HGET', KEYS[2], ARGV[1])\n"
    "if tonumber(ARGV[2]) > 0 then\n"
    "  if not mark then return {-1} end\n"
    "  if tonumber(mark) < tonumber(ARGV[2]) then return {tonumber(mark)} end\n"
    "end\n"
    "local n = 0\n"
    f"for i = 4, #ARGV, {len(STREAM_FIELDS)} do\n"
    "  redis.call('XADD', KEYS[1], '*', "
    + ", ".join(f"'{name}', ARGV[i + {j}]" for j, name in enumerate(STREAM_FIELDS))
    + ")\n"
    "  n = n + 1\n"
    "end\n"
    "if not mark or tonumber(mark) < tonumber(ARGV[3]) then\n"
    "  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])\n"
    "end\n"
    "return n\n"
)
# The marks PostgreSQL holds (module docstring), read in the pass's claim round trip, and
# raised in the transaction that deletes the outbox rows (partitions in order, so two
# passes never lock them in opposite orders). Their cost per pass: docs/benchmarks.md,
# "Costs the code's comments rely on".
_READ_MARKS = (
    "SELECT partition, position FROM events.relay_marks WHERE namespace = %s AND partitions = %s"
)
_READ_ALL_MARKS = (
    "SELECT partitions, partition, position FROM events.relay_marks WHERE namespace = %s"
)
_RAISE_MARKS = """
    INSERT INTO events.relay_marks (namespace, partitions, partition, position)
    SELECT %s, %s, p, pos FROM unnest(%s::int[], %s::bigint[]) AS t(p, pos)
    ON CONFLICT (namespace, partitions, partition)
    DO UPDATE SET position = greatest(events.relay_marks.position, excluded.position)
"""
# A page of the log for `_republish`: events after a position, up to another.
_LOG_PAGE = f"""
    SELECT e.position, {STREAM_FIELDS_SQL} FROM events.event_log e
    WHERE e.position > %s AND e.position <= %s ORDER BY e.position LIMIT %s
"""
# Passes in a row that may find a stream behind (and re-publish) before one gives up and
# leaves its rows to the next pass: another loss during the repair, nothing more.
_BEHIND_ATTEMPTS = 3
# Partition keys whose stream key is remembered; cleared when full (a relay sees the same
# customers and products again and again; a hash and a UUID parse saved per event).
_STREAM_CACHE_SIZE = 100_000
# Where a claimed row (position, *STREAM_FIELDS values) keeps what `_values_by_stream` reads.
_PARTITION_KEY = 1 + STREAM_FIELDS.index("partition_key")
_OCCURRED_AT = 1 + STREAM_FIELDS.index("occurred_at")


class RelayMetrics(Protocol):
    """What the relay reports to, once per pass (`cqrs.metrics.Metrics` implements it)."""

    def relayed(self, count: int, seconds: float) -> None: ...

    def reconnected(self, component: str) -> None: ...

    def rerelayed(self, count: int) -> None: ...


class StreamsBehind(Exception):
    """Streams whose relay mark is below PostgreSQL's (Redis lost entries): command index
    in the pass -> the stream's mark (-1: none). Raised inside the pass's transaction, so
    it rolls back and deletes no outbox row."""

    def __init__(self, marks: dict[int, int]) -> None:
        super().__init__(f"{len(marks)} stream(s) behind PostgreSQL's relay marks")
        self.marks = marks


class Relay:
    def __init__(self, database_url: str, client: redis.Redis, settings: Settings) -> None:
        self.database_url = database_url
        self.redis = client
        self.settings = settings
        self.keys = KeyMap(settings.namespace)
        self._partitions: int | None = None
        self._streams: dict[str, int] = {}  # partition key (text) -> partition
        self._last_trim = 0.0
        self._next_audit = 0.0
        self.published = 0
        self.republished = 0  # events published again because Redis lost them
        self.metrics: RelayMetrics | None = None  # instrumentation; None = metrics off
        # Start-up refused an evicting Redis; this says so loudly if the policy changes
        # while we run (checked between passes, at most every eviction_check_seconds).
        self.eviction_watch = EvictionWatch(
            client, every=settings.eviction_check_seconds, allowed=settings.allow_eviction
        )

    def _connect(self) -> psycopg.Connection:
        # A relay transaction only deletes outbox rows it has already published; if a
        # crash loses such a commit, the rows come back and are published again, which
        # at-least-once delivery allows (projections drop the copies). So it need not
        # wait for its WAL to reach the disk, and every pass (the next event's latency)
        # waits for the previous pass's commit, several times longer with the flush
        # (docs/benchmarks.md, "Costs the code's comments rely on").
        conn = psycopg.connect(libpq_url(self.database_url), autocommit=True)
        conn.execute("SET synchronous_commit TO off")
        return conn

    @property
    def partitions(self) -> int:
        if self._partitions is None:
            self._partitions = stream_partitions(self.redis, self.keys, self.settings.partitions)
        return self._partitions

    def forget_partitions(self) -> None:
        """Read the partition count again at the next pass: `cqrs repartition` may have
        changed it. It does so holding the leader lock, with the passes fenced off, and
        every pass reads the count after its claim (cqrs.app.repartition says why that
        is enough): a leader forgets it when it takes the lock, a drain at every pass."""
        self._partitions = None
        self._streams.clear()

    def publish_batch(
        self, conn: psycopg.Connection, limit: int | None = None, *, repair: bool = True
    ) -> int:
        """One pass: publish up to `limit` visible unpublished events; returns how many.

        A stream found behind (module docstring) rolls the pass back; with `repair` its
        lost entries are re-published from the log and the pass runs again (a bounded
        number of times), without (the commands' publish-after-commit) the rows are left
        to the relay and 0 is returned."""
        for _attempt in range(_BEHIND_ATTEMPTS):
            try:
                return self._pass(conn, limit or self.settings.relay_batch_size)
            except StreamsBehind as behind:
                if not repair:
                    return 0
                self._republish(conn, behind.marks)
        log.warning("relay: streams keep losing entries while being repaired; retrying later")
        return 0

    def _pass(self, conn: psycopg.Connection, limit: int) -> int:
        started = time.perf_counter()
        with conn.transaction():
            # The claim and the marks in one round trip; the marks of every partition count
            # (a handful of rows), as the count is read only after the claim (see
            # `forget_partitions`).
            with conn.pipeline():
                claimed = conn.execute(_CLAIM_BATCH, (limit,), binary=True)
                held = conn.execute(_READ_ALL_MARKS, (self.keys.ns,))
            rows = claimed.fetchall()
            if not rows:
                return 0
            rows.sort(key=itemgetter(0))
            count = self.partitions
            marks = {p: position for n, p, position in held.fetchall() if n == count}
            grouped = self._values_by_partition(rows)
            commands = [
                self._append(p, marks.get(p, 0), highest, values)
                for p, (highest, values) in grouped.items()
            ]
            # Wakes idle projector workers (they also poll, so a lost message only delays).
            commands.append(
                publish_command(self.redis, self.keys.relay_wakeup_channel(), len(rows))
            )
            try:
                self._publish(commands)
            except StreamsBehind as behind:
                by_index = list(grouped)
                raise StreamsBehind({by_index[i]: m for i, m in behind.marks.items()}) from None
            order = sorted(grouped)
            highest = [grouped[p][0] for p in order]
            conn.execute(_RAISE_MARKS, (self.keys.ns, self.partitions, order, highest))
        self.published += len(rows)
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.relayed(len(rows), seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "relay: published %d event(s) in %.1f ms",
                len(rows),
                seconds * 1000,
                extra={"events": len(rows), "first_position": rows[0][0], "seconds": seconds},
            )
        return len(rows)

    def _publish(self, commands: list[tuple[Any, ...]]) -> None:
        """A pass's writes to Redis in one packed round trip (`cqrs.redisio` says why:
        redis-py's `Pipeline` adds Python per command to every event's latency). Any
        error reply raises, and so does a stream behind (`StreamsBehind`, by command
        index), so the pass rolls back and deletes nothing. Also the seam where tests
        hold a pass between claiming its rows and publishing them."""
        behind: dict[int, int] = {}
        for i, reply in enumerate(round_trip(self.redis, commands)):
            if isinstance(reply, Exception):
                raise reply
            if isinstance(reply, list):
                behind[i] = int(reply[0])
        if behind:
            raise StreamsBehind(behind)

    def _append(
        self, partition: int, expected: int, highest: int, values: list[str]
    ) -> tuple[Any, ...]:
        """The script call that appends events to a partition stream and raises its mark
        to `highest`, unless the mark is below `expected` (0: no check)."""
        stream, mark = self.keys.stream(partition), self.keys.relay_mark(partition)
        return ("EVAL", _XADD_EVENTS_LUA, 2, stream, mark, self.partitions, expected, highest,
                *values)  # fmt: skip

    def _values_by_partition(self, rows: list[tuple[Any, ...]]) -> dict[int, tuple[int, list[str]]]:
        """The claimed rows' field values, grouped by partition, in position order, with
        the highest position of each partition's (the last one).

        Each row is (position, *STREAM_FIELDS values), all text but `occurred_at`, which is
        formatted here with `datetime.isoformat()` exactly as `EventEnvelope` formats it
        (PostgreSQL's own text form differs: a space, no minutes in the offset).
        """
        streams = self._streams
        if len(streams) > _STREAM_CACHE_SIZE:
            streams.clear()
        values_of: dict[int, list[str]] = {}
        highest: dict[int, int] = {}
        for row in rows:
            pkey = row[_PARTITION_KEY]
            partition = streams.get(pkey)
            if partition is None:
                partition = streams[pkey] = partition_of(UUID(pkey), self.partitions)
            values = values_of.get(partition)
            if values is None:
                values = values_of[partition] = []
            values += row[1:_OCCURRED_AT]
            values.append(row[_OCCURRED_AT].isoformat())
            values += row[_OCCURRED_AT + 1 :]
            highest[partition] = row[0]
        return {p: (highest[p], values) for p, values in values_of.items()}

    # --- entries Redis lost (module docstring) -----------------------------------------

    def audit(self, conn: psycopg.Connection) -> int:
        """Compare every partition's relay mark in Redis with PostgreSQL's and repair the
        streams that are behind; returns the events re-published. PostgreSQL is read
        first: a pass committing in between raises both marks, Redis's first, so a
        stream is never taken for behind when it is not."""
        self._next_audit = time.monotonic() + self.settings.relay_audit_seconds
        count = self.partitions
        marks = dict(conn.execute(_READ_MARKS, (self.keys.ns, count)).fetchall())
        if not marks:
            return 0
        order = sorted(marks)
        replies = round_trip(self.redis, [("HGET", self.keys.relay_mark(p), count) for p in order])
        behind: dict[int, int] = {}
        for partition, reply in zip(order, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            mark = -1 if reply is None else int(reply)
            if mark < marks[partition]:
                behind[partition] = mark
        return self._republish(conn, behind) if behind else 0

    def _republish(self, conn: psycopg.Connection, behind: dict[int, int]) -> int:
        """Re-publish from the log what streams behind lost: for each partition (-> its
        Redis mark) the events after that mark up to the one PostgreSQL holds, in position
        order, a page at a time, through the pass's script (so each page raises the mark
        and a relay stopped halfway resumes from there). A stream with no mark gets
        PostgreSQL's, and nothing re-published (module docstring). Returns the count."""
        count = self.partitions
        held = dict(conn.execute(_READ_MARKS, (self.keys.ns, count)).fetchall())
        ranges = {p: (m, held[p]) for p, m in behind.items() if m >= 0 and m < held.get(p, 0)}
        empty = sorted(p for p, m in behind.items() if m < 0 and held.get(p, 0) > 0)
        commands: list[tuple[Any, ...]] = [
            ("HSET", self.keys.relay_mark(p), count, held[p]) for p in empty
        ]
        if ranges or empty:
            # The streams no longer hold the whole history in order: replays read the log.
            commands.append(("HSET", self.keys.meta(), "origin", "partial"))
        for reply in round_trip(self.redis, commands) if commands else []:
            if isinstance(reply, Exception):
                raise reply
        if empty:
            log.warning(
                "relay: partition stream(s) %s hold no relay mark while PostgreSQL says "
                "events up to position %d were published to them: Redis lost everything "
                "they held (a master restarted empty, or a replica that never had them was "
                "promoted); not re-publishing their history, the projector rebuilds the "
                "views from the log",
                ", ".join(map(str, empty)),
                max(held[p] for p in empty),
                extra={"partitions": empty},
            )
        total = 0
        if ranges:
            cursor, last = min(m for m, _ in ranges.values()), max(e for _, e in ranges.values())
            batch = self.settings.relay_batch_size
            while cursor < last:
                rows = conn.execute(_LOG_PAGE, (cursor, last, batch), binary=True).fetchall()
                if not rows:
                    break
                cursor = rows[-1][0]
                lost = [
                    row
                    for row in rows
                    if (p := self._partition_of(row[_PARTITION_KEY])) in ranges
                    and ranges[p][0] < row[0] <= ranges[p][1]
                ]
                grouped = self._values_by_partition(lost)
                appends = [self._append(p, 0, h, v) for p, (h, v) in grouped.items()]
                for reply in round_trip(self.redis, appends) if appends else []:
                    if isinstance(reply, Exception):
                        raise reply
                total += len(lost)
            self.redis.hincrby(self.keys.meta(), "republished", total)
            self.republished += total
            if self.metrics is not None:
                self.metrics.rerelayed(total)
            log.warning(
                "relay: partition stream(s) %s lost entries in Redis (a failover?): "
                "re-published %d event(s) from the log",
                ", ".join(f"{p} (after position {m}, up to {e})" for p, (m, e) in ranges.items()),
                total,
                extra={"partitions": sorted(ranges), "events": total},
            )
        return total

    def _partition_of(self, pkey: str) -> int:
        partition = self._streams.get(pkey)
        if partition is None:
            partition = self._streams[pkey] = partition_of(UUID(pkey), self.partitions)
        return partition

    def mark_origin(self, conn: psycopg.Connection) -> None:
        """Record once whether the streams start at the beginning of history (nothing was
        published before them). Replays read the streams alone only then; after Redis
        lost its data the mark is gone, and replays fall back to the log."""
        if self.redis.hexists(self.keys.meta(), "origin"):
            return
        published = conn.execute(
            "SELECT (SELECT count(*) FROM events.event_log) - (SELECT count(*) FROM events.outbox)"
        ).fetchone()[0]
        self.redis.hsetnx(self.keys.meta(), "origin", "complete" if published == 0 else "partial")

    def drain(self, stop: threading.Event | None = None) -> int:
        """Publish everything visible now (used by `cqrs run --drain` and tests); a set
        `stop` ends it after the pass in hand (SIGTERM/SIGINT)."""
        total = 0
        with self._connect() as conn:
            self.mark_origin(conn)
            self.audit(conn)
            while not (stop is not None and stop.is_set()):
                self.forget_partitions()  # a drain holds no leader lock
                if not (n := self.publish_batch(conn)):
                    break
                total += n
        self.trim_streams(force=True)
        return total

    def pending_count(self) -> tuple[int, datetime | None]:
        """Unpublished events and the time of the oldest (for status and tests)."""
        with self._connect() as conn:
            count, oldest = conn.execute(
                "SELECT count(*), min(e.occurred_at) FROM events.outbox o"
                " JOIN events.event_log e ON e.position = o.position"
            ).fetchone()
        return count, oldest

    def trim_streams(self, *, force: bool = False) -> None:
        """Trim entries every consumer group has finished with, once a stream exceeds its
        retention. Never below a group's oldest pending entry or last-delivered id, so a
        slow or stopped projection loses nothing (the log covers rebuilds beyond that)."""
        retention = self.settings.stream_retention
        if retention <= 0 or (not force and time.monotonic() - self._last_trim < 10):
            return
        self._last_trim = time.monotonic()
        for partition in range(self.partitions):
            stream = self.keys.stream(partition)
            length = self.redis.xlen(stream)
            if length <= retention:
                continue
            safe = self._safe_trim_id(stream)
            if safe is not None:
                self.redis.xtrim(
                    stream, minid=safe, approximate=True, limit=max(length - retention, 1)
                )

    def _safe_trim_id(self, stream: str) -> str | None:
        groups = self.redis.xinfo_groups(stream)
        if not groups:
            return None  # nobody has read anything yet
        candidates: list[tuple[int, int]] = []
        for group in groups:
            delivered = parse_entry_id(group["last-delivered-id"])
            candidates.append((delivered[0], delivered[1] + 1))
            if group["pending"]:
                summary = self.redis.xpending(stream, group["name"])
                # None when a worker acknowledged the last pending entries since XINFO
                # GROUPS: then the last-delivered bound above is the one that holds.
                if summary["min"] is not None:
                    candidates.append(parse_entry_id(summary["min"]))
        low = min(candidates)
        return f"{low[0]}-{low[1]}"

    def run(self, stop: threading.Event) -> None:
        """Relay until `stop` is set: wake on NOTIFY, poll as a safety net, stand by while
        another relay holds the leader lock, reconnect with backoff on failures."""
        backoff = 0.1
        while not stop.is_set():
            try:
                with self._connect() as conn:
                    self._lead(conn, stop)
                    backoff = 0.1
            except (psycopg.OperationalError, redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning(
                    "relay: connection lost (%s); retrying in %.1fs", mask_url(str(exc)), backoff
                )
                if self.metrics is not None:
                    self.metrics.reconnected("relay")
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _lead(self, conn: psycopg.Connection, stop: threading.Event) -> None:
        poll = self.settings.relay_poll_seconds
        while not stop.is_set():
            if conn.execute("SELECT pg_try_advisory_lock(%s)", (_RELAY_LOCK,)).fetchone()[0]:
                break
            stop.wait(poll)  # standby: another relay is active
        else:
            return
        log.info("relay: active")
        self.forget_partitions()
        self.mark_origin(conn)
        # A new leader, or the same one back from a lost connection (a failover among
        # them): what did Redis lose meanwhile? Then every relay_audit_seconds.
        self.audit(conn)
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        while not stop.is_set():
            n = self.publish_batch(conn)
            if time.monotonic() >= self._next_audit:
                self.audit(conn)
            self.trim_streams()
            self.eviction_watch.poll()
            if n < self.settings.relay_batch_size:
                self._wait_for_notify(conn, poll, stop)

    @staticmethod
    def _wait_for_notify(conn: psycopg.Connection, timeout: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for _ in _notifies(conn, min(remaining, 0.5)):
                return


def _notifies(conn: psycopg.Connection, timeout: float) -> Iterator[object]:
    with contextlib.suppress(StopIteration):
        yield from conn.notifies(timeout=timeout, stop_after=1)


def publish_pending(database_url: str, client: redis.Redis, settings: Settings) -> int:
    """Publish, now, one pass of what is committed and not yet published; returns how
    many events. The one entry point for "publish after commit" (the commands side gets
    it through `cqrs.hooks`); the running relay remains the safety net."""
    relay = Relay(database_url, client, settings)
    with relay._connect() as conn:
        # A stream found behind is the running relay's to repair (a re-publication may be
        # long; a command should not wait for it): the rows stay for it.
        return relay.publish_batch(conn, repair=False)
