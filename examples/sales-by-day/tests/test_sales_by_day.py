"""sales-by-day end to end, as a user of an installed plugin meets it: every command is
the `cqrs` CLI in a subprocess against real PostgreSQL and Redis, and nothing in the
project was edited to make the projection exist."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import pytest

# Skipped, not failed, where the example is not installed (the project's CI installs it)
# or the project's test fixtures are not at hand.
pytest.importorskip("cqrs_sales_by_day", reason="pip install -e examples/sales-by-day")
pytest.importorskip("tests.conftest", reason="the cqrs-projector repository's test fixtures")

NAME = "sales-by-day"


def cqrs(*args: str, env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cqrs.app", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cqrs_json(*args: str, env: dict[str, str]) -> Any:
    result = cqrs(*args, "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def drain(env: dict[str, str], *only: str) -> None:
    """Publish what is pending, then apply it (all projections, or `only`)."""
    assert cqrs("relay", "--drain", env=env).returncode == 0
    chosen = [a for name in only for a in ("-p", name)]
    result = cqrs("project", "--drain", *chosen, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def today() -> str:
    return datetime.now(UTC).date().isoformat()


@pytest.fixture
def day_of_orders(cli_env: dict[str, str]) -> tuple[str, str]:
    """Three orders placed today (10.00, 20.00, 30.00), the second one cancelled; the day
    and the last write's token."""
    day = today()
    customer = cqrs_json(
        "customer", "register", "--email", "a@example.com", "--name", "Ann", env=cli_env
    )["id"]
    product = cqrs_json(
        "product",
        "create",
        "--sku",
        "S-1",
        "--name",
        "Mug",
        "--price",
        "10.00",
        "--stock",
        "100",
        env=cli_env,
    )["id"]
    orders = [
        cqrs_json(
            "order", "place", "--customer", customer, "--item", f"{product}:{qty}", env=cli_env
        )
        for qty in (1, 2, 3)
    ]
    token = cqrs_json("order", "cancel", orders[1]["id"], env=cli_env)["token"]
    if today() != day:
        pytest.skip("the UTC day changed while placing the orders")
    return day, token


def test_the_plugin_is_built_served_verified_and_listed(
    cli_env: dict[str, str], day_of_orders: tuple[str, str]
) -> None:
    day, _token = day_of_orders
    drain(cli_env)
    view = cqrs_json("query", "view", NAME, day, env=cli_env)
    assert view == {"date": day, "order_count": 2, "revenue": "40.00"}

    verified = cqrs("verify", env=cli_env)
    assert verified.returncode == 0, verified.stdout
    assert NAME in verified.stdout and "views match PostgreSQL" in verified.stdout

    status = cqrs_json("status", env=cli_env)
    assert status["projections"][NAME]["generation"] == 1

    missing = cqrs("query", "view", NAME, "1999-01-01", env=cli_env)
    assert missing.returncode == 1 and "not found" in missing.stderr
    bad = cqrs("query", "view", NAME, "yesterday", env=cli_env)
    assert bad.returncode == 2, bad.stderr


def test_replay_rebuilds_it(cli_env: dict[str, str], day_of_orders: tuple[str, str]) -> None:
    day, _token = day_of_orders
    drain(cli_env)
    replayed = cqrs_json("replay", NAME, "--yes", env=cli_env)
    assert [r["projection"] for r in replayed["replays"]] == [NAME]
    assert cqrs_json("status", env=cli_env)["projections"][NAME]["generation"] == 2
    view = cqrs_json("query", "view", NAME, day, env=cli_env)
    assert view == {"date": day, "order_count": 2, "revenue": "40.00"}
    assert cqrs("verify", env=cli_env).returncode == 0


def test_after_waits_for_it(cli_env: dict[str, str], day_of_orders: tuple[str, str]) -> None:
    """The cancel's token is applied by the built-in projections first: the read waits
    until sales-by-day has it too, and then shows the cancellation."""
    day, token = day_of_orders
    drain(cli_env, "products", "customers", "orders")
    args = ["query", "view", NAME, day, "--json", "--after", token, "--timeout", "60"]
    waiting = subprocess.Popen(
        [sys.executable, "-m", "cqrs.app", *args],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2.0)
        assert waiting.poll() is None, "the read did not wait for sales-by-day"
        drain(cli_env, NAME)
        stdout, stderr = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, stderr
    assert json.loads(stdout) == {"date": day, "order_count": 2, "revenue": "40.00"}
