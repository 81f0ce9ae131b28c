"""Query handlers over the Redis views.

Rules this module keeps:
- it never opens a PostgreSQL connection (it is handed only a Redis client);
- a single view is one round trip: the projection's live generation and the view are
  read in one write of two commands, and the read is repeated only if a rebuild switched
  the generation in between;
- a list is two round trips whatever its length: the index page (with the generation),
  then every view of the page in one write. Never one per item;
- a view our projections could not have written (edited by hand, truncated, another
  type) is reported as `BadView`, naming the key and what is wrong, never half-read.

Every read is written once, as a *plan* (`ViewPlans`): a generator that yields the
commands of one round trip, receives their replies, and returns the result. The
synchronous `QueryService` (CLI, other services) and the asyncio twin
`queries.aio.AsyncViews` (the HTTP server) only drive plans over their own I/O, so what a
read means (generation checks, cursors, validation, read-your-writes) cannot drift
between them.
"""

from __future__ import annotations

import base64
import binascii
import copy
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar
from uuid import UUID

import redis
from pydantic import BaseModel, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from cqrs.contracts import ViewContract, registered_contracts
from cqrs.keys import KeyMap, ViewKeys
from cqrs.queries.errors import BadCursor, BadView, NotCaughtUp, NotFound
from cqrs.queries.models import Page
from cqrs.redisio import (
    Subscription,
    cluster_round_trip,
    hash_fields,
    is_cluster_client,
    pack,
    read_replies,
)
from cqrs.replicas import Node, Route, SyncReplicas, read_round_trip
from cqrs.settings import Settings
from cqrs.streams import group_lag
from cqrs.tokens import decode_token

T = TypeVar("T")
Commands = list[tuple[Any, ...]]
# A read as a generator: yields one round trip's commands, is sent their replies.
Plan = Generator[Commands, list[Any], T]

PRODUCT_SORTS = ("name", "price")
MAX_LIMIT = 500
_SEP = "\x00"
# Between a cursor's kind (the sort or list it was handed out for) and its index member.
_KIND_SEP = "\x1f"
_ORDERS_CURSOR = "orders"
# A list read across this many generation switches in a row is answered as read.
_SWITCH_RETRIES = 3


def encode_cursor(member: str, kind: str | None = None) -> str:
    """An opaque cursor for the index member a page ended at. `kind` (the sort order or
    list it belongs to) travels inside it, so a cursor reused with another sort is
    refused instead of silently starting at a member of another index."""
    text = member if kind is None else f"{kind}{_KIND_SEP}{member}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, separator: str, kind: str | None = None) -> str:
    """The index member a page ended at; anything we did not hand out is rejected, and a
    cursor of another kind says so (another sort of the same list is a usage mistake
    worth naming; anything else is just not ours)."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        member = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor("invalid cursor") from None
    if kind is not None:
        found, marker, member = member.partition(_KIND_SEP)
        if not marker:
            raise BadCursor("invalid cursor")
        if found != kind:
            if found in PRODUCT_SORTS and kind in PRODUCT_SORTS:
                raise BadCursor("cursor belongs to another sort")
            raise BadCursor("invalid cursor")
    if separator not in member or len(member) > 1000:
        raise BadCursor("invalid cursor")
    return member


def view_id(value: UUID | str, what: str) -> UUID:
    try:
        return value if isinstance(value, UUID) else UUID(str(value))
    except ValueError:
        raise NotFound(f"{what} {value} not found") from None


M = TypeVar("M", bound=BaseModel)


def view_model(model: type[M], data: dict[str, Any], key: str) -> M:
    """The result model of one view. Validation stays on: pydantic-core checks a view
    faster than building the model by hand from converted values (`model_construct` with
    UUID/Decimal/int conversions; figures in docs/benchmarks.md), and it is what turns a
    hand-edited or corrupted view into an error naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadView(_invalid(key, exc)) from None


def _invalid(key: str, exc: ValidationError) -> str:
    problems = [
        f"{'.'.join(str(p) for p in err.get('loc', ())) or 'view'}: {err.get('msg', 'invalid')}"
        for err in exc.errors()[:3]
    ]
    more = f" (and {exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return f"view {key} is not valid: {'; '.join(problems)}{more}; `cqrs verify` compares it"


