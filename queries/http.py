"""The HTTP query API: the same views as `cqrs query`, as JSON over HTTP.

Read only, Redis only: the app holds one QueryService and one async get-by-id reader (both
built in the lifespan from settings, never at import time) and nothing that could reach
PostgreSQL, so it keeps answering while the write side is down.

Conventions every endpoint keeps:
- bodies are the pydantic views serialised to JSON (field names as in the views); lists
  are `{"items": [...], "next_cursor": ...}`, top products `{"items": [...]}`;
- errors are `{"error": <slug>, "detail": <one line>}`: 400 bad request (bad cursor, sort,
  limit, token, a cursor of another sort; FastAPI's 422 validation errors are turned into
  400 too), 404 not found, 500 `bad_view` (a view our projections could not have
  written), 503 `unavailable` (Redis unreachable) or `busy` (overload, with
  `Retry-After`), 504 read-your-writes gave up;
- `?after=TOKEN[&timeout=s]` waits until the views reflect the write that printed TOKEN;
- `ETag` + `Cache-Control: no-cache` on every read, `If-None-Match` answered with 304.

Every endpoint is `async` on redis.asyncio (`queries.aio.AsyncViews`: the same plans,
round trips and models as `cqrs query`), so none of them waits in a threadpool behind
another: a thread hand-off each way cost more than the Redis round trip itself, and a
pool of 40 threads was a queue that 40 read-your-writes waiters filled, stalling the list
endpoints and the health check for as long as the waiters waited. Now:
- `?after=` waits are `queries.waiters.AppliedWaiters`: no thread and no connection per
  waiter, one shared subscription to the applied channel, at most
  `CQRS_HTTP_MAX_WAITERS` at once (503 busy beyond), the client's timeout a deadline;
- Redis connections come from one bounded blocking pool
  (`CQRS_HTTP_REDIS_MAX_CONNECTIONS`; on a cluster, and with reads from replicas, one
  per node: `queries.aio.make_async_replicas`): a request that finds them all busy waits
  for one (`CQRS_HTTP_REDIS_POOL_TIMEOUT`), then gets 503 busy with `Retry-After`; only
  a Redis that does not answer is 503 unavailable;
- the health check's lag (XINFO, parsed by the kernel's synchronous code) runs on a
  two-thread executor of its own (`queries.aio.BlockingLag`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal
from urllib.parse import parse_qsl

import redis
from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route, request_response
from starlette.types import Receive, Scope, Send

from cqrs.contracts import registered_contracts
from cqrs.queries.aio import (
    AsyncViews,
    BlockingLag,
    client_options,
    make_async_redis,
    make_async_replicas,
)
from cqrs.queries.errors import BadCursor, BadView, Busy, NotCaughtUp, NotFound
from cqrs.queries.models import Page
from cqrs.queries.service import MAX_LIMIT, QueryService
from cqrs.queries.waiters import AppliedWaiters
from cqrs.settings import Settings
from cqrs.tokens import TokenError
from cqrs.urls import mask_url

log = logging.getLogger(__name__)

TITLE = "cqrs-projector query API"
MAX_WAIT_SECONDS = 30.0
# Threads (and sync Redis connections) for the lag reads of health checks and timeouts.
LAG_THREADS = 2


# --- response shapes that are not views ------------------------------------------------


class ErrorBody(BaseModel):
    error: str = Field(description="not_found, bad_request, unavailable, not_caught_up, ...")
    detail: str = Field(description="one line for a person")


class ProjectionHealth(BaseModel):
    lag: int = Field(description="stream entries not yet delivered to the projection")
    pending: int = Field(description="entries delivered but not yet acknowledged")
    rebuilding: bool = Field(
        default=False, description="a replay is building a new generation, or no views exist yet"
    )


class Health(BaseModel):
    status: Literal["ok", "rebuilding", "unavailable"]
    redis: str
    projections: dict[str, ProjectionHealth] = Field(default_factory=dict)
    waiters: int = Field(
        default=0, description="`?after=` waits this process holds now (CQRS_HTTP_MAX_WAITERS)"
    )


# --- bodies, ETags, errors -------------------------------------------------------------


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Weak comparison (RFC 9110 13.1.2): `W/` prefixes are ignored, `*` matches."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    opaque = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == opaque for tag in if_none_match.split(","))


def view_response(request: Request, body: bytes) -> Response:
    """The JSON body with an ETag, or 304 when the client already holds that body.

    The ETag is a hash of the body, not `<generation>-<version>` of the view: a view's
    `version` is its own aggregate's version, yet other aggregates' events change it too
    (an order's `customer_name` on a customer rename, a customer's `order_count` and
    `lifetime_value` on order events), and a version-based tag would answer 304 with
    stale data. Hashing the few hundred bytes we send anyway is exact and cheap.
    """
    etag = f'W/"{hashlib.blake2b(body, digest_size=16).hexdigest()}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


def model_body(model: BaseModel) -> bytes:
    """The model as compact JSON, serialised by pydantic-core straight to bytes: the same
    text as `json.dumps(model.model_dump(mode="json"))` without the intermediate dicts."""
    return type(model).__pydantic_serializer__.to_json(model)


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    body = _json_bytes({"error": error, "detail": " ".join(mask_url(detail).split())})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
        problems.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "invalid " + "; ".join(problems)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotFound)
    async def not_found(_request: Request, exc: NotFound) -> Response:
        return _error(404, "not_found", str(exc))

    @app.exception_handler(BadCursor)
    async def bad_cursor(_request: Request, exc: BadCursor) -> Response:
        return _error(400, "bad_request", str(exc))

    @app.exception_handler(TokenError)
    async def bad_token(_request: Request, exc: TokenError) -> Response:
        return _error(400, "bad_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> Response:
        return _error(400, "bad_request", _validation_detail(exc))

    @app.exception_handler(BadView)
    async def bad_view(_request: Request, exc: BadView) -> Response:
        return _error(500, "bad_view", str(exc))

    @app.exception_handler(NotCaughtUp)
    async def not_caught_up(_request: Request, exc: NotCaughtUp) -> Response:
        return _error(504, "not_caught_up", str(exc))

    @app.exception_handler(Busy)
    async def busy(_request: Request, exc: Busy) -> Response:
        return _error(503, "busy", str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def redis_down(_request: Request, exc: redis.RedisError) -> Response:
        return _error(503, "unavailable", f"redis unreachable: {exc}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        try:
            slug = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        except ValueError:
            slug = "error"
        return _error(exc.status_code, slug, str(exc.detail), dict(exc.headers or {}))


# --- the server's state ----------------------------------------------------------------


@dataclass
class ServerState:
    """What the lifespan builds: the async reader every endpoint uses, the waiters, and
    the lag reader; all on clients named `cqrs-serve.<namespace>` in `CLIENT LIST`."""

    views: AsyncViews
    waiters: AppliedWaiters
    lag: BlockingLag

    async def aclose(self) -> None:
        await self.waiters.aclose()
        await self.views.aclose()
        self.lag.close()


def _is_cluster(wiring: Any) -> bool:
    """Cluster or one node, decided once at start (cqrs.wiring). A server started while
    Redis does not answer serves 503s until it does, like on one node, as a one-node
    client: set CQRS_REDIS_CLUSTER=on to start one before its cluster answers."""
    try:
        return bool(wiring.redis_cluster)
    except redis.ConnectionError as exc:
        log.warning("cannot ask Redis whether it is a cluster (%s); assuming one node", exc)
        return False


def build_state(settings: Settings | None) -> ServerState:
    """The server's readers from settings (Redis only: `engine` is never asked for)."""
    from cqrs.wiring import Wiring

    wiring = Wiring(settings)  # Settings() read here, at startup, not at import
    s = wiring.settings
    name = f"cqrs-serve.{s.namespace}"
    cluster = _is_cluster(wiring)
    client = make_async_redis(
        wiring.redis_url,
        socket_timeout=s.redis_socket_timeout,
        max_connections=s.http_redis_max_connections,
        pool_timeout=s.http_redis_pool_timeout,
        client_name=name,
        cluster=cluster,
    )
    replicas = make_async_replicas(
        client,
        read_from_replicas=s.read_from == "replicas",
        max_lag=s.replica_max_lag,
        max_connections=s.http_redis_max_connections,
        pool_timeout=s.http_redis_pool_timeout,
    )
    views = AsyncViews(client, wiring.keys, partitions=s.partitions, replicas=replicas)
    if cluster:
        sync_client = wiring.redis  # the cluster client: a pool per node
    else:
        sync_pool = redis.BlockingConnectionPool.from_url(
            wiring.redis_url,
            max_connections=LAG_THREADS,
            timeout=s.redis_socket_timeout,
            **client_options(s.redis_socket_timeout, name),
        )
        sync_client = redis.Redis(connection_pool=sync_pool)
    lag = BlockingLag(
        QueryService(sync_client, wiring.keys, partitions=s.partitions),
        threads=LAG_THREADS,
    )
    waiters = AppliedWaiters(views, max_waiters=s.http_max_waiters, recent_lag=lag.recent)
    return ServerState(views=views, waiters=waiters, lag=lag)


