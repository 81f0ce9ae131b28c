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
Parser = Callable[[dict[str, str]], tuple[EventHeader, Payload]]


class ParseOnce:
    """A parser for one batch that parses each entry once, however many projections
    handle it: customer and order events are read by two consumer groups, each with its
    own delivery (its own fields dict) of the same entry. Keyed by the entry's content,
    so two deliveries of one entry share a parse and two entries never do."""

    def __init__(self) -> None:
        self._seen: dict[tuple[tuple[str, str], ...], tuple[EventHeader, Payload]] = {}

    def __call__(self, fields: dict[str, str]) -> tuple[EventHeader, Payload]:
        key = tuple(fields.items())
        found = self._seen.get(key)
        if found is None:
            found = self._seen[key] = parse_stream_entry(fields)
        return found


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

    def skips(self, event_type: object) -> bool:
        """A known event type this projection has no handler for.

        Such an entry is acknowledged without being parsed: more than half of all
        deliveries are such (every projection's group reads every event of its
        partitions), and a malformed one is dead-lettered by the projections that do
        handle its type. An entry whose type nobody knows is not skipped: it is parsed,
        to be dead-lettered with the reason."""
        return event_type not in self.handlers and event_type in PAYLOAD_TYPES

    def steps(
        self,
        record: dict[str, str] | EventEnvelope,
        views: ViewKeys,
        parse: Parser = parse_stream_entry,
    ) -> list[Step] | None:
        """The steps of one event: the one way from an event to its steps, for the live
        worker, the replay (from streams or the log) and dead-letter retries alike.

        `record` is a stream entry's fields, parsed by `parse` only when this projection
        handles its type (the worker passes a parser that parses an entry once per batch
        for the projections that share it), or an envelope already read from the log.
        None when the projection skips the type; EventError for anything malformed,
        including a type nobody knows (parsed first, so the error says what is wrong)."""
        if type(record) is not dict and isinstance(record, EventEnvelope):
            # (`type` first: a pydantic class's isinstance check runs Python code, and
            # the live worker passes plain dicts)
            handler = self.handlers.get(record.event_type)
            return None if handler is None else handler(record, record.typed_payload(), views)
        event_type = record.get("type")
        handler = self.handlers.get(event_type)  # type: ignore[arg-type]
        if handler is None:
            if event_type in PAYLOAD_TYPES:
                return None
            parse_stream_entry(record)  # raises, saying what is wrong with the entry
            raise EventError(f"unknown event type {event_type!r}")
        event, payload = parse(record)
        return handler(event, payload, views)