def read_view(contract: ViewContract, data: dict[str, str], key: str) -> BaseModel:
    """A view's read model by its contract; anything the contract's reader refuses (a
    corrupted count, a field of the wrong type) is BadView naming the key."""
    try:
        return contract.read_view(data, key)
    except ValidationError as exc:
        raise BadView(_invalid(key, exc)) from None
    except ValueError as exc:
        raise BadView(f"view {key} is not valid: {exc}") from None


class ViewPlans:
    """Every read of the views, as plans (see the module docstring), and the one piece of
    state they share: the live generation each projection had at this reader's last read
    (a reader assumes it unchanged, and reads again when the reply says otherwise)."""

    def __init__(
        self,
        keys: KeyMap,
        *,
        partitions: int = 8,
        contracts: dict[str, ViewContract] | None = None,
    ) -> None:
        self.keys = keys
        self.partitions = partitions
        # Every registered projection's contract (entry points, `cqrs.contracts`): what
        # `--after` waits for, what health reports, what the generic view read serves.
        self.contracts = registered_contracts() if contracts is None else contracts
        self.projections = tuple(self.contracts)
        self._generations: dict[str, int] = {}

    def _model(self, data: dict[str, str], key: str, projection: str) -> Any:
        return read_view(self.contracts[projection], data, key)

    # --- reading with the live generation ----------------------------------------------

    def _read(self, projection: str, build: Callable[[ViewKeys], Commands]) -> Plan[list[Any]]:
        """The replies of `build`'s commands against the live generation's views."""
        generation_key = self.keys.generation(projection)
        for _ in range(3):
            assumed = self._generations.get(projection, 1)
            first, *rest = yield [
                ("GET", generation_key),
                *build(self.keys.views(projection, assumed)),
            ]
            live = int(first or 0)
            if live == assumed:
                return rest
            self._generations[projection] = live  # a rebuild switched: read again
        return rest

    def _hashes(
        self, projection: str, keys: list[str], last_try: bool
    ) -> Plan[list[dict[str, str]] | None]:
        """The views of one page, in one trip with the generation number; None when a
        rebuild switched generations since the index was read (read the page again)."""
        live, *hashes = yield [
            ("GET", self.keys.generation(projection)),
            *[("HGETALL", k) for k in keys],
        ]
        if int(live or 0) != self._generations.get(projection, 1):
            self._generations[projection] = int(live or 0)
            if not last_try:
                return None
        return [hash_fields(h) for h in hashes]

    def _view(
        self, projection: str, key_of: Callable[[ViewKeys], str]
    ) -> Plan[tuple[str, dict[str, str]]]:
        """One view hash by id: its key in the live generation and its fields, read with
        the generation number in one trip (`_read`, without its list plumbing)."""
        generation_key = self.keys.generation(projection)
        for _ in range(3):
            assumed = self._generations.get(projection, 1)
            key = key_of(self.keys.views(projection, assumed))
            live, data = yield [("GET", generation_key), ("HGETALL", key)]
            if int(live or 0) == assumed:
                break
            self._generations[projection] = int(live or 0)  # a rebuild switched: read again
        return key, hash_fields(data)

    # --- products ----------------------------------------------------------------------

    def _product(self, product_id: UUID | str) -> Plan[Any]:
        pid = view_id(product_id, "product")
        key, data = yield from self._view("products", lambda v: v.product(pid))
        if not data.get("version"):
            raise NotFound(f"product {pid} not found")
        return self._model(data, key, "products")

    def _product_list(self, sort: str, limit: int, cursor: str | None) -> Plan[Page[Any]]:
        if sort not in PRODUCT_SORTS:
            raise BadCursor(f"unknown sort {sort!r} (name or price)")
        limit = max(1, min(limit, MAX_LIMIT))
        start = f"({decode_cursor(cursor, _SEP, sort)}" if cursor else "-"

        def page(v: ViewKeys) -> Commands:
            index = v.products_by_name() if sort == "name" else v.products_by_price()
            return [("ZRANGEBYLEX", index, start, "+", "LIMIT", 0, limit + 1)]

        for attempt in range(_SWITCH_RETRIES + 1):
            [members] = yield from self._read("products", page)
            shown = members[:limit]
            views = yield from self._product_views(
                [m.rsplit(_SEP, 1)[-1] for m in shown], attempt == _SWITCH_RETRIES
            )
            if views is not None:
                more = len(members) > limit
                return Page[self.contracts["products"].model](  # type: ignore[valid-type]
                    items=views, next_cursor=encode_cursor(shown[-1], sort) if more else None
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def _product_views(self, ids: list[str], last_try: bool) -> Plan[list[Any] | None]:
        views = self.keys.views("products", self._generations.get("products", 1))
        keys = [views.product(i) for i in ids]
        hashes = yield from self._hashes("products", keys, last_try)
        if hashes is None:
            return None
        return [
            self._model(data, key, "products")
            for key, data in zip(keys, hashes, strict=True)
            if data.get("version")
        ]

    def _top_products(self, limit: int) -> Plan[list[Any]]:
        limit = max(1, min(limit, MAX_LIMIT))
        for attempt in range(_SWITCH_RETRIES + 1):
            [ids] = yield from self._read(
                "products", lambda v: [("ZREVRANGE", v.top_products(), 0, limit - 1)]
            )
            views = yield from self._product_views(ids, attempt == _SWITCH_RETRIES)
            if views is not None:
                return views
        raise AssertionError("unreachable")  # pragma: no cover

    # --- customers and orders ----------------------------------------------------------

    def _customer(self, customer_id: UUID | str) -> Plan[Any]:
        cid = view_id(customer_id, "customer")
        key, data = yield from self._view("customers", lambda v: v.customer(cid))
        if not data.get("version"):
            raise NotFound(f"customer {cid} not found")
        return self._model(data, key, "customers")

    def _order(self, order_id: UUID | str) -> Plan[Any]:
        oid = view_id(order_id, "order")
        key, data = yield from self._view("orders", lambda v: v.order(oid))
        if not data.get("version"):
            raise NotFound(f"order {oid} not found")
        return self._model(data, key, "orders")

    def _customer_orders(
        self, customer_id: UUID | str, limit: int, cursor: str | None
    ) -> Plan[Page[Any]]:
        """Newest first. Unknown customer: NotFound (its view is checked in the same trip)."""
        cid = view_id(customer_id, "customer")
        limit = max(1, min(limit, MAX_LIMIT))
        start = f"({decode_cursor(cursor, ':', _ORDERS_CURSOR)}" if cursor else "+"

        def page(v: ViewKeys) -> Commands:
            return [
                ("EXISTS", v.order_customer(cid)),
                ("ZREVRANGEBYLEX", v.customer_orders(cid), start, "-", "LIMIT", 0, limit + 1),
            ]

        for attempt in range(_SWITCH_RETRIES + 1):
            known, members = yield from self._read("orders", page)
            if not known and not members:
                raise NotFound(f"customer {cid} not found")
            views = self.keys.views("orders", self._generations.get("orders", 1))
            shown = members[:limit]
            keys = [views.order(m.rsplit(":", 1)[-1]) for m in shown]
            hashes = yield from self._hashes("orders", keys, attempt == _SWITCH_RETRIES)
            if hashes is None:
                continue
            items = [
                self._model(data, key, "orders")
                for key, data in zip(keys, hashes, strict=True)
                if data.get("version")
            ]
            more = len(members) > limit
            cursor_out = encode_cursor(shown[-1], _ORDERS_CURSOR) if more else None
            page = Page[self.contracts["orders"].model]  # type: ignore[valid-type]
            return page(items=items, next_cursor=cursor_out)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- read-your-writes and health ---------------------------------------------------

    def _behind(self, token: str) -> Plan[list[str]]:
        """What the projections have not applied yet of the write behind `token`: every
        applied mark the token names (each contract's `applied` rule), in the live
        generation, below the token's version."""
        versions = decode_token(token)
        names = self.projections
        replies = yield [("GET", self.keys.generation(p)) for p in names]
        generations = {p: int(g or 1) for p, g in zip(names, replies, strict=True)}
        marks: list[tuple[str, str, str, int]] = []
        for projection in names:
            rule = self.contracts[projection].applied
            assert rule is not None  # a contract without one is refused when built
            views = self.keys.views(projection, generations[projection])
            for v in versions:
                mark = rule(views, v.aggregate_type, v.aggregate_id, v.partition_key)
                if mark:
                    marks.append((projection, mark[0], mark[1], v.version))
        if not marks:
            return []
        applied = yield [("HGET", key, field) for _, key, field, _ in marks]
        missing = []
        for (projection, key, _field, wanted), got in zip(marks, applied, strict=True):
            if int(got or 0) < wanted:
                missing.append(f"{projection} at version {int(got or 0)} of {wanted} ({key})")
        return missing

    def _rebuilding(self) -> Plan[set[str]]:
        """Projections being rebuilt (a replay holds their lock) or with no views at all
        (not built yet, or Redis lost its data and the workers are rebuilding them)."""
        commands: Commands = []
        for projection in self.projections:
            commands += [
                ("EXISTS", self.keys.replay_lock(projection)),
                ("EXISTS", self.keys.generation(projection)),
            ]
        results = yield commands
        return {
            p for i, p in enumerate(self.projections) if results[2 * i] or not results[2 * i + 1]
        }

    # --- any registered view, by its contract ------------------------------------------

    def contract(self, name: str) -> ViewContract:
        """The contract of a registered projection; NotFound naming the known ones."""
        try:
            return self.contracts[name]
        except KeyError:
            known = ", ".join(self.projections)
            raise NotFound(f"no view named {name!r} (registered: {known})") from None

    def _any_view(self, name: str, key: str) -> Plan[BaseModel]:
        """One view of any registered projection by the id its contract reads KEY as
        (`cqrs query view NAME KEY`, `GET /views/{name}/{key}`)."""
        contract = self.contract(name)
        assert contract.view_key is not None  # a contract without one is refused when built
        try:
            contract.view_key(self.keys.views(name, 1), key)
        except ValueError:
            raise NotFound(f"{name} {key} not found") from None
        hash_key, data = yield from self._view(name, lambda v: contract.view_key(v, key))
        if not contract.present(data):
            raise NotFound(f"{name} {key} not found")
        return read_view(contract, data, hash_key)


def not_caught_up(token_timeout: float, missing: list[str] | None, summary: str) -> NotCaughtUp:
    """The one message for a read-your-writes wait that gave up (CLI and HTTP alike)."""
    what = missing[0] if missing else "the views could not be checked in time"
    return NotCaughtUp(
        f"views did not reflect the write within {token_timeout:g}s: {what}; {summary}"
    )


def lag_summary(lags: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{p} lag {v['lag']} pending {v['pending']}" for p, v in lags.items())


class QueryService(ViewPlans):
    """The reads on a synchronous redis-py client (thread-safe: its pool is, and the only
    other state is the generation cache, whose races only cost a re-read)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: KeyMap,
        *,
        partitions: int = 8,
        contracts: dict[str, ViewContract] | None = None,
        replicas: SyncReplicas | None = None,
    ) -> None:
        super().__init__(keys, partitions=partitions, contracts=contracts)
        self.redis = client
        # `CQRS_READ_FROM=replicas`: the topology reads are routed by (cqrs.replicas).
        self.replicas = replicas
        # A reader `wait_for` returned: the keys its check read on replicas, and where.
        self._pins: dict[Any, Node] | None = None

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> QueryService:
        """For other services: a Redis client from settings, nothing else."""
        from cqrs.wiring import Wiring

        wiring = Wiring(settings)
        return cls(
            wiring.redis,
            wiring.keys,
            partitions=wiring.settings.partitions,
            replicas=wiring.replicas,
        )

    def _round_trip(
        self, commands: Sequence[tuple[Any, ...]], route: Route | None = None
    ) -> list[Any]:
        """One round trip of a plan: on the primary (`_primary_trip`), or, with reads
        from replicas, on the nodes `route` gives each key (`cqrs.replicas`); an error
        reply (a key of another type where a view belongs) is BadView either way."""
        if route is None:
            replies = self._primary_trip(commands)
        else:
            replies = read_round_trip(route, list(commands), self._primary_trip)
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, ResponseError):
                raise BadView(f"view {command[1]} cannot be read: {reply}")
        return replies

    def _primary_trip(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send `commands` in one write on one pooled connection and read their replies.

        A redis-py `Pipeline` for the two commands of a get-by-id (command stack, response
        callbacks, its own connection handling) costs as much Python again as the HGETALL
        round trip it wraps (docs/benchmarks.md). Packed with hiredis and read straight from
        the connection's hiredis reader (`cqrs.redisio`), the pair costs what one
        `client.hgetall` does. Replies are raw, error replies in their place: HGETALL is
        a dict under RESP3 (redis-py's default) and a flat list under RESP2
        (`hash_fields`).

        Every command here is a read, so a connection that broke while idle in the pool
        (Redis restarted) is replaced and the trip sent once more, as redis-py's own
        retry would.
        """
        if is_cluster_client(self.redis):
            # One packed write per node, redirects and a failed node retried there.
            return cluster_round_trip(self.redis, list(commands))
        pool = self.redis.connection_pool
        for attempt in (1, 2):
            conn = pool.get_connection()
            try:
                conn.send_packed_command([b"".join(pack(c) for c in commands)])
                return read_replies(conn, len(commands))
            except RedisConnectionError:
                conn.disconnect()
                if attempt == 2:
                    raise
            except BaseException:
                conn.disconnect()
                raise
            finally:
                pool.release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def _route(self) -> Route | None:
        """Where one request's reads go: None (the primary, reads from replicas off), or
        a route over the replica topology, pinned when this reader guards a write."""
        if self.replicas is None:
            return None
        self.replicas.refresh_if_due()
        return Route(self.replicas, pins=self._pins)

    def _run(self, plan: Plan[T], route: Route | None = None) -> T:
        """Drive a plan: each yielded batch of commands is one round trip, all of them
        routed alike (one request)."""
        route = route or self._route()
        try:
            commands = next(plan)
            while True:
                commands = plan.send(self._round_trip(commands, route))
        except StopIteration as done:
            return done.value
        finally:
            plan.close()

    def get_product(self, product_id: UUID | str) -> Any:
        return self._run(self._product(product_id))

    def list_products(
        self, *, sort: str = "name", limit: int = 20, cursor: str | None = None
    ) -> Page[Any]:
        return self._run(self._product_list(sort, limit, cursor))

    def top_products(self, *, limit: int = 10) -> list[Any]:
        return self._run(self._top_products(limit))

    def get_customer(self, customer_id: UUID | str) -> Any:
        return self._run(self._customer(customer_id))

    def get_order(self, order_id: UUID | str) -> Any:
        return self._run(self._order(order_id))

    def customer_orders(
        self, customer_id: UUID | str, *, limit: int = 20, cursor: str | None = None
    ) -> Page[Any]:
        """Newest first. Unknown customer: NotFound (its view is checked in the same trip)."""
        return self._run(self._customer_orders(customer_id, limit, cursor))

    def get_view(self, name: str, key: str) -> BaseModel:
        """One view of any registered projection (`cqrs query view NAME KEY`)."""
        return self._run(self._any_view(name, key))

    def behind(self, token: str) -> list[str]:
        """What the projections have not applied yet of the write behind `token`."""
        return self.check(token)[0]

    def check(self, token: str) -> tuple[list[str], dict[Any, Node] | None]:
        """`behind`, and where the read it guards must go (`cqrs.replicas`): the keys the
        check read on replicas, and which (None: reads from replicas are off)."""
        if self.replicas is None:
            return self._run(self._behind(token)), None
        self.replicas.refresh_if_due()
        route = Route(self.replicas)
        missing = self._run(self._behind(token), route)
        if missing and route.used_replicas:
            # A replica may only lag its primary: ask the primaries before waiting.
            route = Route(self.replicas, primaries=True)
            missing = self._run(self._behind(token), route)
        return missing, dict(route.served)

    def pinned(self, pins: dict[Any, Node] | None) -> QueryService:
        """This service reading as a satisfied check says (`check`); itself when reads
        from replicas are off."""
        if self.replicas is None or pins is None:
            return self
        reader = copy.copy(self)
        reader._pins = pins
        return reader

    def wait_for(self, token: str, *, timeout: float = 5.0) -> QueryService:
        """Return, once every projection reflects the write behind `token`, the reader
        that sees it: this service, or with reads from replicas on, one whose reads go
        where the satisfied check read (`cqrs.replicas`: read the write through it, as
        `svc.wait_for(token).get_order(id)`; this service's own reads may come from a
        replica that has not caught up).

        Waiting is driven by the projector's notifications (pub/sub on the applied
        channel), not by a sleep loop: subscribe first, then check, then wait for the next
        notification, so an apply between the check and the wait is never missed. This
        is the one-shot caller's wait (a connection of its own); the HTTP server shares
        one subscription among all its waiters (`queries.waiters`).
        """
        decode_token(token)  # a bad token fails before we subscribe
        deadline = time.monotonic() + timeout
        pubsub = Subscription(self.redis, self.keys.applied_channel())
        try:
            while True:
                missing, pins = self.check(token)
                if not missing:
                    return self.pinned(pins)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                pubsub.get_message(timeout=min(remaining, 1.0))
        finally:
            pubsub.close()
        raise not_caught_up(timeout, missing, lag_summary(self.lag()))

    def rebuilding(self) -> set[str]:
        return self._run(self._rebuilding())

    def lag(self) -> dict[str, dict[str, int]]:
        partitions = int(self.redis.hget(self.keys.meta(), "partitions") or self.partitions)
        return {p: group_lag(self.redis, self.keys, p, partitions) for p in self.projections}
