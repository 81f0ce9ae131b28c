"""Reads from replicas (`CQRS_READ_FROM=replicas`): which nodes may serve the query
side's reads, and where each read of one request goes. The one place that knows the
replica topology: `QueryService` (CLI, Python API) and `AsyncViews` (`cqrs serve`) route
their packed round trips through it, on one primary with replicas or on a cluster.

**Which replicas.** Each primary (the one node, or every master of a cluster) lists its
replicas in `INFO replication` (`slaveN:ip=..,port=..,state=online,offset=..,lag=..`).
On one node those addresses are the replicas; on a cluster the replicas of each master
come from the client's slot map (the addresses the cluster announces to clients) and are
matched with their master's list. A replica serves reads while its primary calls it
`online` and its `lag`, the seconds since it last acknowledged the replication stream,
is at most `CQRS_REPLICA_MAX_LAG`. Replicas acknowledge every second whatever the
traffic, so a healthy one reports 0 or 1; one that stops applying the stream (paused,
overloaded, cut off) stops acknowledging, and is skipped once its silence passes the
limit. (The byte offsets in the same line are only as fresh as the last acknowledgement,
so they tell no more; the replica's own `master_last_io_seconds_ago` counts the
primary's pings, which an idle primary sends only every 10 s.) The lists are read again
every `REFRESH_SECONDS`, and at the next request after a replica failed; a replica that
fails (refused connection, `LOADING`, a timeout) is skipped for `DOWN_SECONDS` and the
reads it had go to its primary. A failover changes the cluster's slot map: a replica's
`MOVED` or error reply sends that read to the primary path (which refreshes the map)
and the next refresh builds the shards again.

**Read-your-writes.** A token's check (`ViewPlans._behind`: the projections' live
generation numbers, then the applied marks the token names) is a request like any other,
and every key it read is remembered with the replica that answered (`Route.served`).
The read it guards then goes, key by key: a key the check read on a replica (the
generation numbers; the marks, which for the built-in views are the views' own hashes)
is read on that same replica, and every other key on its primary (`Route(pins=...)`).
Why that holds: a replica applies its primary's writes in the primary's order and never
goes back, so a replica that showed a mark at the token's version shows it still at the
later read, with everything its primary wrote before it. Why not more: a key the check
did not read may have been written on *another* master before the mark was (an order's
entry in its customer's index precedes the order view's mark, on another slot), and
only its primary is sure to have it, exactly as without replicas. A replica that shows
a mark below the token is not waited on: the check is asked again of the primaries at
once, and when they satisfy it the guarded read goes to the primaries (a lagging
replica costs one trip, never a wait, and the waits stay as long as on one node).

Within one request each shard's reads stay on the node first picked for it, so the
second trip of a list (the page's views) never reads an older replica than the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import AskError, ClusterDownError, MovedError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cqrs.redisio import (
    command_key,
    is_cluster_client,
    pack,
    read_replies,
    send_and_read_async,
    slot_of,
)

log = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0
DOWN_SECONDS = 5.0
# How often, at most, a cluster's slot map is read again because a master lists a
# replica the map lacks (one added, or one the answering node had not heard of yet).
SLOT_MAP_SECONDS = 5.0
# A node that fails this way is skipped and its commands go to the primary path.
_NODE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
# Error replies of a primary that mean "ask the cluster again" (the primary path does).
_REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError)

Commands = list[tuple[Any, ...]]


@dataclass(eq=False)
class Node:
    """A node that serves reads. `handle` sends to it: a redis-py connection pool (sync)
    or a link with `acquire()`/`release(conn)` (async)."""

    name: str
    handle: Any = field(repr=False)
    replica: bool = False
    readonly: bool = False  # a cluster replica: READONLY ahead of every trip's reads


@dataclass(eq=False)
class Shard:
    """A primary and its replicas that may serve reads now (as last refreshed)."""

    primary: Node
    replicas: list[Node] = field(default_factory=list)


def reported_replicas(info: Any) -> dict[tuple[str, int], tuple[str, int]]:
    """(ip, port) -> (state, lag) of each replica a primary's `INFO replication` lists
    (the raw text, or redis-py's parsed dict)."""
    found: dict[tuple[str, int], tuple[str, int]] = {}
    if isinstance(info, dict):
        entries = [v for k, v in info.items() if _is_replica_line(k) and isinstance(v, dict)]
    else:
        text = info.decode() if isinstance(info, bytes) else str(info or "")
        entries = []
        for line in text.splitlines():
            name, _, value = line.strip().partition(":")
            if _is_replica_line(name):
                entries.append(dict(p.split("=", 1) for p in value.split(",") if "=" in p))
    for entry in entries:
        try:
            address = (str(entry["ip"]), int(entry["port"]))
            found[address] = (str(entry.get("state", "")), int(entry.get("lag", -1)))
        except (KeyError, ValueError):
            continue
    return found


def _is_replica_line(name: str) -> bool:
    return name.startswith("slave") and name[5:].isdigit()


def unusable(
    reported: dict[tuple[str, int], tuple[str, int]], host: str, port: int, max_lag: float
) -> str | None:
    """Why the replica at host:port may not serve reads now, or None when it may. Matched
    by address, or by port alone when its primary sees it under another address (NAT,
    `replica-announce-ip`) and that port is unique in the list."""
    entry = reported.get((host, port))
    if entry is None:
        by_port = [e for (_, p), e in reported.items() if p == port]
        entry = by_port[0] if len(by_port) == 1 else None
    if entry is None:
        return "its primary does not list it"
    state, lag = entry
    if state != "online":
        return f"its primary reports it {state or 'not online'}"
    if lag < 0 or lag > max_lag:
        return f"its primary last heard from it {lag}s ago (CQRS_REPLICA_MAX_LAG={max_lag:g})"
    return None


class ReadNodes:
    """The shards as last refreshed, which replica serves a shard's reads, and which
    replicas failed lately: the state the sync and async drivers share."""

    def __init__(self, client: Any, *, replicas: bool, max_lag: float) -> None:
        self.client = client
        self.cluster = is_cluster_client(client)
        self.read_from_replicas = replicas
        self.max_lag = max_lag
        self.shards: dict[str, Shard] = {}
        # Replicas that serve no reads now, and why (logged when it changes; tests read it).
        self.skipped: dict[str, str] = {}
        self.refreshed_at: float | None = None
        self._stale = False
        self._down: dict[str, float] = {}
        self._turn = itertools.count()
        self._handles: dict[str, Any] = {}
        # A master lists an online replica the client's slot map lacks (`_install`).
        self.unmapped = False
        self._slot_map_read: float | None = None

    # --- routing -----------------------------------------------------------------------

    def due(self) -> bool:
        if self.refreshed_at is None or self._stale:
            return True
        return time.monotonic() - self.refreshed_at >= REFRESH_SECONDS

    def shard_of(self, key: Any) -> Shard | None:
        """The shard holding `key`; None when the topology does not know it (yet)."""
        if not self.cluster:
            return next(iter(self.shards.values()), None)
        owners = self.client.nodes_manager.slots_cache.get(slot_of(key))
        return self.shards.get(owners[0].name) if owners else None

    def pick(self, shard: Shard) -> Node:
        """A replica of `shard` for one request's reads (in turn), else its primary."""
        now = time.monotonic()
        live = [r for r in shard.replicas if self._down.get(r.name, 0.0) <= now]
        if not live:
            return shard.primary
        return live[next(self._turn) % len(live)]

    def is_down(self, node: Node) -> bool:
        return node.replica and self._down.get(node.name, 0.0) > time.monotonic()

    def failed(self, node: Node, why: object) -> None:
        """A node's trip failed: a replica is skipped for a while; either way the
        topology is read again at the next request (a failover may be under way)."""
        self._stale = True
        if node.replica:
            if not self.is_down(node):
                log.warning(
                    "replica %s skipped for %gs: %s; its primary serves its reads",
                    node.name,
                    DOWN_SECONDS,
                    why,
                )
            self._down[node.name] = time.monotonic() + DOWN_SECONDS

    # --- building the shards -----------------------------------------------------------

    def _layout(self) -> list[tuple[str, Any, list[tuple[str, str, int, Any]]]]:
        """(primary name, its cluster node, [(replica name, host, port, cluster node)])
        per shard; on one node the replicas come from the primary's own list."""
        if not self.cluster:
            return [("primary", None, [])]
        masters: dict[str, tuple[Any, dict[str, Any]]] = {}
        for owners in self.client.nodes_manager.slots_cache.values():
            if not owners:
                continue
            _, replicas = masters.setdefault(owners[0].name, (owners[0], {}))
            for node in owners[1:]:
                replicas[node.name] = node
        return [
            (name, node, [(r.name, r.host, int(r.port), r) for r in replicas.values()])
            for name, (node, replicas) in masters.items()
        ]

    def _handle(self, name: str, host: str | None, port: int | None, node: Any) -> Any:
        raise NotImplementedError

    def _cached_handle(self, name: str, host: str | None, port: int | None, node: Any) -> Any:
        """A node's handle, made once per node (a cluster node object replaced after a
        failover gets a new one)."""
        handle = self._handles.get(name)
        if handle is None or getattr(handle, "node", node) is not node:
            handle = self._handles[name] = self._handle(name, host, port, node)
        return handle

    def _install(
        self,
        layout: list[tuple[str, Any, list[tuple[str, str, int, Any]]]],
        reports: dict[str, Any],
    ) -> None:
        """The shards from the layout and each primary's `INFO replication` (None: not
        read, so none of its replicas serves)."""
        shards: dict[str, Shard] = {}
        skipped: dict[str, str] = {}
        unmapped = False
        for name, node, candidates in layout:
            primary = Node(name, self._cached_handle(name, None, None, node))
            shard = shards[name] = Shard(primary)
            if not self.read_from_replicas:
                continue
            report = reports.get(name)
            reported = reported_replicas(report) if report is not None else {}
            if not self.cluster:
                candidates = [(f"{h}:{p}", h, p, None) for h, p in reported]
            elif any(
                state == "online" and not _mapped(address, candidates)
                for address, (state, _) in reported.items()
            ):
                unmapped = True
            for replica, host, port, cluster_node in candidates:
                why = (
                    unusable(reported, host, port, self.max_lag)
                    if report is not None
                    else "its primary's replication report could not be read"
                )
                if why:
                    skipped[replica] = why
                    continue
                handle = self._cached_handle(replica, host, port, cluster_node)
                shard.replicas.append(Node(replica, handle, replica=True, readonly=self.cluster))
        for replica, why in skipped.items():
            if self.skipped.get(replica) != why:
                log.warning("replica %s serves no reads: %s", replica, why)
        for replica in self.skipped.keys() - skipped.keys():
            log.info("replica %s serves reads again", replica)
        self.shards, self.skipped, self.unmapped = shards, skipped, unmapped
        self.refreshed_at, self._stale = time.monotonic(), False

    def slot_map_due(self) -> bool:
        """Whether to read the cluster's slot map again: a master lists a replica the
        client's map lacks, and the map was not read in the last `SLOT_MAP_SECONDS`."""
        if not self.unmapped:
            return False
        now = time.monotonic()
        if self._slot_map_read is not None and now - self._slot_map_read < SLOT_MAP_SECONDS:
            return False
        self._slot_map_read = now
        return True


def _mapped(address: tuple[str, int], candidates: list[tuple[str, str, int, Any]]) -> bool:
    """Whether a replica its master lists is among the slot map's (`unusable`'s match)."""
    host, port = address
    return any(h == host and p == port for _, h, p, _ in candidates) or (
        sum(1 for _, _, p, _ in candidates if p == port) == 1
    )


class Route:
    """Where the reads of one request go (see the module docstring).

    `primaries`: every key on its primary (the re-check after a replica said "not yet",
    or reads from replicas off). `pins`: a guarded read: the keys its check read on a
    replica, and where; every other key on its primary. Neither: each shard's reads on
    one replica picked for this request."""

    def __init__(
        self, nodes: ReadNodes, *, pins: dict[Any, Node] | None = None, primaries: bool = False
    ) -> None:
        self.nodes = nodes
        self.pins = pins
        self.primaries = primaries or not nodes.read_from_replicas
        self.chosen: dict[str, Node] = {}
        self.served: dict[Any, Node] = {}  # key -> the replica that answered it
        self.used_replicas = False

    def node_for(self, key: Any) -> Node | None:
        """The node for a command on `key`; None: the primary path (a keyless command,
        or a slot the topology does not know yet)."""
        if key is None:
            return None
        shard = self.nodes.shard_of(key)
        if shard is None:
            return None
        if self.primaries:
            return shard.primary
        if self.pins is not None:
            node = self.pins.get(key)
            return node if node is not None and not self.nodes.is_down(node) else shard.primary
        node = self.chosen.get(shard.primary.name)
        if node is None:
            node = self.chosen[shard.primary.name] = self.nodes.pick(shard)
        elif self.nodes.is_down(node):
            # Never back to another replica within a request: it may be older.
            node = self.chosen[shard.primary.name] = shard.primary
        return node

    def _group(self, commands: Commands) -> tuple[list[int], dict[str, tuple[Node, list[int]]]]:
        direct: list[int] = []
        groups: dict[str, tuple[Node, list[int]]] = {}
        for i, command in enumerate(commands):
            node = self.node_for(command_key(command))
            if node is None:
                direct.append(i)
            else:
                groups.setdefault(node.name, (node, []))[1].append(i)
        return direct, groups

    def _take(
        self,
        node: Node,
        indexes: list[int],
        got: list[Any],
        commands: Commands,
        replies: list[Any],
    ) -> list[int]:
        """Put a node's replies in place; return the commands to send on the primary path
        instead (every error reply of a replica, redirects of a primary)."""
        if node.readonly:
            ok, *got = got
            if isinstance(ok, Exception):
                self.nodes.failed(node, ok)
                return indexes
        again: list[int] = []
        for i, reply in zip(indexes, got, strict=True):
            if isinstance(reply, _REDIRECTS) or (node.replica and isinstance(reply, ResponseError)):
                again.append(i)
                if isinstance(reply, _REDIRECTS):
                    self.nodes.failed(node, reply)  # the slot map moved: read it again
                continue
            replies[i] = reply
            if node.replica:
                self.served[command_key(commands[i])] = node
                self.used_replicas = True
        return again


def _batch(node: Node, commands: Commands, indexes: list[int]) -> Commands:
    batch = [commands[i] for i in indexes]
    return [("READONLY",), *batch] if node.readonly else batch


def read_round_trip(
    route: Route, commands: Commands, primary_trip: Callable[[Commands], list[Any]]
) -> list[Any]:
    """The commands' replies, each read on the node `route` gives it: one packed write
    per node, all sent before any reply is read, the primary path's part (`primary_trip`:
    the caller's own round trip, with its retries) in between. A node that fails, and
    every error reply of a replica, sends those commands down the primary path."""
    replies: list[Any] = [None] * len(commands)
    direct, groups = route._group(commands)
    again: list[int] = []
    sent: list[tuple[Node, Any, list[int], int]] = []
    try:
        for node, indexes in groups.values():
            batch = _batch(node, commands, indexes)
            pool = node.handle
            try:
                conn = pool.get_connection()
            except _NODE_ERRORS as exc:
                route.nodes.failed(node, exc)
                again += indexes
                continue
            try:
                conn.send_packed_command([b"".join(pack(c) for c in batch)])
            except _NODE_ERRORS as exc:
                conn.disconnect()
                pool.release(conn)
                route.nodes.failed(node, exc)
                again += indexes
                continue
            except BaseException:
                conn.disconnect()
                pool.release(conn)
                raise
            sent.append((node, conn, indexes, len(batch)))
        if direct:
            for i, reply in zip(direct, primary_trip([commands[i] for i in direct]), strict=True):
                replies[i] = reply
        while sent:
            node, conn, indexes, count = sent.pop(0)
            try:
                got = read_replies(conn, count)
            except _NODE_ERRORS as exc:
                conn.disconnect()
                route.nodes.failed(node, exc)
                again += indexes
                continue
            except BaseException:
                conn.disconnect()
                raise
            finally:
                node.handle.release(conn)
            again += route._take(node, indexes, got, commands, replies)
    except BaseException:
        for node, conn, _, _ in sent:  # replies left unread: never reuse the sockets
            conn.disconnect()
            node.handle.release(conn)
        raise
    if again:
        again.sort()
        for i, reply in zip(again, primary_trip([commands[i] for i in again]), strict=True):
            replies[i] = reply
    return replies


async def read_round_trip_async(
    route: Route,
    commands: Commands,
    primary_trip: Callable[[Commands], Awaitable[list[Any]]],
) -> list[Any]:
    """`read_round_trip` on redis.asyncio: the nodes' parts (and the primary path's)
    awaited together, each under the connection's socket timeout. Waiting for a free
    connection is the link's business (and its own error, raised as is)."""
    replies: list[Any] = [None] * len(commands)
    direct, groups = route._group(commands)

    async def one(node: Node, indexes: list[int]) -> list[int]:
        batch = _batch(node, commands, indexes)
        link = node.handle
        try:
            conn = await link.acquire()  # a full pool's own error (Busy) is raised as is
        except _NODE_ERRORS as exc:
            route.nodes.failed(node, exc)
            return indexes
        try:
            async with asyncio.timeout(getattr(conn, "socket_timeout", None)):
                got = await send_and_read_async(conn, batch)
        except _NODE_ERRORS as exc:
            await conn.disconnect()
            route.nodes.failed(node, exc)
            return indexes
        except BaseException:
            await conn.disconnect()  # replies may be left unread on it
            raise
        finally:
            await link.release(conn)
        return route._take(node, indexes, got, commands, replies)

    async def primary_part() -> list[int]:
        if direct:
            got = await primary_trip([commands[i] for i in direct])
            for i, reply in zip(direct, got, strict=True):
                replies[i] = reply
        return []

    parts = await asyncio.gather(primary_part(), *(one(n, ix) for n, ix in groups.values()))
    again = sorted(i for part in parts for i in part)
    if again:
        got = await primary_trip([commands[i] for i in again])
        for i, reply in zip(again, got, strict=True):
            replies[i] = reply
    return replies


# --- the drivers: refreshing the shards over each kind of client ----------------------


class SyncReplicas(ReadNodes):
    """The shards of a synchronous client (`redis.Redis` or `RedisCluster`), refreshed
    inline by the request that finds them due (one at a time; the others route by the
    shards they have). Thread-safe like the client: the shards are swapped whole."""

    def __init__(self, client: Any, *, max_lag: float, replicas: bool = True) -> None:
        super().__init__(client, replicas=replicas, max_lag=max_lag)
        self._lock = threading.Lock()
        self._pools: list[Any] = []

    def refresh_if_due(self) -> None:
        if not self.due():
            return
        if not self._lock.acquire(blocking=self.refreshed_at is None):
            return
        try:
            if self.due():
                self.refresh()
        finally:
            self._lock.release()

    def refresh(self) -> None:
        layout = self._layout()
        reports: dict[str, Any] = {}
        if self.read_from_replicas:
            for name, node, _ in layout:
                pool = self._cached_handle(name, None, None, node)
                try:
                    conn = pool.get_connection()
                    try:
                        conn.send_packed_command([pack(("INFO", "replication"))])
                        [reports[name]] = read_replies(conn, 1)
                    except BaseException:
                        conn.disconnect()
                        raise
                    finally:
                        pool.release(conn)
                except (*_NODE_ERRORS, redis.RedisError) as exc:
                    log.debug("no replication report from %s: %s", name, exc)
                if isinstance(reports.get(name), Exception):
                    reports.pop(name)
        self._install(layout, reports)
        if self.slot_map_due():
            with contextlib.suppress(*_NODE_ERRORS, redis.RedisError):
                self.client.nodes_manager.initialize()
                self._install(self._layout(), reports)

    def _cached_handle(self, name: str, host: str | None, port: int | None, node: Any) -> Any:
        if self.cluster:  # redis-py keeps a pool per node, and a new one after a failover
            return self.client.get_redis_connection(node).connection_pool
        return super()._cached_handle(name, host, port, node)

    def _handle(self, name: str, host: str | None, port: int | None, node: Any) -> Any:
        base = self.client.connection_pool
        if host is None:
            return base
        kwargs = {**base.connection_kwargs, "host": host, "port": port}
        connection_class = base.connection_class
        if "path" in kwargs:  # the primary over a unix socket; replicas are host:port
            kwargs.pop("path")
            connection_class = redis.Connection
        pool = redis.ConnectionPool(connection_class=connection_class, **kwargs)
        self._pools.append(pool)
        return pool

    def close(self) -> None:
        for pool in self._pools:
            pool.disconnect()


class PoolLink:
    """An async link over a redis.asyncio connection pool (one node); `owned`: made for
    a replica, closed with the topology."""

    def __init__(self, pool: Any, *, owned: bool = False) -> None:
        self.pool = pool
        self.owned = owned

    async def acquire(self) -> Any:
        return await self.pool.get_connection()

    async def release(self, conn: Any) -> None:
        await self.pool.release(conn)

    async def aclose(self) -> None:
        if self.owned:
            await self.pool.disconnect()


# (name, host, port, cluster node) -> a link with acquire()/release(conn)
LinkFactory = Callable[[str, str | None, int | None, Any], Any]


class AsyncReplicas(ReadNodes):
    """The shards of a redis.asyncio client, refreshed in the background: a request that
    finds them due starts a refresh and routes by the shards it has (it waits for the
    refresh only while there are none). `link` makes the handle of a cluster node, or of
    a replica of one node (the caller's waiting pools); the one node's primary is the
    client's own pool."""

    def __init__(
        self, client: Any, *, link: LinkFactory, max_lag: float, replicas: bool = True
    ) -> None:
        super().__init__(client, replicas=replicas, max_lag=max_lag)
        self._link = link
        self._refreshing: asyncio.Task[None] | None = None
        self._failing = False

    async def refresh_if_due(self) -> None:
        if not self.due():
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh(), name="cqrs-replicas")
        if not self.shards:  # nothing to route by yet (the first request, or Redis was down)
            await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        """Never raises: a topology that cannot be read keeps the last one (or none:
        every read on the primary path) and is asked again a second later."""
        try:
            if self.cluster:
                await self.client.initialize()  # the slot map, once
            layout = self._layout()
            reports: dict[str, Any] = {}
            if self.read_from_replicas:
                names = [name for name, _, _ in layout]
                got = await asyncio.gather(
                    *(self._report(self._cached_handle(n, None, None, c)) for n, c, _ in layout)
                )
                reports = {n: r for n, r in zip(names, got, strict=True) if r is not None}
            self._install(layout, reports)
            if self.slot_map_due():
                await self.client.nodes_manager.initialize()
                self._install(self._layout(), reports)
            if self._failing:
                log.info("replica topology read again")
            self._failing = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._failing:
                log.warning("cannot read the replica topology (%s); retrying every %gs", exc, 1)
            self._failing = True
            self.refreshed_at, self._stale = time.monotonic(), False

    async def _report(self, link: Any) -> Any | None:
        try:
            conn = await link.acquire()
        except _NODE_ERRORS:
            return None
        try:
            async with asyncio.timeout(getattr(conn, "socket_timeout", None)):
                [info] = await send_and_read_async(conn, [("INFO", "replication")])
        except _NODE_ERRORS:
            await conn.disconnect()
            return None
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await link.release(conn)
        return None if isinstance(info, Exception) else info

    def _handle(self, name: str, host: str | None, port: int | None, node: Any) -> Any:
        if not self.cluster and host is None:
            return PoolLink(self.client.connection_pool)
        return self._link(name, host, port, node)

    async def aclose(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)
        for handle in self._handles.values():
            closing = getattr(handle, "aclose", None)
            if closing is not None:
                await closing()
