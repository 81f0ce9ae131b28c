"""Helpers for the operations tests: private redis-server processes on free loopback ports
(started through the test's `tests.procs.Fleet`, so they are always killed) and a
self-signed certificate for TLS."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import redis

from tests.helpers import free_port, wait_until
from tests.procs import Fleet, Proc


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if not found:
        pytest.skip("no redis-server or valkey-server on PATH")
    return found


def self_signed_certificate(tmp: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("no openssl CLI to make a test certificate")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def start_redis(
    procs: Fleet,
    tmp: Path,
    *extra: str,
    url_auth: str = "",
    tls: tuple[Path, Path] | None = None,
    port: int | None = None,
) -> tuple[Proc, str]:
    """A private Redis on a free loopback port (or exactly `port`, e.g. the one processes
    are already waiting for), persistence off, plus `extra` options; returns (process,
    URL with `url_auth` as `user:password@` part). With `tls` (certificate, key) it
    listens only for TLS and the URL is `rediss://`. Waits until it answers a PING
    through that URL."""
    binary = redis_server_binary()
    fixed = port
    for _attempt in range(1 if fixed else 3):
        port = fixed or free_port()
        workdir = tmp / f"redis-{port}"
        workdir.mkdir()
        listen = ["--port", str(port)]
        url = f"redis://{url_auth}127.0.0.1:{port}/0"
        if tls:
            cert, key = tls
            listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert)]
            listen += ["--tls-key-file", str(key), "--tls-ca-cert-file", str(cert)]
            listen += ["--tls-auth-clients", "no"]
            url = f"rediss://{url_auth}127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        proc = procs.start(
            f"redis-{port}",
            [
                binary,
                *listen,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(workdir),
                *extra,
            ],
            os.environ.copy(),
        )

        def answers(proc: Proc = proc, url: str = url) -> bool:
            if proc.poll() is not None:
                return True  # exited: reported below
            client = redis.Redis.from_url(url, socket_connect_timeout=1)
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False
            finally:
                client.close()

        wait_until(answers, timeout=20, what=f"redis-server on {port}")
        if proc.poll() is None:
            return proc, url
        if "Address already in use" not in procs.log_of(proc):
            raise RuntimeError(f"redis-server exited:\n{procs.log_of(proc)}")
    raise RuntimeError("no free port for redis-server")
