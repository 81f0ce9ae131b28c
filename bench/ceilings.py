"""Raw ceilings: the same work done the plainest fast way, without the project's
guarantees, measured in the same run as the project's figure.

- transactions: one psycopg transaction inserting one row and one log row;
- XADD: pipelined XADDs of the exact entries the relay writes;
- projection loop: XREADGROUP COUNT 500 over the owned streams + pipelined HSET of the
  event's fields + XACK, and a variant with one Lua call per batch that also checks
  versions (both in spawned processes, timed like the project's workers);
- HGETALL: one round trip with redis-py;
- end-to-end chain: INSERT + NOTIFY -> LISTEN -> XADD -> XREAD -> HSET.

Ceilings write under the scenario's namespace (and the `bench` schema of the scratch
database), so they touch nothing else. Their keys are deliberately not from the key map:
they are not the product's keys, only the same amount of data in the same kind of key.

On a Redis Cluster the ceilings stay plain redis-py: `raw_client` is redis-py's
`RedisCluster`, and batches are `Pipes`, one plain `Pipeline` per master holding the
commands' keys, executed one after another (faster than redis-py's `ClusterPipeline`
here: ~11-14 ms against ~16 ms for 1,000 HSETs on three local masters). A multi-key
Lua call must keep its keys in one slot, so the Lua variant of the projection loop makes
one call per hash slot of the batch (its view keys are tagged by aggregate, so nearly
one call per event) instead of one per batch.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from typing import Any

import psycopg
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from bench.history import SynthEvent
from cqrs.keys import KeyMap
from cqrs.urls import libpq_url
from cqrs.wiring import cluster_url

# --- the plain client and its batches, on one node or a cluster -----------------------------


def is_cluster_url(url: str) -> bool:
    """Whether `url` names a node of a Redis Cluster (the node says so in INFO cluster)."""
    probe = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        return str(probe.info("cluster").get("cluster_enabled", "0")) == "1"
    finally:
        probe.close()


def raw_client(url: str) -> redis.Redis:
    """redis-py's plain client for `url`: `RedisCluster` when it names a cluster node
    (database 0 only: the path is dropped), `Redis` otherwise; replies decoded."""
    if is_cluster_url(url):
        return RedisCluster.from_url(cluster_url(url), decode_responses=True)  # type: ignore[return-value]
    return redis.Redis.from_url(url, decode_responses=True)


class Pipes:
    """One batch of commands as plain redis-py pipelines: one on one node; on a cluster
    one per master holding the commands' keys, executed in turn. `on(key)` gives the
    pipeline for the one command about to be added on `key`; `execute()` returns the
    replies in the order the commands were added. Single use, like a pipeline."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._one: redis.client.Pipeline | None = None
        if not isinstance(client, RedisCluster):
            self._one = client.pipeline(transaction=False)
        self._by_node: dict[str, redis.client.Pipeline] = {}
        self._by_slot: dict[int, redis.client.Pipeline] = {}
        self._order: list[tuple[redis.client.Pipeline, int]] = []

    def on(self, key: str) -> redis.client.Pipeline:
        if self._one is not None:
            return self._one
        slot = key_slot(key.encode())
        pipe = self._by_slot.get(slot)
        if pipe is None:
            cluster: Any = self.client
            node = cluster.nodes_manager.get_node_from_slot(slot)
            pipe = self._by_node.get(node.name)
            if pipe is None:
                pipe = cluster.get_redis_connection(node).pipeline(transaction=False)
                self._by_node[node.name] = pipe
            self._by_slot[slot] = pipe
        self._order.append((pipe, len(pipe)))
        return pipe

    def __len__(self) -> int:
        return len(self._one) if self._one is not None else len(self._order)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        if self._one is not None:
            return self._one.execute(raise_on_error=raise_on_error)
        replies = {
            id(pipe): pipe.execute(raise_on_error=raise_on_error) for pipe in self._by_node.values()
        }
        return [replies[id(pipe)][i] for pipe, i in self._order]


# --- PostgreSQL: one row + one log row per transaction -----------------------------------

