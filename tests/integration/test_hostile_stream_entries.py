"""Foreign and malformed stream entries: dead-lettered, never a crash, never a stop.

tests/integration/test_projector_poison.py covers missing fields, an unknown type, a future
schema, a wrong payload type and a payload that is not JSON; this table adds what it does
not: bytes that are not UTF-8, a 1 MB payload (malformed and well-formed but off-contract),
payloads that are JSON but not objects, envelope fields of the wrong type or shape, and RESP
or SQL text where an identifier belongs. All of them sit in one partition among valid
events, and the real `cqrs run --drain` process (not an in-process worker) must project
everything else, file each poison entry with the projections that read it, and exit 0.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import redis

from cqrs.commands.catalog import CreateProduct, RenameProduct
from cqrs.events import EventEnvelope
from cqrs.keys import partition_of
from cqrs.projector.deadletters import list_dead_letters
from cqrs.projector.registry import PROJECTIONS
from cqrs.wiring import Wiring
from tests.conftest import settings_env
from tests.helpers import run_cli
from tests.integration.projector_support import differences, drain, run

MB = 1_000_000


def _good() -> dict[str, str]:
    return EventEnvelope(
        event_id=uuid.uuid4(),
        event_type="ProductCreated",
        aggregate_type="product",
        aggregate_id=uuid.uuid4(),
        version=1,
        partition_key=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
        payload={"sku": "F-1", "name": "Foreign", "price": "1.00", "stock": 1},
    ).to_stream_fields()


def _with(**changes: str) -> dict[str, str]:
    return {**_good(), **changes}


ALL = set(PROJECTIONS)
# Only the projection that handles ProductCreated parses it: the others skip a known type
# they do not handle without reading it, so a malformed ProductCreated is dead-lettered by
# `products` alone. An entry whose type nobody knows is dead-lettered by every projection.
PRODUCTS = {"products"}

# (id, fields (str or raw bytes), projections that must dead-letter it, text in the error)
CASES: list[tuple[str, dict, set[str], str]] = [
    ("not-utf8", {b"type": b"\xff\xfe\xfd", b"payload": b"\xc3\x28"}, ALL, "missing field"),
    ("not-utf8-in-valid-entry", {**{k.encode(): v.encode() for k, v in _good().items()},
                                 b"payload": b'{"sku":"\xff"}'}, PRODUCTS, "field required"),
    ("huge-malformed-payload", _with(payload='{"sku":"' + "x" * MB), PRODUCTS, "malformed"),
    ("huge-off-contract-payload", _with(payload=json.dumps(
        {"sku": "F-1", "name": "N", "price": "1.00", "stock": 1, "blob": "x" * MB})), PRODUCTS,
     "extra"),
    ("payload-is-a-list", _with(payload="[1, 2, 3]"), PRODUCTS, "payload"),
    ("payload-is-null", _with(payload="null"), PRODUCTS, "payload"),
    ("payload-price-is-a-list", _with(payload=json.dumps(
        {"sku": "F-1", "name": "N", "price": ["1"], "stock": 1})), PRODUCTS, "price"),
    ("version-zero", _with(version="0"), PRODUCTS, "version"),
    ("version-not-a-number", _with(version="seven"), PRODUCTS, "malformed"),
    ("schema-not-an-int", _with(schema="1.0"), PRODUCTS, "malformed"),
    ("position-not-an-int", _with(position="x"), PRODUCTS, "malformed"),
    ("event-id-not-a-uuid", _with(event_id="1' OR '1'='1"), PRODUCTS, "event_id"),
    ("aggregate-id-sql", _with(aggregate_id="'; DROP TABLE x; --"), PRODUCTS, "aggregate_id"),
    ("partition-key-hash-tag", _with(partition_key="{p0}"), PRODUCTS, "partition_key"),
    ("occurred-at-garbage", _with(occurred_at="yesterday"), PRODUCTS, "occurred_at"),
    ("type-is-resp", _with(type="*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"), ALL,
     "unknown event type"),
    ("every-field-empty", dict.fromkeys(_good(), ""), ALL, "stream entry"),
]  # fmt: skip


def test_hostile_entries_are_dead_lettered_and_the_rest_is_projected(wiring: Wiring) -> None:
    drain(wiring)  # views exist: what follows is live projection
    env = settings_env(wiring.settings) | {"CQRS_PROJECTOR_MAX_DELIVERIES": "2"}
    first = run(wiring, CreateProduct(sku="OK-1", name="Before", price="1.00", stock=1))
    partition = partition_of(first.events[0].partition_key, wiring.settings.partitions)
    stream = wiring.keys.stream(partition)
    drained = run_cli("relay", "--drain", env=env)
    assert drained.returncode == 0, drained.stderr[-2000:]

    raw = redis.Redis.from_url(wiring.redis_url)  # no decoding: bytes go in as they are
    try:
        ids = {why: raw.xadd(stream, fields).decode() for why, fields, *_ in CASES}
    finally:
        raw.close()
    # Valid events of the same product after the poison, in the same partition.
    run(wiring, RenameProduct(product_id=first.id, name="After"))
    second = run(wiring, CreateProduct(sku="OK-2", name="Second", price="2.00", stock=2))

    result = run_cli("run", "--drain", env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]

    views = wiring.keys.views("products", 1)
    assert wiring.redis.hget(views.product(first.id), "name") == "After"
    assert wiring.redis.hget(views.product(second.id), "name") == "Second"
    assert differences(wiring) == []
    for projection in PROJECTIONS:
        letters = {d.entry_id: d for d in list_dead_letters(wiring.redis, wiring.keys, projection)}
        wanted = {ids[why]: why for why, _f, who, _e in CASES if projection in who}
        assert set(letters) == set(wanted), (projection, sorted(wanted.values()))
        for why, _fields, who, error in CASES:
            if projection in who:
                letter = letters[ids[why]]
                assert error.lower() in letter.error.lower(), (projection, why, letter.error)
                assert letter.deliveries >= 2, (projection, why)
        # Nothing is left pending: no poison entry blocks the partition.
        assert wiring.redis.xpending(stream, projection)["pending"] == 0
