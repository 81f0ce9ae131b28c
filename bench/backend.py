"""Where benchmarks run: the configured servers, in a scratch database and namespaces.

The servers are the ones the project is configured for (`CQRS_DATABASE_URL`,
`CQRS_REDIS_URL`), else the embedded servers, exactly as `cqrs.wiring.Wiring` resolves
them. Users' data is never touched: a run creates its own PostgreSQL database
`cqrs_bench_<random>` on that server (dropped at the end, even after a failure), and every
scenario works under Redis namespaces of its own (`bench-<run>-<scenario>-<n>`), deleted
when the scenario is done. Raw ceilings write their keys under those namespaces too.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import redis

from cqrs.redisio import is_cluster_client
from cqrs.settings import Settings
from cqrs.urls import libpq_url, mask_url
from cqrs.wiring import Wiring, make_engine, make_redis

# Raw-ceiling tables live in their own schema of the scratch database.
CEILING_DDL = [
    "CREATE SCHEMA IF NOT EXISTS bench",
    "CREATE TABLE IF NOT EXISTS bench.items (id UUID PRIMARY KEY, name TEXT NOT NULL,"
    " price NUMERIC(12, 2) NOT NULL, stock INTEGER NOT NULL, version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS bench.log (position BIGINT GENERATED ALWAYS AS IDENTITY"
    " PRIMARY KEY, aggregate_id UUID NOT NULL, event_type TEXT NOT NULL, payload JSONB NOT NULL,"
    " occurred_at TIMESTAMPTZ NOT NULL DEFAULT now())",
]

WRITE_SIDE_TABLES = (
    "events.outbox, events.event_log, catalog.products, customers.customers,"
    " orders.order_lines, orders.orders, bench.items, bench.log"
)


def delete_namespace(client: redis.Redis, namespace: str) -> int:
    """Unlink every key of `namespace` (on every master of a cluster: redis-py's cluster
    client scans them all and splits UNLINK by slot)."""
    removed = 0
    batch: list[str] = []
    for key in client.scan_iter(match=f"{namespace}:*", count=2000):
        batch.append(key)
        if len(batch) >= 1000:
            removed += client.unlink(*batch)
            batch.clear()
    if batch:
        removed += client.unlink(*batch)
    return removed


def with_database(url: str, name: str) -> str:
    """The same server URL with another database name (query string kept)."""
    head, sep, query = url.partition("?")
    base = head.rsplit("/", 1)[0] if head.count("/") >= 3 else head
    return f"{base}/{name}{sep}{query}"


class BenchBackend:
    """The scratch database and the namespaces of one benchmark run."""

    def __init__(self, base: Settings | None = None) -> None:
        self.base = base or Settings()
        wiring = Wiring(self.base)
        self.server_url = wiring.database_url
        self.redis_url = wiring.redis_url
        self.run_id = uuid.uuid4().hex[:8]
        self.database_name = f"cqrs_bench_{self.run_id}"
        self.database_url = with_database(self.server_url, self.database_name)
        self._namespaces: list[str] = []
        self._created = False
        self.redis = make_redis(self.redis_url, self.base)

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> BenchBackend:
        self.create()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def create(self) -> None:
        from cqrs.commands.migrations import upgrade

        try:
            with psycopg.connect(libpq_url(self.server_url), autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.database_name}"')
        except psycopg.Error as exc:
            raise SystemExit(
                f"bench: cannot create scratch database {self.database_name} on "
                f"{mask_url(self.server_url)}: {exc}"
            ) from None
        self._created = True
        engine = make_engine(self.database_url, pool_size=1)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        with psycopg.connect(libpq_url(self.database_url), autocommit=True) as conn:
            for statement in CEILING_DDL:
                conn.execute(statement)

    def close(self) -> None:
        for namespace in self._namespaces:
            with contextlib.suppress(redis.RedisError):
                self.delete_namespace(namespace)
        self._namespaces.clear()
        if self._created:
            with psycopg.connect(libpq_url(self.server_url), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.database_name}" WITH (FORCE)')
            self._created = False
        self.redis.close()

    # --- per scenario --------------------------------------------------------------------

    def settings(self, scenario: str, **overrides: Any) -> Settings:
        """Settings of a fresh namespace on the scratch database, with empty tables."""
        namespace = f"bench-{self.run_id}-{scenario}-{len(self._namespaces)}"
        self._namespaces.append(namespace)
        self.truncate()
        values: dict[str, Any] = {
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "namespace": namespace,
            "home": self.base.home,
            "relay_poll_seconds": 0.2,
        }
        values.update(overrides)
        return Settings(**values)

    @contextlib.contextmanager
    def scope(self, scenario: str, **overrides: Any) -> Iterator[Settings]:
        """A fresh namespace for a block; its keys are deleted when the block ends."""
        settings = self.settings(scenario, **overrides)
        try:
            yield settings
        finally:
            self.delete_namespace(settings.namespace)

    def truncate(self) -> None:
        with psycopg.connect(libpq_url(self.database_url), autocommit=True) as conn:
            conn.execute(f"TRUNCATE {WRITE_SIDE_TABLES} RESTART IDENTITY CASCADE")

    def delete_namespace(self, namespace: str) -> int:
        return delete_namespace(self.redis, namespace)

    # --- facts for the report ------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        info = self.redis.info("server")
        with psycopg.connect(libpq_url(self.database_url)) as conn:
            pg_version = conn.execute("SHOW server_version").fetchone()[0]
            sync = conn.execute("SHOW synchronous_commit").fetchone()[0]
            fsync = conn.execute("SHOW fsync").fetchone()[0]
        listpack = self.redis.config_get("hash-max-listpack-*")
        cluster: dict[str, int] | None = None
        if is_cluster_client(self.redis):
            nodes: Any = self.redis
            links = nodes.info("replication", target_nodes=nodes.PRIMARIES)
            cluster = {
                "masters": len(nodes.get_primaries()),
                "replicas": sum(int(i.get("connected_slaves", 0)) for i in links.values()),
            }
        return {
            "redis_version": info.get("redis_version"),
            "valkey_version": info.get("valkey_version"),
            "redis_hash_max_listpack": listpack,
            "redis_cluster": cluster,
            "postgresql_version": pg_version,
            "postgresql_synchronous_commit": sync,
            "postgresql_fsync": fsync,
            "database_server": mask_url(self.server_url),
            "redis_server": mask_url(self.redis_url),
        }
