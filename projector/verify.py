"""`cqrs verify`: recompute every key the projections keep from PostgreSQL and compare.

PostgreSQL is the source of truth; this is the check that Redis converged to it. What each
projection's keys should hold comes from its view contract (`ViewContract.expect`: plain
SQL on the write side's tables and the event log, never through `commands`), for the
views, the indexes and the bookkeeping the projection relies on for exactly-once effects.
This module only compares: every field or member that differs, every key that is missing
or of the wrong type, and every key of the live generations that should not exist (a
phantom view, an orphaned record) is reported, labelled with its projection's key kind.
A registered plugin projection is verified like the built-ins.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
import redis

from cqrs.contracts import Expected, ViewContract
from cqrs.keys import KeyMap
from cqrs.urls import libpq_url

__all__ = ["Difference", "Expected", "expected_keys", "verify"]


@dataclass(frozen=True)
class Difference:
    view: str
    key: str
    field: str
    expected: Any
    actual: Any
    projection: str = ""

    def __str__(self) -> str:
        # The key names its projection (`<ns>:<projection>:g<g>:...`).
        return (
            f"{self.view} {self.key} {self.field}: expected {self.expected!r}, got {self.actual!r}"
        )


def expected_keys(
    conn: psycopg.Connection,
    keys: KeyMap,
    generations: Mapping[str, int],
    contracts: Mapping[str, ViewContract],
) -> dict[str, tuple[str, Expected]]:
    """Every key of the live generations with (its projection, the content PostgreSQL
    implies for it), from each projection's contract."""
    out: dict[str, tuple[str, Expected]] = {}
    for name, generation in generations.items():
        contract = contracts[name]
        assert contract.expect is not None  # a contract without one is refused when built
        for key, want in contract.expect(conn, keys.views(name, generation)).items():
            out[key] = (name, want)
    return out


def _read_many(client: redis.Redis, wanted: list[tuple[str, str]]) -> Iterator[Any]:
    """The content of (key, kind) pairs, 500 per pipeline; an error (a key of another
    type) comes back as the exception instead of being raised."""
    for start in range(0, len(wanted), 500):
        pipe = client.pipeline(transaction=False)
        for key, kind in wanted[start : start + 500]:
            if kind == "hash":
                pipe.hgetall(key)
            elif kind == "zset":
                pipe.zrange(key, 0, -1, withscores=True)
            else:
                pipe.smembers(key)
        yield from pipe.execute(raise_on_error=False)


def _compare_key(
    key: str, projection: str, want: Expected, actual: Any, view_kinds: set[str]
) -> list[Difference]:
    def diff(field: str, expected: Any, got: Any) -> Difference:
        return Difference(want.view, key, field, expected, got, projection)

    if isinstance(actual, Exception):
        return [diff("*", want.kind, f"error: {actual}")]
    if want.kind == "zset":
        actual = dict(actual)
    if not actual and want.content:
        return [diff("*", "view" if want.view in view_kinds else want.kind, None)]
    if want.kind == "set":
        if set(actual) == want.content:
            return []
        return [diff("members", sorted(want.content), sorted(actual))]
    content: dict[str, Any] = want.content  # type: ignore[assignment]
    return [
        diff(name, content.get(name), actual.get(name))
        for name in sorted(set(content) | set(actual))
        if content.get(name) != actual.get(name)
    ]


def _label(key: str, prefix: str) -> str:
    """The kind of key a projection key is, from its name: `product`, `customer-orders`,
    `products:by-name`..."""
    rest = key[len(prefix) + 1 :]
    return rest.split(":{", 1)[0]


def _extra_keys(
    client: redis.Redis,
    keys: KeyMap,
    generations: Mapping[str, int],
    expected: Mapping[str, Any],
    contracts: Mapping[str, ViewContract],
) -> list[Difference]:
    """Keys of the live generations that nothing in PostgreSQL accounts for."""
    diffs = []
    for name, generation in sorted(generations.items()):
        views = keys.views(name, generation)
        view_kinds = contracts[name].view_kinds()
        for key in sorted(client.scan_iter(match=views.pattern(), count=1000)):
            if key not in expected:
                label = _label(key, views.prefix)
                kind = "view" if label in view_kinds else "key"
                diffs.append(Difference(label, key, "*", None, kind, name))
    return diffs


def verify(
    database_url: str,
    client: redis.Redis,
    keys: KeyMap,
    generations: Mapping[str, int],
    contracts: Mapping[str, ViewContract] | None = None,
) -> list[Difference]:
    """Every difference between what PostgreSQL implies and what the live generations of
    `generations` ({projection: generation}) hold, views and bookkeeping alike, for each
    projection by its contract (default: the registered ones)."""
    if contracts is None:
        from cqrs.contracts import registered_contracts

        contracts = registered_contracts()
    unknown = sorted(set(generations) - set(contracts))
    if unknown:
        raise ValueError(f"no contract registered for {unknown}")
    with psycopg.connect(libpq_url(database_url)) as conn:
        expected = expected_keys(conn, keys, generations, contracts)
    wanted = list(expected.items())
    kinds = {name: contracts[name].view_kinds() for name in generations}
    diffs: list[Difference] = []
    actuals = _read_many(client, [(k, w.kind) for k, (_, w) in wanted])
    for (key, (name, want)), actual in zip(wanted, actuals, strict=True):
        diffs += _compare_key(key, name, want, actual, kinds[name])
    return diffs + _extra_keys(client, keys, generations, expected, contracts)
