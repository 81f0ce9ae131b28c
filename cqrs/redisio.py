"""Packed round trips to Redis for the hot paths (projector batches, query get-by-id).

redis-py's `Pipeline` spends Python on every command (command stack, response
callbacks) and `Connection.read_response` on every reply (timeouts, health checks,
push-message handling). On paths that send thousands of commands per batch, or whose
whole budget is one round trip, that is more than the commands themselves (figures:
docs/benchmarks.md, "Costs the code's comments rely on"). These helpers
pack commands with hiredis into one write on a pooled connection and take the replies
straight from the connection's hiredis reader. Replies are raw (no response callbacks):
callers know what they asked for. With any other parser they go the documented way.

They read private attributes of redis-py's hiredis parser (`_parser._reader`,
`read_from_socket`); each is looked up with a fallback, so a redis-py that moves them
costs speed, not correctness.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    DataError,
    MovedError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

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
    and raises: replies may be left unread, so that socket is never handed out again.

    On a Redis Cluster client: one packed write per node holding the commands' slots
    (`cluster_round_trip`)."""
    if is_cluster_client(client):
        return cluster_round_trip(client, commands)
    return pool_round_trip(client.connection_pool, commands)


def pool_round_trip(pool: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """One packed write on one connection of `pool`, one reply read per command; a
    connection left in doubt (an error mid-read) is dropped, not returned to the pool."""
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


# --- Redis Cluster ---------------------------------------------------------------------
#
# The routing rule (every command this project sends in a packed round trip obeys it):
# a command is routed by ONE key, the one `command_key` finds:
#   - EVAL/EVALSHA(_RO): the first key after numkeys (`EVALSHA sha n key...`); a script's
#     keys share one hash tag (cqrs.keys), so the first names the slot of all;
#   - XREAD/XREADGROUP: the first key after STREAMS (we read one stream per command);
#   - PUBLISH, PING, ECHO: no key (any node). PUBLISH and SPUBLISH (routed by its
#     channel) are sent after every other command of the trip has replied, so a wake-up
#     never overtakes the writes it announces (on one node that order comes free: one
#     connection, one queue);
#   - everything else: args[1] (HGETALL/HGET/GET/EXISTS/XADD/XACK/XPENDING/XCLAIM/XRANGE/
#     ZADD/SET ... key ...). A multi-key command (EXISTS a b) must keep its keys in one
#     slot; Redis answers CROSSSLOT otherwise, in that command's place.
_EVALS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
_STREAM_READS = frozenset({"XREAD", "XREADGROUP"})
_KEYLESS = frozenset({"PUBLISH", "PING", "ECHO"})
_NOTIFICATIONS = frozenset({"PUBLISH", "SPUBLISH"})
# Commands of ours whose key is args[1], spelled as we send them.
# fmt: off
_PLAIN = frozenset({
    "HGET", "HGETALL", "HMGET", "HSET", "HSETNX", "HDEL", "HINCRBY", "EXISTS", "GET", "SET",
    "DEL", "UNLINK", "XADD", "XACK", "XPENDING", "XCLAIM", "XAUTOCLAIM", "XRANGE", "XLEN",
    "XREVRANGE", "XTRIM", "ZADD", "ZRANGE", "ZREVRANGE", "ZRANGEBYSCORE", "ZSCORE",
    "ZREMRANGEBYSCORE", "ZCOUNT", "ZCARD", "SADD", "SREM", "SMEMBERS", "SCARD", "TYPE",
    "PEXPIRE", "EXPIRE",
})
# fmt: on
# Replies that mean "ask the cluster again": the slot moved (failover, resharding), is
# migrating, or the cluster is between states. Retried after a slot-map refresh.
_REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError)
# Tries of a cluster round trip (the first included) before the errors stand.
CLUSTER_ATTEMPTS = 3


def is_cluster_client(client: Any) -> bool:
    """A `redis.cluster.RedisCluster` (sync); the async twin has `nodes_manager` too."""
    return hasattr(client, "nodes_manager")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def command_key(args: tuple[Any, ...]) -> Any | None:
    """The key that routes `args` on a cluster (see the rule above); None: any node."""
    name = args[0] if type(args[0]) is str else _text(args[0])
    if name in _PLAIN:  # the common case, without upper() or set tests
        return args[1]
    name = name.upper()
    if name in _KEYLESS:
        return None
    if name in _EVALS:
        return args[3] if int(args[2]) > 0 else None
    if name in _STREAM_READS:
        for i, arg in enumerate(args):
            if isinstance(arg, str | bytes) and _text(arg).upper() == "STREAMS":
                return args[i + 1]
        return None
    return args[1] if len(args) > 1 else None


