"""What the replay tests and the self-healing tests share: seeds, snapshots of the live
views keyed without their generation, the generations present, and the CLI's replay and
verify as a user runs them."""

from __future__ import annotations

import json
import os
import random
from decimal import Decimal
from typing import Any

import psycopg
import redis

from cqrs.keys import KeyMap
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.replay import generation_of
from cqrs.projector.state import live_generation
from cqrs.urls import libpq_url
from tests.helpers import run_cli


def run_seed() -> int:
    """CQRS_TEST_SEED, or a fresh random seed (printed by each test)."""
    return int(os.environ.get("CQRS_TEST_SEED") or random.SystemRandom().randrange(2**32))


# --------------------------------------------------------------------------- snapshots


def live_snapshot(client: redis.Redis, keys: KeyMap) -> dict[str, Any]:
    """Every key of every projection's live generation with its full content, keyed
    `<projection>:<rest of the key>` so two generations compare equal."""
    snapshot: dict[str, Any] = {}
    for projection in PROJECTIONS:
        generation = live_generation(client, keys, projection)
        assert generation, f"{projection} has no live generation"
        prefix = keys.views(projection, generation).prefix + ":"
        for key in client.scan_iter(match=prefix + "*", count=1000):
            # The generation's prefix also appears inside the catalog indexes' hash tags.
            name = f"{projection}:{key[len(prefix) :].replace(prefix[:-1], '')}"
            kind = client.type(key)
            if kind == "hash":
                snapshot[name] = client.hgetall(key)
            elif kind == "zset":
                snapshot[name] = client.zrange(key, 0, -1, withscores=True)
            elif kind == "set":
                snapshot[name] = sorted(client.smembers(key))
            elif kind == "string":
                snapshot[name] = client.get(key)
            else:
                snapshot[name] = f"<{kind}>"
    return snapshot


def snapshot_mismatch(expected: dict[str, Any], actual: dict[str, Any]) -> str:
    """A short description of how two snapshots differ ('' when equal)."""
    if expected == actual:
        return ""
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    changed = sorted(k for k in expected.keys() & actual.keys() if expected[k] != actual[k])
    lines = [
        f"{len(expected)} vs {len(actual)} keys; {len(missing)} missing, {len(extra)} extra, "
        f"{len(changed)} changed"
    ]
    lines += [f"missing {k}: {expected[k]!r}" for k in missing[:3]]
    lines += [f"extra {k}: {actual[k]!r}" for k in extra[:3]]
    lines += [f"changed {k}: {expected[k]!r} -> {actual[k]!r}" for k in changed[:3]]
    return "\n".join(lines)


def generations_present(client: redis.Redis, keys: KeyMap) -> dict[str, set[int]]:
    """The generations that have at least one view key, per projection."""
    present: dict[str, set[int]] = {}
    for projection in PROJECTIONS:
        prefix = f"{keys.ns}:{projection}:g"
        found = set()
        for key in client.scan_iter(match=keys.projection_pattern(projection), count=1000):
            found.add(generation_of(key, prefix))
        present[projection] = found
    return present


def keys_of_generation(client: redis.Redis, keys: KeyMap, projection: str, gen: int) -> int:
    pattern = keys.views(projection, gen).pattern()
    return sum(1 for _ in client.scan_iter(match=pattern, count=1000))


def assert_totals_match_the_write_side(snapshot: dict[str, Any], database_url: str) -> None:
    """Counters fed by events (units_sold, revenue, order_count, lifetime_value) summed
    over every view equal the write side's totals: nothing was counted twice (or lost)."""
    with psycopg.connect(libpq_url(database_url)) as conn:
        units, revenue = conn.execute(
            "SELECT coalesce(sum(l.qty), 0), coalesce(sum(l.line_total), 0)"
            " FROM orders.order_lines l JOIN orders.orders o ON o.id = l.order_id"
            " WHERE o.status <> 'cancelled'"
        ).fetchone()
        orders, value = conn.execute(
            "SELECT count(*), coalesce(sum(total), 0) FROM orders.orders"
            " WHERE status <> 'cancelled'"
        ).fetchone()
    products = [v for k, v in snapshot.items() if k.startswith("products:product:")]
    customers = [v for k, v in snapshot.items() if k.startswith("customers:customer:")]
    assert products and customers
    assert units > 0 and orders > 0  # the workload sold something
    assert sum(int(p["units_sold"]) for p in products) == units
    assert sum(Decimal(p["revenue"]) for p in products) == revenue
    assert sum(int(c["order_count"]) for c in customers) == orders
    assert sum(Decimal(c["lifetime_value"]) for c in customers) == value
    # The top-products index scores follow the views exactly.
    top = dict(next(v for k, v in snapshot.items() if k.startswith("products:products:top:")))
    for key, view in (i for i in snapshot.items() if i[0].startswith("products:product:")):
        assert top.get(view["id"]) == float(view["units_sold"]), key


def stream_entries(client: redis.Redis, keys: KeyMap) -> list[tuple[int, str]]:
    """(partition, entry id) of every entry of every partition stream."""
    partitions = int(client.hget(keys.meta(), "partitions"))
    return [
        (p, entry_id)
        for p in range(partitions)
        for entry_id, _fields in client.xrange(keys.stream(p), "-", "+")
    ]


# --------------------------------------------------------------------------- the CLI


def replay(env: dict[str, str], *args: str, timeout: float = 120) -> list[dict[str, Any]]:
    """`cqrs replay ARGS --yes --json`: the summaries, one per projection."""
    result = run_cli("replay", *args, "--yes", "--json", env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    return data.get("replays", [data])


def verify_clean(env: dict[str, str]) -> None:
    verified = run_cli("verify", "--json", env=env, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["differences"] == 0, verified.stdout
