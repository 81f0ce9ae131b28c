"""Get-by-id on redis.asyncio, for the HTTP API.

`QueryService` is synchronous; an HTTP endpoint calling it has to run in the threadpool,
and that hop (hand the call to a worker thread, wait for its result on the event loop) cost
more than the Redis round trip and the model together. This reader does the same single
round trip (live generation + HGETALL in one write) on the event loop itself, without
blocking it, and returns the same validated models, so a corrupted view is the same
`BadView` as in `QueryService`.

Lists, top products and `?after=` waits stay on `QueryService` (they are not the
latency-critical path); the generation each reader last saw is kept per reader, exactly
as `QueryService` keeps it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID

import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cqrs.keys import KeyMap, ViewKeys
from cqrs.urls import redis_url as to_redis_url
from queries.errors import BadView, NotFound
from queries.models import CustomerView, OrderView, ProductView
from queries.service import QueryService, hash_fields, order_view, view_id, view_model

try:  # redis[hiredis] is a dependency; the fallback only keeps a bare redis-py working
    from hiredis import pack_command as _hiredis_pack
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover
    _hiredis_pack = None
    _NOT_ENOUGH_DATA = None


async def _send_and_read(conn: Any, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Write the packed commands and read one reply per command, error replies as
    exception objects in their place. With redis-py's hiredis parser the bytes go
    straight to the connection's stream writer and the replies come straight from its
    reader; any other layout goes through the documented (slower) calls."""
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    writer = getattr(conn, "_writer", None)
    fill = getattr(parser, "read_from_socket", None)
    if reader is None or writer is None or fill is None or _NOT_ENOUGH_DATA is None:
        payload = (
            b"".join(_hiredis_pack(c) for c in commands)
            if _hiredis_pack is not None
            else b"".join(conn.pack_commands(commands))
        )
        await conn.send_packed_command(payload)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies
    writer.write(b"".join(_hiredis_pack(c) for c in commands))
    await writer.drain()
    push_type = getattr(parser, "_hiredis_PushNotificationType", None)
    replies = []
    while len(replies) < len(commands):
        reply = reader.gets()
        if reply is _NOT_ENOUGH_DATA:
            await fill()
        elif isinstance(reply, RedisConnectionError):
            raise reply  # a protocol error: the replies that follow cannot be trusted
        elif push_type is not None and isinstance(reply, push_type):
            await parser.handle_push_response(reply)
        else:
            replies.append(reply)
    return replies


def make_async_redis(url: str, *, socket_timeout: float) -> redis.asyncio.Redis:
    """An asyncio client with the options `cqrs.wiring.make_redis` gives the sync one
    (decoded replies with errors replaced, the same timeouts, no retry on timeout)."""
    return redis.asyncio.Redis.from_url(
        to_redis_url(url),
        decode_responses=True,
        encoding_errors="replace",
        socket_timeout=socket_timeout,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry_on_timeout=False,
    )


class ThreadpoolViews:
    """AsyncViews' methods over a given synchronous QueryService, each call run in a
    worker thread: for an app embedding its own service (`create_app(service_factory=)`)
    without an asyncio client."""

    def __init__(self, service: QueryService) -> None:
        self.service = service

    async def aclose(self) -> None:
        """The service belongs to whoever built it."""

    async def get_product(self, product_id: UUID | str) -> ProductView:
        return await asyncio.to_thread(self.service.get_product, product_id)

    async def get_customer(self, customer_id: UUID | str) -> CustomerView:
        return await asyncio.to_thread(self.service.get_customer, customer_id)

    async def get_order(self, order_id: UUID | str) -> OrderView:
        return await asyncio.to_thread(self.service.get_order, order_id)


class AsyncViews:
    def __init__(self, client: redis.asyncio.Redis, keys: KeyMap) -> None:
        self.redis = client
        self.keys = keys
        self._generations: dict[str, int] = {}

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def _round_trip(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """The commands in one write on one pooled connection, their replies in order;
        one more try on a fresh connection after a connection error (they are reads),
        BadView for an error reply (see `QueryService._round_trip`).

        redis.asyncio's own send and read cost ~50 us more than this for the pair: each
        `send_packed_command` runs in an `asyncio.wait_for` (a task per write) and each
        `read_response` in a timeout context of its own. Here one `asyncio.timeout`
        (the client's socket timeout) covers the write and both replies, read straight
        from the connection's hiredis reader (`_read_replies`)."""
        pool = self.redis.connection_pool
        for attempt in (1, 2):
            conn = await pool.get_connection()
            try:
                async with asyncio.timeout(conn.socket_timeout):
                    replies = await _send_and_read(conn, commands)
                for command, reply in zip(commands, replies, strict=True):
                    if isinstance(reply, ResponseError):
                        raise BadView(f"view {command[1]} cannot be read: {reply}")
                return replies
            except RedisConnectionError:
                await conn.disconnect()
                if attempt == 2:
                    raise
            except TimeoutError:
                await conn.disconnect()
                raise RedisTimeoutError(f"Timeout reading from {conn.host}") from None
            except BaseException:
                await conn.disconnect()  # later replies may be unread on it
                raise
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _view(
        self, projection: str, key_of: Callable[[ViewKeys], str]
    ) -> tuple[str, dict[str, str]]:
        generation_key = self.keys.generation(projection)
        for _ in range(3):
            assumed = self._generations.get(projection, 1)
            key = key_of(self.keys.views(projection, assumed))
            live, data = await self._round_trip((("GET", generation_key), ("HGETALL", key)))
            if int(live or 0) == assumed:
                break
            self._generations[projection] = int(live or 0)  # a rebuild switched: read again
        return key, hash_fields(data)

    async def get_product(self, product_id: UUID | str) -> ProductView:
        pid = view_id(product_id, "product")
        key, data = await self._view("products", lambda v: v.product(pid))
        if not data.get("version"):
            raise NotFound(f"product {pid} not found")
        return view_model(ProductView, data, key)

    async def get_customer(self, customer_id: UUID | str) -> CustomerView:
        cid = view_id(customer_id, "customer")
        key, data = await self._view("customers", lambda v: v.customer(cid))
        if not data.get("version"):
            raise NotFound(f"customer {cid} not found")
        return view_model(CustomerView, data, key)

    async def get_order(self, order_id: UUID | str) -> OrderView:
        oid = view_id(order_id, "order")
        key, data = await self._view("orders", lambda v: v.order(oid))
        if not data.get("version"):
            raise NotFound(f"order {oid} not found")
        return order_view(data, key)
