"""What one side offers another without importing it.

The sides (`cqrs.commands`, `cqrs.relay`, `cqrs.projector`, `cqrs.queries`) import none of
each other. Where one needs a service of another, it asks for it here, and the composition
(`cqrs.app`) fills it in when it mounts them: the commands CLI publishes what it just
committed through the relay's `publish_pending`; the relay creates the write-side schema
on first use through the commands' `ensure_schema`. Unset (a side used as a library, a
test that mounts one side), each caller does without: the command leaves publishing to
the running relay, the relay expects `cqrs db upgrade` to have run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis
    from sqlalchemy import Engine

    from cqrs.settings import Settings

# Publish the events committed and not yet published, now; returns how many.
PublishPending = Callable[[str, "redis.Redis", "Settings"], int]
# Create or migrate the write-side schema (the event log and outbox among it).
EnsureSchema = Callable[["Engine"], None]


@dataclass
class Hooks:
    publish_pending: PublishPending | None = None
    ensure_schema: EnsureSchema | None = None


hooks = Hooks()


def install(
    *, publish_pending: PublishPending | None = None, ensure_schema: EnsureSchema | None = None
) -> None:
    """Set the hooks (the composition calls this once, before mounting the sides)."""
    if publish_pending is not None:
        hooks.publish_pending = publish_pending
    if ensure_schema is not None:
        hooks.ensure_schema = ensure_schema
