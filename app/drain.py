"""The one "relay and project until caught up" loop: `cqrs run --drain`, `cqrs demo` and
the tests all drain through `drain_all`."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from cqrs.projector.projection import Projection
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.replay import AlreadyBuilt, Replayer, ReplayError
from cqrs.projector.worker import Worker
from cqrs.relay.outbox import Relay
from cqrs.wiring import Wiring


@dataclass
class DrainReport:
    """What a drain did (`cqrs run --drain` prints it), counted exactly: events published
    by the relay, views built from history (events read per projection, each event once),
    and the live deliveries after that (one per event and projection that handles it)."""

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


def build_missing_views(worker: Worker, wiring: Wiring, stop: threading.Event) -> dict[str, Any]:
    """Build, from history, the projections that have no valid views, and say how many
    events each build read. The worker would build them too, but only logs the counts; a
    build that fails here is left to the worker, which retries it."""
    built: dict[str, Any] = {}
    if worker.repairs is not None:
        worker.repairs.poll()  # first: a build clears a repair flag raised before it
    worker.refresh_status()
    for projection in worker.projections:
        if projection.name not in worker.needs_build or stop.is_set():
            continue
        replayer = Replayer(wiring.redis, wiring.settings, projection, wiring.database_url)
        change = worker.repair_flags.get(projection.name)
        try:
            result = replayer.run("auto", stop=stop, only_if_invalid=True)
        except (AlreadyBuilt, ReplayError, psycopg.OperationalError):
            continue
        if change is not None and worker.repairs is not None:
            worker.repairs.finish(projection, change, worker.partitions, worker.reapply)
        built[projection.name] = {"source": result.source, "events": result.events}
    worker.refresh_status()
    return built


def drain_all(
    wiring: Wiring,
    projections: Iterable[Projection] | None = None,
    *,
    stop: threading.Event | None = None,
    worker: Worker | None = None,
    relay: Relay | None = None,
) -> DrainReport:
    """Relay everything pending, build missing views from history, project to the end,
    and go round again if writers added more meanwhile; returns the counts. `worker`
    (default: one over `projections`, default every registered one) may be given to name
    its consumer or report its progress; its stats are the deliveries counted. A set
    `stop` ends it after the step in hand."""
    stop = stop or threading.Event()
    relay = relay or Relay(wiring.database_url, wiring.redis, wiring.settings)
    if worker is None:
        worker = Worker(
            wiring.redis,
            wiring.settings,
            PROJECTIONS.values() if projections is None else projections,
            database_url=wiring.database_url,
        )
    report = DrainReport()
    while (published := relay.drain(stop)) or not worker.caught_up():
        report.published += published
        report.built.update(build_missing_views(worker, wiring, stop))
        worker.run(stop, drain=True)
        if stop.is_set():
            break
    stats = worker.stats
    report.applied, report.duplicates = stats.applied, stats.duplicates
    report.dead_lettered = stats.dead_lettered
    return report
