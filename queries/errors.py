"""Why a query did not answer; each message is one line for a person."""


class QueryError(Exception):
    pass


class NotFound(QueryError):
    """No view for that id. There is no fallback to PostgreSQL, by design."""


class BadCursor(QueryError):
    """A pagination cursor that this API did not hand out."""


class NotCaughtUp(QueryError):
    """Read-your-writes gave up: the projections did not reach the token in time."""
