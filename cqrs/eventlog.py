"""Reading the PostgreSQL event log: shared by the relay (write side) and replays
(projector), which must not depend on each other."""

from __future__ import annotations

import json
from typing import Any

from cqrs.events import EventEnvelope

# Column order expected by `envelope_from_row`.
LOG_COLUMNS = (
    "position, event_id, aggregate_type, aggregate_id, aggregate_version, partition_key,"
    " event_type, schema_version, payload, occurred_at"
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
