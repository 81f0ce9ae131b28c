"""Unit of work: one PostgreSQL transaction around a command.

It rolls back unless `commit()` is called. Events recorded during the command are
appended to the event log and the outbox *in the same transaction* as the state change,
so an event exists if and only if its change was committed (no "write then publish").

Why plain SQL on the pooled psycopg connection and not ORM objects: a command is a
handful of statements whose cost is round trips, not SQL. The ORM unit of work (flush,
identity map, version bookkeeping) cost more Python per command than the round trips and
sent every statement in its own round trip (figures: docs/benchmarks.md, "Costs the
code's comments rely on").
Here the statements of a command are queued in psycopg's pipeline mode and travel
together: a product create is one round trip with its COMMIT, an order placement two (its
reads, then all its writes with the COMMIT), a rename two plus COMMIT (its row count is
checked in Python). The connection still comes from the engine's pool, so pooling,
pre-ping and disposal stay SQLAlchemy's.

Optimistic concurrency is explicit: an UPDATE of a row read earlier carries
`AND version = <read>` and is registered with `expect_rows`; a row count other than the
expected one raises `StaleVersion` before anything commits, and the command bus retries.
A write counted in the command's statement (`write(..., expect_rows=)`) is checked by the
statement itself, which fails and so aborts the COMMIT queued behind it.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from types import TracebackType
from typing import Any, NamedTuple, Self

import psycopg
from psycopg import errors as pg_errors
from pydantic_core import to_json
from sqlalchemy import Engine
from sqlalchemy.engine.interfaces import PoolProxiedConnection
from sqlalchemy.orm import sessionmaker

from cqrs.commands.errors import CommandRejected, StaleVersion
from cqrs.commands.notify import notifier_for
from cqrs.eventlog import NOTIFY_CHANNEL
from cqrs.events import SCHEMA_VERSION, EventEnvelope, Payload, payload_json

# Unique (aggregate_type, aggregate_id, aggregate_version): two commands wrote the same
# version of one aggregate. For a command creating an aggregate (version 1) it means the id
# is taken; the statement may meet it before the service table's primary key.
EVENT_VERSION_TAKEN = "uq_event_log_aggregate_type"

# The events travel as one JSON array (one parameter whatever their number, one prepared
# statement); PostgreSQL expands it into event_log rows in the order they were recorded.
_APPENDED = (
    "appended AS (INSERT INTO events.event_log (event_id, aggregate_type, aggregate_id,"
    " aggregate_version, partition_key, event_type, schema_version, payload, occurred_at)"
    " SELECT e.event_id, e.aggregate_type, e.aggregate_id, e.aggregate_version,"
    " e.partition_key, e.event_type, e.schema_version, e.payload, e.occurred_at"
    " FROM ROWS FROM (jsonb_populate_recordset(NULL::events.event_log, %s::jsonb))"
    " WITH ORDINALITY AS e ORDER BY e.ordinality RETURNING event_id, position)"
)
# The text of the cast error a failed row-count check raises (see `_commit_sql`).
STALE_MARK = "cqrs-stale-version"
_STALE_RE = re.compile(STALE_MARK + r" (\d+)")

_QUEUED = "queued AS (INSERT INTO events.outbox (position) SELECT position FROM appended)"


def json_text(value: Any) -> str:
    """Compact JSON for a JSONB parameter; UUIDs and datetimes as their ISO strings.
    pydantic's serializer, several times faster than `json.dumps` for a command's rows."""
    return to_json(value).decode()


def uuid_array(ids: Sequence[uuid.UUID]) -> str:
    """A `uuid[]` parameter as PostgreSQL's array literal (the SQL casts it): psycopg's
    list adaptation inspects every element and cost ~40 us per array, more than the rest
    of the statement's parameters (docs/benchmarks.md, "Round 2: commands"). A UUID's text
    needs no quoting."""
    return "{" + ",".join(map(str, ids)) + "}"


@cache
def _commit_sql(writes: tuple[tuple[str, bool], ...], notify: bool = True) -> str:
    """One statement for the whole state change: the command's writes as data-modifying
    CTEs (each `(sql, counted)`; a counted one is checked against its expected row count),
    the events appended to the log, their outbox rows, and the relay's wake-up.

    All parts run in one snapshot and succeed or fail together; foreign keys between them
    (outbox -> log, order lines -> order) are checked at the end of the statement. NOTIFY
    is delivered only when (and if) the transaction commits, so the relay never wakes for
    an event that is not visible yet; PostgreSQL folds the identical notifications of one
    transaction into one. Without `notify` the wake-up is sent after COMMIT instead
    (`cqrs.commands.notify`)."""
    ctes = [
        f"w{n} AS ({sql}{' RETURNING 1' if counted else ''})"
        for n, (sql, counted) in enumerate(writes)
    ]
    # A counted write that matched another number of rows than expected (one parameter
    # each, after the events') fails the statement with a marked cast error, so COMMIT can
    # travel in the same round trip: a failed statement aborts the COMMIT queued behind it.
    # The CASE is not constant, so the planner cannot fold the cast ahead of time.
    checks = [
        f"CAST(CASE WHEN (SELECT count(*) FROM w{n}) <> %s::bigint"
        f" THEN '{STALE_MARK} {k}' END AS integer)"
        for k, n in enumerate(n for n, (_, counted) in enumerate(writes) if counted)
    ]
    wake = [f"pg_notify('{NOTIFY_CHANNEL}', '')"] if notify else []
    columns = ", ".join(["a.event_id", "a.position", *wake, *checks])
    return f"WITH {', '.join([*ctes, _APPENDED, _QUEUED])} SELECT {columns} FROM appended AS a"


class _Recorded(NamedTuple):
    event_id: uuid.UUID
    event_type: str
    aggregate_type: str
    aggregate_id: uuid.UUID
    version: int
    partition_key: uuid.UUID
    occurred_at: datetime
    payload: dict[str, Any]


class WriteSession:
    """The open transaction of one unit of work. `commit()` is the one place COMMIT is
    sent, after every statement of the command has run (event positions taken, row
    locks held), so a test can hold a transaction open exactly there."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.connection = connection

    def commit(self) -> None:
        if self.connection.info.pipeline_status != psycopg.pq.PipelineStatus.OFF:
            # Queued behind the command's statement (already sent, so its rows are
            # written and its positions taken): both travel in one round trip.
            self.connection.execute("COMMIT")
        else:
            self.connection.commit()

    def rollback(self) -> None:
        self.connection.rollback()


