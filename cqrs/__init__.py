"""Shared kernel of cqrs-projector: event contracts, settings, the Redis key map,
embedded servers, wiring and the root CLI.

It imports nothing from `commands`, `projector` or `queries`, so each of those can depend on
it without dragging in the others.
"""

__version__ = "0.1.0"
