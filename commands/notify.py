"""The relay's wake-up after a command commits, sent inside the transaction or after it.

`in-transaction`: the command's statement calls `pg_notify`; PostgreSQL delivers it at
commit. Simple and exact, but a transaction that notifies takes a cluster-wide lock from
its pre-commit until its commit record is flushed, so concurrent commands cannot share a
WAL flush: with 8 writers the commits queue on that lock (docs/benchmarks.md, "Round 2:
commands").

`after-commit` / `after-commit-sync`: the command commits without NOTIFY, then pokes this
process's `Notifier`, which sends `NOTIFY` on a connection of its own (autocommit,
`synchronous_commit` off: a lost notification only delays). Pokes coalesce: one NOTIFY
covers every commit that happened before it was sent. `after-commit` sends from a
background thread (the command returns at once); `after-commit-sync` sends from the
committing thread before the command returns (a NOTIFY already started after this
commit covers it). Either way, a process killed between its COMMIT and the NOTIFY leaves
the events to the relay's poll (`CQRS_RELAY_POLL_SECONDS`), the safety net it always had;
a NOTIFY that fails is logged and dropped for the same reason. A short-lived process
calls `flush()` before it exits (the CLI does; an `atexit` hook is the fallback).

`auto`: in the transaction while the command is the only one of this process in flight
(nothing in the process to queue behind it, and no second transaction for the NOTIFY),
after commit from the background thread when others are (their commits then share WAL
flushes and one NOTIFY covers the burst). Measured: docs/benchmarks.md.

The relay needs no change: it LISTENs on the same channel and does not care who sent it.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import Literal

import psycopg
from sqlalchemy import Engine

from cqrs.eventlog import NOTIFY_CHANNEL
from cqrs.urls import libpq_url

log = logging.getLogger(__name__)

Mode = Literal["auto", "in-transaction", "after-commit", "after-commit-sync"]
MODES: tuple[Mode, ...] = ("auto", "in-transaction", "after-commit", "after-commit-sync")

# How long `flush()` waits by default: a NOTIFY is one round trip; a server that does not
# answer in this time is left to the relay's poll rather than holding a CLI's exit.
FLUSH_SECONDS = 5.0
# A background sender idle this long closes its connection and ends.
IDLE_SECONDS = 10.0


class Notifier:
    """One process's sender of the relay's wake-up, for one database."""

    def __init__(self, database_url: str, *, background: bool, adaptive: bool = False) -> None:
        self.database_url = database_url
        self.background = background
        self.adaptive = adaptive
        self._active = 0  # units of work in flight on this engine (adaptive only)
        self._lock = threading.Lock()  # guards the counters and the thread
        self._send_lock = threading.Lock()  # guards the connection: one send at a time
        self._done = threading.Condition(threading.Lock())
        self._requested = 0  # pokes so far
        self._covered = 0  # pokes a sent (or abandoned) NOTIFY accounts for
        self._started = 0  # pokes covered by the NOTIFY in flight (sync mode)
        self._conn: psycopg.Connection | None = None
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.sent = 0  # NOTIFYs sent, for tests and the bench
        self.failures = 0

    # --- the committing side ------------------------------------------------------------

    def enter(self) -> None:
        """A unit of work starts (adaptive mode counts them)."""
        with self._lock:
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1

    def in_transaction(self) -> bool:
        """Whether the committing command should notify inside its own transaction:
        adaptive mode, and no other command of this process in flight."""
        return self.adaptive and self._active <= 1

    def poke(self) -> None:
        """A command has just committed: make sure a NOTIFY is sent after this moment."""
        with self._lock:
            self._requested += 1
            ticket = self._requested
        if self.background:
            self._ensure_thread()
            self._wake.set()
        else:
            self._send_covering(ticket)

    def flush(self, timeout: float = FLUSH_SECONDS) -> bool:
        """Wait until every poke so far is covered by a sent (or abandoned) NOTIFY; False
        if `timeout` passed first."""
        with self._lock:
            wanted = self._requested
        with self._done:
            return self._done.wait_for(lambda: self._covered >= wanted, timeout)

    def close(self) -> None:
        """Flush, stop the thread, close the connection."""
        self.flush()
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(FLUSH_SECONDS)
        with self._send_lock:
            self._disconnect()

    # --- sending --------------------------------------------------------------------------

    def _send_covering(self, ticket: int) -> None:
        """Synchronous mode: send one NOTIFY unless one started after `ticket` was taken
        (the send lock serialises senders; a waiter usually finds itself covered)."""
        with self._send_lock:
            with self._lock:
                if self._started >= ticket:
                    return
                self._started = upto = self._requested
            self._send()
        self._cover(upto)

    def _ensure_thread(self) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="cqrs-commit-notify", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        """Background mode: one NOTIFY per burst of pokes. After IDLE_SECONDS without a
        poke the thread closes its connection and ends (the next poke starts another), so
        an engine nobody uses any more holds neither."""
        while True:
            woken = self._wake.wait(IDLE_SECONDS)
            self._wake.clear()
            with self._lock:
                upto = self._requested
                idle = not woken and upto <= self._covered
                if idle:
                    self._thread = None  # a poke from now on starts a new thread
            if idle or (self._closed and upto <= self._covered):
                with self._send_lock:
                    self._disconnect()
                return
            if upto > self._covered:
                with self._send_lock:
                    self._send()
            self._cover(upto)

    def _send(self) -> None:
        """One NOTIFY; on failure the connection is dropped (the next send reconnects) and
        the wake-up is left to the relay's poll. Called with `_send_lock` held."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    libpq_url(self.database_url), autocommit=True, connect_timeout=5
                )
                self._conn.execute("SET synchronous_commit = off")
            self._conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
            self.sent += 1
        except psycopg.Error as exc:
            self.failures += 1
            log.warning("wake-up NOTIFY not sent (the relay's poll will find the events): %s", exc)
            self._disconnect()

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _cover(self, upto: int) -> None:
        with self._done:
            if upto > self._covered:
                self._covered = upto
            self._done.notify_all()