def _state(request: Request) -> ServerState:
    return request.app.state.server


AFTER = Query(None, description="A write's consistency token: answer only once the views show it.")
TIMEOUT = Query(
    5.0, ge=0, le=MAX_WAIT_SECONDS, description="Seconds to wait for `after` (504 after)."
)


async def caught_up(request: Request, after: str | None, timeout: float) -> AsyncViews:
    """Read-your-writes: wait (only when `after` is given) until the token's write is
    projected; the views reader either way."""
    state = _state(request)
    if after:
        # The reader that sees the write (with reads from replicas: pinned to where the
        # satisfied check read; cqrs.replicas).
        return await state.waiters.wait_for(after, timeout)
    return state.views


_CACHE_HEADERS = {
    "ETag": {"description": "weak tag of this body", "schema": {"type": "string"}},
    "Cache-Control": {"description": "no-cache: revalidate", "schema": {"type": "string"}},
}
_READ_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"headers": _CACHE_HEADERS},
    304: {"description": "Not Modified: If-None-Match matched the current ETag"},
    400: {"model": ErrorBody, "description": "bad parameter, cursor or token"},
    500: {
        "model": ErrorBody,
        "description": "a view our projections could not have written (edited by hand, "
        "corrupted); `cqrs verify` compares the views with PostgreSQL",
    },
    503: {
        "model": ErrorBody,
        "description": "`unavailable`: Redis unreachable; `busy`: too many waiters or every "
        "Redis connection busy (see `Retry-After`)",
        "headers": {
            "Retry-After": {"description": "seconds, with `busy`", "schema": {"type": "string"}}
        },
    },
    504: {"model": ErrorBody, "description": "the views did not reach `after` in time"},
}
_ONE_RESPONSES = {**_READ_RESPONSES, 404: {"model": ErrorBody, "description": "no such view"}}


