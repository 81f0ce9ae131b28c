"""The PostgreSQL event log as the sides share it: the commands write it, the relay
publishes it, replays (projector) read it; none of them depends on another."""

from __future__ import annotations

import json
from typing import Any

from cqrs.events import EventEnvelope

# The channel a committing command NOTIFYs (after commit) and the relay LISTENs on.
NOTIFY_CHANNEL = "cqrs_outbox"

# Column order expected by `envelope_from_row`.
LOG_COLUMNS = (
    "position, event_id, aggregate_type, aggregate_id, aggregate_version, partition_key,"
    " event_type, schema_version, payload, occurred_at"
)

# The fields of a stream entry, in the order `EventEnvelope.to_stream_fields` writes them,
# and SQL over `events.event_log e` that yields their values straight from a log row, so
# the relay can publish without building an envelope (or a dict, or JSON) per event. All
# text, except `occurred_at`: a timestamptz, to be formatted with `datetime.isoformat()`
# like the envelope does. `payload::text` is PostgreSQL's rendering of the JSONB (a space
# after ':' and ','), the same JSON as the envelope's compact dump, parsed the same way.
STREAM_FIELDS = (
    "event_id",
    "type",
    "schema",
    "aggregate_type",
    "aggregate_id",
    "version",
    "partition_key",
    "position",
    "occurred_at",
    "payload",
)
STREAM_FIELDS_SQL = (
    "e.event_id::text, e.event_type::text, e.schema_version::text, e.aggregate_type::text,"
    " e.aggregate_id::text, e.aggregate_version::text, e.partition_key::text,"
    " e.position::text, e.occurred_at, e.payload::text"
)


def envelope_from_row(row: tuple[Any, ...]) -> EventEnvelope:
    position, event_id, agg_type, agg_id, version, pkey, etype, schema, payload, occurred = row
    if isinstance(payload, str):
        payload = json.loads(payload)
    return EventEnvelope(
        event_id=event_id,
        event_type=etype,
        schema_version=schema,
        aggregate_type=agg_type,
        aggregate_id=agg_id,
        version=version,
        partition_key=pkey,
        position=position,
        occurred_at=occurred,
        payload=payload,
    )
