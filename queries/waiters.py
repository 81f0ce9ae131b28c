"""Read-your-writes for a server: every waiter of the process on one subscription.

A waiter (`GET ...?after=TOKEN`) holds no thread and no connection of its own. The
process keeps ONE pub/sub subscription to the projector's `applied` channel (the same
notifications the CLI's `QueryService.wait_for` listens to) and a single `asyncio.Event`
that each notification sets; a waiter re-checks its token (`ViewPlans._behind`, the same
check as everywhere) when woken, on the shared pooled connections, and otherwise just
sleeps on the event. With reads from replicas the check reads a replica first (the
primaries only when it says "not yet"), and the waiter answers with a reader pinned to
where its check read (`cqrs.replicas`). So 1,000 waiters cost 1,000 suspended coroutines and one
connection, not 1,000 threads and 1,000 connections.

Why nothing can strand a waiter:
- the event a waiter sleeps on is taken *before* its check, so a notification that
  lands between the check and the sleep has already set it;
- a message lost anyway (the subscription dropped, Redis restarted, the listener is
  still connecting) costs at most `RECHECK_SECONDS`: every waiter re-checks on that
  interval whatever happens, and the listener wakes everyone when it (re)subscribes;
- the client's `timeout` is a deadline: no re-check starts at it unless a notification
  came, a check still running gets `CHECK_GRACE` seconds, then the waiter answers
  `NotCaughtUp`, quoting a lag read at most a second old (`BlockingLag.recent`, shared
  by every waiter timing out at once, itself given at most `SUMMARY_SECONDS`).

A projector under load publishes after every batch; wake-ups are coalesced to at most
one per `MIN_WAKE_INTERVAL` (the first one of a quiet period is immediate) so that a
thousand waiters do not re-check a thousand times a second each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from cqrs.queries.aio import AsyncViews
from cqrs.queries.errors import Busy
from cqrs.queries.service import lag_summary, not_caught_up
from cqrs.redisio import AsyncSubscription
from cqrs.tokens import decode_token

log = logging.getLogger(__name__)

RECHECK_SECONDS = 1.0
CHECK_GRACE = 0.25
SUMMARY_SECONDS = 0.25
MIN_WAKE_INTERVAL = 0.01
LISTEN_SECONDS = 5.0
MAX_BACKOFF = 5.0

LagReader = Callable[[], Awaitable[dict[str, dict[str, int]]]]


class AppliedWaiters:
    """The read-your-writes waits of one server process (see the module docstring)."""

    def __init__(self, views: AsyncViews, *, max_waiters: int, recent_lag: LagReader) -> None:
        self.views = views
        self.max_waiters = max_waiters
        self.waiting = 0
        self._recent_lag = recent_lag
        self._woken = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._last_wake = 0.0
        self._wake_pending: asyncio.TimerHandle | None = None

    async def wait_for(self, token: str, timeout: float) -> AsyncViews:
        """Once the views reflect the write behind `token`, the reader to read it with
        (with reads from replicas, one that reads where the satisfied check did:
        `cqrs.replicas`); `Busy` when the process already holds `max_waiters` waits;
        `NotCaughtUp` at the deadline."""
        decode_token(token)  # a bad token is a 400 before it counts as a waiter
        if self.waiting >= self.max_waiters:
            raise Busy(
                f"{self.waiting} read-your-writes waits in progress, the most this server "
                f"holds (CQRS_HTTP_MAX_WAITERS={self.max_waiters}); retry later"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        missing: list[str] | None = None
        self.waiting += 1
        try:
            self._start_listening()
            # The first check after the subscription is live, so the notification of an
            # apply right after the check cannot be lost; bounded, the recheck is the net.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(min(deadline, loop.time() + RECHECK_SECONDS)):
                    await self._subscribed.wait()
            while True:
                woken = self._woken
                try:
                    async with asyncio.timeout_at(deadline + CHECK_GRACE):
                        missing, pins = await self.views.check(token)
                except TimeoutError:
                    break
                if not missing:
                    return self.views.pinned(pins)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(min(remaining, RECHECK_SECONDS)):
                        await woken.wait()
                except TimeoutError:
                    # No notification: re-check (the net for a lost one), except at the
                    # deadline itself, where a check could only make the answer late.
                    if remaining <= RECHECK_SECONDS:
                        break
        finally:
            self.waiting -= 1
        raise not_caught_up(timeout, missing, await self._summary())

    async def _summary(self) -> str:
        """The lag for the timeout message, or why it is missing: never a reason to answer
        later than the client asked."""
        try:
            async with asyncio.timeout(SUMMARY_SECONDS):
                return lag_summary(await self._recent_lag())
        except TimeoutError:
            return "lag unknown (not read in time)"
        except Exception as exc:  # the 504 stands; the lag is only context
            return f"lag unknown ({type(exc).__name__})"

    # --- the shared subscription -------------------------------------------------------

    def _start_listening(self) -> None:
        """The subscription starts with the first waiter and lives as long as the app."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="cqrs-applied-listener")

    def _wake(self) -> None:
        """Wake every waiter now, or at the end of the current coalescing window."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._last_wake >= MIN_WAKE_INTERVAL:
            self._wake_now()
        elif self._wake_pending is None:
            self._wake_pending = loop.call_at(self._last_wake + MIN_WAKE_INTERVAL, self._wake_now)

    def _wake_now(self) -> None:
        self._wake_pending = None
        self._last_wake = asyncio.get_running_loop().time()
        woken, self._woken = self._woken, asyncio.Event()
        woken.set()

    async def _listen(self) -> None:
        """Subscribe and wake waiters on every notification; on any failure (Redis down,
        every pooled connection busy) retry with bounded back-off, logging once per
        outage. Waiters keep re-checking on their own interval meanwhile."""
        backoff = 0.1
        failing = False
        channel = self.views.keys.applied_channel()
        while True:
            pubsub = AsyncSubscription(self.views.redis)
            try:
                await pubsub.subscribe(channel)
                self._subscribed.set()
                if failing:
                    log.info("read-your-writes: subscribed to %s again", channel)
                failing, backoff = False, 0.1
                self._wake()  # something may have been applied while we were away
                while True:
                    if await pubsub.get_message(timeout=LISTEN_SECONDS) is not None:
                        self._wake()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning(
                        "read-your-writes: subscription to %s lost (%s); waiters re-check "
                        "every %gs until it is back",
                        channel,
                        exc,
                        RECHECK_SECONDS,
                    )
                failing = True
            finally:
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def aclose(self) -> None:
        if self._wake_pending is not None:
            self._wake_pending.cancel()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(BaseException):
                await self._listener
