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
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from uuid import UUID

import redis
from pydantic import BaseModel, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from cqrs.keys import KeyMap, ViewKeys
from cqrs.redisio import hash_fields, pack, read_replies
from cqrs.settings import Settings
from cqrs.streams import group_lag
from cqrs.tokens import AggregateVersion, decode_token
from queries.errors import BadCursor, BadView, NotCaughtUp, NotFound
from queries.models import CustomerView, OrderView, Page, ProductView

T = TypeVar("T")

PROJECTIONS = ("products", "customers", "orders")
MAX_LIMIT = 500
_SEP = "\x00"
_LINE_ATTRIBUTES = ("product_id", "name", "unit_price", "qty", "line_total")
# More lines than any order can have (commands accept 100) means a corrupted count: it is
# reported rather than turned into that many lookups.
_MAX_LINES = 10_000


def _line_fields(count: int) -> list[tuple[tuple[str, str], ...]]:
    """Per line number, (attribute, view field) pairs: formatted once, not per read."""
    return [tuple((a, f"line:{n}:{a}") for a in _LINE_ATTRIBUTES) for n in range(count)]


_LINE_FIELDS = _line_fields(101)


class _GenerationSwitched(Exception):
    """A list was read across a generation switch; read it again from the start."""


def _retry_on_switch(read: Callable[[], T]) -> T:
    for _ in range(3):
        try:
            return read()
        except _GenerationSwitched:
            continue
    return read()


