"""Container health probes that cost a few milliseconds of CPU, not a CLI start-up.

A compose healthcheck runs every 15 s for the life of every container. `cqrs status`
imports the whole CLI (typer, rich, pydantic, SQLAlchemy, every package's commands) and
costs about one CPU-second each time; these probes import only the driver they need, read
the two environment variables directly (no settings model), and ask one question:

    python -m cqrs.health relay --max-age 60
        exit 1 when a committed event has waited longer than 60 s to be published, or
        PostgreSQL does not answer (the same question as `cqrs status --only relay`);
    python -m cqrs.health worker --max-age 30 products customers orders
        exit 1 unless a worker of this container (consumer names start with the host
        name) has sent a heartbeat within 30 s for each named projection (or the
        projection is being built from history, under its replay lock): a hung or
        dead worker makes its own container unhealthy, while a backlog the whole fleet
        shares (`cqrs status --max-age`, an operator's alert) restarts nobody.

One line on stdout either way (docker keeps it in `docker inspect`).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cqrs.keys import KeyMap
from cqrs.urls import libpq_url, mask_url, redis_url

# The relay's backlog: the one query for it (`cqrs status` uses it too).
OUTBOX_BACKLOG_SQL = (
    "SELECT count(*), extract(epoch FROM now() - min(e.occurred_at))"
    " FROM events.outbox o JOIN events.event_log e ON e.position = o.position"
)


def relay_healthy(database_url: str, max_age: float) -> tuple[bool, str]:
    import psycopg

    try:
        with psycopg.connect(libpq_url(database_url), connect_timeout=3) as conn:
            count, age = conn.execute(OUTBOX_BACKLOG_SQL).fetchone()
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return False, mask_url(f"cannot query PostgreSQL at {database_url}: {first}")
    age = float(age or 0.0)
    if age > max_age:
        return False, f"{count} unpublished event(s), the oldest waiting {age:.0f}s"
    return True, f"{count} unpublished event(s), oldest {age:.1f}s"


def _is_cluster(client: Any) -> bool:
    """`CQRS_REDIS_CLUSTER` (on/off), else the node's own answer (cqrs.wiring's rule,
    without importing the wiring: a probe runs every few seconds)."""
    mode = (os.environ.get("CQRS_REDIS_CLUSTER") or "auto").strip().lower()
    if mode in ("on", "off", "true", "false", "1", "0", "yes", "no"):
        return mode in ("on", "true", "1", "yes")
    return str(client.info("cluster").get("cluster_enabled", "0")) == "1"


def worker_healthy(
    url: str, namespace: str, projections: list[str], max_age: float, host: str
) -> tuple[bool, str]:
    import redis

    keys = KeyMap(namespace)
    since_ms = int((time.time() - max_age) * 1000)
    from cqrs.redisio import round_trip

    options: dict[str, Any] = {"socket_timeout": 3, "socket_connect_timeout": 3}
    client: Any = redis.Redis.from_url(redis_url(url), **options)
    try:
        if _is_cluster(client):
            from redis.cluster import RedisCluster

            client.close()
            parts = urlsplit(redis_url(url))  # a cluster has database 0 only
            client = RedisCluster.from_url(urlunsplit(parts._replace(path="")), **options)
        commands: list[tuple[Any, ...]] = []
        for name in projections:
            commands.append(("ZRANGEBYSCORE", keys.workers(name), since_ms, "+inf"))
            commands.append(("EXISTS", keys.replay_lock(name)))
        replies = round_trip(client, commands)  # one packed trip (one per master)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
    except redis.RedisError as exc:
        return False, mask_url(f"cannot query Redis at {url}: {exc}")
    finally:
        client.close()
    prefix = f"{host}-".encode()
    # A worker building a projection's views from history (a first start, a new version)
    # sends no heartbeat until the build is done, which can take minutes: the build's
    # lock, renewed while it runs, stands in for it.
    silent = [
        name
        for name, members, building in zip(projections, replies[::2], replies[1::2], strict=True)
        if not building and not any(m.startswith(prefix) for m in members)
    ]
    if silent:
        return False, f"no heartbeat from {host} within {max_age:.0f}s for {', '.join(silent)}"
    return True, f"{host} heartbeats for {', '.join(projections)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cqrs.health", description=__doc__)
    sub = parser.add_subparsers(dest="probe", required=True)
    relay = sub.add_parser("relay", help="the relay's backlog is younger than --max-age")
    relay.add_argument("--max-age", type=float, default=60.0)
    worker = sub.add_parser("worker", help="this container's worker heartbeats")
    worker.add_argument("--max-age", type=float, default=30.0)
    worker.add_argument("projections", nargs="+", metavar="PROJECTION")
    args = parser.parse_args(argv)
    if args.probe == "relay":
        url = os.environ.get("CQRS_DATABASE_URL")
        if not url:
            print("unhealthy: CQRS_DATABASE_URL is not set")
            return 1
        ok, detail = relay_healthy(url, args.max_age)
    else:
        url = os.environ.get("CQRS_REDIS_URL")
        if not url:
            print("unhealthy: CQRS_REDIS_URL is not set")
            return 1
        namespace = os.environ.get("CQRS_NAMESPACE") or "cqrs"
        ok, detail = worker_healthy(
            url, namespace, args.projections, args.max_age, socket.gethostname()
        )
    print(f"{'healthy' if ok else 'unhealthy'}: {detail}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
