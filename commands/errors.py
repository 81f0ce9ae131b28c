"""Why a command was refused. Every message is one line a person can act on.

`CommandRejected` (exit 1) means the input was well formed but the current state forbids
it; malformed input never reaches a handler (pydantic rejects it first, exit 2).
"""

from __future__ import annotations


class CommandRejected(Exception):
    """The command was valid but cannot be applied; nothing was written."""


class NotFound(CommandRejected):
    pass


class InsufficientStock(CommandRejected):
    pass


class Conflict(CommandRejected):
    """A concurrent command changed the same aggregate and retrying did not help."""


class Duplicate(CommandRejected):
    pass


class InvalidTransition(CommandRejected):
    pass


class StaleVersion(Exception):
    """A versioned UPDATE matched no row: another transaction changed the aggregate after
    this one read it. Not a rejection: the command bus retries the whole command, and
    only when retries run out does the caller see a `Conflict`."""
