"""`cqrs run`: the relay and every projection in one process (development, demos, scripts)."""

from __future__ import annotations

import logging
import threading

import typer

from cqrs.app.drain import drain_all
from cqrs.cli import load_settings, metrics_port_option, start_metrics_or_fail
from cqrs.commands.migrations import ensure_schema
from cqrs.console import out, print_json
from cqrs.logs import configure_logging
from cqrs.relay.cli import outbox_gauges
from cqrs.relay.outbox import Relay
from cqrs.signals import install_stop_handlers
from cqrs.startup import prepare_or_exit
from cqrs.tuning import tune_gc
from cqrs.wiring import Wiring

log = logging.getLogger(__name__)


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
        tune_gc(wiring.settings.projector_gc_threshold)
        log.info(
            "running the relay and %d projections (%s) over %d partitions as consumer %s",
            len(PROJECTIONS),
            ", ".join(PROJECTIONS),
            worker.partitions,
            worker.consumer,
            extra={"consumer": worker.consumer},
        )
        if drain:
            report = drain_all(wiring, stop=stop, worker=worker, relay=relay)
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
