"""The state file and the lock: the only record of which processes are ours.

`<home>/embedded.json` lists what was started (PIDs, ports, process identity, file
locations); `<home>/embedded.lock` serialises every start and stop across processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock

from cqrs.embedded.errors import EmbeddedError

STATE_FILE = "embedded.json"
LOCK_FILE = "embedded.lock"
STATE_VERSION = 1


def resolve_home(home: Path) -> Path:
    """Resolve once so the lock, the state and the /var/tmp hash agree whatever the cwd is."""
    return Path(home).expanduser().resolve()


@contextlib.contextmanager
def locked(home: Path, deadline: float, timeout: float) -> Iterator[None]:
    """Serialize start/stop across processes; the lock dies with its holder (flock)."""
    lock = filelock.FileLock(str(home / LOCK_FILE))
    try:
        lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
    except filelock.Timeout as exc:
        raise EmbeddedError(
            f"another cqrs process held {home / LOCK_FILE} for more than {timeout:g}s"
        ) from exc
    try:
        yield
    finally:
        lock.release()


def read_state(home: Path) -> dict[str, Any] | None:
    """Refuse a corrupt state file instead of guessing: it is the only record of our PIDs."""
    path = home / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EmbeddedError(
            f"cannot read {path} ({exc}); stop the embedded servers by hand and delete it"
        ) from exc
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise EmbeddedError(
            f"{path} is not a state file of this version; stop the servers by hand and delete it"
        )
    return data


def write_state(home: Path, state: dict[str, Any]) -> None:
    """Write-then-rename, so a concurrent `status()` or a crash never sees half a file."""
    path = home / STATE_FILE
    tmp = home / f".{STATE_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def previous_port(entry: object) -> int | None:
    """Prefer the old port on restart, so URLs users copied keep working."""
    if isinstance(entry, dict) and isinstance(entry.get("port"), int):
        return int(entry["port"])
    return None
