"""The outbox relay: moves committed events from the PostgreSQL log to Redis Streams.

A process of its own (`cqrs relay`); `publish_pending` is its one entry point for others
(the composition hands it to the commands side, which publishes right after a commit).
"""

from cqrs.relay.outbox import Relay, publish_pending

__all__ = ["Relay", "publish_pending"]