# --- health ----------------------------------------------------------------------------


async def health(state: ServerState) -> tuple[int, Health]:
    """Redis reachable and, per projection, how far behind the streams it is."""
    try:
        await state.views.ping()
        rebuilding = await state.views.rebuilding()
        lags = await state.lag.read()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return 503, Health(
            status="unavailable",
            redis=mask_url(f"unreachable: {exc}"),
            waiters=state.waiters.waiting,
        )
    # Still 200 while rebuilding: a manual replay keeps the live generation serving; after
    # Redis lost its data, reads answer 404 until the rebuild switches, and this says why.
    status: Literal["ok", "rebuilding", "unavailable"] = "rebuilding" if rebuilding else "ok"
    return 200, Health(
        status=status,
        redis="ok",
        projections={
            name: ProjectionHealth(**numbers, rebuilding=name in rebuilding)
            for name, numbers in lags.items()
        },
        waiters=state.waiters.waiting,
    )


# --- the app ---------------------------------------------------------------------------


def _package_version() -> str:
    try:
        return version("cqrs-projector")
    except PackageNotFoundError:
        return "0.0.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; its readers are built at startup from `settings` (default: the
    environment) and their Redis clients closed at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.server = build_state(settings)
        try:
            yield
        finally:
            await app.state.server.aclose()

    app = FastAPI(
        title=TITLE,
        version=_package_version(),
        description=(
            "Read-only views of products, customers and orders, served from Redis (never "
            "PostgreSQL). Every read accepts `after` (a write's consistency token) to read "
            "your own writes, and answers `If-None-Match` with 304."
        ),
        lifespan=lifespan,
    )
    _install_error_handlers(app)
    _install_routes(app)
    _install_plain_gets(app)
    _install_openapi(app)
    return app