_ITEM = "INSERT INTO bench.items (id, name, price, stock, version) VALUES (%s, %s, %s, %s, 1)"
_LOG = "INSERT INTO bench.log (aggregate_id, event_type, payload) VALUES (%s, %s, %s::jsonb)"


def raw_transactions(database_url: str, total: int, writers: int) -> float:
    """Transactions per second over `writers` connections (one thread each)."""
    url = libpq_url(database_url)
    conns = [psycopg.connect(url) for _ in range(writers)]
    tickets = iter(range(total))
    lock = threading.Lock()

    def write(conn: psycopg.Connection) -> None:
        rng = random.Random()
        while True:
            with lock:
                if next(tickets, None) is None:
                    return
            item = uuid.uuid4()
            payload = json.dumps({"name": "Blue Widget", "price": "12.50", "stock": 10})
            with conn.transaction():
                conn.execute(_ITEM, (item, "Blue Widget", rng.randint(1, 9999) / 100, 10))
                conn.execute(_LOG, (item, "ItemCreated", payload))

    try:
        started = time.perf_counter()
        threads = [threading.Thread(target=write, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return total / (time.perf_counter() - started)
    finally:
        for c in conns:
            c.close()


# --- PostgreSQL: an order placement written by hand --------------------------------------

# The project's own tables, copied (constraints, indexes, identity) into a schema of the
# ceiling's, with the foreign keys the project's rows are checked against: the same rows
# in the same kind of table, without touching what the relay and the projections read.
_ORDER_SCHEMA = "bench_orders"
_ORDER_TABLES = (
    ("products", "catalog.products"),
    ("customers", "customers.customers"),
    ("orders", "orders.orders"),
    ("order_lines", "orders.order_lines"),
    ("event_log", "events.event_log"),
    ("outbox", "events.outbox"),
)
_ORDER_FKS = (
    "ALTER TABLE bench_orders.order_lines ADD FOREIGN KEY (order_id)"
    " REFERENCES bench_orders.orders (id) ON DELETE CASCADE",
    "ALTER TABLE bench_orders.outbox ADD FOREIGN KEY (position)"
    " REFERENCES bench_orders.event_log (position)",
)
_O_READ_CUSTOMER = "SELECT name, version FROM bench_orders.customers WHERE id = %s FOR SHARE"
_O_READ_PRODUCTS = (
    "SELECT id, name, price, stock, version FROM bench_orders.products"
    " WHERE id = ANY(%s) ORDER BY id FOR UPDATE"
)
_O_ORDER = (
    "INSERT INTO bench_orders.orders (id, customer_id, status, total, placed_at, version)"
    " VALUES (%s, %s, 'placed', %s, now(), 1)"
)
_O_LINE = (
    "INSERT INTO bench_orders.order_lines (order_id, line_no, product_id, name, unit_price,"
    " qty, line_total) VALUES (%s, %s, %s, %s, %s, %s, %s)"
)
# The stock check twice, as a hand-written service would: the rows are locked, so the
# Python check decides; the WHERE and the table's CHECK constraint guard the row anyway.
_O_STOCK = (
    "UPDATE bench_orders.products SET stock = stock - %s, version = version + 1"
    " WHERE id = %s AND stock >= %s"
)
_O_EVENT = (
    "WITH e AS (INSERT INTO bench_orders.event_log (event_id, aggregate_type, aggregate_id,"
    " aggregate_version, partition_key, event_type, schema_version, payload, occurred_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, 1, %s::jsonb, now()) RETURNING position)"
    " INSERT INTO bench_orders.outbox (position) SELECT position FROM e"
)


def prepare_order_tables(database_url: str) -> None:
    """(Re)create the ceiling's copy of the write side's tables, with the project's
    products and customers in it (the rows the measured orders read and lock)."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn, conn.transaction():
        conn.execute(f"DROP SCHEMA IF EXISTS {_ORDER_SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {_ORDER_SCHEMA}")
        for table, like in _ORDER_TABLES:
            conn.execute(f"CREATE TABLE {_ORDER_SCHEMA}.{table} (LIKE {like} INCLUDING ALL)")
        for fk in _ORDER_FKS:
            conn.execute(fk)
        conn.execute(f"INSERT INTO {_ORDER_SCHEMA}.products SELECT * FROM catalog.products")
        conn.execute(f"INSERT INTO {_ORDER_SCHEMA}.customers SELECT * FROM customers.customers")


def drop_order_tables(database_url: str) -> None:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {_ORDER_SCHEMA} CASCADE")


def _place_order_by_hand(
    conn: psycopg.Connection, customer: uuid.UUID, items: list[tuple[uuid.UUID, int]]
) -> None:
    """One order placement: read the customer and lock the products (one round trip),
    then the order, its lines, the stock updates, an OrderPlaced event and one
    StockReserved per line with their outbox rows, and COMMIT (a second round trip)."""
    order_id = uuid.uuid4()
    with conn.pipeline() as pipe:
        conn.execute("BEGIN")
        who = conn.execute(_O_READ_CUSTOMER, (customer,))
        locked = conn.execute(_O_READ_PRODUCTS, ([p for p, _ in items],))
        pipe.sync()
        name, customer_version = who.fetchone()  # type: ignore[misc]
        products = {row[0]: row for row in locked.fetchall()}
        lines = []
        for n, (product_id, qty) in enumerate(items, start=1):
            _, pname, price, stock, version = products[product_id]
            if stock < qty:
                conn.execute("ROLLBACK")
                raise ValueError("insufficient stock")
            lines.append((n, product_id, pname, price, qty, price * qty, stock - qty, version))
        total = sum(line[5] for line in lines)
        conn.execute(_O_ORDER, (order_id, customer, total))
        placed = {
            "customer_id": str(customer),
            "customer_name": name,
            "customer_version": customer_version,
            "lines": [
                {
                    "product_id": str(pid),
                    "name": pname,
                    "unit_price": str(price),
                    "qty": qty,
                    "line_total": str(line_total),
                }
                for _, pid, pname, price, qty, line_total, _, _ in lines
            ],
            "total": str(total),
            "placed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        events = [(uuid.uuid4(), "order", order_id, 1, customer, "OrderPlaced", json.dumps(placed))]
        for n, pid, pname, price, qty, line_total, left, version in lines:
            conn.execute(_O_LINE, (order_id, n, pid, pname, price, qty, line_total))
            conn.execute(_O_STOCK, (qty, pid, qty))
            reserved = {
                "order_id": str(order_id),
                "qty": qty,
                "unit_price": str(price),
                "stock": left,
            }
            events.append(
                (
                    uuid.uuid4(),
                    "product",
                    pid,
                    version + 1,
                    pid,
                    "StockReserved",
                    json.dumps(reserved),
                )
            )
        for event in events:
            conn.execute(_O_EVENT, event)
        conn.execute("COMMIT")


def raw_order_placements(
    database_url: str, orders: list[tuple[uuid.UUID, list[tuple[uuid.UUID, int]]]], writers: int
) -> float:
    """Order placements per second over `writers` connections (one thread each), the
    orders given as (customer, [(product, qty)]) in the order they are taken."""
    url = libpq_url(database_url)
    conns = [psycopg.connect(url, autocommit=True) for _ in range(writers)]
    tickets = iter(orders)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def write(conn: psycopg.Connection) -> None:
        try:
            while True:
                with lock:
                    order = next(tickets, None)
                if order is None:
                    return
                _place_order_by_hand(conn, *order)
        except BaseException as exc:
            errors.append(exc)

    try:
        started = time.perf_counter()
        threads = [threading.Thread(target=write, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        if errors:
            raise errors[0]
        return len(orders) / elapsed
    finally:
        for c in conns:
            c.close()


# --- Redis: pipelined XADD of the relay's own entries ------------------------------------


def raw_xadd(
    client: redis.Redis, keys: KeyMap, events: list[SynthEvent], *, batch: int = 500
) -> float:
    """Events per second XADDing pre-built entries (the relay's batch size per pipeline)."""
    entries = [(keys.stream(e.partition), e.stream_fields(i + 1)) for i, e in enumerate(events)]
    started = time.perf_counter()
    for start in range(0, len(entries), batch):
        pipes = Pipes(client)
        for stream, fields in entries[start : start + batch]:
            pipes.on(stream).xadd(stream, fields)
        pipes.execute()
    return len(entries) / (time.perf_counter() - started)


# --- Redis: the hand-written projection loop ---------------------------------------------

# One call per batch: for each event, apply its fields only when its version is the next
# one recorded on the target hash (the same gate as the project, without indexes).
# KEYS: one target hash per event. ARGV per event: version, field count, field/value pairs.
RAW_BATCH_LUA = r"""
local i = 1
local applied = 0
for k = 1, #KEYS do
  local version = tonumber(ARGV[i])
  local nfields = tonumber(ARGV[i + 1])
  local stored = tonumber(redis.call('HGET', KEYS[k], 'version') or '0')
  if version == stored + 1 then
    local args = {'version', version}
    for j = 0, 2 * nfields - 1 do args[#args + 1] = ARGV[i + 2 + j] end
    redis.call('HSET', KEYS[k], unpack(args))
    applied = applied + 1
  end
  i = i + 2 + 2 * nfields
end
return applied
"""


def raw_group(projection: str) -> str:
    return f"ceiling-{projection}"


def raw_view_key(namespace: str, projection: str, aggregate_id: str) -> str:
    return f"{namespace}:ceiling-{projection}:view:{{{aggregate_id}}}"


def view_fields(payload: str) -> dict[str, Any]:
    """The event's payload as flat hash fields (nested values stay JSON strings)."""
    data = json.loads(payload)
    return {
        k: (json.dumps(v, separators=(",", ":")) if isinstance(v, list | dict) else v)
        for k, v in data.items()
    }


def raw_loop_child(
    redis_url: str,
    namespace: str,
    partitions: list[int],
    handled: dict[str, list[str]],
    mode: str,
    consumer: str,
    *,
    ready: Any,
    go: Any,
    stop: Any,
    **_: Any,
) -> dict[str, Any]:
    """XREADGROUP COUNT 500 over every (group, owned stream) in one batch, then one batch
    of HSETs (or one Lua call per batch: per hash slot on a cluster) and XACKs; until
    `stop`."""
    import psutil

    client = raw_client(redis_url)
    keys = KeyMap(namespace)
    streams = [keys.stream(p) for p in partitions]
    types = {group: set(kinds) for group, kinds in handled.items()}
    sha = client.script_load(RAW_BATCH_LUA)  # on every master of a cluster
    per_slot = isinstance(client, RedisCluster)
    ready()
    go.wait()
    started = psutil.Process().cpu_times()
    events = 0
    while not stop.is_set():
        pipes = Pipes(client)
        slots = []
        for projection in types:
            for stream in streams:
                pipes.on(stream).xreadgroup(
                    raw_group(projection), consumer, {stream: ">"}, count=500
                )
                slots.append((projection, stream))
        read = pipes.execute()
        pipes = Pipes(client)
        got = 0
        for (projection, stream), result in zip(slots, read, strict=True):
            rows = result[0][1] if result else []
            if not rows:
                continue
            got += len(rows)
            wanted = types[projection]
            if mode == "hset":
                for _eid, f in rows:
                    if f["type"] in wanted:
                        mapping = view_fields(f["payload"])
                        mapping["version"] = f["version"]
                        key = raw_view_key(namespace, projection, f["aggregate_id"])
                        pipes.on(key).hset(key, mapping=mapping)
            else:
                calls: dict[int, tuple[list[str], list[Any]]] = {}
                for _eid, f in rows:
                    if f["type"] not in wanted:
                        continue
                    mapping = view_fields(f["payload"])
                    key = raw_view_key(namespace, projection, f["aggregate_id"])
                    batch_keys, argv = calls.setdefault(
                        key_slot(key.encode()) if per_slot else 0, ([], [])
                    )
                    batch_keys.append(key)
                    argv += [f["version"], len(mapping)]
                    for name, value in mapping.items():
                        argv += [name, value]
                for batch_keys, argv in calls.values():
                    pipes.on(batch_keys[0]).evalsha(sha, len(batch_keys), *batch_keys, *argv)
            pipes.on(stream).xack(stream, raw_group(projection), *[eid for eid, _ in rows])
        if got:
            pipes.execute()
            events += got
        else:
            time.sleep(0.001)
    client.close()
    ended = psutil.Process().cpu_times()
    return {
        "consumer": consumer,
        "cpu": ended.user + ended.system - started.user - started.system,
        "rss": psutil.Process().memory_info().rss,
        "deliveries": events,
    }


# --- Redis: a plain hash's memory ---------------------------------------------------------


def raw_hset_bytes(client: redis.Redis, key: str, fields: dict[str, Any]) -> tuple[int, str]:
    """MEMORY USAGE and encoding of a plain hash holding `fields`."""
    client.delete(key)
    client.hset(key, mapping=fields)
    size = int(client.memory_usage(key, samples=0) or 0)
    encoding = client.object("encoding", key)
    client.delete(key)
    return size, str(encoding)


# --- the raw end-to-end chain ---------------------------------------------------------------

CHAIN_CHANNEL = "cqrs_bench_chain"


def chain_child(
    database_url: str,
    redis_url: str,
    stream: str,
    prefix: str,
    *,
    ready: Any,
    go: Any,
    stop: Any,
    **_: Any,
) -> dict[str, Any]:
    """Relay thread (LISTEN -> SELECT new rows -> pipelined XADD) and projector thread
    (XREAD BLOCK -> pipelined HSET); reports when each sequence number became visible."""
    visible: dict[int, float] = {}
    client = raw_client(redis_url)
    listen = psycopg.connect(libpq_url(database_url), autocommit=True)
    listen.execute(f"LISTEN {CHAIN_CHANNEL}")

    def relay() -> None:
        last = 0
        while not stop.is_set():
            for _ in listen.notifies(timeout=0.05, stop_after=1):
                pass
            rows = listen.execute(
                "SELECT position, aggregate_id, payload FROM bench.log WHERE position > %s"
                " ORDER BY position",
                (last,),
            ).fetchall()
            if rows:
                pipes = Pipes(client)
                for position, aggregate_id, payload in rows:
                    pipes.on(stream).xadd(
                        stream,
                        {
                            "position": position,
                            "aggregate_id": str(aggregate_id),
                            "payload": json.dumps(payload),
                        },
                    )
                pipes.execute()
                last = rows[-1][0]

    def project() -> None:
        reader = raw_client(redis_url)
        last_id = "0-0"
        while not stop.is_set():
            got = reader.xread({stream: last_id}, count=500, block=50)
            if not got:
                continue
            rows = got[0][1]
            pipes = Pipes(reader)
            for _eid, f in rows:
                key = f"{prefix}:{{{f['aggregate_id']}}}"
                pipes.on(key).hset(key, mapping=view_fields(f["payload"]))
            pipes.execute()
            now = time.perf_counter()
            for _eid, f in rows:
                visible[json.loads(f["payload"])["seq"]] = now
            last_id = rows[-1][0]

    threads = [threading.Thread(target=relay), threading.Thread(target=project)]
    for t in threads:
        t.start()
    ready()
    go.wait()
    stop.wait()
    for t in threads:
        t.join(5)
    listen.close()
    return {"visible": visible}


def chain_write(
    database_url: str, rate: float, n: int, writers: int = 1
) -> tuple[dict[int, float], float]:
    """INSERT + NOTIFY at `rate` per second (open loop); commit times by sequence number,
    and the achieved rate."""
    committed: dict[int, float] = {}
    url = libpq_url(database_url)
    tickets = iter(range(n))
    lock = threading.Lock()
    start = time.perf_counter() + 0.05

    def write() -> None:
        with psycopg.connect(url) as conn:
            while True:
                with lock:
                    seq = next(tickets, None)
                if seq is None:
                    return
                delay = start + seq / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                payload = json.dumps({"seq": seq, "name": "Blue Widget", "price": "12.50"})
                with conn.transaction():
                    conn.execute(_LOG, (uuid.uuid4(), "ItemCreated", payload))
                    conn.execute(f"NOTIFY {CHAIN_CHANNEL}")
                committed[seq] = time.perf_counter()

    threads = [threading.Thread(target=write) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    achieved = n / (max(committed.values()) - start) if committed else 0.0
    return committed, achieved


def latencies(committed: dict[int, float], visible: dict[Any, float]) -> list[float]:
    return [visible[k] - t for k, t in committed.items() if k in visible]
