"""Prometheus metrics for `cqrs relay|project|run|serve --metrics-port P`.

Counters and histograms are updated once per batch by the relay and the worker (they call
the small hook methods below; with metrics off they hold no hook and pay nothing). Gauges
that describe the shared state (lag, pending, dead letters, outbox backlog) are computed
at scrape time by a custom collector from callables the process hands in, so they are
never stale and cost nothing between scrapes. Several processes exporting the same gauge
report the same value: aggregate them with `max`, not `sum`.

Each process gets its own registry (no import-time global state), served by
prometheus-client's small threaded HTTP server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Gauge:
    """One sample of a scrape-time gauge."""

    name: str
    help: str
    value: float
    labels: Mapping[str, str] | None = None


GaugeSource = Callable[[], Iterable[Gauge]]


class _ScrapeCollector(Collector):
    def __init__(self, sources: list[GaugeSource]) -> None:
        self.sources = sources

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        ok = 1.0
        for source in self.sources:
            try:
                samples = list(source())
            except Exception as exc:  # a scrape must answer even when Redis/PostgreSQL do not
                log.warning("metrics: a gauge source failed: %s", exc)
                ok = 0.0
                continue
            for sample in samples:
                labels = dict(sample.labels or {})
                family = families.get(sample.name)
                if family is None:
                    family = GaugeMetricFamily(sample.name, sample.help, labels=sorted(labels))
                    families[sample.name] = family
                family.add_metric([labels[k] for k in sorted(labels)], sample.value)
        yield from families.values()
        yield GaugeMetricFamily(
            "cqrs_scrape_ok", "1 when every gauge source answered during this scrape", value=ok
        )


class Metrics:
    """The metrics of one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_relayed = Counter(
            "cqrs_events_relayed", "Events published from the outbox to the streams", registry=r
        )
        self.events_applied = Counter(
            "cqrs_events_applied",
            "Stream entries a projection processed and acknowledged (re-deliveries included)",
            ["projection", "event_type"],
            registry=r,
        )
        self.events_failed = Counter(
            "cqrs_events_failed",
            "Entries that failed to apply and stay pending for a retry",
            ["projection"],
            registry=r,
        )
        self.dead_letters = Counter(
            "cqrs_dead_letters",
            "Entries moved to a dead-letter stream by this process",
            ["projection"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "cqrs_batch_duration_seconds",
            "Wall time of one batch: relay pass (select, XADD, delete, commit) or projector "
            "batch (read, apply, acknowledge)",
            ["component"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.reconnects = Counter(
            "cqrs_reconnects",
            "Connection losses to Redis or PostgreSQL that a loop backed off from",
            ["component"],
            registry=r,
        )
        self.events_rerelayed = Counter(
            "cqrs_events_rerelayed",
            "Events published again from the log because Redis lost their stream entries "
            "(a failover)",
            registry=r,
        )
        self.view_repairs = Counter(
            "cqrs_view_repairs",
            "Projections rebuilt from the log because a Redis master's data history changed "
            "(a failover, a restart without persistence)",
            ["projection"],
            registry=r,
        )
        self._sources: list[GaugeSource] = []
        r.register(_ScrapeCollector(self._sources))
        self._relay_batches = self.batch_seconds.labels("relay")
        self._projector_batches = self.batch_seconds.labels("projector")

    def add_gauges(self, source: GaugeSource) -> None:
        """Compute more gauges at every scrape."""
        self._sources.append(source)

    # --- hooks (called once per batch) -------------------------------------------------

    def relayed(self, count: int, seconds: float) -> None:
        self.events_relayed.inc(count)
        self._relay_batches.observe(seconds)

    def projected(
        self,
        applied: Mapping[tuple[str, str], int],
        failed: Mapping[str, int],
        seconds: float,
    ) -> None:
        for (projection, event_type), n in applied.items():
            self.events_applied.labels(projection, event_type).inc(n)
        for projection, n in failed.items():
            self.events_failed.labels(projection).inc(n)
        self._projector_batches.observe(seconds)

    def dead_lettered(self, projection: str, count: int) -> None:
        self.dead_letters.labels(projection).inc(count)

    def reconnected(self, component: str) -> None:
        self.reconnects.labels(component).inc()

    def rerelayed(self, count: int) -> None:
        self.events_rerelayed.inc(count)

    def repaired(self, projection: str) -> None:
        self.view_repairs.labels(projection).inc()

    # --- serving -----------------------------------------------------------------------

    def serve(self, port: int, host: str = "127.0.0.1") -> Any:
        """Serve `/metrics` on a daemon thread; returns the server (for `shutdown()`)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port, extra={"port": port})
        return server


def start_metrics(port: int, host: str = "127.0.0.1") -> Metrics | None:
    """Metrics served on `port`, or None when `port` is 0 (off). Raises OSError when the
    port cannot be bound."""
    if not port:
        return None
    metrics = Metrics()
    metrics.serve(port, host)
    return metrics