def _install_routes(app: FastAPI) -> None:
    # The read models come from the registered contracts (the query side never imports the
    # projector); they are resolved here, when the app is built, not at import.
    contracts = registered_contracts()
    ProductView = contracts["products"].model
    CustomerView = contracts["customers"].model
    OrderView = contracts["orders"].model
    ProductList = create_model("ProductList", items=(list[ProductView], ...))  # type: ignore[valid-type]

    # `after` and `timeout` are each endpoint's own parameters, not a dependency: every
    # dependency FastAPI resolves costs a second pass of its parameter machinery.
    @app.get(
        "/products/{product_id}",
        response_model=ProductView,
        responses=_ONE_RESPONSES,
        tags=["products"],
    )
    async def get_product(
        product_id: str, request: Request, after: str | None = AFTER, timeout: float = TIMEOUT
    ) -> Any:
        """One product: name, price, stock, units sold, revenue."""
        views = await caught_up(request, after, timeout)
        return view_response(request, model_body(await views.get_product(product_id)))

    @app.get(
        "/products",
        response_model=Page[ProductView],
        responses=_READ_RESPONSES,
        tags=["products"],
    )
    async def list_products(
        request: Request,
        sort: Literal["name", "price"] = Query("name", description="name or price"),
        limit: int = Query(20, ge=1, le=MAX_LIMIT),
        cursor: str | None = Query(
            None, description="`next_cursor` of the previous page (of the same sort)"
        ),
        after: str | None = AFTER,
        timeout: float = TIMEOUT,
    ) -> Any:
        """The catalog a page at a time; a cursor continues after the last item shown,
        so products added meanwhile never repeat or push others out of the next page.
        A cursor belongs to its sort: another sort's cursor is a 400."""
        views = await caught_up(request, after, timeout)
        page = await views.list_products(sort=sort, limit=limit, cursor=cursor)
        return view_response(request, model_body(page))

    @app.get(
        "/customers/{customer_id}",
        response_model=CustomerView,
        responses=_ONE_RESPONSES,
        tags=["customers"],
    )
    async def get_customer(
        customer_id: str, request: Request, after: str | None = AFTER, timeout: float = TIMEOUT
    ) -> Any:
        """One customer with order count and lifetime value."""
        views = await caught_up(request, after, timeout)
        return view_response(request, model_body(await views.get_customer(customer_id)))

    @app.get(
        "/customers/{customer_id}/orders",
        response_model=Page[OrderView],
        responses=_ONE_RESPONSES,
        tags=["customers", "orders"],
    )
    async def customer_orders(
        customer_id: str,
        request: Request,
        limit: int = Query(20, ge=1, le=MAX_LIMIT),
        cursor: str | None = Query(None, description="`next_cursor` of the previous page"),
        after: str | None = AFTER,
        timeout: float = TIMEOUT,
    ) -> Any:
        """A customer's orders, newest first, a page at a time."""
        views = await caught_up(request, after, timeout)
        page = await views.customer_orders(customer_id, limit=limit, cursor=cursor)
        return view_response(request, model_body(page))

    @app.get(
        "/orders/{order_id}",
        response_model=OrderView,
        responses=_ONE_RESPONSES,
        tags=["orders"],
    )
    async def get_order(
        order_id: str, request: Request, after: str | None = AFTER, timeout: float = TIMEOUT
    ) -> Any:
        """One order, denormalized: customer name, lines as placed, status, total."""
        views = await caught_up(request, after, timeout)
        return view_response(request, model_body(await views.get_order(order_id)))

    @app.get(
        "/stats/top-products",
        response_model=ProductList,
        responses=_READ_RESPONSES,
        tags=["products"],
    )
    async def top_products(
        request: Request,
        limit: int = Query(10, ge=1, le=MAX_LIMIT),
        after: str | None = AFTER,
        timeout: float = TIMEOUT,
    ) -> Any:
        """Best sellers by units sold (cancelled orders do not count)."""
        views = await caught_up(request, after, timeout)
        products = await views.top_products(limit=limit)
        return view_response(request, model_body(ProductList(items=products)))

    @app.get(
        "/views/{name}/{key}",
        responses=_ONE_RESPONSES,
        tags=["views"],
    )
    async def get_any_view(
        name: str,
        key: str,
        request: Request,
        after: str | None = AFTER,
        timeout: float = TIMEOUT,
    ) -> Any:
        """One view of any registered projection (plugins included), by its contract: NAME
        is the projection (`GET /healthz` lists them), KEY what its contract reads as a
        view id (a UUID for the built-ins, a date for sales-by-day)."""
        views = await caught_up(request, after, timeout)
        return view_response(request, model_body(await views.get_view(name, key)))

    @app.get(
        "/healthz",
        response_model=Health,
        responses={503: {"model": Health, "description": "Redis unreachable"}},
        tags=["health"],
    )
    async def healthz(request: Request) -> Any:
        """200 when Redis answers, with each projection's lag; 503 when it does not."""
        status, report = await health(_state(request))
        return JSONResponse(
            jsonable_encoder(report), status_code=status, headers={"Cache-Control": "no-store"}
        )


# --- get-by-id without FastAPI's parameter machinery -----------------------------------

