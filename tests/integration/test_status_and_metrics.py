"""`cqrs status` and the Prometheus endpoint on a live system (real PostgreSQL and Redis,
real `cqrs project` / `cqrs run` / `cqrs serve` subprocesses, loopback only).

- lag grows while the workers are stopped and returns to 0 once they run again;
  `--max-lag` is a health check (exit 1 past the threshold);
- a frozen worker (SIGSTOP) with work waiting is "stalled" after CQRS_STALL_SECONDS;
- the metrics endpoints count a workload.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cqrs.commands.catalog import CreateProduct
from cqrs.commands.customers import RegisterCustomer
from cqrs.commands.orders import PlaceOrder
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.status import CAUGHT_UP, STALLED, SystemStatus, collect_status
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.helpers import cli_json, free_port, wait_applied, wait_until
from tests.integration.projector_support import relay_all, run
from tests.procs import fleet

ALL = list(PROJECTIONS.values())


def _status(wiring: Wiring, settings: Settings | None = None) -> SystemStatus:
    return collect_status(
        wiring.redis, settings or wiring.settings, ALL, database_url=wiring.database_url
    )


def _caught_up(wiring: Wiring) -> bool:
    report = _status(wiring)
    relay_done = report.relay is not None and report.relay.unpublished == 0
    return relay_done and all(p.state == CAUGHT_UP for p in report.projections)


def _products(wiring: Wiring, n: int) -> None:
    for _ in range(n):
        sku = f"S-{uuid.uuid4().hex[:8]}"
        run(wiring, CreateProduct(sku=sku, name="Widget", price="1.00", stock=5))


def test_lag_grows_while_workers_are_stopped_and_returns_to_zero(
    wiring: Wiring, cli_env: dict[str, str], tmp_path: Path
) -> None:
    _products(wiring, 2)
    relay_all(wiring)
    with fleet(tmp_path) as procs:
        worker = procs.cqrs("worker", "project", env=cli_env)
        wait_applied(wiring, lambda: _caught_up(wiring), timeout=30, what="first catch-up")
        code, data, err = cli_json("status", "--max-lag", "0", env=cli_env)
        assert code == 0, (data, err)
        assert data["ok"] and not data["problems"]
        for name in PROJECTIONS:
            p = data["projections"][name]
            assert (p["state"], p["lag"], p["pending"]) == (CAUGHT_UP, 0, 0), (name, p)
            assert p["generation"] >= 1 and p["live_workers"] == 1
        assert data["relay"] == {
            "reachable": True,
            "unpublished": 0,
            "oldest_age_seconds": None,
            "error": None,
        }

        procs.stop(worker)
        assert worker.returncode == 0, procs.logs()
        _products(wiring, 3)
        relay_all(wiring)
        first = _status(wiring)
        _products(wiring, 2)
        relay_all(wiring)
        code, data, err = cli_json("status", "--max-lag", "4", env=cli_env)
        assert code == 1, (data, err)
        for name in PROJECTIONS:
            before, after = first.by_name(name), data["projections"][name]
            assert (before.lag, after["lag"]) == (3, 5), name  # grows with every relayed event
            assert after["state"] == STALLED  # work waits and no worker heartbeats
            assert after["oldest_unapplied_age_seconds"] is not None
        assert any("--max-lag 4" in problem for problem in data["problems"])
        assert _status(wiring).violations(5, None) == []  # 5 is not more than 5

        procs.cqrs("worker-again", "project", env=cli_env)
        wait_applied(wiring, lambda: _caught_up(wiring), timeout=30, what="catch-up after restart")
        code, data, err = cli_json("status", "--max-lag", "0", "--max-age", "60", env=cli_env)
        assert code == 0, (data, err, procs.logs())
        with wiring.engine.connect() as conn:
            last = conn.exec_driver_sql("SELECT max(position) FROM events.event_log").scalar()
        for name in PROJECTIONS:
            p = data["projections"][name]
            assert (p["state"], p["lag"], p["pending"]) == (CAUGHT_UP, 0, 0)
            assert p["last_position"] == last
            assert p["last_applied_age_seconds"] is not None


def test_a_frozen_worker_with_work_waiting_is_stalled(
    wiring: Wiring, cli_env: dict[str, str], tmp_path: Path
) -> None:
    stall = Settings(**{**wiring.settings.model_dump(), "stall_seconds": 2.0})
    env = {**cli_env, "CQRS_STALL_SECONDS": "2"}
    with fleet(tmp_path) as procs:
        worker = procs.cqrs("worker", "project", env=cli_env)
        try:
            wait_applied(wiring, lambda: _caught_up(wiring), timeout=30, what="first catch-up")
            os.kill(worker.pid, signal.SIGSTOP)
            _products(wiring, 2)
            relay_all(wiring)

            def stalled() -> bool:
                return _status(wiring, stall).by_name("products").state == STALLED

            wait_until(stalled, timeout=15, interval=0.2, what="products stalled")
            code, data, _err = cli_json("status", "--max-age", "1", env=env)
            assert code == 1  # the waiting entries are older than 1 s
            for name in PROJECTIONS:
                p = data["projections"][name]
                assert p["state"] == STALLED, (name, p)
                assert p["lag"] + p["pending"] == 2
                assert p["reason"]
            assert data["stall_seconds"] == 2.0
            assert _status(wiring, stall).violations(None, None) == []  # no threshold: exit 0
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        wait_applied(wiring, lambda: _caught_up(wiring), timeout=30, what="catch-up after SIGCONT")


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=5, trust_env=False).text
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2, trust_env=False).status_code == 200
    except httpx.TransportError:
        return False


def test_metrics_endpoints_count_a_workload(
    wiring: Wiring, cli_env: dict[str, str], tmp_path: Path
) -> None:
    run_port, api_port, serve_port = free_port(), free_port(), free_port()
    run_url = f"http://127.0.0.1:{run_port}/metrics"
    serve_url = f"http://127.0.0.1:{serve_port}/metrics"
    with fleet(tmp_path) as procs:
        procs.cqrs("run", "run", "--metrics-port", str(run_port), env=cli_env)
        procs.cqrs(
            "serve",
            "serve",
            "--port",
            str(api_port),
            env={**cli_env, "CQRS_METRICS_PORT": str(serve_port)},  # the variable works too
        )
        wait_until(lambda: _answers(run_url), timeout=60, what=f"{run_url}\n{procs.logs()}")
        # Views exist (built from the empty log) before the workload, so every event of it
        # is counted by the live worker.
        wait_until(
            lambda: all(p.generation for p in _status(wiring).projections),
            timeout=30,
            what="projections built",
        )

        def workload(n: int) -> int:
            products = [
                CreateProduct(sku=f"M-{uuid.uuid4().hex[:8]}", name="Gadget", price="2.50", stock=9)
                for _ in range(n)
            ]
            for command in products:
                run(wiring, command)
            customer = RegisterCustomer(email=f"{uuid.uuid4().hex[:8]}@example.com", name="Ann")
            run(wiring, customer)
            run(
                wiring,
                PlaceOrder(
                    customer_id=customer.customer_id,
                    items=[{"product_id": products[0].product_id, "qty": 1}],
                ),
            )
            return n + 1 + 1 + 1  # created, registered, placed + one stock reservation

        events = workload(3)
        wait_applied(
            wiring, lambda: _caught_up(wiring), timeout=30, what=f"caught up\n{procs.logs()}"
        )
        first = _scrape(run_url)
        assert _value(first, "cqrs_events_relayed_total") == events
        assert (
            _value(
                first,
                "cqrs_events_applied_total",
                projection="products",
                event_type="ProductCreated",
            )
            == 3
        )
        assert (
            _value(
                first, "cqrs_events_applied_total", projection="orders", event_type="OrderPlaced"
            )
            == 1
        )
        assert _value(first, "cqrs_batch_duration_seconds_count", component="relay") >= 1
        assert _value(first, "cqrs_batch_duration_seconds_count", component="projector") >= 1
        assert _value(first, "cqrs_scrape_ok") == 1
        assert _value(first, "cqrs_outbox_backlog") == 0
        for name in PROJECTIONS:
            assert ("cqrs_projection_lag", (("projection", name),)) in first
            assert _value(first, "cqrs_projection_lag", projection=name) == 0
            assert _value(first, "cqrs_projection_pending", projection=name) == 0
            assert _value(first, "cqrs_projection_stalled", projection=name) == 0
            assert _value(first, "cqrs_dead_letter_entries", projection=name) == 0

        more = workload(2)
        wait_applied(wiring, lambda: _caught_up(wiring), timeout=30, what="caught up again")
        second = _scrape(run_url)
        assert _value(second, "cqrs_events_relayed_total") == events + more
        assert (
            _value(
                second,
                "cqrs_events_applied_total",
                projection="products",
                event_type="ProductCreated",
            )
            == 5
        )

        wait_until(lambda: _answers(serve_url), timeout=60, what=f"{serve_url}\n{procs.logs()}")
        api = _scrape(serve_url)
        for name in PROJECTIONS:
            assert ("cqrs_projection_lag", (("projection", name),)) in api
        assert _value(api, "cqrs_scrape_ok") == 1
