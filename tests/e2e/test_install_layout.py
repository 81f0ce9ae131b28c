"""Installed, the project is one import name (issue 14, part 4): from outside the
repository, `cqrs.commands`, `cqrs.relay`, `cqrs.app`, ... import, and the folders'
own names (`commands`, `queries`, `bench`, ...) do not exist in site-packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # -I: isolated mode, so neither the current directory nor PYTHONPATH can supply the
    # repository's folders; only what is installed is importable.
    return subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_package_imports_under_cqrs_from_outside_the_repository(tmp_path: Path) -> None:
    result = _python(
        "import cqrs.commands.catalog, cqrs.relay, cqrs.projector.worker, cqrs.queries.service,"
        " cqrs.app.cli, cqrs.app.drain; print(callable(cqrs.relay.publish_pending))",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_no_generic_top_level_names_are_installed(tmp_path: Path) -> None:
    for name in ("commands", "projector", "queries", "relay", "app", "bench"):
        result = _python(f"import {name}", tmp_path)
        assert result.returncode != 0, f"`import {name}` works outside the repository"
        assert "ModuleNotFoundError" in result.stderr, result.stderr


def test_python_dash_m_cqrs_app_is_the_cli(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-I", "-m", "cqrs.app", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for command in ("relay", "project", "run", "demo", "doctor", "status", "serve", "order"):
        assert command in result.stdout, command
