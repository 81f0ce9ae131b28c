"""Helpers for the operations tests: subprocesses we start and always kill (by PID),
private redis-server processes on free loopback ports, free ports."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import wait_until


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Every subprocess a test starts; `close()` (in a finally) resumes and kills each one
    still running, by its PID."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"{name}-{len(self.started)}.log"
        with log.open("ab") as out:  # a file, never a pipe nobody reads
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.started.append((proc, log))
        return proc

    def cqrs(self, name: str, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        return self.start(name, [sys.executable, "-m", "cqrs.app", *args], env)

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        for p, log in self.started:
            if p is proc:
                return log.read_text(errors="replace")
        return ""

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name} ---\n{log.read_text(errors='replace')[-2000:]}"
            for _p, log in self.started
        )

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        """SIGTERM (the loops finish their batch and exit 0), SIGKILL if it lingers."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def close(self) -> None:
        for proc, _log in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)  # a frozen process cannot die otherwise
                    proc.kill()
        for proc, _log in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@contextlib.contextmanager
def processes(log_dir: Path) -> Iterator[Processes]:
    procs = Processes(log_dir)
    try:
        yield procs
    finally:
        procs.close()


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
    procs: Processes,
    tmp: Path,
    *extra: str,
    url_auth: str = "",
    tls: tuple[Path, Path] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """A private Redis on a free loopback port, persistence off, plus `extra` options;
    returns (process, URL with `url_auth` as `user:password@` part). With `tls`
    (certificate, key) it listens only for TLS and the URL is `rediss://`. Waits until it
    answers a PING through that URL."""
    binary = redis_server_binary()
    for _attempt in range(3):
        port = free_port()
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

        def answers(proc: subprocess.Popen[bytes] = proc, url: str = url) -> bool:
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


def cli(*args: str, env: dict[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cqrs.app", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_json(*args: str, env: dict[str, str]) -> tuple[int, Any, str]:
    """(exit code, parsed stdout, stderr) of a `--json` command."""
    result = cli(*args, "--json", env=env)
    try:
        data = json.loads(result.stdout) if result.stdout.strip() else None
    except json.JSONDecodeError as exc:
        raise AssertionError(f"not JSON: {result.stdout!r} / {result.stderr!r}") from exc
    return result.returncode, data, result.stderr


def cli_parallel(
    *calls: tuple[tuple[str, ...], dict[str, str]], timeout: float = 60.0
) -> list[subprocess.CompletedProcess[str]]:
    """Run several `cqrs` commands at once (each pays the interpreter start-up; they do
    not depend on each other); results in the order given."""
    running = [
        subprocess.Popen(
            [sys.executable, "-m", "cqrs.app", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, env in calls
    ]
    results = []
    try:
        for proc, (args, _env) in zip(running, calls, strict=True):
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    finally:
        for proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    return results
