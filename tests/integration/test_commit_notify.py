"""The relay's wake-up sent after commit (`CQRS_COMMIT_NOTIFY`, commands/notify.py).

What must hold in every mode: a committed command wakes a LISTENer on the relay's
channel; after commit the notification comes from the notifier's own connection, never
before the commit is visible; bursts coalesce; a failing NOTIFY neither fails the
command nor hangs `flush()`; the CLI, a short-lived process, does not exit before its
wake-up is sent.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from sqlalchemy.orm import sessionmaker

from cqrs.commands import notify
from cqrs.commands.catalog import CreateProduct
from cqrs.commands.db import make_session_factory
from cqrs.commands.handlers import execute
from cqrs.eventlog import NOTIFY_CHANNEL
from cqrs.settings import Settings
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring
from tests.conftest import settings_env


@pytest.fixture
def sf(wiring: Wiring) -> sessionmaker:
    return make_session_factory(wiring.engine)


def _listener(wiring: Wiring) -> psycopg.Connection:
    conn = psycopg.connect(libpq_url(wiring.database_url), autocommit=True)
    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
    return conn


@pytest.mark.parametrize("mode", notify.MODES)
def test_a_commit_wakes_the_relay_in_every_mode(
    mode: notify.Mode, wiring: Wiring, sf: sessionmaker
) -> None:
    notify.configure(wiring.engine, mode)
    with _listener(wiring) as listener:
        result = execute(CreateProduct(sku=f"N-{mode}", name="Notify", price="1.00"), sf)
        received = list(listener.notifies(timeout=10, stop_after=1))
        assert [n.channel for n in received] == [NOTIFY_CHANNEL]
        # Sent by whoever the mode says: the command's backend, or the notifier's own.
        notifier = notify.notifier_for(wiring.engine)
        if mode == "in-transaction":
            assert notifier is None
        elif mode == "auto":  # alone in its process: inside its own transaction
            assert notifier is not None
            assert notify.flush(wiring.engine, timeout=10)
            assert notifier.sent == 0
        else:
            assert notifier is not None
            assert notify.flush(wiring.engine, timeout=10)
            assert notifier.sent >= 1
            assert received[0].pid == notifier._conn.info.backend_pid  # type: ignore[union-attr]
        # The wake-up never precedes the commit: the event is visible when it arrives.
        seen = listener.execute(
            "SELECT count(*) FROM events.outbox o JOIN events.event_log e USING (position)"
            " WHERE e.aggregate_id = %s",
            (result.id,),
        ).fetchone()
        assert seen == (1,)


def test_sync_mode_has_sent_before_the_command_returns(wiring: Wiring, sf: sessionmaker) -> None:
    notify.configure(wiring.engine, "after-commit-sync")
    execute(CreateProduct(sku="S-1", name="Sync", price="1.00"), sf)
    notifier = notify.notifier_for(wiring.engine)
    assert notifier is not None and notifier.sent == 1


def test_a_burst_of_commits_coalesces_into_fewer_notifies(wiring: Wiring, sf: sessionmaker) -> None:
    """8 writers x 10 commands: every commit is covered by a NOTIFY sent after it, with
    fewer NOTIFYs than commits (that is the point: the relay wakes once per burst)."""
    notify.configure(wiring.engine, "after-commit")
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for k in range(10):
                execute(CreateProduct(sku=f"B-{n}-{k}", name="Burst", price="1.00"), sf)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    notifier = notify.notifier_for(wiring.engine)
    assert notifier is not None
    assert notify.flush(wiring.engine, timeout=10)
    assert 1 <= notifier.sent < 80
    assert notifier.failures == 0
    assert notifier._active == 0  # every unit of work left, whatever its outcome


@pytest.mark.parametrize("background", [True, False])
def test_an_unreachable_server_neither_fails_nor_hangs(background: bool) -> None:
    """The wake-up is best effort (the relay polls): a NOTIFY that cannot be sent is
    counted and dropped, `flush()` returns within its bound."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    notifier = notify.Notifier(
        f"postgresql://postgres@127.0.0.1:{port}/none", background=background
    )
    started = time.monotonic()
    for _ in range(3):
        notifier.poke()
    assert notifier.flush(timeout=10)
    assert time.monotonic() - started < 10
    assert notifier.failures >= 1 and notifier.sent == 0
    notifier.close()


def test_bad_mode_is_refused(wiring: Wiring) -> None:
    with pytest.raises(ValueError, match="commit notify mode must be one of"):
        notify.configure(wiring.engine, "sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Settings(commit_notify="sometimes")  # type: ignore[arg-type]


def test_the_cli_sends_its_wake_up_before_exiting(wiring: Wiring, settings: Settings) -> None:
    env = settings_env(settings)
    env.update(CQRS_COMMIT_NOTIFY="after-commit", CQRS_PUBLISH_ON_COMMIT="false")
    with _listener(wiring) as listener:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "cqrs.app",
                "product",
                "create",
                "--sku",
                "CLI-1",
                "--name",
                "Cli",
                "--price",
                "1.00",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        received = list(listener.notifies(timeout=10, stop_after=1))
    assert [n.channel for n in received] == [NOTIFY_CHANNEL]