def _is_notification(args: tuple[Any, ...]) -> bool:
    name = args[0]
    return name not in _PLAIN and _text(name).upper() in _NOTIFICATIONS


def slot_of(key: Any) -> int:
    return key_slot(key if isinstance(key, bytes) else str(key).encode())


def _send_and_read(
    pools: list[Any], batches: list[tuple[list[int], list[tuple[Any, ...]]]]
) -> list[tuple[list[int], list[Any] | BaseException]]:
    """Send every batch (one per node) before reading any reply, so the nodes execute
    their parts at the same time: a trip over three masters takes about the time of the
    slowest, not the sum, without threads. A node that fails gives its exception in
    place of its replies (its socket dropped); other nodes are read regardless."""
    sent: list[tuple[Any, Any, list[int], int]] = []
    outcome: list[tuple[list[int], list[Any] | BaseException]] = []
    try:
        for node_pool, (indexes, commands) in zip(pools, batches, strict=True):
            try:
                # redis-py connects here: a dead node fails now, not at the write.
                conn = node_pool.get_connection()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                outcome.append((indexes, exc))
                continue
            try:
                conn.send_packed_command([b"".join(pack(args) for args in commands)])
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                conn.disconnect()
                node_pool.release(conn)
                outcome.append((indexes, exc))
                continue
            except BaseException:
                conn.disconnect()
                node_pool.release(conn)
                raise
            sent.append((node_pool, conn, indexes, len(commands)))
        while sent:
            node_pool, conn, indexes, count = sent.pop(0)
            try:
                outcome.append((indexes, read_replies(conn, count)))
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                conn.disconnect()
                outcome.append((indexes, exc))
            except BaseException:
                conn.disconnect()
                raise
            finally:
                node_pool.release(conn)
    except BaseException:
        for node_pool, conn, _, _ in sent:  # replies left unread: never reuse the sockets
            conn.disconnect()
            node_pool.release(conn)
        raise
    return outcome


