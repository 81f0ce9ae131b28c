"""`cqrs status` says what is actually wrong with a projection's setup (issue 12).

With `<ns>:gen:<projection>` missing, status used to say "rebuilding: views built by
version 2, code is 2" although nothing rebuilds anything in that case: live workers go on
writing the generation the state hash records and restore the key from it, and until
they do queries read no generation at all. Each setup state is checked here against what
the workers and the replay really do.
"""

from __future__ import annotations

import uuid

from cqrs.commands.catalog import CreateProduct
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.status import BROKEN, CAUGHT_UP, REBUILDING, ProjectionStatus, collect_status
from cqrs.wiring import Wiring
from tests.helpers import cli_json, run_cli
from tests.integration.projector_support import drain, run

WIDE = {"COLUMNS": "400"}  # rich wraps long reasons at the terminal width


def _products(wiring: Wiring) -> ProjectionStatus:
    return collect_status(
        wiring.redis, wiring.settings, [PROJECTIONS["products"]], include_relay=False
    ).by_name("products")


def _product(wiring: Wiring) -> uuid.UUID:
    sku = f"S-{uuid.uuid4().hex[:8]}"
    return run(wiring, CreateProduct(sku=sku, name="Widget", price="1.00", stock=5)).id


def test_a_missing_generation_key_is_reported_as_broken_with_its_remedy(
    wiring: Wiring, cli_env: dict[str, str]
) -> None:
    _product(wiring)
    drain(wiring)
    gen_key = wiring.keys.generation("products")
    assert _products(wiring).state == CAUGHT_UP
    live = int(wiring.redis.get(gen_key))
    wiring.redis.delete(gen_key)

    report = _products(wiring)
    assert report.state == BROKEN
    assert "rebuilding" not in report.reason and "version" not in report.reason
    assert f"{gen_key} is missing" in report.reason
    assert f"workers keep generation {live}" in report.reason
    assert "cqrs replay products" in report.reason

    code, data, err = cli_json("status", "-p", "products", env=cli_env)
    assert code == 0, err
    products = data["projections"]["products"]
    assert products["state"] == BROKEN and products["reason"] == report.reason
    # A health check fails on it, whatever the thresholds.
    code, data, _ = cli_json("status", "-p", "products", "--max-lag", "1000", env=cli_env)
    assert code == 1 and any(gen_key in p for p in data["problems"]), data
    text = run_cli("status", "-p", "products", env=cli_env | WIDE)
    assert f"{gen_key} is missing" in text.stdout, text.stdout

    # What the reason says is true: a live worker keeps the recorded generation up to date
    # and restores the key from the state hash ...
    pid = _product(wiring)
    drain(wiring)
    assert wiring.redis.exists(wiring.keys.views("products", live).product(pid)) == 1
    assert int(wiring.redis.get(gen_key)) == live
    assert _products(wiring).state == CAUGHT_UP
    # ... and the other remedy it names works too.
    wiring.redis.delete(gen_key)
    replayed = run_cli("replay", "products", "--yes", env=cli_env, timeout=120)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    report = _products(wiring)
    assert report.state == CAUGHT_UP and report.reason == "", report
    assert int(wiring.redis.get(gen_key)) > live


def test_a_generation_key_naming_another_generation_is_broken(wiring: Wiring) -> None:
    _product(wiring)
    drain(wiring)
    gen_key = wiring.keys.generation("products")
    live = int(wiring.redis.get(gen_key))
    wiring.redis.set(gen_key, live + 5)
    report = _products(wiring)
    assert report.state == BROKEN
    assert f"queries read generation {live + 5}" in report.reason
    assert f"workers write generation {live}" in report.reason


def test_every_rebuilding_reason_matches_what_the_workers_do(wiring: Wiring) -> None:
    _product(wiring)
    drain(wiring)
    keys = wiring.keys
    state_key = keys.projection_state("products")
    code = PROJECTIONS["products"].version

    # Version bumped: a worker rebuilds, the old views serve meanwhile.
    wiring.redis.hset(state_key, "version", code - 1)
    report = _products(wiring)
    assert report.state == REBUILDING
    assert f"built by version {code - 1}, the code is version {code}" in report.reason
    assert "a worker rebuilds them" in report.reason
    drain(wiring)  # and it does
    assert _products(wiring).state == CAUGHT_UP

    # A newer release's views: not rebuilding; this release's workers leave them alone.
    wiring.redis.hset(state_key, "version", code + 1)
    report = _products(wiring)
    assert report.state != REBUILDING
    assert "newer release" in report.reason and "leave them alone" in report.reason
    wiring.redis.hset(state_key, "version", code)

    # No state recorded: a worker builds the views; queries read the old ones until then.
    served = int(wiring.redis.get(keys.generation("products")))
    wiring.redis.delete(state_key)
    report = _products(wiring)
    assert report.state == REBUILDING
    assert f"{state_key} is missing" in report.reason
    assert f"queries still read generation {served}" in report.reason
    drain(wiring)
    assert _products(wiring).state == CAUGHT_UP

    # A pause left behind by a replay that stopped (no lock): it expires by itself.
    wiring.redis.set(keys.pause("products"), "gone", px=60_000)
    report = _products(wiring)
    assert report.state == REBUILDING
    assert "no replay holds the lock" in report.reason and "expires within" in report.reason
    wiring.redis.delete(keys.pause("products"))

    # A replay building: the current generation keeps serving.
    wiring.redis.set(keys.replay_lock("products"), "someone", px=60_000)
    report = _products(wiring)
    assert report.state == REBUILDING
    current = int(wiring.redis.get(keys.generation("products")))
    assert f"generation {current} keeps serving meanwhile" in report.reason
    wiring.redis.delete(keys.replay_lock("products"))
    assert _products(wiring).state == CAUGHT_UP