# One notifier per engine (its pool's database), created on first use. `configure` sets an
# engine's mode explicitly; otherwise `CQRS_COMMIT_NOTIFY` decides, read once per engine.
_modes: weakref.WeakKeyDictionary[Engine, Mode] = weakref.WeakKeyDictionary()
_notifiers: weakref.WeakKeyDictionary[Engine, Notifier] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def configure(engine: Engine, mode: Mode) -> None:
    """Choose how commands on `engine` wake the relay (tests and the bench A/B both)."""
    if mode not in MODES:
        raise ValueError(f"commit notify mode must be one of {', '.join(MODES)}, not {mode!r}")
    with _registry_lock:
        _modes[engine] = mode
        old = _notifiers.pop(engine, None)
    if old is not None:
        old.close()


def mode_of(engine: Engine) -> Mode:
    mode = _modes.get(engine)
    if mode is None:
        from cqrs.settings import Settings

        mode = Settings().commit_notify
        with _registry_lock:
            mode = _modes.setdefault(engine, mode)
    return mode


def notifier_for(engine: Engine) -> Notifier | None:
    """The engine's notifier, or None when its commands notify inside the transaction."""
    notifier = _notifiers.get(engine)
    if notifier is not None:
        return notifier
    mode = mode_of(engine)
    if mode == "in-transaction":
        return None
    with _registry_lock:
        notifier = _notifiers.get(engine)
        if notifier is None:
            url = engine.url.render_as_string(hide_password=False)
            notifier = Notifier(
                url, background=mode != "after-commit-sync", adaptive=mode == "auto"
            )
            _notifiers[engine] = notifier
    return notifier


@atexit.register
def _flush_all() -> None:
    """The fallback for a process that exits without `flush()`: its last wake-ups."""
    for notifier in list(_notifiers.values()):
        notifier.flush()


def flush(engine: Engine, timeout: float = FLUSH_SECONDS) -> bool:
    """Send the wake-up for every command committed on `engine` so far (a no-op when they
    notify inside their transactions); short-lived processes call it before exiting."""
    notifier = _notifiers.get(engine)
    return True if notifier is None else notifier.flush(timeout)
