"""Unit of work: one PostgreSQL transaction around a command.

It rolls back unless `commit()` is called. Events recorded during the command are
appended to the event log and the outbox *in the same transaction* as the state change,
so an event exists if and only if its change was committed (no "write then publish").
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from cqrs.events import SCHEMA_VERSION, EventEnvelope, Payload, payload_json

NOTIFY_CHANNEL = "cqrs_outbox"

_APPEND_EVENT = text(
    """
    WITH appended AS (
        INSERT INTO events.event_log (event_id, aggregate_type, aggregate_id,
            aggregate_version, partition_key, event_type, schema_version, payload, occurred_at)
        VALUES (:event_id, :aggregate_type, :aggregate_id, :version, :partition_key,
            :event_type, :schema_version, CAST(:payload AS JSONB), :occurred_at)
        RETURNING position
    )
    INSERT INTO events.outbox (position) SELECT position FROM appended RETURNING position
    """
)


@dataclass
class UnitOfWork:
    session_factory: sessionmaker
    session: Session = field(init=False)
    events: list[EventEnvelope] = field(init=False, default_factory=list)
    _committed: bool = field(init=False, default=False)

    def __enter__(self) -> Self:
        self.session = self.session_factory()
        self.session.begin()
        self.events = []
        self._committed = False
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._committed:
            self.session.rollback()
        self.session.close()

    def record(
        self,
        aggregate_type: str,
        aggregate_id: uuid.UUID,
        version: int,
        payload: Payload,
        *,
        partition_key: uuid.UUID | None = None,
    ) -> None:
        """Queue an event; it is written at commit, inside the same transaction."""
        self.events.append(
            EventEnvelope(
                event_id=uuid.uuid4(),
                event_type=type(payload).__name__,
                schema_version=SCHEMA_VERSION,
                aggregate_type=aggregate_type,
                aggregate_id=aggregate_id,
                version=version,
                partition_key=partition_key or aggregate_id,
                occurred_at=datetime.now(UTC),
                payload=payload_json(payload),
            )
        )

    def commit(self) -> list[EventEnvelope]:
        """Flush the state change, append the events, wake the relay, commit."""
        self.session.flush()
        if self.events:
            rows = [
                {
                    "event_id": e.event_id,
                    "aggregate_type": e.aggregate_type,
                    "aggregate_id": e.aggregate_id,
                    "version": e.version,
                    "partition_key": e.partition_key,
                    "event_type": e.event_type,
                    "schema_version": e.schema_version,
                    "payload": json.dumps(e.payload, separators=(",", ":")),
                    "occurred_at": e.occurred_at,
                }
                for e in self.events
            ]
            positions = [self.session.execute(_APPEND_EVENT, row).scalar_one() for row in rows]
            self.events = [
                e.model_copy(update={"position": p})
                for e, p in zip(self.events, positions, strict=True)
            ]
            # NOTIFY is delivered only when (and if) this transaction commits, so the relay
            # never wakes for an event that is not visible yet.
            self.session.execute(text("SELECT pg_notify(:c, '')"), {"c": NOTIFY_CHANNEL})
        self.session.commit()
        self._committed = True
        return self.events
