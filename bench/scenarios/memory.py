"""Memory: Redis bytes per view and per stream entry (MEMORY USAGE), hash encodings, and
the worker's RSS.

Views come from a synthetic history projected by the real worker. Each view is compared
with a raw HSET of exactly the same fields into a fresh hash (so the ratio shows what the
way the view was written costs, e.g. a hash converted to `hashtable` by a value that was
once long); OBJECT ENCODING says whether it is the compact `listpack`. Order views keep
each line attribute in a field of its own (`line:<n>:<attribute>`, projector.orders); they
are also compared with the same data in the layout they replaced (all lines as one JSON
field `lines`), which Redis converts to a `hashtable`. Stream entries are compared with
the same fields in a hash. Worker RSS is the resident size of a `cqrs project` process
after projecting the history (from the projection scenario when it ran; else measured
here).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any

import psutil

from bench import ceilings
from bench.history import History, xadd_history
from bench.scenarios import Context
from bench.scenarios.projection import prepare_live
from bench.stats import Figure, Row
from cqrs.keys import KeyMap
from cqrs.projector.orders import LINE_ATTRIBUTES, line_field
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.worker import Worker
from cqrs.tuning import tune_gc
from cqrs.wiring import make_redis

SAMPLE = 2000


def lines_as_json(fields: dict[str, str]) -> dict[str, Any]:
    """An order view in its former layout: every line in one JSON field (~100 bytes per
    line, above `hash-max-listpack-value`, so the hash is a `hashtable`)."""
    flat: dict[str, Any] = {k: v for k, v in fields.items() if not k.startswith("line")}
    lines = [
        {a: fields[line_field(n, a)] for a in LINE_ATTRIBUTES}
        for n in range(1, int(fields.get("line_count") or 0) + 1)
    ]
    for line in lines:
        line["qty"] = int(line["qty"])
    flat["lines"] = json.dumps(lines, separators=(",", ":"), ensure_ascii=False)
    return flat


def measure_keys(
    client: Any, keys: list[str], scratch: str, reshape: Any = None
) -> tuple[list[float], list[float], Counter[str], Counter[str]]:
    """Per key: MEMORY USAGE of the view and of a raw HSET of the same (or reshaped)
    fields; encodings of both."""
    view_bytes, raw_bytes = [], []
    encodings, raw_encodings = Counter(), Counter()
    for key in keys:
        fields = client.hgetall(key)
        if not fields:
            continue
        pipe = client.pipeline(transaction=False)
        pipe.memory_usage(key, samples=0)
        pipe.object("encoding", key)
        size, encoding = pipe.execute()
        view_bytes.append(float(size))
        encodings[str(encoding)] += 1
        raw_size, raw_encoding = ceilings.raw_hset_bytes(
            client, scratch, reshape(fields) if reshape else fields
        )
        raw_bytes.append(float(raw_size))
        raw_encodings[raw_encoding] += 1
    return view_bytes, raw_bytes, encodings, raw_encodings


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def run(ctx: Context) -> list[Row]:
    n_events = ctx.size(3_000, 50_000)
    results: dict[str, list[float]] = {}
    notes: dict[str, dict[str, Any]] = {}
    with ctx.backend.scope("memory") as settings:
        client = make_redis(settings.redis_url or "", settings)
        keys = KeyMap(settings.namespace)
        history = History(partitions=settings.partitions)
        xadd_history(client, keys, history.events(n_events), partitions=settings.partitions)
        prepare_live(client, keys, ["bench-memory"], settings.partitions)
        rss_before = psutil.Process().memory_info().rss
        tune_gc(settings.projector_gc_threshold)  # as `cqrs project` does
        Worker(client, settings, list(PROJECTIONS.values()), consumer="bench-memory").run(
            threading.Event(), drain=True
        )
        rss_in_process = psutil.Process().memory_info().rss
        views = {name: keys.views(name, 1) for name in PROJECTIONS}
        scratch = f"{settings.namespace}:ceiling-memory:scratch"
        product_keys = [views["products"].product(p.id) for p in history.products[:SAMPLE]]
        order_keys = [views["orders"].order(o) for o in history.orders[:SAMPLE]]
        stream = keys.stream(0)
        entries = client.xrange(stream, count=SAMPLE)
        for rep in range(ctx.repeat):
            v, r, enc, raw_enc = measure_keys(client, product_keys, scratch)
            results.setdefault("product", []).append(mean(v))
            results.setdefault("product-raw", []).append(mean(r))
            notes["product"] = {"view_encodings": dict(enc), "raw_encodings": dict(raw_enc)}
            v, r, enc, raw_enc = measure_keys(client, order_keys, scratch)
            results.setdefault("order", []).append(mean(v))
            results.setdefault("order-raw", []).append(mean(r))
            notes["order"] = {"view_encodings": dict(enc), "raw_encodings": dict(raw_enc)}
            _v, r, _enc, json_enc = measure_keys(client, order_keys, scratch, lines_as_json)
            results.setdefault("order-json", []).append(mean(r))
            notes["order-json"] = {"view_encodings": dict(enc), "json_encodings": dict(json_enc)}
            # A stream entry: the stream's bytes per entry, against its fields as a hash.
            length = client.xlen(stream)
            per_entry = float(client.memory_usage(stream, samples=0) or 0) / max(length, 1)
            raw = [
                float(ceilings.raw_hset_bytes(client, scratch, fields)[0])
                for _eid, fields in entries[:500]
            ]
            results.setdefault("entry", []).append(per_entry)
            results.setdefault("entry-raw", []).append(mean(raw))
            ctx.say(
                f"  memory rep {rep + 1}: product {results['product'][-1]:.0f} B "
                f"({dict(notes['product']['view_encodings'])}), order {results['order'][-1]:.0f} B "
                f"({dict(notes['order']['view_encodings'])}), the same order with its lines as one "
                f"JSON field {results['order-json'][-1]:.0f} B "
                f"({dict(notes['order-json']['json_encodings'])}), stream entry {per_entry:.0f} B"
            )
        client.close()
    worker_rss = ctx.figures.get("projection.worker_rss")
    raw_rss = ctx.figures.get("projection.raw_rss")
    if worker_rss is not None and raw_rss is not None:
        rss_rows = (
            Figure.of([v / 2**20 for v in worker_rss.values]),
            Figure.of([v / 2**20 for v in raw_rss.values]),
            "hand-written loop process (projection scenario)",
            "cqrs project worker process after the projection scenario's history",
        )
    else:
        rss_rows = (
            Figure.of([rss_in_process / 2**20]),
            Figure.of([rss_before / 2**20]),
            "this process before projecting",
            "worker run in this process (run the projection scenario for a worker process)",
        )
    size = {"events": n_events, "sampled_views": SAMPLE}
    return [
        Row(
            "memory",
            "product view",
            "bytes",
            Figure.of(results["product"]),
            Figure.of(results["product-raw"]),
            "raw HSET of the same fields",
            better="lower",
            target=1.2,
            extra={**size, **notes["product"]},
        ),
        Row(
            "memory",
            "order view",
            "bytes",
            Figure.of(results["order"]),
            Figure.of(results["order-raw"]),
            "raw HSET of the same fields",
            better="lower",
            target=1.2,
            extra={**size, **notes["order"]},
        ),
        Row(
            "memory",
            "order view vs lines as one JSON field",
            "bytes",
            Figure.of(results["order"]),
            Figure.of(results["order-json"]),
            "raw HSET, all lines in one JSON field (the former layout)",
            better="lower",
            extra={**size, **notes["order-json"]},
        ),
        Row(
            "memory",
            "stream entry",
            "bytes",
            Figure.of(results["entry"]),
            Figure.of(results["entry-raw"]),
            "the entry's fields as a raw HSET",
            better="lower",
            extra=size,
        ),
        Row(
            "memory",
            "worker RSS",
            "MiB",
            rss_rows[0],
            rss_rows[1],
            rss_rows[2],
            better="lower",
            notes=[rss_rows[3]],
            extra=size,
        ),
    ]
