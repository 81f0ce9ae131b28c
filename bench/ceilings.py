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

from bench.history import SynthEvent
from cqrs.keys import KeyMap
from cqrs.urls import libpq_url

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


# --- Redis: pipelined XADD of the relay's own entries ------------------------------------


def raw_xadd(
    client: redis.Redis, keys: KeyMap, events: list[SynthEvent], *, batch: int = 500
) -> float:
    """Events per second XADDing pre-built entries (the relay's batch size per pipeline)."""
    entries = [(keys.stream(e.partition), e.stream_fields(i + 1)) for i, e in enumerate(events)]
    started = time.perf_counter()
    for start in range(0, len(entries), batch):
        pipe = client.pipeline(transaction=False)
        for stream, fields in entries[start : start + batch]:
            pipe.xadd(stream, fields)
        pipe.execute()
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
    """XREADGROUP COUNT 500 over every (group, owned stream) in one pipeline, then one
    pipeline of HSETs (or one Lua call per batch) and XACKs; until `stop`."""
    import psutil

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = KeyMap(namespace)
    streams = [keys.stream(p) for p in partitions]
    types = {group: set(kinds) for group, kinds in handled.items()}
    script = client.register_script(RAW_BATCH_LUA)
    client.script_load(RAW_BATCH_LUA)
    ready()
    go.wait()
    events = 0
    while not stop.is_set():
        pipe = client.pipeline(transaction=False)
        slots = []
        for projection in types:
            for stream in streams:
                pipe.xreadgroup(raw_group(projection), consumer, {stream: ">"}, count=500)
                slots.append((projection, stream))
        read = pipe.execute()
        pipe = client.pipeline(transaction=False)
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
                        pipe.hset(key, mapping=mapping)
            else:
                batch_keys: list[str] = []
                argv: list[Any] = []
                for _eid, f in rows:
                    if f["type"] not in wanted:
                        continue
                    mapping = view_fields(f["payload"])
                    batch_keys.append(raw_view_key(namespace, projection, f["aggregate_id"]))
                    argv += [f["version"], len(mapping)]
                    for name, value in mapping.items():
                        argv += [name, value]
                if batch_keys:
                    script(keys=batch_keys, args=argv, client=pipe)
            pipe.xack(stream, raw_group(projection), *[eid for eid, _ in rows])
        if got:
            pipe.execute()
            events += got
        else:
            time.sleep(0.001)
    client.close()
    return {"consumer": consumer, "rss": psutil.Process().memory_info().rss, "deliveries": events}


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
    client = redis.Redis.from_url(redis_url, decode_responses=True)
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
                pipe = client.pipeline(transaction=False)
                for position, aggregate_id, payload in rows:
                    pipe.xadd(
                        stream,
                        {
                            "position": position,
                            "aggregate_id": str(aggregate_id),
                            "payload": json.dumps(payload),
                        },
                    )
                pipe.execute()
                last = rows[-1][0]

    def project() -> None:
        reader = redis.Redis.from_url(redis_url, decode_responses=True)
        last_id = "0-0"
        while not stop.is_set():
            got = reader.xread({stream: last_id}, count=500, block=50)
            if not got:
                continue
            rows = got[0][1]
            pipe = reader.pipeline(transaction=False)
            for _eid, f in rows:
                mapping = view_fields(f["payload"])
                pipe.hset(f"{prefix}:{{{f['aggregate_id']}}}", mapping=mapping)
            pipe.execute()
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
