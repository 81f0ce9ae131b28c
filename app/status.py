"""`cqrs status`: lag, pending, stalls and dead letters per projection, and the relay's
backlog. In the composition because it reports on two sides (projector and relay)."""

from __future__ import annotations

import time
from typing import Any, Literal

import typer

from cqrs.cli import load_settings, unreachable_message
from cqrs.console import fail, out, print_json
from cqrs.projector.cli import select_projections
from cqrs.wiring import Wiring


def status_command(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
    max_lag: int = typer.Option(
        None,
        "--max-lag",
        min=0,
        help="Exit 1 when a projection has more than N entries not applied (lag + pending) "
        "or the relay more than N unpublished events.",
    ),
    max_age: float = typer.Option(
        None,
        "--max-age",
        min=0,
        help="Exit 1 when the oldest unapplied entry or unpublished event is older (seconds).",
    ),
    only: Literal["projections", "relay"] | None = typer.Option(
        None, "--only", help="Check only the projections or only the relay (default: both)."
    ),
    projection: list[str] = typer.Option(
        None, "--projection", "-p", help="Only these projections (repeatable)."
    ),
    watch: bool = typer.Option(False, "--watch", help="Refresh every second until Ctrl-C."),
) -> None:
    """Lag, pending, stalls, dead letters and progress per projection, and the relay's
    backlog; with --max-lag/--max-age a health check (exit 1 when exceeded)."""
    import redis

    from cqrs.projector.status import collect_status

    chosen = [] if only == "relay" else select_projections(projection)
    wiring = Wiring(load_settings())

    def collect() -> Any:
        return collect_status(
            wiring.redis,
            wiring.settings,
            chosen,
            database_url=wiring.database_url if only != "projections" else None,
            include_relay=only != "projections",
        )

    try:
        try:
            if watch:
                _watch(collect, json_output, max_lag, max_age)
                return
            report = collect()
        except redis.RedisError as exc:
            # The one translation of driver errors (it masks the URL's password).
            fail(unreachable_message(exc) or f"Redis refused a status query: {exc}")
    finally:
        wiring.close()
    problems = report.violations(max_lag, max_age)
    if json_output:
        print_json({**report.as_json(), "ok": not problems, "problems": problems})
    else:
        out.print(render_status(report, problems))
    if problems:
        raise typer.Exit(1)


def _watch(collect: Any, json_output: bool, max_lag: int | None, max_age: float | None) -> None:
    """Refresh every second until Ctrl-C (JSON: one object per line)."""
    from rich.live import Live

    try:
        if json_output:
            while True:
                report = collect()
                problems = report.violations(max_lag, max_age)
                print_json({**report.as_json(), "ok": not problems, "problems": problems})
                time.sleep(1.0)
        report = collect()
        with Live(
            render_status(report, report.violations(max_lag, max_age)),
            console=out,
            auto_refresh=False,
        ) as live:
            while True:
                time.sleep(1.0)
                report = collect()
                live.update(render_status(report, report.violations(max_lag, max_age)))
                live.refresh()
    except KeyboardInterrupt:
        return


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


_STATE_STYLE = {
    "caught up": "green",
    "behind": "yellow",
    "rebuilding": "cyan",
    "stalled": "red",
    "broken": "bold red",
}
_NUMERIC = {"gen", "stream", "lag", "pending", "workers", "dlq", "idle", "heartbeat"}


def render_status(report: Any, problems: list[str]) -> Any:
    """The rich view of a `cqrs.projector.status.SystemStatus`."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from cqrs.console import table as new_table

    def table(title: str, columns: tuple[str, ...]) -> Table:
        return new_table(title, [(column, column in _NUMERIC) for column in columns])

    parts: list[Any] = []
    if report.projections:
        main = table(
            f"projections (namespace {report.namespace})",
            (
                "projection",
                "state",
                "gen",
                "stream",
                "lag",
                "pending",
                "oldest",
                "last applied",
                "workers",
                "dlq",
            ),
        )
        for p in report.projections:
            last = (
                "-"
                if p.last_position is None
                else f"#{p.last_position}, {_age(p.last_applied_age_seconds)} ago"
            )
            main.add_row(
                p.name,
                Text(p.state, style=_STATE_STYLE.get(p.state, "")),
                str(p.generation),
                str(p.stream_length),
                str(p.lag),
                str(p.pending),
                _age(p.oldest_unapplied_age_seconds),
                last,
                str(p.live_workers),
                Text(str(p.dead_letters), style="red" if p.dead_letters else ""),
            )
        parts.append(main)
        consumers = table("consumers", ("projection", "consumer", "pending", "idle", "heartbeat"))
        for p in report.projections:
            for c in p.consumers:
                consumers.add_row(
                    p.name,
                    c.name,
                    str(c.pending),
                    _age(c.idle_seconds),
                    _age(c.heartbeat_age_seconds),
                )
        if consumers.row_count:
            parts.append(consumers)
        for p in report.projections:
            if p.reason:
                parts.append(Text(f"{p.name}: {p.reason}", style=_STATE_STYLE.get(p.state, "")))
    relay = report.relay
    if relay is not None:
        if relay.reachable:
            parts.append(
                Text(
                    f"relay: {relay.unpublished} unpublished event(s), oldest "
                    f"{_age(relay.oldest_age_seconds)}"
                )
            )
        else:
            parts.append(Text(f"relay: unknown ({relay.error})", style="yellow"))
    for problem in problems:
        parts.append(Text(f"problem: {problem}", style="bold red"))
    return Group(*parts)
