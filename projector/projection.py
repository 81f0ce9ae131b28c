"""What a projection is: a name, a version, and one handler per event type.

Adding a projection is one module defining a `Projection` and one line in
`projector.registry`. Handlers are pure: they read nothing and return steps that write
only the projection's own keys (so a replay can never fire anything outside them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cqrs.events import EventEnvelope, Payload
from cqrs.keys import ViewKeys
from projector.steps import Step

Handler = Callable[[EventEnvelope, Payload, ViewKeys], list[Step]]


@dataclass(frozen=True)
class Projection:
    name: str
    # Bump when the handlers change meaning: the views are then rebuilt from history.
    version: int
    handlers: dict[str, Handler]

    def handles(self, event_type: str) -> bool:
        return event_type in self.handlers


def cents(amount: object) -> int:
    """Money string/Decimal -> integer cents for the Lua money op (exact, no floats)."""
    from decimal import Decimal

    return int((Decimal(str(amount)) * 100).to_integral_exact())
