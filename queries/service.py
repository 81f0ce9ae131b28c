"""Query handlers over the Redis views.

Rules this module keeps:
- it never opens a PostgreSQL connection (it is handed only a Redis client);
- a single view is one round trip: the projection's live generation and the view are
  read in one pipeline, and the read is repeated only if a rebuild switched the
  generation in between;
- a list is two round trips whatever its length: the index page (with the generation),
  then every view of the page in one pipeline. Never one per item.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from typing import Any, TypeVar
from uuid import UUID

import redis

from cqrs.keys import KeyMap, ViewKeys
from cqrs.settings import Settings
from cqrs.streams import group_lag
from cqrs.tokens import AggregateVersion, decode_token
from queries.errors import BadCursor, NotCaughtUp, NotFound
from queries.models import CustomerView, OrderView, Page, ProductView

T = TypeVar("T")

PROJECTIONS = ("products", "customers", "orders")
MAX_LIMIT = 500
_SEP = "\x00"
_LINE_ATTRIBUTES = ("product_id", "name", "unit_price", "qty", "line_total")


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


def _uuid(value: UUID | str, what: str) -> UUID:
    try:
        return value if isinstance(value, UUID) else UUID(str(value))
    except ValueError:
        raise NotFound(f"{what} {value} not found") from None


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

    def _read(
        self, projection: str, build: Callable[[redis.client.Pipeline, ViewKeys], None]
    ) -> list[Any]:
        for _ in range(3):
            assumed = self._generations.get(projection, 1)
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self.keys.generation(projection))
            build(pipe, self.keys.views(projection, assumed))
            first, *rest = pipe.execute()
            live = int(first or 0)
            if live == assumed:
                return rest
            self._generations[projection] = live  # a rebuild switched: read again
        return rest

    def _hashes(self, projection: str, keys: list[str]) -> list[dict[str, str]]:
        """The views of one page, in one pipeline with the generation number: if a rebuild
        switched generations since the index was read, the page is read again."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.generation(projection))
        for key in keys:
            pipe.hgetall(key)
        live, *hashes = pipe.execute()
        if int(live or 0) != self._generations.get(projection, 1):
            self._generations[projection] = int(live or 0)
            raise _GenerationSwitched
        return hashes

    # --- products ----------------------------------------------------------------------

    def get_product(self, product_id: UUID | str) -> ProductView:
        pid = _uuid(product_id, "product")
        [data] = self._read("products", lambda p, v: p.hgetall(v.product(pid)))
        if not data.get("version"):
            raise NotFound(f"product {pid} not found")
        return ProductView.model_validate(data)

    def list_products(
        self, *, sort: str = "name", limit: int = 20, cursor: str | None = None
    ) -> Page[ProductView]:
        return _retry_on_switch(lambda: self._list_products(sort, limit, cursor))

    def _list_products(self, sort: str, limit: int, cursor: str | None) -> Page[ProductView]:
        if sort not in ("name", "price"):
            raise BadCursor(f"unknown sort {sort!r} (name or price)")
        limit = max(1, min(limit, MAX_LIMIT))
        start = f"({decode_cursor(cursor, _SEP)}" if cursor else "-"

        def page(p: redis.client.Pipeline, v: ViewKeys) -> None:
            index = v.products_by_name() if sort == "name" else v.products_by_price()
            p.zrangebylex(index, start, "+", start=0, num=limit + 1)

        [members] = self._read("products", page)
        return self._product_page(members, limit)

    def _product_page(self, members: list[str], limit: int) -> Page[ProductView]:
        views = self.keys.views("products", self._generations.get("products", 1))
        shown = members[:limit]
        items = [
            ProductView.model_validate(data)
            for data in self._hashes(
                "products", [views.product(m.rsplit(_SEP, 1)[-1]) for m in shown]
            )
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
        [ids] = self._read("products", lambda p, v: p.zrevrange(v.top_products(), 0, limit - 1))
        views = self.keys.views("products", self._generations.get("products", 1))
        return [
            ProductView.model_validate(data)
            for data in self._hashes("products", [views.product(i) for i in ids])
            if data.get("version")
        ]

    # --- customers and orders ----------------------------------------------------------

    def get_customer(self, customer_id: UUID | str) -> CustomerView:
        cid = _uuid(customer_id, "customer")
        [data] = self._read("customers", lambda p, v: p.hgetall(v.customer(cid)))
        if not data.get("version"):
            raise NotFound(f"customer {cid} not found")
        return CustomerView.model_validate(data)

    @staticmethod
    def _order(data: dict[str, str]) -> OrderView:
        """The view keeps each line attribute in a field of its own (`line:<n>:<attr>`,
        see projector.orders): short values keep the hash listpack-encoded."""
        count = int(data.get("line_count") or 0)
        lines = [
            {a: data.get(f"line:{n}:{a}") for a in _LINE_ATTRIBUTES} for n in range(1, count + 1)
        ]
        return OrderView.model_validate({**data, "lines": lines})

    def get_order(self, order_id: UUID | str) -> OrderView:
        oid = _uuid(order_id, "order")
        [data] = self._read("orders", lambda p, v: p.hgetall(v.order(oid)))
        if not data.get("version"):
            raise NotFound(f"order {oid} not found")
        return self._order(data)

    def customer_orders(
        self, customer_id: UUID | str, *, limit: int = 20, cursor: str | None = None
    ) -> Page[OrderView]:
        """Newest first. Unknown customer: NotFound (its view is checked in the same trip)."""
        return _retry_on_switch(lambda: self._customer_orders(customer_id, limit, cursor))

    def _customer_orders(
        self, customer_id: UUID | str, limit: int, cursor: str | None
    ) -> Page[OrderView]:
        cid = _uuid(customer_id, "customer")
        limit = max(1, min(limit, MAX_LIMIT))
        start = f"({decode_cursor(cursor, ':')}" if cursor else "+"

        def page(p: redis.client.Pipeline, v: ViewKeys) -> None:
            p.exists(v.order_customer(cid))
            p.zrevrangebylex(v.customer_orders(cid), start, "-", start=0, num=limit + 1)

        known, members = self._read("orders", page)
        if not known and not members:
            raise NotFound(f"customer {cid} not found")
        views = self.keys.views("orders", self._generations.get("orders", 1))
        shown = members[:limit]
        items = [
            self._order(data)
            for data in self._hashes("orders", [views.order(m.rsplit(":", 1)[-1]) for m in shown])
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
