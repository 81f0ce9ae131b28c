"""`cqrs project`, `cqrs verify`, `cqrs replay` and `cqrs dlq ...`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import typer

from cqrs.cli import load_settings, metrics_port_option, start_metrics_or_fail
from cqrs.console import EXIT_USAGE, fail, out, print_json
from cqrs.logs import configure_logging
from cqrs.projector.deadletters import (
    DeadLetter,
    drop_dead_letters,
    get_dead_letter,
    list_dead_letters,
    refile_dead_letters,
)
from cqrs.projector.projection import Projection
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.state import live_generation
from cqrs.projector.verify import verify
from cqrs.projector.worker import Worker
from cqrs.signals import install_stop_handlers
from cqrs.startup import prepare_or_exit
from cqrs.tuning import tune_gc
from cqrs.wiring import Wiring

if TYPE_CHECKING:
    from cqrs.projector.replay import Progress, ReplayResult

dlq_app = typer.Typer(
    help="Dead letters: events a projection could not apply.", no_args_is_help=True
)


def select_projections(names: list[str] | None) -> list[Projection]:
    if not names:
        return list(PROJECTIONS.values())
    unknown = [n for n in names if n not in PROJECTIONS]
    if unknown:
        fail(f"unknown projection {unknown[0]!r} (known: {', '.join(PROJECTIONS)})", EXIT_USAGE)
    return [PROJECTIONS[n] for n in names]


def project_command(
    projection: list[str] = typer.Option(
        None, "--projection", "-p", help="Run only these (repeatable)."
    ),
    consumer: str = typer.Option(
        None, "--consumer", help="Consumer name (default host-pid-random)."
    ),
    drain: bool = typer.Option(False, "--drain", help="Exit once everything is applied."),
    metrics_port: int = metrics_port_option(),
) -> None:
    """Run projections in this process until SIGTERM/SIGINT (a second signal exits at once)."""
    stop = threading.Event()
    install_stop_handlers(stop)  # first: a SIGTERM during start-up is still a clean stop
    configure_logging(logging.INFO)
    projections = select_projections(projection)
    wiring = Wiring(load_settings())
    try:
        # Redis only: PostgreSQL is needed to build views from the log, and a build that
        # cannot reach it is retried by the worker itself.
        prepare_or_exit(wiring, stop, long_running=not drain, postgres=False)
        metrics = start_metrics_or_fail(wiring.settings, metrics_port)
        worker = Worker(
            wiring.redis,
            wiring.settings,
            projections,
            consumer=consumer,
            database_url=wiring.database_url,
        )
        if metrics is not None:
            add_projection_gauges(metrics, wiring, projections)
            worker.metrics = metrics
        tune_gc(wiring.settings.projector_gc_threshold)
        worker.run(stop, drain=drain)
    finally:
        wiring.close()


def add_projection_gauges(metrics: Any, wiring: Wiring, projections: list[Projection]) -> None:
    """Lag, pending, age of the oldest unapplied entry, ... computed at every scrape."""
    from cqrs.projector.status import projection_gauges

    metrics.add_gauges(lambda: projection_gauges(wiring.redis, wiring.settings, projections))


def verify_command(
    json_output: bool = typer.Option(False, "--json", help="Print the differences as JSON."),
    limit: int = typer.Option(50, "--limit", min=1, help="Show at most this many differences."),
) -> None:
    """Recompute every view from PostgreSQL and compare field by field; exit 1 on any difference.

    Every registered projection is checked (plugins too), each by its contract's
    expectation, and named in the output."""
    wiring = Wiring(load_settings())
    try:
        generations = {
            name: live_generation(wiring.redis, wiring.keys, name) for name in PROJECTIONS
        }
        diffs = verify(wiring.database_url, wiring.redis, wiring.keys, generations)
    finally:
        wiring.close()
    if json_output:
        print_json(
            {
                "projections": list(generations),
                "differences": len(diffs),
                "shown": [d.__dict__ for d in diffs[:limit]],
            }
        )
    else:
        for diff in diffs[:limit]:
            out.print(str(diff), markup=False)
        checked = ", ".join(generations)
        out.print(
            f"{len(diffs)} difference(s) (checked {checked})"
            if diffs
            else f"views match PostgreSQL ({checked})",
            markup=False,
        )
    if diffs:
        raise typer.Exit(1)


PROJECTION_OPTION = typer.Option(..., "--projection", "-p", help="Projection name.")


def _letters(wiring: Wiring, projection: str, ids: list[str], all_: bool) -> list[DeadLetter]:
    letters = list_dead_letters(wiring.redis, wiring.keys, projection)
    if all_:
        return letters
    if not ids:
        fail("name dead-letter ids or pass --all", EXIT_USAGE)
    by_id = {d.id: d for d in letters}
    missing = [i for i in ids if i not in by_id]
    if missing:
        fail(f"dead letter {missing[0]} not found in {projection}")
    return [by_id[i] for i in ids]


@dlq_app.command("list")
def dlq_list(
    projection: list[str] = typer.Option(
        None,
        "--projection",
        "-p",
        help="Only this projection (repeatable; default: every projection).",
    ),
    json_output: bool = typer.Option(
        False, "--json", help='One JSON object: {"items": [...], "next_cursor": null}.'
    ),
) -> None:
    """Dead letters, projection by projection, oldest first."""
    from rich.text import Text

    from cqrs.console import table

    chosen = select_projections(projection)
    wiring = Wiring(load_settings())
    try:
        letters = [d for p in chosen for d in list_dead_letters(wiring.redis, wiring.keys, p.name)]
    finally:
        wiring.close()
    if json_output:
        # The shape of every list we print (HTTP and `query` lists too); all of them fit
        # in one page today, so there is never a next cursor.
        print_json({"items": [d.as_json() for d in letters], "next_cursor": None})
        return
    if letters:
        rows = table(
            None,
            [("projection", False), ("id", False), ("type", False), ("deliveries", True),
             ("error", False)],
        )  # fmt: skip
        for d in letters:
            rows.add_row(
                d.projection,
                d.id,
                Text(d.fields.get("type", "?")),
                str(d.deliveries),
                Text(d.error),
            )
        out.print(rows)
    where = chosen[0].name if len(chosen) == 1 else f"{len(chosen)} projections"
    out.print(f"{len(letters)} dead letter(s) in {where}")


@dlq_app.command("show")
def dlq_show(
    dlq_id: str = typer.Argument(..., metavar="ID"),
    projection: str = PROJECTION_OPTION,
    json_output: bool = typer.Option(True, "--json", help="Always JSON; accepted for symmetry."),
) -> None:
    """One dead letter with its original entry (JSON)."""
    select_projections([projection])
    wiring = Wiring(load_settings())
    try:
        letter = get_dead_letter(wiring.redis, wiring.keys, projection, dlq_id)
    finally:
        wiring.close()
    if letter is None:
        fail(f"dead letter {dlq_id} not found in {projection}")
    print_json(letter.as_json())


@dlq_app.command("retry")
def dlq_retry(
    ids: list[str] = typer.Argument(
        None, metavar="ID", help="Dead letters to apply again (or --all)."
    ),
    projection: str = PROJECTION_OPTION,
    all_: bool = typer.Option(False, "--all", help="Retry every dead letter, oldest first."),
    json_output: bool = typer.Option(
        False, "--json", help='One JSON object: {"retried": [ids], "failed": [{id, error}]}.'
    ),
) -> None:
    """Apply dead letters again (after the cause was fixed); the ones that apply are removed.
    One that fails again stays, filed anew with its delivery count raised and the new
    error (exit 1)."""
    chosen = select_projections([projection])[0]
    wiring = Wiring(load_settings())
    try:
        letters = _letters(wiring, projection, ids or [], all_)
        worker = Worker(wiring.redis, wiring.settings, [chosen], consumer="dlq-retry")
        results = worker.reapply(chosen, letters)
        done = [d for d, error in zip(letters, results, strict=True) if error is None]
        failed = [(d, e) for d, e in zip(letters, results, strict=True) if e is not None]
        drop_dead_letters(wiring.redis, wiring.keys, projection, done)
        refile_dead_letters(wiring.redis, wiring.keys, projection, failed)
    finally:
        wiring.close()
    if json_output:
        print_json(
            {
                "retried": [d.id for d in done],
                "failed": [{"id": d.id, "error": e} for d, e in failed],
            }
        )
    else:
        for d, error in failed:
            out.print(f"{d.id} still fails: {error}", markup=False)
        out.print(f"re-applied {len(done)}, still failing {len(failed)}")
    if failed:
        raise typer.Exit(1)


@dlq_app.command("drop")
def dlq_drop(
    ids: list[str] = typer.Argument(None, metavar="ID", help="Dead letters to drop (or --all)."),
    projection: str = PROJECTION_OPTION,
    all_: bool = typer.Option(False, "--all", help="Drop every dead letter."),
    json_output: bool = typer.Option(False, "--json", help='One JSON object: {"dropped": N}.'),
) -> None:
    """Delete dead letters without applying them."""
    select_projections([projection])
    wiring = Wiring(load_settings())
    try:
        letters = _letters(wiring, projection, ids or [], all_)
        dropped = drop_dead_letters(wiring.redis, wiring.keys, projection, letters)
    finally:
        wiring.close()
    if json_output:
        print_json({"dropped": dropped})
    else:
        out.print(f"dropped {dropped} dead letter(s)")


def replay_command(
    projections: list[str] = typer.Argument(
        None, metavar="PROJECTION", help="Projections to rebuild (or --all)."
    ),
    all_: bool = typer.Option(False, "--all", help="Replay every projection."),
    source: Literal["auto", "stream", "log"] = typer.Option(
        "auto",
        "--from",
        help="History to rebuild from: the streams when they still hold everything (auto), "
        "the streams, or the PostgreSQL event log.",
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    json_output: bool = typer.Option(
        False, "--json", help='One JSON object: {"replays": [one summary per projection]}.'
    ),
) -> None:
    """Rebuild views from history into a new generation while the current one keeps
    serving, then switch atomically (see docs/operations.md)."""
    import sys

    from cqrs.projector.replay import Replayer, ReplayError, ReplayInterrupted

    if all_ == bool(projections):
        fail("name projections to replay, or pass --all (not both)", EXIT_USAGE)
    chosen = select_projections(None if all_ else projections)
    if not yes:
        if not sys.stdin.isatty():
            fail("replay rebuilds views; pass --yes to run it non-interactively", EXIT_USAGE)
        names = ", ".join(p.name for p in chosen)
        if not typer.confirm(f"Rebuild {names} from history?"):
            raise typer.Exit(1)
    configure_logging(logging.WARNING)
    wiring = Wiring(load_settings())
    stop = threading.Event()
    install_stop_handlers(stop)
    summaries = []
    tune_gc(wiring.settings.projector_gc_threshold)
    try:
        for projection in chosen:
            replayer = Replayer(wiring.redis, wiring.settings, projection, wiring.database_url)
            try:
                result = with_progress(
                    projection.name,
                    lambda report, r=replayer: r.run(source, progress=report, stop=stop),
                    show=not json_output,
                )
            except ReplayInterrupted:
                fail(f"replay of {projection.name} interrupted; the live views are untouched", 130)
            except ReplayError as exc:
                fail(str(exc))
            summaries.append(result.as_json())
            if not json_output:
                print_replay(result)
    finally:
        wiring.close()
    if json_output:
        print_json({"replays": summaries})


def with_progress(
    name: str, run: Callable[[Progress], ReplayResult], *, show: bool
) -> ReplayResult:
    """`run(report)`, a replay of projection `name`, with a progress bar on a terminal
    (`cqrs replay`, `cqrs repartition`)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar

    with Bar(
        TextColumn(name),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]} ev/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=out,
        disable=not (show and out.is_terminal),
    ) as bar:
        task = bar.add_task(name, total=None, rate="-")
        started = time.monotonic()
        known = 0  # the log's size once known; the streams part reports no total

        def report(done: int, total: int) -> None:
            nonlocal known
            known = total or known
            rate = done / max(time.monotonic() - started, 1e-6)
            # Events committed after the log's snapshot arrive through the streams: the
            # total grows with them, it is never exceeded.
            whole = max(known, done) if known else None
            bar.update(task, completed=done, total=whole, rate=f"{rate:,.0f}")

        return run(report)


def print_replay(result: ReplayResult) -> None:
    out.print(
        f"{result.projection}: {result.events} events from the {result.source} in "
        f"{result.seconds:.1f}s ({result.events_per_second:,.0f}/s), "
        f"generation {result.old_generation} -> {result.new_generation}"
    )


def register(app: typer.Typer) -> None:
    app.command("project")(project_command)
    app.command("verify")(verify_command)
    app.command("replay")(replay_command)
    app.add_typer(dlq_app, name="dlq")