def engine_of(session_factory: sessionmaker | Engine) -> Engine:
    """The engine whose pool the commands borrow connections from (callers keep passing
    the session factory they always built with `make_session_factory`)."""
    if isinstance(session_factory, Engine):
        return session_factory
    bind = session_factory.kw.get("bind")
    if not isinstance(bind, Engine):
        raise TypeError("commands need a sessionmaker bound to an Engine")
    return bind


class UnitOfWork:
    """One transaction on one pooled connection, statements queued in pipeline mode.

    The connection runs in autocommit mode with an explicit BEGIN queued first: psycopg's
    implicit BEGIN would be synchronised on its own, one more round trip per command.
    """

    def __init__(self, session_factory: sessionmaker | Engine) -> None:
        self.engine = engine_of(session_factory)
        self._notifier = notifier_for(self.engine)
        self._counted = False
        self.events: list[_Recorded] = []
        self._writes: list[tuple[str, bool]] = []
        self._write_params: list[Any] = []
        self._expected: list[tuple[int, str]] = []
        self._checks: list[tuple[psycopg.Cursor[Any], int, str]] = []
        # constraint -> (text the violation's detail must contain, rejection)
        self._rejections: dict[str, tuple[str, CommandRejected]] = {}
        self._committed = False
        self._pipeline: psycopg.Pipeline | None = None

    def __enter__(self) -> Self:
        if self._notifier is not None and self._notifier.adaptive:
            self._notifier.enter()
            self._counted = True
        try:
            self._pooled: PoolProxiedConnection = self.engine.raw_connection()
        except BaseException:
            self._leave()
            raise
        try:
            conn: psycopg.Connection[Any] = self._pooled.driver_connection  # type: ignore[assignment]
            conn.autocommit = True
            self.connection = conn
            self.session = WriteSession(conn)
            self._pipeline = conn.pipeline()
            self._pipeline.__enter__()
            conn.execute("BEGIN")
        except BaseException:
            self._release(broken=True)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        broken = False
        try:
            if self._pipeline is not None:
                # The command failed mid-way: collect what is in flight; its error (if
                # any) is a consequence of the one already propagating.
                with contextlib.suppress(psycopg.Error):
                    self._end_pipeline()
            if not self._committed:
                self.session.rollback()
        except psycopg.Error:
            broken = True
        finally:
            self._release(broken=broken)
        if isinstance(exc, pg_errors.UniqueViolation):
            detail, rejection = self._rejections.get(exc.diag.constraint_name or "", ("", None))
            if rejection is not None and detail in (exc.diag.message_detail or ""):
                raise rejection from exc

    def _leave(self) -> None:
        if self._counted:
            self._counted = False
            self._notifier.leave()  # type: ignore[union-attr]

    def _release(self, *, broken: bool) -> None:
        self._leave()
        conn = getattr(self, "connection", None)
        if conn is not None and not broken and not conn.broken:
            try:
                conn.autocommit = False  # the pool's other users expect psycopg's default
            except psycopg.Error:
                broken = True
        if broken or (conn is not None and conn.broken):
            self._pooled.invalidate()
        self._pooled.close()

    def _end_pipeline(self) -> None:
        """Send everything queued and wait for all of it: one round trip. Raises the
        first statement error."""
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.__exit__(None, None, None)

    # --- what handlers call ----------------------------------------------------------

    def send(self, query: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        """Queue a statement now. Its rows arrive with the next fetch on any queued cursor
        (statements queued before it travel in the same round trip) or at commit."""
        return self.connection.execute(query, params)  # type: ignore[arg-type]

    def expect_rows(self, cursor: psycopg.Cursor[Any], rows: int, what: str) -> None:
        """Check at commit that a versioned UPDATE sent with `send` matched `rows` rows;
        fewer means another transaction changed `what` after we read it (retried)."""
        self._checks.append((cursor, rows, what))

    def write(
        self,
        query: str,
        params: Sequence[Any] = (),
        *,
        expect_rows: int | None = None,
        what: str = "",
    ) -> None:
        """Add an INSERT/UPDATE to the statement `commit()` sends with the events, so a
        command's writes cost one statement however many there are. With `expect_rows`,
        a different row count (a versioned UPDATE that lost its race) raises
        `StaleVersion` before COMMIT."""
        self._writes.append((query, expect_rows is not None))
        self._write_params += params
        if expect_rows is not None:
            self._expected.append((expect_rows, what))

    def reject_on_conflict(self, rejection: CommandRejected, constraint: str) -> None:
        """A unique violation of `constraint` in this command is `rejection` (e.g. a reused
        SKU): the database checks it, no SELECT beforehand."""
        self._rejections[constraint] = ("", rejection)

    def reject_if_exists(
        self, rejection: CommandRejected, aggregate_id: uuid.UUID, primary_key: str
    ) -> None:
        """This command creates `aggregate_id`: if it exists, the command is `rejection`.
        The one statement meets either the service table's primary key or the version 1
        event already in the log first (its parts run in no set order); both mean the
        same. Only a log violation naming this aggregate counts."""
        self._rejections[primary_key] = ("", rejection)
        self._rejections[EVENT_VERSION_TAKEN] = (str(aggregate_id), rejection)

    def record(
        self,
        aggregate_type: str,
        aggregate_id: uuid.UUID,
        version: int,
        payload: Payload,
        *,
        partition_key: uuid.UUID | None = None,
    ) -> dict[str, Any]:
        """Queue an event; it is written at commit, inside the same transaction. Returns
        the payload as it is stored (JSON-ready), for rows that repeat it."""
        stored = payload_json(payload)
        self.events.append(
            _Recorded(
                uuid.uuid4(),
                type(payload).__name__,
                aggregate_type,
                aggregate_id,
                version,
                partition_key or aggregate_id,
                datetime.now(UTC),
                stored,
            )
        )
        return stored

    def commit(self) -> list[EventEnvelope]:
        """Send the writes and the events in one statement and COMMIT behind it (in the same
        round trip unless rows counted by earlier statements must be checked first)."""
        if not self.events:
            raise ValueError("a command must record at least one event")
        docs = [
            {
                "event_id": e.event_id,
                "aggregate_type": e.aggregate_type,
                "aggregate_id": e.aggregate_id,
                "aggregate_version": e.version,
                "partition_key": e.partition_key,
                "event_type": e.event_type,
                "schema_version": SCHEMA_VERSION,
                "payload": e.payload,
                "occurred_at": e.occurred_at,
            }
            for e in self.events
        ]
        notifier = self._notifier
        in_transaction = notifier is None or notifier.in_transaction()
        appended = self.send(
            _commit_sql(tuple(self._writes), in_transaction),
            [*self._write_params, json_text(docs), *(n for n, _ in self._expected)],
        )
        try:
            if self._checks:
                # Row counts of statements sent earlier are known once they come back:
                # one round trip for the statement, another for COMMIT.
                self._end_pipeline()
                for cursor, expected, what in self._checks:
                    if cursor.rowcount != expected:
                        raise StaleVersion(f"{what} changed concurrently")
                self.session.commit()
            else:
                self.session.commit()
                self._end_pipeline()
        except pg_errors.InvalidTextRepresentation as exc:
            stale = _STALE_RE.search(exc.diag.message_primary or "")
            if stale is None:
                raise
            what = self._expected[int(stale.group(1))][1]
            raise StaleVersion(f"{what} changed concurrently") from exc
        self._committed = True
        positions = {row[0]: row[1] for row in appended.fetchall()}
        if not in_transaction:
            notifier.poke()  # type: ignore[union-attr]
        return [
            EventEnvelope(
                event_id=e.event_id,
                event_type=e.event_type,
                schema_version=SCHEMA_VERSION,
                aggregate_type=e.aggregate_type,
                aggregate_id=e.aggregate_id,
                version=e.version,
                partition_key=e.partition_key,
                position=positions[e.event_id],
                occurred_at=e.occurred_at,
                payload=e.payload,
            )
            for e in self.events
        ]
