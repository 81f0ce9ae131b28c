"""The views on redis.asyncio, for the HTTP API.

`QueryService` is synchronous; an HTTP endpoint calling it has to run in a threadpool,
and that hop (hand the call to a worker thread, wait for its result on the event loop)
cost more than the Redis round trip and the model together, and a pool of threads is a
queue every endpoint waits in behind the slowest caller. `AsyncViews` drives the same
plans as `QueryService` (`queries.service.ViewPlans`: same round trips, same models, a
corrupted view the same `BadView`) on the event loop itself, without blocking it.

Connections come from a blocking pool of a bounded size (`make_async_redis`): a request
that finds every connection in use waits for one, up to the pool's timeout, and past it
gets `Busy` (overload: HTTP 503 "busy" with Retry-After), never the "unreachable" that a
Redis which does not answer gets. On a cluster the same holds per node (`WaitingNode`),
and with reads from replicas per replica (`cqrs.replicas`, `make_async_replicas`).
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast
from uuid import UUID

import redis.asyncio
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, ResponseError

from cqrs.contracts import ViewContract
from cqrs.keys import KeyMap
from cqrs.queries.errors import BadView, Busy
from cqrs.queries.models import Page
from cqrs.queries.service import Plan, ViewPlans
from cqrs.redisio import is_cluster_client, round_trip_async
from cqrs.replicas import AsyncReplicas, Node, PoolLink, Route, read_round_trip_async
from cqrs.urls import redis_url as to_redis_url
from cqrs.wiring import cluster_url

T = TypeVar("T")
# Connections a cluster node may have beyond the requests' `max_connections`: the
# read-your-writes subscription's and one for the slot map's refresh.
CLUSTER_SPARE = 2


def client_options(socket_timeout: float, client_name: str | None = None) -> dict[str, Any]:
    """The options `cqrs.wiring.make_redis` gives its client (decoded replies with errors
    replaced, the same timeouts, no retry on timeout), for the query side's own clients;
    `client_name` makes a process's connections findable in `CLIENT LIST`."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "encoding_errors": "replace",
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        "retry_on_timeout": False,
    }
    if client_name:
        options["client_name"] = client_name
    return options