def encode_cursor(member: str) -> str:
    return base64.urlsafe_b64encode(member.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, separator: str) -> str:
    """The index member a page ended at; anything we did not hand out is rejected."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        member = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor("invalid cursor") from None
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
    """The result model of one view. Validation stays on: pydantic-core checks a product
    view in ~2 us, which is less than building the model by hand from converted values
    (measured ~4 us for `model_construct` with UUID/Decimal/int conversions), and it is
    what turns a hand-edited or corrupted view into an error naming the field."""
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


def order_view(data: dict[str, str], key: str) -> OrderView:
    """The view keeps each line attribute in a field of its own (`line:<n>:<attribute>`,
    see projector.orders): short values keep the hash listpack-encoded."""
    try:
        count = int(data.get("line_count") or 0)
    except ValueError:
        raise BadView(f"view {key} is not valid: line_count: {data['line_count']!r}") from None
    if not 0 <= count <= _MAX_LINES:
        raise BadView(f"view {key} is not valid: line_count: {count}")
    get = data.get
    fields = _LINE_FIELDS if count < len(_LINE_FIELDS) else _line_fields(count + 1)
    lines = [{a: get(f) for a, f in fields[n]} for n in range(1, count + 1)]
    return view_model(OrderView, {**data, "lines": lines}, key)


class QueryService:
    def __init__(self, client: redis.Redis, keys: KeyMap, *, partitions: int = 8) -> None:
        self.redis = client
        self.keys = keys
        self.partitions = partitions
        self._generations: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> QueryService:
        """For other services: a Redis client from settings, nothing else."""
        from cqrs.wiring import Wiring

        wiring = Wiring(settings)
        return cls(wiring.redis, wiring.keys, partitions=wiring.settings.partitions)

    # --- reading with the live generation ----------------------------------------------

    def _round_trip(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send `commands` in one write on one pooled connection and read their replies.

        A redis-py `Pipeline` costs ~20 us of Python for the two commands of a get-by-id
        (command stack, response callbacks, its own connection handling): as much again
        as the HGETALL round trip it wraps. Packed with hiredis and read straight from
        the connection's hiredis reader (`cqrs.redisio`), the pair costs what one
        `client.hgetall` does. Replies are raw: HGETALL is a dict under RESP3 (redis-py's
        default) and a flat list under RESP2 (`hash_fields`).

        Every command here is a read, so a connection that broke while idle in the pool
        (Redis restarted) is replaced and the trip sent once more, as redis-py's own
        retry would. An error reply (WRONGTYPE: a key of another type where a view
        belongs) becomes BadView; the connection is then dropped, as after any error,
        since later replies may be left unread on it.
        """
        pool = self.redis.connection_pool
        for attempt in (1, 2):
            conn = pool.get_connection()
            try:
                conn.send_packed_command([b"".join(pack(c) for c in commands)])
                replies = read_replies(conn, len(commands))
                for command, reply in zip(commands, replies, strict=True):
                    if isinstance(reply, ResponseError):
                        raise BadView(f"view {command[1]} cannot be read: {reply}")
                return replies
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

    def _read(
        self, projection: str, build: Callable[[ViewKeys], list[tuple[Any, ...]]]
    ) -> list[Any]:
        """The replies of `build`'s commands against the live generation's views."""
        generation_key = self.keys.generation(projection)
        for _ in range(3):
            assumed = self._generations.get(projection, 1)
            first, *rest = self._round_trip(
                [("GET", generation_key), *build(self.keys.views(projection, assumed))]
            )
            live = int(first or 0)
            if live == assumed:
                return rest
            self._generations[projection] = live  # a rebuild switched: read again
        return rest

    def _hashes(self, projection: str, keys: list[str]) -> list[dict[str, str]]:
        """The views of one page, in one trip with the generation number: if a rebuild
        switched generations since the index was read, the page is read again."""
        live, *hashes = self._round_trip(
            [("GET", self.keys.generation(projection)), *[("HGETALL", k) for k in keys]]
        )
        if int(live or 0) != self._generations.get(projection, 1):
            self._generations[projection] = int(live or 0)
            raise _GenerationSwitched
        return [hash_fields(h) for h in hashes]

    def _view(
        self, projection: str, key_of: Callable[[ViewKeys], str]
    ) -> tuple[str, dict[str, str]]:
        """One view hash by id: its key in the live generation and its fields, read with
        the generation number in one trip (`_read`, without its list plumbing)."""
        generation_key = self.keys.generation(projection)
        for _ in range(3):
            assumed = self._generations.get(projection, 1)
            key = key_of(self.keys.views(projection, assumed))
            live, data = self._round_trip((("GET", generation_key), ("HGETALL", key)))
            if int(live or 0) == assumed:
                break
            self._generations[projection] = int(live or 0)  # a rebuild switched: read again
        return key, hash_fields(data)

    # --- products ----------------------------------------------------------------------

    def get_product(self, product_id: UUID | str) -> ProductView:
        pid = view_id(product_id, "product")
        key, data = self._view("products", lambda v: v.product(pid))
        if not data.get("version"):
            raise NotFound(f"product {pid} not found")
        return view_model(ProductView, data, key)

    def list_products(
        self, *, sort: str = "name", limit: int = 20, cursor: str | None = None
    ) -> Page[ProductView]:
        return _retry_on_switch(lambda: self._list_products(sort, limit, cursor))

    def _list_products(self, sort: str, limit: int, cursor: str | None) -> Page[ProductView]:
        if sort not in ("name", "price"):
            raise BadCursor(f"unknown sort {sort!r} (name or price)")
        limit = max(1, min(limit, MAX_LIMIT))
        start = f"({decode_cursor(cursor, _SEP)}" if cursor else "-"

        def page(v: ViewKeys) -> list[tuple[Any, ...]]:
            index = v.products_by_name() if sort == "name" else v.products_by_price()
            return [("ZRANGEBYLEX", index, start, "+", "LIMIT", 0, limit + 1)]

        [members] = self._read("products", page)
        return self._product_page(members, limit)

    def _product_page(self, members: list[str], limit: int) -> Page[ProductView]:
        views = self.keys.views("products", self._generations.get("products", 1))
        shown = members[:limit]
        keys = [views.product(m.rsplit(_SEP, 1)[-1]) for m in shown]
        items = [
            view_model(ProductView, data, key)
            for key, data in zip(keys, self._hashes("products", keys), strict=True)
            if data.get("version")
        ]
        more = len(members) > limit
        return Page[ProductView](
            items=items, next_cursor=encode_cursor(shown[-1]) if more else None
        )

    def top_products(self, *, limit: int = 10) -> list[ProductView]:
        return _retry_on_switch(lambda: self._top_products(limit))

    def _top_products(self, limit: int) -> list[ProductView]:
        limit = max(1, min(limit, MAX_LIMIT))
        [ids] = self._read("products", lambda v: [("ZREVRANGE", v.top_products(), 0, limit - 1)])
        views = self.keys.views("products", self._generations.get("products", 1))
        keys = [views.product(i) for i in ids]
        return [
            view_model(ProductView, data, key)
            for key, data in zip(keys, self._hashes("products", keys), strict=True)
            if data.get("version")
        ]

    # --- customers and orders ----------------------------------------------------------

    def get_customer(self, customer_id: UUID | str) -> CustomerView:
        cid = view_id(customer_id, "customer")
        key, data = self._view("customers", lambda v: v.customer(cid))
        if not data.get("version"):
            raise NotFound(f"customer {cid} not found")
        return view_model(CustomerView, data, key)

    def get_order(self, order_id: UUID | str) -> OrderView:
        oid = view_id(order_id, "order")
        key, data = self._view("orders", lambda v: v.order(oid))
        if not data.get("version"):
            raise NotFound(f"order {oid} not found")
        return order_view(data, key)

    def customer_orders(
        self, customer_id: UUID | str, *, limit: int = 20, cursor: str | None = None
    ) -> Page[OrderView]:
        """Newest first. Unknown customer: NotFound (its view is checked in the same trip)."""
        return _retry_on_switch(lambda: self._customer_orders(customer_id, limit, cursor))

    def _customer_orders(
        self, customer_id: UUID | str, limit: int, cursor: str | None
    ) -> Page[OrderView]:
        cid = view_id(customer_id, "customer")
        limit = max(1, min(limit, MAX_LIMIT))
        start = f"({decode_cursor(cursor, ':')}" if cursor else "+"

        def page(v: ViewKeys) -> list[tuple[Any, ...]]:
            return [
                ("EXISTS", v.order_customer(cid)),
                ("ZREVRANGEBYLEX", v.customer_orders(cid), start, "-", "LIMIT", 0, limit + 1),
            ]

        known, members = self._read("orders", page)
        if not known and not members:
            raise NotFound(f"customer {cid} not found")
        views = self.keys.views("orders", self._generations.get("orders", 1))
        shown = members[:limit]
        keys = [views.order(m.rsplit(":", 1)[-1]) for m in shown]
        items = [
            order_view(data, key)
            for key, data in zip(keys, self._hashes("orders", keys), strict=True)
            if data.get("version")
        ]
        more = len(members) > limit
        return Page[OrderView](items=items, next_cursor=encode_cursor(shown[-1]) if more else None)

    # --- read-your-writes --------------------------------------------------------------

    def _marks(self, versions: list[AggregateVersion]) -> list[tuple[str, str, str, int]]:
        pipe = self.redis.pipeline(transaction=False)
        for projection in PROJECTIONS:
            pipe.get(self.keys.generation(projection))
        generations = {p: int(g or 1) for p, g in zip(PROJECTIONS, pipe.execute(), strict=True)}
        marks = []
        for projection in PROJECTIONS:
            for v in versions:
                mark = self.keys.applied_marks(
                    projection,
                    generations[projection],
                    v.aggregate_type,
                    v.aggregate_id,
                    v.partition_key,
                )
                if mark:
                    marks.append((projection, mark[0], mark[1], v.version))
        return marks

    def behind(self, token: str) -> list[str]:
        """What the projections have not applied yet of the write behind `token`."""
        marks = self._marks(decode_token(token))
        pipe = self.redis.pipeline(transaction=False)
        for _, key, field, _ in marks:
            pipe.hget(key, field)
        missing = []
        for (projection, key, _field, wanted), got in zip(marks, pipe.execute(), strict=True):
            if int(got or 0) < wanted:
                missing.append(f"{projection} at version {int(got or 0)} of {wanted} ({key})")
        return missing

    def wait_for(self, token: str, *, timeout: float = 5.0) -> None:
        """Return once every projection reflects the write behind `token`.

        Waiting is driven by the projector's notifications (pub/sub on the applied
        channel), not by a sleep loop: subscribe first, then check, then wait for the next
        notification, so an apply between the check and the wait is never missed.
        """
        decode_token(token)  # a bad token fails before we subscribe
        deadline = time.monotonic() + timeout
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.keys.applied_channel())
            while True:
                missing = self.behind(token)
                if not missing:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                pubsub.get_message(timeout=min(remaining, 1.0))
        finally:
            pubsub.close()
        lags = self.lag()
        summary = ", ".join(f"{p} lag {v['lag']} pending {v['pending']}" for p, v in lags.items())
        raise NotCaughtUp(
            f"views did not reflect the write within {timeout:g}s: {missing[0]}; {summary}"
        )

    def rebuilding(self) -> set[str]:
        """Projections being rebuilt (a replay holds their lock) or with no views at all
        (not built yet, or Redis lost its data and the workers are rebuilding them)."""
        pipe = self.redis.pipeline(transaction=False)
        for projection in PROJECTIONS:
            pipe.exists(self.keys.replay_lock(projection))
            pipe.exists(self.keys.generation(projection))
        results = pipe.execute()
        return {p for i, p in enumerate(PROJECTIONS) if results[2 * i] or not results[2 * i + 1]}

    def lag(self) -> dict[str, dict[str, int]]:
        partitions = int(self.redis.hget(self.keys.meta(), "partitions") or self.partitions)
        return {p: group_lag(self.redis, self.keys, p, partitions) for p in PROJECTIONS}
