"""`cqrs project`, `cqrs verify` and `cqrs dlq ...`."""

from __future__ import annotations

import logging
import threading
import time

import typer

from cqrs.cli import load_settings
from cqrs.console import EXIT_USAGE, fail, out, print_json
from cqrs.signals import install_stop_handlers
from cqrs.wiring import Wiring
from projector.deadletters import (
    DeadLetter,
    drop_dead_letters,
    get_dead_letter,
    list_dead_letters,
)
from projector.projection import Projection
from projector.registry import PROJECTIONS
from projector.state import live_generation
from projector.verify import verify
from projector.worker import Worker

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


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def project_command(
    projection: list[str] = typer.Option(None, "--projection", help="Run only these (repeatable)."),
    consumer: str = typer.Option(
        None, "--consumer", help="Consumer name (default host-pid-random)."
    ),
    drain: bool = typer.Option(False, "--drain", help="Exit once everything is applied."),
) -> None:
    """Run projections in this process until SIGTERM/SIGINT (a second signal exits at once)."""
    stop = threading.Event()
    install_stop_handlers(stop)  # first: a SIGTERM during start-up is still a clean stop
    configure_logging()
    projections = select_projections(projection)
    wiring = Wiring(load_settings())
    try:
        worker = Worker(
            wiring.redis,
            wiring.settings,
            projections,
            consumer=consumer,
            database_url=wiring.database_url,
        )
        worker.run(stop, drain=drain)
    finally:
        wiring.close()


def verify_command(
    json_output: bool = typer.Option(False, "--json", help="Print the differences as JSON."),
    limit: int = typer.Option(50, "--limit", min=1, help="Show at most this many differences."),
) -> None:
    """Recompute every view from PostgreSQL and compare field by field; exit 1 on any difference."""
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
                "differences": len(diffs),
                "shown": [d.__dict__ for d in diffs[:limit]],
            }
        )
    else:
        for diff in diffs[:limit]:
            out.print(str(diff), markup=False)
        out.print(f"{len(diffs)} difference(s)" if diffs else "views match PostgreSQL")
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
    projection: str = PROJECTION_OPTION,
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Dead letters of a projection, oldest first."""
    select_projections([projection])
    wiring = Wiring(load_settings())
    try:
        letters = list_dead_letters(wiring.redis, wiring.keys, projection)
    finally:
        wiring.close()
    if json_output:
        print_json([d.as_json() for d in letters])
        return
    for d in letters:
        out.print(
            f"{d.id}  {d.fields.get('type', '?')}  deliveries={d.deliveries}  {d.error}",
            markup=False,
        )
    out.print(f"{len(letters)} dead letter(s) in {projection}")


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
    ids: list[str] = typer.Argument(None, metavar="[ID]..."),
    projection: str = PROJECTION_OPTION,
    all_: bool = typer.Option(False, "--all", help="Retry every dead letter, oldest first."),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Apply dead letters again (after the cause was fixed); the ones that apply are removed."""
    chosen = select_projections([projection])[0]
    wiring = Wiring(load_settings())
    try:
        letters = _letters(wiring, projection, ids or [], all_)
        worker = Worker(wiring.redis, wiring.settings, [chosen], consumer="dlq-retry")
        results = worker.reapply(chosen, letters)
        done = [d for d, error in zip(letters, results, strict=True) if error is None]
        failed = [(d, e) for d, e in zip(letters, results, strict=True) if e is not None]
        drop_dead_letters(wiring.redis, wiring.keys, projection, done)
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
    ids: list[str] = typer.Argument(None, metavar="[ID]..."),
    projection: str = PROJECTION_OPTION,
    all_: bool = typer.Option(False, "--all", help="Drop every dead letter."),
    json_output: bool = typer.Option(False, "--json"),
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
    projections: list[str] = typer.Argument(None, metavar="[PROJECTION]..."),
    all_: bool = typer.Option(False, "--all", help="Replay every projection."),
    source: str = typer.Option("auto", "--from", help="auto, stream or log."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Rebuild views from history into a new generation while the current one keeps
    serving, then switch atomically (see docs/operations.md)."""
    import sys

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from projector.replay import Replayer, ReplayError, ReplayInterrupted

    if source not in ("auto", "stream", "log"):
        fail(f"invalid --from {source!r}: use auto, stream or log", EXIT_USAGE)
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
    try:
        for projection in chosen:
            replayer = Replayer(wiring.redis, wiring.settings, projection, wiring.database_url)
            show = out.is_terminal and not json_output
            with Progress(
                TextColumn(f"{projection.name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]} ev/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=out,
                disable=not show,
            ) as progress:
                task = progress.add_task(projection.name, total=None, rate="-")
                started = time.monotonic()

                def report(
                    done: int, total: int, task: int = task, started: float = started
                ) -> None:
                    rate = done / max(time.monotonic() - started, 1e-6)
                    progress.update(task, completed=done, total=total or None, rate=f"{rate:,.0f}")

                try:
                    result = replayer.run(source, progress=report, stop=stop)
                except ReplayInterrupted:
                    fail(
                        f"replay of {projection.name} interrupted; the live views are untouched",
                        130,
                    )
                except ReplayError as exc:
                    fail(str(exc))
            summaries.append(result.as_json())
            if not json_output:
                out.print(
                    f"{projection.name}: {result.events} events from the {result.source} in "
                    f"{result.seconds:.1f}s ({result.events_per_second:,.0f}/s), "
                    f"generation {result.old_generation} -> {result.new_generation}"
                )
    finally:
        wiring.close()
    if json_output:
        print_json(summaries[0] if len(summaries) == 1 else {"replays": summaries})


def register(app: typer.Typer) -> None:
    app.command("project")(project_command)
    app.command("verify")(verify_command)
    app.command("replay")(replay_command)
    app.add_typer(dlq_app, name="dlq")