class WaitingPool(redis.asyncio.ConnectionPool):
    """A pool of at most `max_connections` whose requests queue, first come first
    served, for up to `timeout` seconds when every connection is in use, and past that
    get `Busy` (overload: HTTP 503 "busy"), never the ConnectionError that the HTTP API
    reports as "Redis unreachable".

    Not redis-py's BlockingConnectionPool: its waiters sit on an `asyncio.Condition`, and
    a notified waiter that loses the race for the freed connection to a newcomer goes
    back to the *end* of the queue. Under 200 concurrent clients that starved a few
    requests past a 2 s wait while the p99 was 1.2 s. A FIFO semaphore (asyncio's is fair
    since 3.11.1) in front of a plain pool of the same size hands connections out in
    arrival order; the plain pool then never finds itself full."""

    def __init__(self, *, timeout: float = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeout = timeout
        self._slots = asyncio.Semaphore(self.max_connections)
        # Connections handed out with a slot: released exactly once, whatever path
        # (redis-py's own get_connection releases a connection that failed to connect).
        self._holding: set[Any] = set()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise Busy(self._busy_message()) from None
        try:
            connection = await super().get_connection(*args, **kwargs)
        except MaxConnectionsError:
            self._slots.release()
            raise Busy(self._busy_message()) from None
        except BaseException:
            self._slots.release()
            raise
        self._holding.add(connection)
        return connection

    async def release(self, connection: Any) -> None:
        try:
            await super().release(connection)
        finally:
            if connection in self._holding:
                self._holding.discard(connection)
                self._slots.release()

    def _busy_message(self) -> str:
        return f"all {self.max_connections} Redis connections stayed busy for {self.timeout:g}s"


def make_async_redis(
    url: str,
    *,
    socket_timeout: float,
    max_connections: int | None = None,
    pool_timeout: float = 5.0,
    client_name: str | None = None,
    cluster: bool = False,
) -> redis.asyncio.Redis:
    """An asyncio client with `client_options`; with `max_connections`, on a
    `WaitingPool` of that size whose requests wait up to `pool_timeout` seconds for a
    free connection (without, redis-py's default pool, which fails at once when full).

    `cluster` (cqrs.wiring.redis_is_cluster): redis.asyncio's cluster client instead.
    It has no waiting pool (a node whose connections are all busy fails at once), so the
    requests wait in `WaitingNode`s of `max_connections` per node (`make_async_replicas`)
    and the client's own limit is `CLUSTER_SPARE` above it, for the read-your-writes
    subscription and the slot map's refreshes, which take a node's connection outside
    those waits."""
    options = client_options(socket_timeout, client_name)
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        # Retries are the cluster client's business (redirects, failover), per request.
        options.pop("retry_on_timeout", None)
        if max_connections is not None:
            options["max_connections"] = max_connections + CLUSTER_SPARE
        client = RedisCluster.from_url(cluster_url(to_redis_url(url)), **options)
        return cast(redis.asyncio.Redis, client)
    if max_connections is None:
        return redis.asyncio.Redis.from_url(to_redis_url(url), **options)
    pool = WaitingPool.from_url(
        to_redis_url(url), max_connections=max_connections, timeout=pool_timeout, **options
    )
    return redis.asyncio.Redis.from_pool(pool)


class WaitingNode:
    """A cluster node's connections for `cqrs serve`, handed out like `WaitingPool`'s:
    first come first served through a FIFO semaphore of the pool's size (shared by every
    link to the same node), `Busy` past `timeout`. redis.asyncio's `ClusterNode` itself
    has no wait (`MaxConnectionsError` the moment it is full)."""

    def __init__(
        self, node: Any, slots: asyncio.Semaphore | None, size: int, timeout: float
    ) -> None:
        self.node = node
        self.slots = slots
        self.size = size
        self.timeout = timeout

    async def acquire(self) -> Any:
        if self.slots is not None:
            try:
                async with asyncio.timeout(self.timeout):
                    await self.slots.acquire()
            except TimeoutError:
                raise Busy(self._busy_message()) from None
        try:
            return self.node.acquire_connection()
        except BaseException as exc:
            if self.slots is not None:
                self.slots.release()
            if isinstance(exc, MaxConnectionsError):
                raise Busy(self._busy_message()) from None
            raise

    async def release(self, connection: Any) -> None:
        try:
            self.node.release(connection)
        finally:
            if self.slots is not None:
                self.slots.release()

    def _busy_message(self) -> str:
        return (
            f"all {self.size} Redis connections to {self.node.name} stayed busy for "
            f"{self.timeout:g}s"
        )


def make_async_replicas(
    client: Any,
    *,
    read_from_replicas: bool,
    max_lag: float,
    max_connections: int | None,
    pool_timeout: float,
) -> AsyncReplicas | None:
    """The node topology `AsyncViews` routes by: on a cluster always (its waiting per
    node), on one node only with reads from replicas (the primary keeps its own
    `WaitingPool`, each replica gets one of the same size). None: the client's pool."""
    cluster = is_cluster_client(client)
    if not cluster and not read_from_replicas:
        return None
    gates: dict[str, asyncio.Semaphore] = {}

    def link(name: str, host: str | None, port: int | None, node: Any) -> Any:
        if node is not None:
            if max_connections is None:
                return WaitingNode(node, None, node.max_connections, pool_timeout)
            gate = gates.setdefault(name, asyncio.Semaphore(max_connections))
            return WaitingNode(node, gate, max_connections, pool_timeout)
        base = client.connection_pool
        kwargs = {**base.connection_kwargs, "host": host, "port": port}
        if max_connections is None:
            pool = redis.asyncio.ConnectionPool(connection_class=base.connection_class, **kwargs)
        else:
            pool = WaitingPool(
                connection_class=base.connection_class,
                max_connections=max_connections,
                timeout=pool_timeout,
                **kwargs,
            )
        return PoolLink(pool, owned=True)

    return AsyncReplicas(client, link=link, max_lag=max_lag, replicas=read_from_replicas)


class AsyncViews(ViewPlans):
    """`QueryService`'s reads, awaited: the same plans driven over redis.asyncio."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: KeyMap,
        *,
        partitions: int = 8,
        contracts: dict[str, ViewContract] | None = None,
        replicas: AsyncReplicas | None = None,
    ) -> None:
        super().__init__(keys, partitions=partitions, contracts=contracts)
        self.redis = client
        # The nodes reads are routed over (`make_async_replicas`), or None: the pool.
        self.replicas = replicas
        # A reader a read-your-writes wait returned: where its check read (`pinned`).
        self._pins: dict[Any, Node] | None = None

    async def aclose(self) -> None:
        if self.replicas is not None:
            await self.replicas.aclose()
        await self.redis.aclose()

    async def _round_trip(
        self, commands: Sequence[tuple[Any, ...]], route: Route | None = None
    ) -> list[Any]:
        """One round trip of a plan, on the client's pool (`_primary_trip`) or on the
        nodes `route` gives each key (`cqrs.replicas`); BadView for an error reply (see
        `QueryService._round_trip`)."""
        if route is None:
            replies = await self._primary_trip(commands)
        else:
            replies = await read_round_trip_async(route, list(commands), self._primary_trip)
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, ResponseError):
                raise BadView(f"view {command[1]} cannot be read: {reply}")
        return replies

    async def _primary_trip(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """The commands in one write on one pooled connection (one per master on a
        cluster), their replies in order, errors in place; one more try on a fresh
        connection after a connection error (they are reads).

        redis.asyncio's own send and read cost more than this for the pair (figure in
        docs/benchmarks.md): each `send_packed_command` runs in an `asyncio.wait_for` (a
        task per write) and each `read_response` in a timeout context of its own;
        `cqrs.redisio.round_trip_async` puts one timeout over the write and the replies,
        read straight from the connection's hiredis reader. Waiting for a free connection
        is the pool's business and outside that timeout (`WaitingPool`). On a cluster
        this is the path after a node failed or answered MOVED (its own retries over a
        fresh slot map), taking connections without the nodes' waits: a node full then
        is `Busy` at once."""
        for attempt in (1, 2):
            try:
                return await round_trip_async(self.redis, list(commands))
            except MaxConnectionsError:
                raise Busy("every Redis connection to a cluster node is in use") from None
            except RedisConnectionError:
                if attempt == 2 or is_cluster_client(self.redis):
                    raise  # the cluster round trip retries (after a refresh) on its own
        raise AssertionError("unreachable")  # pragma: no cover

    async def _route(self) -> Route | None:
        if self.replicas is None:
            return None
        await self.replicas.refresh_if_due()
        return Route(self.replicas, pins=self._pins)

    async def _run(self, plan: Plan[T], route: Route | None = None) -> T:
        """Drive a plan: each yielded batch of commands is one round trip, all of them
        routed alike (one request)."""
        route = route or await self._route()
        try:
            commands = next(plan)
            while True:
                commands = plan.send(await self._round_trip(commands, route))
        except StopIteration as done:
            return done.value
        finally:
            plan.close()

    async def check(self, token: str) -> tuple[list[str], dict[Any, Node] | None]:
        """`QueryService.check`, awaited: what is not applied yet, and where the read it
        guards must go."""
        if self.replicas is None or not self.replicas.read_from_replicas:
            return await self._run(self._behind(token)), None
        await self.replicas.refresh_if_due()
        route = Route(self.replicas)
        missing = await self._run(self._behind(token), route)
        if missing and route.used_replicas:
            route = Route(self.replicas, primaries=True)  # a replica may only lag
            missing = await self._run(self._behind(token), route)
        return missing, dict(route.served)

    def pinned(self, pins: dict[Any, Node] | None) -> AsyncViews:
        """These views reading as a satisfied check says (`check`)."""
        if pins is None:
            return self
        reader = copy.copy(self)
        reader._pins = pins
        return reader

    async def ping(self) -> None:
        await self._round_trip([("PING",)])

    async def get_product(self, product_id: UUID | str) -> Any:
        return await self._run(self._product(product_id))

    async def list_products(
        self, *, sort: str = "name", limit: int = 20, cursor: str | None = None
    ) -> Page[Any]:
        return await self._run(self._product_list(sort, limit, cursor))

    async def top_products(self, *, limit: int = 10) -> list[Any]:
        return await self._run(self._top_products(limit))

    async def get_customer(self, customer_id: UUID | str) -> Any:
        return await self._run(self._customer(customer_id))

    async def get_order(self, order_id: UUID | str) -> Any:
        return await self._run(self._order(order_id))

    async def customer_orders(
        self, customer_id: UUID | str, *, limit: int = 20, cursor: str | None = None
    ) -> Page[Any]:
        return await self._run(self._customer_orders(customer_id, limit, cursor))

    async def get_view(self, name: str, key: str) -> BaseModel:
        return await self._run(self._any_view(name, key))

    async def behind(self, token: str) -> list[str]:
        return (await self.check(token))[0]

    async def rebuilding(self) -> set[str]:
        return await self._run(self._rebuilding())


class BlockingLag:
    """Each projection's lag, from the synchronous `QueryService.lag`.

    Lag comes from XINFO replies parsed by redis-py's response callbacks and the kernel's
    `cqrs.streams.group_lag`, which has no asyncio twin; rather than write that parsing a
    second time, it runs on a small executor of its own, never the threadpool requests
    could queue in, over a client whose pool is as small as the executor. Callers that
    arrive while a read is running share it (`read`), and a burst of read-your-writes
    timeouts, which only quote the lag in their message, share one read per second
    (`recent`)."""

    def __init__(self, service: Any, *, threads: int = 2) -> None:
        self.service = service
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="cqrs-lag")
        self._running: asyncio.Future[dict[str, dict[str, int]]] | None = None
        self._last: tuple[float, dict[str, dict[str, int]]] | None = None

    async def read(self) -> dict[str, dict[str, int]]:
        """The lag now (or from a read that is running right now)."""
        if self._running is None or self._running.done():
            loop = asyncio.get_running_loop()
            self._running = loop.run_in_executor(self._executor, self._read_and_keep)
        return await asyncio.shield(self._running)

    async def recent(self, max_age: float = 1.0) -> dict[str, dict[str, int]]:
        """The lag as of at most `max_age` seconds ago."""
        if self._last is not None and time.monotonic() - self._last[0] <= max_age:
            return self._last[1]
        return await self.read()

    def _read_and_keep(self) -> dict[str, dict[str, int]]:
        lags = self.service.lag()
        self._last = (time.monotonic(), lags)
        return lags

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.service.redis.close()
