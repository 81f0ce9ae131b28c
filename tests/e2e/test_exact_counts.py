"""Every count a command prints is exact and says what it counts (issue 13, item 3), and
lists and summaries have one JSON shape (item 7).

Before: with 19 events in the log `cqrs run --drain` printed "drained: 0 applied" (the
views had been built from history, which it did not count) and a replay from the log
reported twice the events (the log, then the same events again from the streams)."""

from __future__ import annotations

import json

from cqrs.commands import catalog, customers
from cqrs.commands.db import make_session_factory
from cqrs.commands.handlers import execute
from cqrs.projector.registry import PROJECTIONS
from cqrs.wiring import Wiring
from tests.helpers import run_cli


def write_events(wiring: Wiring, products: int, customers_: int = 0) -> int:
    """Commit events without publishing them (the relay of the command under test does)."""
    sf = make_session_factory(wiring.engine)
    n = 0
    for i in range(products):
        execute(catalog.CreateProduct(sku=f"C-{i}", name=f"P{i}", price="1.00", stock=1), sf)
        n += 1
    for i in range(customers_):
        execute(customers.RegisterCustomer(email=f"c{i}@example.com", name=f"C{i}"), sf)
        n += 1
    return n


def run_json(*args: str, env: dict[str, str]) -> dict:
    result = run_cli(*args, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_run_drain_counts_published_built_and_applied(
    wiring: Wiring, cli_env: dict[str, str]
) -> None:
    events = write_events(wiring, products=12, customers_=7)  # 19, as in the issue
    first = run_json("run", "--drain", "--json", env=cli_env)
    assert first["published"] == 19
    # No views yet: every projection is built from history, each event read once.
    assert set(first["built"]) == set(PROJECTIONS)
    for name, built in first["built"].items():
        assert built["events"] == events, (name, built)
    assert first["deliveries"]["dead_lettered"] == 0

    sf = make_session_factory(wiring.engine)
    for i in range(3):
        execute(catalog.CreateProduct(sku=f"M-{i}", name="M", price="1.00", stock=1), sf)
    second = run_json("run", "--drain", "--json", env=cli_env)
    assert second["published"] == 3
    assert second["built"] == {}
    # A product event is applied by the products projection only: 3 deliveries applied.
    assert second["deliveries"] == {"applied": 3, "already_applied": 0, "dead_lettered": 0}

    text = run_cli("run", "--drain", env=cli_env)
    assert text.returncode == 0, text.stderr
    assert "published 0 event(s)" in text.stdout
    assert "0 applied" in text.stdout


def test_replay_from_the_log_counts_each_event_once(
    wiring: Wiring, cli_env: dict[str, str]
) -> None:
    events = write_events(wiring, products=15, customers_=8)  # 23, as in the issue
    run_json("run", "--drain", "--json", env=cli_env)
    one = run_json("replay", "products", "--from", "log", "--yes", "--json", env=cli_env)
    every = run_json("replay", "--all", "--from", "log", "--yes", "--json", env=cli_env)
    # One shape whatever the number of projections.
    assert set(one) == set(every) == {"replays"}
    assert [s["projection"] for s in one["replays"]] == ["products"]
    assert [s["projection"] for s in every["replays"]] == list(PROJECTIONS)
    for summary in one["replays"] + every["replays"]:
        assert summary["source"] == "log"
        assert summary["events"] == events, summary  # was 46: the streams counted again

    text = run_cli("replay", "products", "--from", "log", "--yes", env=cli_env)
    assert text.returncode == 0, text.stderr
    assert f"products: {events} events from the log" in text.stdout


def test_replay_from_offers_and_checks_its_choices(cli_env: dict[str, str]) -> None:
    bad = run_cli("replay", "products", "--from", "tape", "--yes", env=cli_env)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "'auto', 'stream', 'log'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    helptext = run_cli("replay", "--help", env={**cli_env, "COLUMNS": "200"}).stdout
    assert "auto|stream|log" in helptext
