"""What a projection is: its view contract, a version, and one handler per event type.

Adding a projection is a contract (`cqrs.contracts.ViewContract`), handlers, and one entry
point in the group `cqrs.projections` naming the `Projection` (docs/architecture.md,
"Write your own projection"). Handlers are pure: they read nothing and return steps that
write only the projection's own keys (so a replay can never fire anything outside them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cqrs.contracts import ContractError, ViewContract
from cqrs.contracts import cents as cents
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
    # What the views are (keys, read model, read-your-writes rule, verify expectation).
    # Optional only for test doubles that reuse a registered projection's handlers.
    contract: ViewContract | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        """Registration checks: a projection that forgot a part fails when it is built
        (at import, or when the registry loads its entry point), naming what is wrong."""
        if self.contract is not None and self.contract.name != self.name:
            raise ContractError(
                f"projection {self.name!r}: its contract is named {self.contract.name!r}"
            )
        if not isinstance(self.version, int) or self.version < 1:
            raise ContractError(f"projection {self.name!r}: version must be an integer >= 1")
        if not self.handlers:
            raise ContractError(f"projection {self.name!r}: it has no handlers")
        unknown = sorted(t for t in self.handlers if t not in PAYLOAD_TYPES)
        if unknown:
            raise ContractError(
                f"projection {self.name!r}: handlers for unknown event types {unknown}"
            )
        bad = sorted(t for t, h in self.handlers.items() if not callable(h))
        if bad:
            raise ContractError(f"projection {self.name!r}: handlers for {bad} are not callable")

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
