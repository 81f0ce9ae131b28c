"""Test backends and isolation.

Backend choice, in order: explicit URLs (`CQRS_TEST_DATABASE_URL`, `CQRS_TEST_REDIS_URL`),
then testcontainers when a Docker daemon answers, then the project's embedded servers.
Every run creates its own PostgreSQL database and uses its own Redis namespaces, so two
runs against the same servers do not collide; each test gets a fresh namespace and empty
write-side tables.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

from cqrs.settings import Settings
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Backend:
    database_url: str  # server URL; tests use their own database on it
    redis_url: str
    kind: str


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    db_url = os.environ.get("CQRS_TEST_DATABASE_URL")
    redis_url = os.environ.get("CQRS_TEST_REDIS_URL")
    if db_url and redis_url:
        yield Backend(db_url, redis_url, "environment")
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer
        from testcontainers.redis import RedisContainer

        with PostgresContainer("postgres:16", driver=None) as pg, RedisContainer("redis:7") as rd:
            host, port = rd.get_container_host_ip(), rd.get_exposed_port(6379)
            yield Backend(pg.get_connection_url(), f"redis://{host}:{port}/0", "testcontainers")
        return
    from cqrs.embedded import ensure_started, stop

    home = tmp_path_factory.mktemp("embedded")
    servers = ensure_started(home)
    try:
        yield Backend(db_url or servers.database_url, redis_url or servers.redis_url, "embedded")
    finally:
        stop(home)


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def database_url(backend: Backend) -> Iterator[str]:
    """A database of this run's own, migrated once."""
    from cqrs.commands.migrations import upgrade
    from cqrs.wiring import make_engine

    name = f"cqrs_test_{uuid.uuid4().hex[:10]}"
    admin = libpq_url(backend.database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(backend.database_url, name)
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    yield url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def truncate_write_side(database_url: str) -> None:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(
            "TRUNCATE events.outbox, events.event_log, catalog.products, customers.customers,"
            " orders.order_lines, orders.orders RESTART IDENTITY CASCADE"
        )


def delete_namespace(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with contextlib.closing(client):
        batch = []
        for key in client.scan_iter(match=f"{namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)


@pytest.fixture
def settings(backend: Backend, database_url: str) -> Iterator[Settings]:
    """Settings for one test: its own Redis namespace and empty write-side tables."""
    truncate_write_side(database_url)
    namespace = f"t{uuid.uuid4().hex[:12]}"
    yield Settings(
        database_url=database_url,
        redis_url=backend.redis_url,
        namespace=namespace,
        relay_poll_seconds=0.2,
        # Short replay lock and switch grace keep rebuild tests quick; production defaults
        # are 15 s and 2 s.
        replay_lock_ms=3000,
        replay_grace_seconds=0.2,
    )
    delete_namespace(backend.redis_url, namespace)


@pytest.fixture
def wiring(settings: Settings) -> Iterator[Wiring]:
    w = Wiring(settings)
    yield w
    w.close()


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment for a subprocess (CLI, relay, worker) that must see the same backend."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRS_")}
    env.update(
        CQRS_DATABASE_URL=settings.database_url or "",
        CQRS_REDIS_URL=settings.redis_url or "",
        CQRS_NAMESPACE=settings.namespace,
        CQRS_HOME=str(settings.home),
        CQRS_RELAY_POLL_SECONDS=str(settings.relay_poll_seconds),
        CQRS_REPLAY_LOCK_MS=str(settings.replay_lock_ms),
        CQRS_REPLAY_GRACE_SECONDS=str(settings.replay_grace_seconds),
    )
    return env


@pytest.fixture
def cli_env(settings: Settings) -> dict[str, str]:
    return settings_env(settings)
