"""The root `cqrs` command: the composition root.

Each side (commands, relay, projector, queries) contributes its own Typer app through the
`cqrs.cli` entry-point group (see pyproject.toml), mounted here without naming them; the
commands that combine sides (`run`, `demo`, `doctor`, `status`) and the embedded servers'
`up`/`down` are this package's own. Mounting also fills `cqrs.hooks`, so a side that needs
a service of another (publish after commit, the schema on first use) gets it without
importing it.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import typer

from cqrs.app.demo import demo_command
from cqrs.app.doctor import doctor_command
from cqrs.app.repartition import repartition_command
from cqrs.app.run import run_command
from cqrs.app.status import status_command
from cqrs.cli import load_settings, unreachable_message
from cqrs.console import EXIT_USAGE, fail, out, print_json
from cqrs.urls import mask_url


def _option_metavar(option: Any, ctx: Any) -> str | None:
    """What help prints after an option: nothing for a flag, the choices for a choice,
    an upper-case word otherwise (`TEXT`, `INTEGER`), or the metavar its author gave."""
    if option.metavar is not None:
        return str(option.metavar)
    if option.is_flag or option.count:
        return None
    label = str(option.display_type(ctx)).strip("<>")
    if label.startswith("list[") and label.endswith("]"):
        label = label[5:-1]
    label = label.removesuffix(" range")
    if "|" in label:
        return label
    return {"str": "TEXT", "int": "INTEGER", "float": "NUMBER", "bool": "BOOLEAN"}.get(
        label, label.upper()
    )


def _plain_help_types() -> None:
    """Typer (0.2x) prints a Python type tag beside every parameter in `--help`: `<bool>`
    beside each flag, `<str>`, `<list[str]>` beside arguments whose name already says what
    they are. Users read those as syntax; print what click always printed instead (see
    `_option_metavar`), and nothing beside arguments. Typer builds its parameter objects
    itself with no class to substitute, so this is set on its classes, once, here, for
    every command the root mounts (and `CliRunner` tests see the same help)."""
    from typer import core

    if hasattr(core, "TyperOption") and hasattr(core.TyperOption, "display_type_rich"):
        core.TyperOption.display_type_rich = _option_metavar  # type: ignore[method-assign]
    if hasattr(core, "TyperArgument") and hasattr(core.TyperArgument, "display_type_rich"):
        core.TyperArgument.display_type_rich = lambda _self, ctx: None  # type: ignore[method-assign]


_plain_help_types()

app = typer.Typer(
    name="cqrs",
    help="CQRS read models on PostgreSQL and Redis Streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Markdown joins a docstring's wrapped lines into one paragraph (rich mode kept the
    # line breaks of the source, so help lines broke mid-sentence).
    rich_markup_mode="markdown",
)


_LOG_FORMATS = ("text", "json")
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"cqrs {version('cqrs-projector')}")
        except PackageNotFoundError:  # run from a tree that was never installed
            print("cqrs (not installed)")
        raise typer.Exit(0)


@app.callback()
def root(
    _version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
    log_format: str = typer.Option(
        None,
        "--log-format",
        envvar="CQRS_LOG_FORMAT",
        metavar="text|json",
        help="Log lines as 'text' or 'json' (one object per line) on stderr.",
    ),
    log_level: str = typer.Option(
        None,
        "--log-level",
        envvar="CQRS_LOG_LEVEL",
        metavar="debug|info|warning|error",
        help="debug, info, warning or error (default: info for relay/project/run/serve, "
        "warning otherwise).",
    ),
) -> None:
    """CQRS read models on PostgreSQL and Redis Streams."""
    from cqrs.logs import configure_logging, set_cli_options

    if log_format is not None and log_format.lower() not in _LOG_FORMATS:
        fail(f"invalid --log-format {log_format!r}: use text or json", EXIT_USAGE)
    if log_level is not None and log_level.lower() not in _LOG_LEVELS:
        fail(f"invalid --log-level {log_level!r}: use {', '.join(_LOG_LEVELS)}", EXIT_USAGE)
    set_cli_options(
        log_format.lower() if log_format else None, log_level.upper() if log_level else None
    )
    configure_logging(logging.WARNING)


@app.command()
def up(
    status: bool = typer.Option(False, "--status", help="Report the servers, start nothing."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
    cluster: bool = typer.Option(
        False,
        "--cluster",
        help="A local Redis Cluster instead (3 masters + 3 replicas on loopback ports); "
        "prints the URL of one node.",
    ),
) -> None:
    """Start the embedded PostgreSQL and Valkey servers (or reuse them) and print their URLs."""
    from cqrs import embedded

    settings = load_settings()
    if cluster:
        _up_cluster(settings.home, status=status, json_output=json_output)
        return
    if status:
        report = embedded.status(settings.home)
        for name in ("postgres", "redis"):
            info = report.get(name)
            if isinstance(info, dict) and info.get("url"):
                info["url"] = mask_url(str(info["url"]))
        if json_output:
            print_json(report)
        else:
            out.print(f"embedded servers: {'running' if report['running'] else 'stopped'}")
            for name in ("postgres", "redis"):
                info = report.get(name)
                if isinstance(info, dict):
                    alive = "up" if info.get("alive") else "down"
                    out.print(f"  {name}: {alive}  pid {info.get('pid')}  {info.get('url')}")
        raise typer.Exit(0 if report["running"] else 1)
    try:
        servers = embedded.ensure_started(settings.home, user=settings.embedded_user)
    except embedded.EmbeddedError as exc:
        fail(str(exc))
    data = {
        "database_url": mask_url(servers.database_url),
        "redis_url": mask_url(servers.redis_url),
        "postgres_pid": servers.postgres_pid,
        "redis_pid": servers.redis_pid,
        "home": str(servers.home),
    }
    if json_output:
        print_json(data)
    else:
        out.print(f"CQRS_DATABASE_URL={data['database_url']}")
        out.print(f"CQRS_REDIS_URL={data['redis_url']}")


def _up_cluster(home: Path, *, status: bool, json_output: bool) -> None:
    """`cqrs up --cluster`: start (or reuse) the local cluster under `home` (cqrs.cluster)."""
    from cqrs import cluster

    if status:
        report = cluster.status(home)
        if json_output:
            print_json(report)
        else:
            out.print(f"local cluster: {'running' if report['running'] else 'stopped'}")
            for node in report["nodes"]:
                alive = "up" if node["alive"] else "down"
                out.print(f"  {node['role']}: {alive}  pid {node['pid']}  {node['url']}")
        raise typer.Exit(0 if report["running"] else 1)
    try:
        local, _ = cluster.ensure_started(home)
    except cluster.ClusterError as exc:
        fail(str(exc))
    if json_output:
        print_json({"redis_url": local.url, "nodes": [n.url for n in local.nodes]})
    else:
        out.print(f"CQRS_REDIS_URL={local.url}")


@app.command()
def down(
    json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Stop exactly the embedded server processes that `cqrs up` (or first use) started,
    and the local cluster of `cqrs up --cluster` if there is one."""
    from cqrs import cluster, embedded

    settings = load_settings()
    try:
        stopped = embedded.stop(settings.home) + cluster.stop(settings.home)
    except embedded.EmbeddedError as exc:
        fail(str(exc))
    if json_output:
        print_json({"stopped": stopped})
    else:
        out.print(f"stopped {len(stopped)} process(es)" + (f": {stopped}" if stopped else ""))


