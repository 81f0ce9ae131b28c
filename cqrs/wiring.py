"""The one place where clients and engines are built from settings.

Everything is lazy: a query process that never asks for `engine` never opens a PostgreSQL
connection, and nothing connects at import time. When a URL is not configured, the
embedded servers under `settings.home` are started (or reused) on first use.
"""

from __future__ import annotations

import select
from functools import cached_property
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc

from cqrs.keys import KeyMap
from cqrs.redisio import is_cluster_client
from cqrs.replicas import SyncReplicas
from cqrs.settings import Settings
from cqrs.urls import redis_url as to_redis_url
from cqrs.urls import sqlalchemy_url, with_connect_timeout


def redis_options(settings: Settings) -> dict[str, Any]:
    """Client options shared by the single-node and the cluster client.

    The socket timeout stays above every blocking read we issue (BLOCK longer than the
    socket timeout would raise a spurious TimeoutError).

    Replies are decoded with errors="replace": everything we write is UTF-8, but anyone
    who can XADD can put other bytes in a stream, and a strict decoder would then fail
    every read of that entry (XREADGROUP, XAUTOCLAIM, XINFO STREAM) and crash every worker
    forever. Replaced, the entry reads as malformed and is dead-lettered like any poison."""
    return {
        "decode_responses": True,
        "encoding_errors": "replace",
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        "retry_on_timeout": False,
    }


def redis_is_cluster(url: str, settings: Settings) -> bool:
    """Whether `url` names a node of a Redis Cluster (`CQRS_REDIS_CLUSTER`: auto|on|off).

    `auto` asks the node (`INFO cluster`): one round trip, once per process, so pointing
    at any node of a cluster is enough. A node that cannot be reached raises redis-py's
    ConnectionError, which start-up waits treat like an unreachable Redis (the mode is
    then decided when it answers, never guessed)."""
    mode = settings.redis_cluster
    if mode != "auto":
        return mode == "on"
    options = {**redis_options(settings), "health_check_interval": 0}
    probe = redis.Redis.from_url(to_redis_url(url), **options)
    try:
        return str(probe.info("cluster").get("cluster_enabled", "0")) == "1"
    except (redis.AuthenticationError, redis.ResponseError):
        # A wrong password, or an ACL user without INFO: the node cannot tell. Taken as
        # one node; the same error then surfaces at the client's first real command,
        # where each command reports it (doctor names it), instead of here, unexplained.
        # `CQRS_REDIS_CLUSTER=on` is the way to a cluster for such a user.
        return False
    finally:
        probe.close()


def make_redis(url: str, settings: Settings, *, cluster: bool | None = None) -> redis.Redis:
    """The process's synchronous client: `redis.Redis`, or `redis.cluster.RedisCluster`
    when the URL names a cluster node (`redis_is_cluster`; `cluster` skips the question).

    Typed as `redis.Redis` because every caller uses the command API the two share; the
    hot paths that go below it (`cqrs.redisio`) check which one they got. TLS (`rediss://`)
    and ACL users/passwords come from the URL either way."""
    if cluster is None:
        cluster = redis_is_cluster(url, settings)
    if cluster:
        from redis.cluster import RedisCluster

        client = RedisCluster.from_url(cluster_url(to_redis_url(url)), **redis_options(settings))
        return cast(redis.Redis, client)
    return redis.Redis.from_url(to_redis_url(url), **redis_options(settings))


def cluster_url(url: str) -> str:
    """`url` for a cluster client: database 0 is the only one, so its path is dropped
    (another database number is refused)."""
    parts = urlsplit(url)
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"a Redis Cluster has only database 0, not {parts.path.lstrip('/')}")
    return urlunsplit(parts._replace(path=""))


def server_spoke(dbapi_connection: Any) -> bool:
    """Whether the server sent something to this idle pooled connection, or it is gone.

    A server that ends a connection (a restart, `pg_terminate_backend`, an idle timeout)
    writes its reason and closes the socket, so the socket turns readable; while it is
    idle in the pool nothing else arrives (its users do not LISTEN). One poll, no round
    trip."""
    if getattr(dbapi_connection, "closed", False) or getattr(dbapi_connection, "broken", False):
        return True
    try:
        fd = dbapi_connection.fileno()
    except Exception:
        return True
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])


def make_engine(database_url: str, *, pool_size: int = 10) -> Engine:
    """A process's engine (commands, doctor, benches). Its pre-ping is SQLAlchemy's
    (`SELECT 1`, and the whole pool invalidated when it fails), sent only when the
    connection's socket shows the server spoke or closed while the connection sat in the
    pool (`server_spoke`): the cases pre-ping exists for, without a round trip per checkout
    for the others (it was one of an order placement's three; docs/benchmarks.md,
    "Round 2: commands")."""
    engine = create_engine(
        sqlalchemy_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        # The connection returned last goes out first: a lone writer keeps using one warm
        # server process instead of cycling through every pooled one (+10-14% order
        # placements/s with one writer after an 8-writer burst; docs/benchmarks.md).
        pool_use_lifo=True,
    )
    dialect = engine.dialect

    @event.listens_for(engine, "checkout")
    def _ping_if_spoken(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if not server_spoke(dbapi_connection):
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # What pool_pre_ping raises: this connection is replaced and every one
            # pooled before now is dropped (a restarted server ended them all).
            raise sa_exc.InvalidatePoolError() from exc

    return engine


class Wiring:
    """Settings plus the lazily built connections of one process."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.keys = KeyMap(self.settings.namespace)

    def _embedded_urls(self) -> tuple[str, str]:
        from cqrs.embedded import announce_fallback, ensure_started

        servers = ensure_started(self.settings.home, user=self.settings.embedded_user)
        announce_fallback(
            servers.home,
            database=self.settings.database_url is None,
            redis=self.settings.redis_url is None,
        )
        return servers.database_url, servers.redis_url

    @cached_property
    def database_url(self) -> str:
        """The configured (or embedded) URL with the connect timeout in it, so that every
        connection this process opens gives up after `database_connect_timeout`."""
        url = self.settings.database_url or self._embedded_urls()[0]
        return with_connect_timeout(url, self.settings.database_connect_timeout)

    @cached_property
    def redis_url(self) -> str:
        return self.settings.redis_url or self._embedded_urls()[1]

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.database_url)

    @cached_property
    def redis_cluster(self) -> bool:
        """Whether Redis is a cluster (asked once; see `redis_is_cluster`)."""
        if "redis" in self.__dict__:
            return is_cluster_client(self.__dict__["redis"])
        return redis_is_cluster(self.redis_url, self.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        return make_redis(self.redis_url, self.settings, cluster=self.redis_cluster)

    @cached_property
    def replicas(self) -> SyncReplicas | None:
        """The replica topology the query side reads through (`CQRS_READ_FROM=replicas`;
        `cqrs.replicas`), over `redis`'s nodes; None when reads go to the primary."""
        if self.settings.read_from != "replicas":
            return None
        return SyncReplicas(self.redis, max_lag=self.settings.replica_max_lag)

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()
        if self.__dict__.get("replicas") is not None:
            self.replicas.close()
        if "redis" in self.__dict__:
            self.redis.close()
