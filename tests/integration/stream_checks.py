"""What "every committed event is on the streams" means, checked against PostgreSQL.

Shared by the relay crash, gap and failover tests. The check reads every partition stream
and the whole event log and asserts the relay's contract:

- every event_log row appears on the streams (after dropping duplicates by event_id)
  exactly once per (aggregate_type, aggregate_id, version), and nothing else appears;
- copies of one event (a relay killed between XADD and DELETE publishes again) carry
  identical fields;
- all events of an aggregate are on one stream, and their versions appear there in
  increasing order, counting each event at its first occurrence;
- the outbox is empty.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg
import redis

from cqrs.events import EventEnvelope
from cqrs.keys import KeyMap
from cqrs.settings import Settings
from cqrs.urls import libpq_url


@dataclass(frozen=True)
class StreamEntry:
    stream: str
    entry_id: str
    fields: dict[str, str]
    event: EventEnvelope


@dataclass(frozen=True)
class PublishReport:
    events: int  # distinct events on the streams (== event_log rows)
    entries: int  # stream entries, duplicates included
    duplicates: int  # entries - events
    streams_used: int


def stream_partitions(client: redis.Redis, keys: KeyMap, settings: Settings) -> int:
    stored = client.hget(keys.meta(), "partitions")
    return int(stored) if stored else settings.partitions


def stream_length(client: redis.Redis, keys: KeyMap, settings: Settings) -> int:
    partitions = stream_partitions(client, keys, settings)
    pipe = client.pipeline(transaction=False)
    for p in range(partitions):
        pipe.xlen(keys.stream(p))
    return sum(pipe.execute())


def read_streams(client: redis.Redis, keys: KeyMap, settings: Settings) -> list[StreamEntry]:
    """Every entry of every partition stream, each stream in entry order."""
    entries: list[StreamEntry] = []
    for p in range(stream_partitions(client, keys, settings)):
        stream = keys.stream(p)
        start = "-"
        while True:
            chunk = client.xrange(stream, min=start, count=5000)
            if not chunk:
                break
            for entry_id, fields in chunk:
                entries.append(
                    StreamEntry(stream, entry_id, fields, EventEnvelope.from_stream_fields(fields))
                )
            start = "(" + chunk[-1][0]
    return entries


def published_event_ids(client: redis.Redis, keys: KeyMap, settings: Settings) -> set[str]:
    return {e.fields["event_id"] for e in read_streams(client, keys, settings)}


def outbox_count(database_url: str) -> int:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM events.outbox").fetchone()[0]


def event_log_rows(database_url: str) -> list[tuple[str, str, str, int]]:
    """(event_id, aggregate_type, aggregate_id, version) of every logged event."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT event_id, aggregate_type, aggregate_id, aggregate_version"
            " FROM events.event_log ORDER BY position"
        ).fetchall()
    return [(str(e), t, str(a), v) for e, t, a, v in rows]


def assert_published_exactly_once(
    database_url: str, client: redis.Redis, keys: KeyMap, settings: Settings
) -> PublishReport:
    """Assert the relay's contract (module docstring); returns counts for the report."""
    assert outbox_count(database_url) == 0, "events.outbox must be empty after draining"
    log = event_log_rows(database_url)
    entries = read_streams(client, keys, settings)

    # Copies of one event are identical, field for field.
    first: dict[str, StreamEntry] = {}
    for entry in entries:
        event_id = entry.fields["event_id"]
        seen = first.setdefault(event_id, entry)
        assert seen.fields == entry.fields, f"duplicates of {event_id} differ"
        assert seen.stream == entry.stream, f"copies of {event_id} are on different streams"

    # Exactly the logged events, each once per (aggregate, version), with the same id.
    logged = {(t, a, v): e for e, t, a, v in log}
    assert len(logged) == len(log), "the event log itself repeats an aggregate version"
    published = Counter(
        (e.event.aggregate_type, str(e.event.aggregate_id), e.event.version) for e in first.values()
    )
    repeated = [k for k, n in published.items() if n > 1]
    assert not repeated, f"distinct event ids share an aggregate version: {repeated[:5]}"
    missing = logged.keys() - published.keys()
    assert not missing, (
        f"{len(missing)} committed events never reached a stream: {sorted(missing)[:5]}"
    )
    extra = published.keys() - logged.keys()
    assert not extra, f"{len(extra)} stream events are not in the log: {sorted(extra)[:5]}"
    for entry in first.values():
        key = (entry.event.aggregate_type, str(entry.event.aggregate_id), entry.event.version)
        assert str(entry.event.event_id) == logged[key], f"{key} has a different event id"

    # Per-aggregate order on its stream, first occurrences only.
    last_version: dict[tuple[str, str], int] = {}
    stream_of: dict[tuple[str, str], str] = {}
    emitted: set[str] = set()
    for entry in entries:
        event_id = entry.fields["event_id"]
        if event_id in emitted:
            continue
        emitted.add(event_id)
        aggregate = (entry.event.aggregate_type, str(entry.event.aggregate_id))
        assert stream_of.setdefault(aggregate, entry.stream) == entry.stream, (
            f"{aggregate} is spread over two streams"
        )
        previous = last_version.get(aggregate, 0)
        assert entry.event.version > previous, (
            f"{aggregate}: version {entry.event.version} first appears after {previous}"
        )
        last_version[aggregate] = entry.event.version

    return PublishReport(
        events=len(first),
        entries=len(entries),
        duplicates=len(entries) - len(first),
        streams_used=len({e.stream for e in entries}),
    )


class PassPause:
    """Holds a relay's passes between claiming (and locking) their outbox rows and
    publishing them: `reached` is set when a pass gets there, which then waits for `go`.
    Hooks `Relay._publish`, the one call through which a pass writes to Redis."""

    def __init__(self, relay: Any) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()
        publish = relay._publish

        def paused(commands: list[tuple[Any, ...]]) -> None:
            self.reached.set()
            assert self.go.wait(30), "the test never let the paused pass publish"
            publish(commands)

        relay._publish = paused


def waiting_on_lock(database_url: str, pid: int) -> bool:
    """The PostgreSQL backend `pid` is waiting for a lock (a relay pass queued behind
    another pass's rows)."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
    return bool(row) and row[0] == "Lock"
