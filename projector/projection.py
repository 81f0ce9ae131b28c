"""What a projection is: a name, a version, and one handler per event type.

Adding a projection is one module defining a `Projection` and one line in
`projector.registry`. Handlers are pure: they read nothing and return steps that write
only the projection's own keys (so a replay can never fire anything outside them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cqrs.events import (
    PAYLOAD_TYPES,
    EventEnvelope,
    EventError,
    EventHeader,
    Payload,
    parse_stream_entry,
)
from cqrs.keys import ViewKeys
from cqrs.projector.steps import Step

Handler = Callable[[EventHeader, Payload, ViewKeys], list[Step]]


@dataclass(frozen=True)
class Projection:
    name: str
    # Bump when the handlers change meaning: the views are then rebuilt from history.
    version: int
    handlers: dict[str, Handler]

    def handles(self, event_type: str) -> bool:
        return event_type in self.handlers

    def skips(self, event_type: object) -> bool:
        """A known event type this projection has no handler for.

        Such an entry is acknowledged without being parsed: more than half of all
        deliveries are such (every projection's group reads every event of its
        partitions), and a malformed one is dead-lettered by the projections that do
        handle its type. An entry whose type nobody knows is not skipped: it is parsed,
        to be dead-lettered with the reason."""
        return event_type not in self.handlers and event_type in PAYLOAD_TYPES

    def steps(self, fields: dict[str, str], views: ViewKeys) -> list[Step] | None:
        """The steps of one stream entry; None when the projection skips its type.
        Raises EventError for anything malformed."""
        event_type = fields.get("type")
        handler = self.handlers.get(event_type)  # type: ignore[arg-type]
        if handler is None:
            if event_type in PAYLOAD_TYPES:
                return None
            parse_stream_entry(fields)  # raises, saying what is wrong with the entry
            raise EventError(f"unknown event type {event_type!r}")
        event, payload = parse_stream_entry(fields)
        return handler(event, payload, views)

    def steps_of_event(self, event: EventEnvelope, views: ViewKeys) -> list[Step] | None:
        """The steps of an event already read as an envelope (from the log)."""
        handler = self.handlers.get(event.event_type)
        if handler is None:
            return None
        return handler(event, event.typed_payload(), views)


def cents(amount: object) -> int:
    """Money string/Decimal -> integer cents for the Lua money op (exact, no floats)."""
    from decimal import Decimal

    return int((Decimal(str(amount)) * 100).to_integral_exact())
