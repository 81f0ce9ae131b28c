"""A plugin projection whose contract lacks a part stops `cqrs` at start, in one line that
names the projection and the part (no traceback, exit 1), before anything connects: never
a projection that `--after` silently stops waiting for or `verify` silently skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import run_cli

PLUGIN = """
from cqrs.contracts import KeySpec, ViewContract, ViewModel


class Thing(ViewModel):
    name: str


CONTRACT = ViewContract(
    name="forgetful",
    keys=(KeySpec("thing", "hash", lambda v: v.tagged("thing", "<id>"), "id", "name", view=True),),
    model=Thing,
    view_key=lambda views, key: views.tagged("thing", key),
    expect=lambda conn, views: {},
)  # no `applied`: what read-your-writes would wait on
"""


def _install(where: Path, module: str, source: str, target: str) -> dict[str, str]:
    """A distribution on PYTHONPATH registering `target` under cqrs.projections: what
    `pip install` of a plugin leaves behind, without touching this environment."""
    (where / f"{module}.py").write_text(source)
    info = where / f"{module}-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[cqrs.projections]\n{target}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(where), env.get("PYTHONPATH")]))
    # Nothing may be reached: the refusal comes before any connection.
    env["CQRS_DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/none"
    env["CQRS_REDIS_URL"] = "redis://127.0.0.1:1/0"
    return env


@pytest.mark.parametrize("command", [("status",), ("project", "--drain"), ("verify",)])
def test_a_contract_lacking_a_part_stops_every_command_naming_it(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    env = _install(tmp_path, "forgetful_plugin", PLUGIN, "forgetful = forgetful_plugin:CONTRACT")
    result = run_cli(*command, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: projection 'forgetful': its contract lacks what it has applied, for "
        "read-your-writes (applied)"
    ]


def test_an_entry_point_naming_something_else_is_refused(tmp_path: Path) -> None:
    env = _install(tmp_path, "odd_plugin", "THING = object()\n", "odd = odd_plugin:THING")
    result = run_cli("status", env=env)
    assert result.returncode == 1
    assert "error: projection 'odd': entry point object" in result.stderr
    assert "Traceback" not in result.stderr
