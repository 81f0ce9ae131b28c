"""Why a query did not answer; each message is one line for a person."""


class QueryError(Exception):
    pass


class NotFound(QueryError):
    """No view for that id. There is no fallback to PostgreSQL, by design."""


class BadCursor(QueryError):
    """A pagination cursor that this API did not hand out."""


class BadView(QueryError):
    """A view our projections could not have written (edited by hand, corrupted, a key of
    another type): the query names the key and the problem instead of half-reading it.
    `cqrs verify` compares it with PostgreSQL; a rebuild (`cqrs replay`) rewrites it."""


class NotCaughtUp(QueryError):
    """Read-your-writes gave up: the projections did not reach the token in time."""


class Busy(QueryError):
    """Overload, not failure: every Redis connection of the server's pool stayed in use
    past the pool's wait, or the server already holds as many read-your-writes waiters as
    it allows. Redis itself is fine; the client should retry after `retry_after` seconds
    (HTTP 503 with `Retry-After`), which is why it is never reported as "unreachable"."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
