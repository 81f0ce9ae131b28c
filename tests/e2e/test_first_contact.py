"""What a new user meets first (issue 13): the embedded fallback says so, `cqrs demo`
asks before writing to a database that is not the embedded one, and a Redis database
index the server lacks is one error line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cqrs.settings import Settings
from tests.helpers import event_count, run_cli, wait_until
from tests.procs import fleet


@pytest.fixture(scope="module")
def embedded_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """No URL configured: the embedded servers, started once for the module."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRS_")}
    env["CQRS_HOME"] = str(tmp_path_factory.mktemp("first-contact") / "home")
    up = run_cli("up", "--json", env=env, timeout=180)
    assert up.returncode == 0, up.stderr
    try:
        yield env
    finally:
        run_cli("down", env=env, timeout=120)


def test_falling_back_to_embedded_servers_says_so_on_stderr(embedded_env: dict[str, str]) -> None:
    result = run_cli("status", "--json", env=embedded_env, timeout=120)
    assert result.returncode in (0, 1), result.stderr
    json.loads(result.stdout)  # stdout stays one clean JSON object
    notices = [line for line in result.stderr.splitlines() if "embedded" in line]
    assert len(notices) == 1, result.stderr
    notice = notices[0]
    assert "CQRS_DATABASE_URL" in notice and "CQRS_REDIS_URL" in notice
    assert str(Path(embedded_env["CQRS_HOME"]).resolve()) in notice


def test_configured_urls_print_no_notice(cli_env: dict[str, str]) -> None:
    result = run_cli("status", "--json", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "embedded" not in result.stderr


def test_demo_refuses_a_real_database_without_yes_when_nobody_can_answer(
    cli_env: dict[str, str], settings: Settings
) -> None:
    assert settings.database_url
    result = run_cli("demo", env=cli_env)  # stdin is not a terminal
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: demo would write"), result.stderr
    assert "--yes" in lines[0]
    assert result.stdout == ""
    assert event_count(settings.database_url) == 0


def test_missing_redis_database_index_is_one_line(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "CQRS_REDIS_URL": "redis://127.0.0.1:6379/99"}
    for args in (("status",), ("dlq", "list"), ("verify",)):
        result = run_cli(*args, env=env)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("error: ") and "redis://127.0.0.1:6379/99" in lines[0]
        assert "Traceback" not in result.stderr


def test_run_starts_with_one_summary_line_not_one_per_partition(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    with fleet(tmp_path, cli_env) as procs:
        proc = procs.cqrs("run", "run")
        wait_until(lambda: "relay: active" in proc.output(), timeout=30, what="the relay")
        wait_until(
            lambda: run_cli("status", "--json", env=cli_env).stdout.count('"live_workers":1') >= 1,
            timeout=30,
            what="the worker's slots",
        )
        procs.stop(proc, timeout=30)
    text = proc.output()
    assert text.count("running the relay and") == 1, text
    assert "took " not in text, text
