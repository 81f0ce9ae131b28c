"""Packed round trips to Redis for the hot paths (projector batches, query get-by-id).

redis-py's `Pipeline` costs ~20 us of Python per command (command stack, response
callbacks) and `Connection.read_response` ~5 us per reply (timeouts, health checks,
push-message handling). On paths that send thousands of commands per batch, or whose
whole budget is one round trip, that is more than the commands themselves. These helpers
pack commands with hiredis into one write on a pooled connection and take the replies
straight from the connection's hiredis reader. Replies are raw (no response callbacks):
callers know what they asked for. With any other parser they go the documented way.

They read private attributes of redis-py's hiredis parser (`_parser._reader`,
`read_from_socket`); each is looked up with a fallback, so a redis-py that moves them
costs speed, not correctness.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError

try:  # redis[hiredis] is a dependency; the fallback only keeps a bare redis-py working
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover

    def _pack_command(args: tuple[Any, ...]) -> bytes:
        from redis.connection import PythonRespSerializer

        encoder = redis.connection.Encoder("utf-8", "strict", False)
        return b"".join(PythonRespSerializer(6000, encoder.encode).pack(*args))


try:  # the sentinel redis-py's hiredis reader returns when a reply is incomplete
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - another redis-py layout: read_response per reply
    _NOT_ENOUGH_DATA = None


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP; a value that cannot be sent is a DataError naming it."""
    try:
        return _pack_command(args)
    except TypeError as exc:
        raise DataError(f"cannot send {args[:2]!r}...: {exc}") from None


def read_replies(conn: Any, count: int) -> list[Any]:
    """`count` replies from `conn`, error replies as exception objects in their place."""
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    fill = getattr(parser, "read_from_socket", None)
    replies: list[Any] = []
    if reader is None or fill is None or _NOT_ENOUGH_DATA is None:
        for _ in range(count):
            try:
                replies.append(conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies
    push_type = getattr(parser, "_hiredis_PushNotificationType", None)
    gets, append, missing = reader.gets, replies.append, _NOT_ENOUGH_DATA
    while len(replies) < count:
        reply = gets()
        if reply is missing:
            try:
                fill()
            except OSError as exc:
                # redis-py's own read path turns socket errors (a reset when the server
                # dies mid-reply) into its ConnectionError, which callers treat as
                # transient; reading past it must do the same.
                raise RedisConnectionError(f"Error while reading from socket: {exc}") from exc
        elif isinstance(reply, RedisConnectionError):
            raise reply  # a protocol error: the replies that follow cannot be trusted
        elif push_type is not None and isinstance(reply, push_type):
            parser.handle_push_response(reply)  # RESP3 push: not a reply of ours
        else:
            append(reply)
    return replies


def round_trip(client: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Every command in one write on one pooled connection, every reply read (errors in
    their place, like `execute(raise_on_error=False)`). A connection error disconnects
    and raises: replies may be left unread, so that socket is never handed out again."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([b"".join(pack(args) for args in commands)])
        return read_replies(conn, len(commands))
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def hash_fields(reply: Any) -> dict[str, str]:
    """An HGETALL reply as a dict (RESP3 gives one; RESP2 a flat list of pairs)."""
    if isinstance(reply, dict):
        return reply
    it = iter(reply or ())
    return dict(zip(it, it, strict=False))