app.command("run")(run_command)
app.command("demo")(demo_command)
app.command("doctor")(doctor_command)
app.command("status")(status_command)
app.command("repartition")(repartition_command)


def install_hooks() -> None:
    """What the sides offer each other, through `cqrs.hooks` (see there)."""
    from cqrs import hooks
    from cqrs.commands.migrations import ensure_schema
    from cqrs.relay import publish_pending

    hooks.install(publish_pending=publish_pending, ensure_schema=ensure_schema)


def _mount_packages() -> None:
    install_hooks()
    for entry in sorted(entry_points(group="cqrs.cli"), key=lambda e: e.name):
        entry.load()(app)


def main() -> None:
    """Console entry point: usage errors become one line on stderr with exit 2."""
    from cqrs.contracts import ContractError

    try:
        # Mounting loads the projections' entry points: one that lacks a part of its
        # contract stops every command here, in one line naming it and the part.
        _mount_packages()
        code = app(standalone_mode=False)
    except ContractError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.exit(EXIT_USAGE)  # the help text was already printed
        message = " ".join(exc.format_message().replace("Value error, ", "").split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Exception as exc:
        unreachable = unreachable_message(exc)
        if unreachable is None:
            raise
        print(f"error: {' '.join(mask_url(unreachable).split())}", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
