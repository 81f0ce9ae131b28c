"""`cqrs relay`: the outbox relay as a process of its own."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

import psycopg
import redis
import typer
from sqlalchemy.exc import OperationalError

from cqrs.cli import fail_unreachable, load_settings, metrics_port_option, start_metrics_or_fail
from cqrs.console import out
from cqrs.hooks import hooks
from cqrs.logs import configure_logging
from cqrs.metrics import Gauge
from cqrs.relay.outbox import Relay
from cqrs.signals import install_stop_handlers
from cqrs.startup import prepare_or_exit
from cqrs.wiring import Wiring


def outbox_gauges(relay: Relay) -> list[Gauge]:
    """The relay's backlog, computed at scrape time (one small query)."""
    count, oldest = relay.pending_count()
    age = 0.0
    if oldest is not None:
        age = max((datetime.now(UTC) - oldest).total_seconds(), 0.0)
    return [
        Gauge("cqrs_outbox_backlog", "Committed events not yet published", count),
        Gauge("cqrs_outbox_oldest_seconds", "Age of the oldest unpublished event (0: none)", age),
    ]


def ensure_schema(wiring: Wiring) -> None:
    """The write-side schema, created on first use when the composition provides how
    (`cqrs.hooks`); the relay itself knows only the event log and outbox tables."""
    if hooks.ensure_schema is not None:
        hooks.ensure_schema(wiring.engine)


def relay_command(
    drain: bool = typer.Option(False, "--drain", help="Publish what is pending, then exit."),
    metrics_port: int = metrics_port_option(),
) -> None:
    """Move committed events from the PostgreSQL log to Redis Streams until stopped."""
    stop = threading.Event()
    install_stop_handlers(stop)  # first: a SIGTERM while waiting for the servers is a stop
    configure_logging(logging.INFO)
    wiring = Wiring(load_settings())
    try:
        prepare_or_exit(wiring, stop, long_running=not drain, postgres=True)
        ensure_schema(wiring)
        relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
        metrics = None if drain else start_metrics_or_fail(wiring.settings, metrics_port)
        if metrics is not None:
            relay.metrics = metrics
            metrics.add_gauges(lambda: outbox_gauges(relay))
        if drain:
            out.print(f"published {relay.drain(stop)} event(s)")
            return
        relay.run(stop)
    except (OperationalError, psycopg.OperationalError) as exc:
        # One line, not a traceback; `run` itself retries, so this is startup or --drain.
        fail_unreachable(exc)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        fail_unreachable(exc)
    finally:
        wiring.close()


def register(app: typer.Typer) -> None:
    app.command("relay")(relay_command)
