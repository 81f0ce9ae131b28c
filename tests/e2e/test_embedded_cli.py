"""A bare machine: no URL configured, the CLI starts the embedded servers on first use,
reuses them, reports them, and `cqrs down` stops exactly them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil

from tests.helpers import run_cli


def _bare_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRS_")}
    env["CQRS_HOME"] = str(home)
    return env


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_first_command_starts_embedded_servers_and_down_stops_them(tmp_path: Path) -> None:
    env = _bare_env(tmp_path / "home")
    try:
        created = run_cli(
            "product",
            "create",
            "--sku",
            "E-1",
            "--name",
            "Embedded",
            "--price",
            "1.00",
            "--json",
            env=env,
            timeout=180,
        )
        assert created.returncode == 0, created.stderr
        product = json.loads(created.stdout)
        assert product["version"] == 1 and product["token"]

        status = run_cli("up", "--status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["running"] is True
        pids = [report["postgres"]["pid"], report["redis"]["pid"]]
        assert all(psutil.pid_exists(pid) for pid in pids)

        # A second command reuses the same servers and sees the first one's data.
        again = run_cli(
            "product",
            "create",
            "--sku",
            "E-1",
            "--name",
            "Again",
            "--price",
            "1.00",
            env=env,
            timeout=120,
        )
        assert again.returncode == 1 and "already exists" in again.stderr
        status2 = json.loads(run_cli("up", "--status", "--json", env=env).stdout)
        assert [status2["postgres"]["pid"], status2["redis"]["pid"]] == pids
    finally:
        down = run_cli("down", "--json", env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert sorted(json.loads(down.stdout)["stopped"]) == sorted(pids)
    assert all(_gone(pid) for pid in pids)
    stopped = run_cli("up", "--status", "--json", env=env)
    assert stopped.returncode == 1
    assert json.loads(stopped.stdout)["running"] is False
