"""`cqrs repartition N`: change the number of partition streams of a namespace.

The projector's part (the locks, the switch of the streams in Redis, the rebuilds from the
log) is `cqrs.projector.repartition`; this is the composition's part, the fence on the
relay's side, in PostgreSQL.

**Why a fence.** Whatever publishes reads the partition count, then XADDs. A pass that read
the old count and XADDs after the streams were switched would put its events into a stream
no worker reads any more (or the wrong one), and delete their outbox rows. Two PostgreSQL
locks rule that out:

- the relay's leader lock (the session advisory lock relays elect their leader with) is
  held from the checks until the streams are switched: no relay leads meanwhile, and a
  relay reads the count again whenever it becomes the leader (`Relay.forget_partitions`).
  A relay leading when the command starts is refused; with `--online` its database
  session is ended instead: it reconnects, stands by until the switch is done, then leads
  under the new count (the path it takes after a PostgreSQL restart);
- `LOCK TABLE events.outbox IN EXCLUSIVE MODE` around the switch itself (a few Redis
  round trips): every pass, the leader's, `publish_pending` after a command or a drain,
  claims its rows with a DELETE, reads the count only after that, and XADDs inside the
  same transaction. The lock waits for passes in flight to commit (their entries are in
  the old streams, about to be deleted, and their events in the log the rebuild reads);
  passes that start meanwhile wait for the switch and then read the new count. Commands
  committing meanwhile wait as long for their outbox insert; none fails.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import psycopg
import typer

from cqrs.cli import load_settings
from cqrs.console import EXIT_USAGE, fail, out, print_json
from cqrs.logs import configure_logging
from cqrs.projector.cli import print_replay, with_progress
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.repartition import Repartitioner, RepartitionInterrupted, RepartitionRefused
from cqrs.projector.replay import ReplayError, ReplayInterrupted
from cqrs.relay.outbox import _RELAY_LOCK
from cqrs.signals import install_stop_handlers
from cqrs.streams import MAX_PARTITIONS, unfinished_repartition
from cqrs.tuning import tune_gc
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring

# How long the switch waits for the outbox lock (transactions in flight hold it in a
# conflicting mode for milliseconds) and, with --online, for the leader lock.
FENCE_TIMEOUT_S = 5.0

# The backends holding the relay's leader lock (a bigint advisory lock is listed with its
# high half as classid, its low half as objid, objsubid 1) in this database.
_LEADER_SQL = """
    SELECT pid FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND objsubid = 1
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid::bigint = %s AND objid::bigint = %s AND pid <> pg_backend_pid()
"""


def _try_leader_lock(conn: psycopg.Connection) -> bool:
    return bool(conn.execute("SELECT pg_try_advisory_lock(%s)", (_RELAY_LOCK,)).fetchone()[0])


def _take_over_leader_lock(conn: psycopg.Connection) -> int:
    """End the leading relay's session and take its lock before it reconnects (it backs
    off 0.1 s first); how many sessions were ended. Bounded by FENCE_TIMEOUT_S."""
    ended = 0
    deadline = time.monotonic() + FENCE_TIMEOUT_S
    high, low = _RELAY_LOCK >> 32, _RELAY_LOCK & 0xFFFFFFFF
    while not _try_leader_lock(conn):
        if time.monotonic() > deadline:
            raise RepartitionRefused(
                f"the relay kept its leader lock for {FENCE_TIMEOUT_S:g}s; nothing was changed"
            )
        for (pid,) in conn.execute(_LEADER_SQL, (high, low)).fetchall():
            try:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            except psycopg.errors.InsufficientPrivilege as exc:
                raise RepartitionRefused(
                    f"cannot end the relay's database session ({exc}); stop the relay first"
                ) from None
            ended += 1
        time.sleep(0.02)
    return ended


def _switch_behind_fence(conn: psycopg.Connection, repartitioner: Repartitioner) -> int:
    try:
        with conn.transaction():
            conn.execute(f"SET LOCAL lock_timeout = '{int(FENCE_TIMEOUT_S * 1000)}ms'")
            conn.execute("LOCK TABLE events.outbox IN EXCLUSIVE MODE")
            return repartitioner.switch_streams()
    except psycopg.errors.LockNotAvailable:
        raise RepartitionRefused(
            f"the outbox stayed busy for {FENCE_TIMEOUT_S:g}s; nothing was changed, try again"
        ) from None


def repartition_command(
    partitions: int = typer.Argument(
        ...,
        metavar="N",
        min=1,
        max=MAX_PARTITIONS,
        help=f"The new number of partition streams (1-{MAX_PARTITIONS}).",
    ),
    online: bool = typer.Option(
        False,
        "--online",
        help="Do not refuse while the relay and workers run: the relay's database session "
        "is ended (it reconnects and waits for the switch), workers step aside and follow.",
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    json_output: bool = typer.Option(
        False,
        "--json",
        help='One JSON object: {"before": N, "after": N, "unfinished": N or null, '
        '"removed_streams": N, "replays": [...]}.',
    ),
) -> None:
    """Change the number of partition streams: the streams are replaced and every
    projection is rebuilt from the PostgreSQL log into a new generation; queries keep the
    current views until each switch, commands keep committing. Refuses while a relay or
    a worker runs, unless --online. Interrupted, run it again (docs/scaling.md)."""
    if not yes:
        if not sys.stdin.isatty():
            fail(
                "repartition rebuilds every view; pass --yes to run it non-interactively",
                EXIT_USAGE,
            )
        if not typer.confirm(f"Replace the streams by {partitions} and rebuild every view?"):
            raise typer.Exit(1)
    configure_logging(logging.WARNING)
    wiring = Wiring(load_settings())
    stop = threading.Event()
    install_stop_handlers(stop)
    tune_gc(wiring.settings.projector_gc_threshold)
    try:
        if not wiring.database_url:
            fail("repartition rebuilds the views from the log: set CQRS_DATABASE_URL", EXIT_USAGE)
        report = _repartition(wiring, partitions, online=online, stop=stop, quiet=json_output)
    finally:
        wiring.close()
    if json_output:
        print_json(report)


def _repartition(
    wiring: Wiring, target: int, *, online: bool, stop: threading.Event, quiet: bool
) -> dict[str, Any]:
    from cqrs.commands.migrations import ensure_schema

    ensure_schema(wiring.engine)
    projections = list(PROJECTIONS.values())
    repartitioner = Repartitioner(
        wiring.redis, wiring.settings, projections, wiring.database_url, target
    )
    before = repartitioner.before
    unfinished = unfinished_repartition(wiring.redis, wiring.keys)
    report: dict[str, Any] = {
        "before": before,
        "after": target,
        "unfinished": unfinished,
        "removed_streams": 0,
        "replays": [],
    }
    if before == target and unfinished is None:
        if not quiet:
            out.print(f"the streams already have {target} partitions: nothing to do")
        return report
    say = (lambda _line: None) if quiet else (lambda line: out.print(line, markup=False))
    if unfinished is not None:
        say(f"an interrupted repartition to {unfinished} partitions is found: starting over")
    switched = False
    try:
        with psycopg.connect(libpq_url(wiring.database_url or ""), autocommit=True) as conn:
            leading = not _try_leader_lock(conn)
            if leading and not online:
                raise RepartitionRefused(
                    "a relay is running (it holds the relay leader lock in PostgreSQL): stop "
                    "the relay and the workers first, or pass --online"
                )
            repartitioner.preflight(online=online)
            with repartitioner.hold():
                if leading:
                    ended = _take_over_leader_lock(conn)
                    say(f"ended the relay's database session ({ended}); it waits for the switch")
                repartitioner.wait_for_workers(stop)
                report["removed_streams"] = _switch_behind_fence(conn, repartitioner)
                switched = True
                conn.execute("SELECT pg_advisory_unlock(%s)", (_RELAY_LOCK,))
                say(
                    f"streams switched: {before or '-'} -> {target} partitions "
                    f"({report['removed_streams']} stream keys deleted)"
                )
                for projection in projections:
                    result = with_progress(
                        projection.name,
                        lambda progress, p=projection: repartitioner.rebuild(
                            p, progress=progress, stop=stop
                        ),
                        show=not quiet,
                    )
                    report["replays"].append(result.as_json())
                    if not quiet:
                        print_replay(result)
            report["removed_streams"] += repartitioner.finish()
    except RepartitionRefused as exc:
        fail(str(exc))
    except RepartitionInterrupted as exc:
        fail(str(exc), 130)
    except (ReplayError, psycopg.Error) as exc:
        code = 130 if isinstance(exc, ReplayInterrupted) else 1
        if not switched:
            fail(f"{exc}; nothing was changed", code)
        fail(
            f"{exc}; the streams have {target} partitions, and views not rebuilt yet keep "
            f"serving: a worker rebuilds them from the log, or run `cqrs repartition {target}` "
            "again to finish",
            code,
        )
    say(f"repartitioned: {target} partitions")
    return report
