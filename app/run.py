"""`cqrs run`: the relay and every projection in one process (development, demos, scripts)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import psycopg
import typer

from cqrs.cli import load_settings, metrics_port_option, start_metrics_or_fail
from cqrs.commands.migrations import ensure_schema
from cqrs.console import out, print_json
from cqrs.logs import configure_logging
from cqrs.relay.cli import outbox_gauges
from cqrs.relay.outbox import Relay
from cqrs.signals import install_stop_handlers
from cqrs.startup import prepare_or_exit
from cqrs.wiring import Wiring

log = logging.getLogger(__name__)


@dataclass
class DrainReport:
    """What `cqrs run --drain` did, counted exactly: events published by the relay, views
    built from history (events read per projection, each event once), and the live
    deliveries after that (one per event and projection that handles it)."""

    published: int = 0
    built: dict[str, dict[str, Any]] = field(default_factory=dict)
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "built": self.built,
            "deliveries": {
                "applied": self.applied,
                "already_applied": self.duplicates,
                "dead_lettered": self.dead_lettered,
            },
        }

    def lines(self) -> list[str]:
        built = [
            f"{name}: views built from the {b['source']}, {b['events']} event(s)"
            for name, b in self.built.items()
        ]
        return [
            f"published {self.published} event(s) to the streams",
            *built,
            f"live deliveries (one per event and projection handling it): {self.applied} "
            f"applied, {self.duplicates} already applied, {self.dead_lettered} dead-lettered",
        ]


def build_missing_views(worker: Any, wiring: Wiring, stop: threading.Event) -> dict[str, Any]:
    """Build, from history, the projections that have no valid views, and say how many
    events each build read. The worker would build them too, but only logs the counts; a
    build that fails here is left to the worker, which retries it."""
    from cqrs.projector.replay import AlreadyBuilt, Replayer, ReplayError

    built: dict[str, Any] = {}
    worker.refresh_status()
    for projection in worker.projections:
        if projection.name not in worker.needs_build or stop.is_set():
            continue
        replayer = Replayer(wiring.redis, wiring.settings, projection, wiring.database_url)
        try:
            result = replayer.run("auto", stop=stop, only_if_invalid=True)
        except (AlreadyBuilt, ReplayError, psycopg.OperationalError):
            continue
        built[projection.name] = {"source": result.source, "events": result.events}
    worker.refresh_status()
    return built


def run_command(
    drain: bool = typer.Option(
        False, "--drain", help="Relay and project everything pending, then exit 0."
    ),
    metrics_port: int = metrics_port_option(),
    json_output: bool = typer.Option(
        False, "--json", help="With --drain: print the counts as one JSON object."
    ),
) -> None:
    """Run the relay and every projection in one process (development, demos, scripts)."""
    from cqrs.projector.cli import add_projection_gauges
    from cqrs.projector.registry import PROJECTIONS
    from cqrs.projector.worker import Worker

    stop = threading.Event()
    install_stop_handlers(stop)  # first: a SIGTERM while waiting for the servers is a stop
    configure_logging(logging.INFO)
    wiring = Wiring(load_settings())
    try:
        prepare_or_exit(wiring, stop, long_running=not drain, postgres=True)
        ensure_schema(wiring.engine)
        relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
        worker = Worker(
            wiring.redis, wiring.settings, PROJECTIONS.values(), database_url=wiring.database_url
        )
        metrics = None if drain else start_metrics_or_fail(wiring.settings, metrics_port)
        if metrics is not None:
            relay.metrics = worker.metrics = metrics
            metrics.add_gauges(lambda: outbox_gauges(relay))
            add_projection_gauges(metrics, wiring, list(PROJECTIONS.values()))
        log.info(
            "running the relay and %d projections (%s) over %d partitions as consumer %s",
            len(PROJECTIONS),
            ", ".join(PROJECTIONS),
            worker.partitions,
            worker.consumer,
            extra={"consumer": worker.consumer},
        )
        if drain:
            report = DrainReport()
            # Relay, project to the end, and go round again if writers added more meanwhile.
            while (published := relay.drain(stop)) or not worker.caught_up():
                report.published += published
                report.built.update(build_missing_views(worker, wiring, stop))
                worker.run(stop, drain=True)
                if stop.is_set():
                    break
            stats = worker.stats
            report.applied, report.duplicates = stats.applied, stats.duplicates
            report.dead_lettered = stats.dead_lettered
            if json_output:
                print_json(report.as_json())
            else:
                for line in report.lines():
                    out.print(line)
            return
        relay_thread = threading.Thread(target=relay.run, args=(stop,), name="relay", daemon=True)
        relay_thread.start()
        worker.run(stop)
        relay_thread.join(timeout=10)
    finally:
        wiring.close()
