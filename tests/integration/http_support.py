"""A real `cqrs serve` for the HTTP tests: a subprocess on a free loopback port.

The server is started before a test builds its data and only waited for at the first
request, so its start-up overlaps the writes.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from cqrs.settings import Settings
from tests.conftest import settings_env
from tests.helpers import cqrs_argv, free_port, wait_until

START_TIMEOUT = 60.0  # a cold interpreter importing FastAPI on a busy CI machine


class ApiServer:
    """`cqrs serve` in a subprocess; `get` waits (with a deadline) for it on first use."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log_path = env, log
        self._ready = False
        self._start()

    def _start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cqrs_argv("serve", "--port", str(self.port)),
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=45.0, trust_env=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            self.client.get("/healthz", timeout=2.0)  # 200 or 503: either way it serves
            return True
        except httpx.TransportError:
            return False

    def wait_ready(self) -> None:
        if self._ready:
            return
        for _attempt in range(3):
            try:
                wait_until(self._answers, timeout=START_TIMEOUT, what=f"{self.url}/healthz")
                self._ready = True
                return
            except RuntimeError:
                if "address already in use" not in self.log().lower():
                    raise
                self.close()  # someone took the port between probe and bind: new port
                self._start()
        raise RuntimeError(f"server never bound a free port:\n{self.log()}")

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        self.wait_ready()
        return self.client.get(path, **kwargs)

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()


def api_servers(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    """The body of each test module's `start_api` fixture: `start(**env_overrides)`
    starts a server with the test's settings; every server is stopped afterwards."""
    servers: list[ApiServer] = []

    def start(**overrides: str) -> ApiServer:
        env = settings_env(settings) | overrides
        server = ApiServer(env, tmp_path / f"server-{len(servers)}.log")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