ViewRead = Callable[[AsyncViews, dict[str, str]], Awaitable[BaseModel]]

# The get-by-id routes and how each reads its view from the path parameters.
_PLAIN_GETS: dict[str, ViewRead] = {
    "/products/{product_id}": lambda views, p: views.get_product(p["product_id"]),
    "/customers/{customer_id}": lambda views, p: views.get_customer(p["customer_id"]),
    "/orders/{order_id}": lambda views, p: views.get_order(p["order_id"]),
    "/views/{name}/{key}": lambda views, p: views.get_view(p["name"], p["key"]),
}


# A `timeout` the fast path takes as it is: digits, an optional fraction (FastAPI's
# float parsing decides everything else, errors included).
_PLAIN_WAIT = "cqrs.plain_wait"  # the scope key for `after` and `timeout`, once parsed
_PLAIN_TIMEOUT = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")


def plain_query(query_string: bytes) -> tuple[str | None, float] | None:
    """`after` and `timeout` from a query string that holds nothing else, each at most
    once, `timeout` plain digits within its bounds; None for anything else (FastAPI's
    route then parses and validates it). Decoded as Starlette decodes it."""
    after: str | None = None
    timeout = TIMEOUT.default
    seen: set[str] = set()
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name in seen:
            return None
        seen.add(name)
        if name == "after":
            after = value
        elif name == "timeout" and _PLAIN_TIMEOUT.fullmatch(value):
            timeout = float(value)
            if timeout > MAX_WAIT_SECONDS:
                return None
        else:
            return None
    return after, timeout


class PlainGet:
    """A get-by-id route's ASGI app: a GET whose query string is empty or holds only a
    plain `after` and `timeout` is answered here; anything else (other parameters, a
    `timeout` FastAPI would have to judge, HEAD) goes to the FastAPI route it stands in
    front of, so parameter checks, errors and the OpenAPI document stay FastAPI's.

    Why: FastAPI resolves the parameters of every request (path, `after`, `timeout`,
    `Request`) through pydantic and its dependency solver: most of what a get-by-id cost
    beyond the bare ASGI app (its p50 went from 1.39x to 1.15x the bare app's;
    docs/benchmarks.md, "Round 2"). Errors raised here go through the app's exception
    handlers as the route's would."""

    def __init__(self, route: APIRoute, read: ViewRead) -> None:
        self.full = route.app
        self.read = read
        self.fast = request_response(self.answer)

    async def answer(self, request: Request) -> Response:
        wait = request.scope.get(_PLAIN_WAIT)
        views = await caught_up(request, *wait) if wait else _state(request).views
        model = await self.read(views, request.path_params)
        return view_response(request, model_body(model))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "GET":
            query = scope.get("query_string")
            wait = plain_query(query) if query else None
            if not query or wait is not None:
                scope[_PLAIN_WAIT] = wait
                await self.fast(scope, receive, send)
                return
        await self.full(scope, receive, send)


def _install_plain_gets(app: FastAPI) -> None:
    """Put a `PlainGet` in front of each get-by-id route (first in the routing table,
    left out of the OpenAPI document, which keeps describing the FastAPI route)."""
    routes = {r.path: r for r in app.router.routes if isinstance(r, APIRoute)}
    for path, read in reversed(_PLAIN_GETS.items()):
        plain = Route(path, PlainGet(routes[path], read), methods=["GET"], include_in_schema=False)
        app.router.routes.insert(0, plain)


def _install_openapi(app: FastAPI) -> None:
    """FastAPI documents 422 for every parameterised route; we answer 400 instead."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts: a busy port is then an OSError
    for the caller to report in one line (uvicorn itself logs it and exits 3)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on accepted sockets whose
    # proto says TCP, and with proto 0 every response waited ~40 ms for a delayed ACK
    # (Nagle), 22 requests a second on one connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    own_logging: bool = True,
    sock: socket.socket | None = None,
) -> None:
    """Run the API with uvicorn; SIGTERM/SIGINT stop it cleanly. `own_logging=False`
    leaves logging to the caller (`cqrs serve` uses cqrs.logs: text or JSON lines,
    passwords masked); True keeps uvicorn's default logging. `sock` is a socket from
    `bind_listener` (else one is bound here, and a busy port raises OSError)."""
    import uvicorn

    listener = sock or bind_listener(host, port)
    options: dict[str, Any] = {} if own_logging else {"log_config": None}
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        access_log=settings.http_access_log,  # off by default: ~65 us a request
        **options,
    )
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        listener.close()