def cluster_round_trip(client: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """`round_trip` on a `RedisCluster`: commands grouped by the master of their slot
    (the client's slot cache), one packed write per master, all sent before any reply
    is read; keyless commands (PUBLISH) after the rest (see the routing rule).

    Replies come back in the commands' order. Each node keeps the order of its own
    commands; commands on different nodes touch different keys, so no order between
    them is promised or needed (a script's keys, and a stream and its group, share a
    slot).

    MOVED/ASK/TRYAGAIN/CLUSTERDOWN replies and connection errors (a master died, its
    replica not yet promoted) refresh the slot map and resend only the affected commands,
    up to `CLUSTER_ATTEMPTS` tries in all; then redis-py's ConnectionError is raised
    (every caller's back-off handles it; `_give_up_if`). Resending is safe for what we
    send: reads, idempotent version-gated scripts, XACK, and XADDs of the relay whose
    duplicates the gates absorb (docs/scaling.md)."""
    replies: list[Any] = [None] * len(commands)
    keys = [command_key(c) for c in commands]
    notify = [_is_notification(c) for c in commands]
    writes = [i for i, n in enumerate(notify) if not n]
    notifications = [i for i, n in enumerate(notify) if n]
    for phase in (writes, notifications):
        todo, asking = phase, {}
        failure: BaseException | None = None
        for attempt in range(CLUSTER_ATTEMPTS):
            if not todo:
                break
            if attempt:
                _refresh(client)
            groups: dict[str, tuple[Any, list[int], list[tuple[Any, ...]]]] = {}
            nodes = _NodeCache(client)
            for i in todo:
                node = asking.get(i) or nodes.of(keys[i])
                _, indexes, batch = groups.setdefault(node.name, (node, [], []))
                indexes.append(i)
                if i in asking:  # ASK: this one command, on the importing node
                    batch.append(("ASKING",))
                batch.append(commands[i])
            pools = [client.get_redis_connection(n).connection_pool for n, _, _ in groups.values()]
            batches = [(ix, batch) for _, ix, batch in groups.values()]
            asked, todo, asking, failure = asking, [], {}, None
            for indexes, result in _send_and_read(pools, batches):
                if isinstance(result, BaseException):
                    failure = result
                    todo += indexes
                    continue
                results = iter(result)
                for i in indexes:
                    if i in asked:
                        next(results)  # ASKING's own +OK
                    reply = replies[i] = next(results)
                    if isinstance(reply, AskError):
                        asking[i] = _node_at(client, reply)
                        todo.append(i)
                    elif isinstance(reply, _REDIRECTS):
                        todo.append(i)
            todo.sort()
        _give_up_if(todo, failure, replies)
    return replies


def _give_up_if(
    todo: list[int], failure: BaseException | None, replies: list[Any] | None = None
) -> None:
    """Commands still to do after the last try: redis-py's ConnectionError, which the
    callers' back-off treats like any unreachable Redis (the HTTP API answers 503). Both
    causes are a cluster in transition, not an answer about the command: a node that
    failed, or a reply that still redirects (CLUSTERDOWN while a failover elects a
    replica lasts seconds, longer than the tries; MOVED/ASK/TRYAGAIN that kept coming).
    Left in place as a reply, such an error would read as the command's own (a query
    reported a "bad view" for CLUSTERDOWN)."""
    if not todo:
        return
    cause = failure if failure is not None else (replies[todo[0]] if replies else None)
    raise RedisConnectionError(
        f"Redis Cluster: {len(todo)} command(s) failed after {CLUSTER_ATTEMPTS} tries: {cause}"
    ) from cause


class _NodeCache:
    """Slot -> master for one trip: a batch touches few slots many times, and redis-py's
    lookup (a lock, an argument-checking wrapper) costs more than the rest of routing."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.by_slot: dict[int, Any] = {}

    def of(self, key: Any | None) -> Any:
        if key is None:
            return self.client.get_default_node()
        slot = key_slot(key.encode() if type(key) is str else key)
        node = self.by_slot.get(slot)
        if node is None:
            # The slot cache's first node is the master (redis-py's layout); anything
            # else (an uncovered slot) goes the documented way, which raises.
            owners = getattr(self.client.nodes_manager, "slots_cache", {}).get(slot)
            node = owners[0] if owners else self.client.nodes_manager.get_node_from_slot(slot)
            self.by_slot[slot] = node
        return node


def _node_at(client: Any, error: AskError) -> Any:
    host, port = error.node_addr
    node = client.get_node(host=host, port=int(port))
    if node is None:
        _refresh(client)
        node = client.get_node(host=host, port=int(port))
    return node or client.get_default_node()


def _refresh(client: Any) -> None:
    """Ask the cluster for its slot map again (after MOVED, or a node that stopped
    answering). A refresh that fails (every known node unreachable right now) keeps the
    old map: the next try fails the same way and the caller's back-off takes over."""
    time.sleep(0.05)  # a failover or migration step in progress: give it a moment
    with contextlib.suppress(redis.RedisError, OSError):
        client.nodes_manager.initialize()
    # Keyless commands (PUBLISH, PING) go to the default node: never a dead one.
    default = client.get_default_node()
    primaries = client.get_primaries()
    if primaries and (default is None or default.name not in {n.name for n in primaries}):
        client.set_default_node(primaries[0])


async def send_and_read_async(conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Write the packed commands and read one reply per command, error replies as
    exception objects in their place. With redis-py's hiredis parser the bytes go
    straight to the connection's stream writer and the replies come straight from its
    reader; any other layout goes through the documented (slower) calls."""
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    writer = getattr(conn, "_writer", None)
    fill = getattr(parser, "read_from_socket", None)
    if reader is None or writer is None or fill is None or _NOT_ENOUGH_DATA is None:
        await conn.send_packed_command(b"".join(pack(c) for c in commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies
    writer.write(b"".join(pack(c) for c in commands))
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


async def round_trip_async(client: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """`round_trip` on redis.asyncio (the HTTP server): every command in one write on
    one pooled connection, every reply read, errors in their place; on a cluster client,
    one packed write per master (`cluster_round_trip_async`). One `asyncio.timeout` (the
    client's socket timeout) covers the write and the replies; waiting for a free
    connection is the pool's business and outside it. A connection or timeout error
    disconnects (replies may be left unread) and raises redis-py's error."""
    import asyncio

    if is_cluster_client(client):
        return await cluster_round_trip_async(client, commands)
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        async with asyncio.timeout(conn.socket_timeout):
            return await send_and_read_async(conn, commands)
    except TimeoutError:
        await conn.disconnect()
        raise RedisTimeoutError(f"Timeout reading from {conn.host}") from None
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


async def cluster_round_trip_async(
    client: Any,
    commands: list[tuple[Any, ...]],
    send_and_read: Any = None,
) -> list[Any]:
    """`cluster_round_trip` on `redis.asyncio.cluster.RedisCluster` (the HTTP server):
    one packed write per master, the masters' parts awaited together, redirects and
    failed nodes retried after a slot-map refresh (bounded), then ConnectionError.
    `send_and_read(conn, commands)` writes and reads one node's part (by default the
    hiredis-direct `send_and_read_async`)."""
    import asyncio

    send_and_read = send_and_read or send_and_read_async

    await client.initialize()  # the slot map, once (a no-op after the first call)
    replies: list[Any] = [None] * len(commands)
    keys = [command_key(c) for c in commands]
    last = [_text(c[0]).upper() in _NOTIFICATIONS for c in commands]
    phases = ([i for i, n in enumerate(last) if not n], [i for i, n in enumerate(last) if n])

    async def one_node(node: Any, batch: list[tuple[Any, ...]]) -> list[Any] | BaseException:
        conn = node.acquire_connection()
        try:
            return list(await send_and_read(conn, batch))
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
            await conn.disconnect()
            return exc
        except BaseException:
            await conn.disconnect()  # replies may be left unread on it
            raise
        finally:
            node.release(conn)

    for todo in phases:
        failure: BaseException | None = None
        asking: dict[int, Any] = {}
        for attempt in range(CLUSTER_ATTEMPTS):
            if not todo:
                break
            if attempt and len(asking) < len(todo):  # a pure ASK retry needs no new map
                await asyncio.sleep(0.05)
                with contextlib.suppress(redis.RedisError, OSError):
                    await client.nodes_manager.initialize()
            groups: dict[str, tuple[Any, list[int], list[tuple[Any, ...]]]] = {}
            for i in todo:
                node = asking.get(i) or (
                    client.get_default_node()
                    if keys[i] is None
                    else client.nodes_manager.get_node_from_slot(slot_of(keys[i]))
                )
                _, indexes, batch = groups.setdefault(node.name, (node, [], []))
                indexes.append(i)
                if i in asking:  # ASK: this one command, on the importing node
                    batch.append(("ASKING",))
                batch.append(commands[i])
            results = await asyncio.gather(
                *(one_node(node, batch) for node, _, batch in groups.values())
            )
            asked, todo, asking, failure = asking, [], {}, None
            for (_, indexes, _), result in zip(groups.values(), results, strict=True):
                if isinstance(result, BaseException):
                    failure = result
                    todo += indexes
                    continue
                got = iter(result)
                for i in indexes:
                    if i in asked:
                        next(got)  # ASKING's own +OK
                    reply = replies[i] = next(got)
                    if isinstance(reply, AskError):
                        asking[i] = _async_node_at(client, reply)
                        todo.append(i)
                    elif isinstance(reply, _REDIRECTS):
                        todo.append(i)
            todo.sort()
        _give_up_if(todo, failure, replies)
    return replies


def _async_node_at(client: Any, error: AskError) -> Any:
    """The node an ASK names (a master of the cluster, so in the client's node list)."""
    host, port = error.node_addr
    return client.get_node(host=host, port=int(port)) or client.get_default_node()


# --- wake-ups (pub/sub) ----------------------------------------------------------------
#
# On one node: PUBLISH/SUBSCRIBE. On a cluster a PUBLISH is broadcast over the cluster
# bus to every node, whoever listens, and costs every node the message; sharded pub/sub
# (Redis 7+/Valkey: SPUBLISH/SSUBSCRIBE) keeps a channel on the master of its slot, where
# its subscribers connect. Every wake-up of ours goes through these helpers, so a
# publisher and its subscribers always agree on the kind.


def publish_command(client: Any, channel: str, message: Any) -> tuple[Any, ...]:
    """The wake-up as a command to pack into a round trip (`round_trip` sends it after
    the trip's writes on a cluster)."""
    return ("SPUBLISH" if is_cluster_client(client) else "PUBLISH", channel, message)


def publish(client: Any, channel: str, message: Any) -> None:
    """Send one wake-up now."""
    round_trip(client, [publish_command(client, channel, message)])


class Subscription:
    """One channel's wake-ups on a synchronous client (sharded on a cluster). Connection
    errors propagate: the callers' back-off drops the subscription and opens a new one,
    which on a cluster finds the channel's master after a failover."""

    def __init__(self, client: Any, channel: str) -> None:
        self.sharded = is_cluster_client(client)
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            if self.sharded:
                self.pubsub.ssubscribe(channel)
            else:
                self.pubsub.subscribe(channel)
        except BaseException:
            self.close()
            raise

    def get_message(self, timeout: float) -> Any | None:
        """The next message, or None after `timeout` seconds (0: do not wait)."""
        if self.sharded:
            return self.pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=timeout)
        return self.pubsub.get_message(timeout=timeout)

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            self.pubsub.close()


class AsyncSubscription:
    """`Subscription` on redis.asyncio (the HTTP server's read-your-writes listener)."""

    def __init__(self, client: Any) -> None:
        self.sharded = is_cluster_client(client)
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)

    async def subscribe(self, channel: str) -> None:
        if self.sharded:
            await self.pubsub.ssubscribe(channel)
        else:
            await self.pubsub.subscribe(channel)

    async def get_message(self, timeout: float) -> Any | None:
        if self.sharded:
            return await self.pubsub.get_sharded_message(
                ignore_subscribe_messages=True, timeout=timeout
            )
        return await self.pubsub.get_message(timeout=timeout)

    async def aclose(self) -> None:
        await self.pubsub.aclose()
