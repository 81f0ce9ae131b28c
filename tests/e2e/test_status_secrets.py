"""`cqrs status` against a Redis that does not answer: one line naming the masked URL,
never the password (the status command used to format the driver error itself)."""

from __future__ import annotations

import os

from tests.helpers import free_port, run_cli


def test_status_on_an_unreachable_redis_masks_the_password() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRS_")}
    env.update(
        CQRS_REDIS_URL=f"redis://app:s3cr3t-pw@127.0.0.1:{free_port()}/0",
        CQRS_DATABASE_URL="postgresql://postgres@127.0.0.1:1/postgres",
        CQRS_STARTUP_TIMEOUT="1",
    )
    result = run_cli("status", "--only", "projections", env=env, timeout=60)
    assert result.returncode == 1
    assert "s3cr3t-pw" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach Redis at redis://app:")
