"""What a successful command returns to its caller (CLI, tests, other services)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from cqrs.events import EventEnvelope
from cqrs.tokens import AggregateVersion, encode_token


@dataclass(frozen=True)
class CommandResult:
    id: uuid.UUID
    version: int
    events: list[EventEnvelope]

    @property
    def token(self) -> str:
        """Every aggregate version this command produced; queries can wait on it."""
        return encode_token(
            [
                AggregateVersion(e.aggregate_type, e.aggregate_id, e.version, e.partition_key)
                for e in self.events
            ]
        )

    def as_json(self) -> dict[str, object]:
        return {
            "id": str(self.id),
            "version": self.version,
            "token": self.token,
            "events": [
                {
                    "event_id": str(e.event_id),
                    "type": e.event_type,
                    "aggregate_type": e.aggregate_type,
                    "aggregate_id": str(e.aggregate_id),
                    "version": e.version,
                    "position": e.position,
                }
                for e in self.events
            ],
        }
