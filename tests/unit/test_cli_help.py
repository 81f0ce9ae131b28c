"""Help a newcomer can read (issue 13, items 6 and 9): no Python type tags, no doubled
brackets in usage lines, a help text for every option, the environment variable beside
each option that maps to a setting, and `cqrs --version`."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import version

import click
import pytest
import typer.main
from typer.testing import CliRunner

import cqrs.app.cli

OTHERS: set[tuple[str, ...]] = set()


@pytest.fixture(scope="module")
def root() -> click.Command:
    if not cqrs.app.cli.app.registered_groups:
        cqrs.app.cli._mount_packages()
    return typer.main.get_command(cqrs.app.cli.app)


def commands(
    cmd: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        if (*path, name) not in OTHERS:
            yield from commands(sub, (*path, name))


def help_of(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(cqrs.app.cli.app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_no_type_tags_or_doubled_brackets_in_any_help(root: click.Command) -> None:
    for path, _cmd in commands(root):
        text = help_of(path)
        for tag in ("<bool>", "<str>", "<int>", "<float>", "<list[", "[[", "]...]..."):
            assert tag not in text, (path, tag, text)


def test_every_option_says_what_it_does(root: click.Command) -> None:
    missing = [
        (" ".join(path), param.opts)
        for path, cmd in commands(root)
        for param in cmd.params
        if isinstance(param, click.Option) and not param.help
    ]
    assert not missing, missing


def test_options_that_map_to_settings_show_their_environment_variable() -> None:
    assert "CQRS_LOG_FORMAT" in help_of(())
    assert "CQRS_LOG_LEVEL" in help_of(())
    for path in (("relay",), ("project",), ("run",)):
        assert "CQRS_METRICS_PORT" in help_of(path), path


def test_choices_are_offered() -> None:
    assert "auto|stream|log" in help_of(("replay",))
    assert "projections|relay" in help_of(("status",))


def test_version() -> None:
    result = CliRunner().invoke(cqrs.app.cli.app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"cqrs {version('cqrs-projector')}"
