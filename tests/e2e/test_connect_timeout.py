"""A PostgreSQL address that accepts TCP but never answers (issue 13, item 1).

Before the connect timeout, `cqrs product create` against such a port (Redis's, another
service's) waited on libpq's default of forever (2 min 11 s with the kernel's retries).
Now every entry point gives up after `CQRS_DATABASE_CONNECT_TIMEOUT` seconds with one
line naming the masked URL, exit 1.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.helpers import run_cli


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never says a word."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                accepted.append(conn)  # held open, silent

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in accepted:
            conn.close()
        server.close()


@pytest.mark.parametrize(
    "args",
    [
        ("product", "create", "--sku", "T-1", "--name", "T", "--price", "1.00"),
        ("db", "upgrade"),
        ("verify",),
        ("demo", "--yes"),
    ],
    ids=["product-create", "db-upgrade", "verify", "demo"],
)
def test_silent_database_port_fails_fast_with_the_masked_url(
    silent_port: int, cli_env: dict[str, str], args: tuple[str, ...]
) -> None:
    url = f"postgresql://app:s3cret@127.0.0.1:{silent_port}/shop"
    env = {**cli_env, "CQRS_DATABASE_URL": url, "CQRS_DATABASE_CONNECT_TIMEOUT": "2"}
    started = time.monotonic()
    result = run_cli(*args, env=env, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot reach PostgreSQL at "), lines[0]
    assert f"postgresql://app:***@127.0.0.1:{silent_port}/shop" in lines[0]
    assert "s3cret" not in result.stderr + result.stdout
    # 2 s of timeout plus the interpreter's start-up; never libpq's minutes.
    assert elapsed < 15, elapsed
