"""The HTTP ceiling: the smallest ASGI app that answers GET /<kind>/<id> with one HGETALL
as JSON, served by the same uvicorn as `cqrs serve`. It has none of the query API's
routing, validation, models or ETags; it measures what HTTP + one round trip costs.

Run by the queries scenario as `python -m uvicorn bench.rawhttp:app`, configured by
BENCH_RAW_REDIS_URL and BENCH_RAW_PREFIX (the view key prefix of the live generation).
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis

from bench.ceilings import raw_client

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = raw_client(os.environ["BENCH_RAW_REDIS_URL"])  # RedisCluster on a cluster
    return _client


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    parts = scope["path"].strip("/").split("/")
    if len(parts) != 2:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    kind, ident = parts
    key = f"{os.environ['BENCH_RAW_PREFIX']}:{kind.rstrip('s')}:{{{ident}}}"
    body = json.dumps(_redis().hgetall(key)).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
