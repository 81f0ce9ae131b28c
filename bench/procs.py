"""Consumer processes for the projection and rebuild scenarios, and how they are timed.

The project's workers and the hand-written ceiling loops run the same way: persistent
spawned processes that, for each round, set up (connect, build a worker), report ready,
wait for "go", consume until told to stop, and send back what they know (RSS, counters).
The parent starts the clock at "go" and stops it when every consumer group has read its
whole stream with nothing pending, so process start-up is never timed and both sides are
measured by the same watch. Processes are reused across rounds (spawning costs a second).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from bench.ceilings import Pipes
from cqrs.streams import parse_entry_id

_CTX = mp.get_context("spawn")


@dataclass
class Timed:
    seconds: float
    reports: list[dict[str, Any]]


def groups_done(client: redis.Redis, streams: list[str], groups: list[str]) -> bool:
    """Every group on every stream has delivered the last entry and has nothing pending."""
    pipes = Pipes(client)
    for stream in streams:
        pipes.on(stream).xinfo_groups(stream)
        pipes.on(stream).xinfo_stream(stream)
    results = pipes.execute(raise_on_error=False)
    for i in range(len(streams)):
        infos, stream_info = results[2 * i], results[2 * i + 1]
        if isinstance(stream_info, Exception):
            continue
        last = parse_entry_id(stream_info["last-generated-id"])
        found = {g["name"]: g for g in infos} if not isinstance(infos, Exception) else {}
        for group in groups:
            g = found.get(group)
            if g is None or g["pending"] or parse_entry_id(g["last-delivered-id"]) < last:
                return False
    return True


def reset_groups(client: redis.Redis, streams: list[str], groups: list[str]) -> None:
    """Fresh consumer groups at the start of every stream."""
    pipes = Pipes(client)
    for stream in streams:
        for group in groups:
            pipes.on(stream).xgroup_destroy(stream, group)
    pipes.execute(raise_on_error=False)
    pipes = Pipes(client)
    for stream in streams:
        for group in groups:
            pipes.on(stream).xgroup_create(stream, group, id="0", mkstream=True)
    pipes.execute()


def _child(index: int, commands: Any, results: Any, go: Any, stop: Any, inbox: Any) -> None:
    """Run rounds until told to quit: (module:function, args) -> report dict.
    The function is called as fn(*args, ready=callable, go=Event, stop=Event, inbox=Queue);
    `inbox` is one queue shared by the pool (the parent or a sibling may feed it)."""
    while True:
        command = commands.get()
        if command is None:
            return
        target, args = command
        module, _, name = target.partition(":")
        fn = getattr(importlib.import_module(module), name)
        try:
            report = fn(
                *args,
                ready=lambda: results.put(("ready", index, None)),
                go=go,
                stop=stop,
                inbox=inbox,
            )
        except BaseException as exc:
            results.put(("error", index, f"{type(exc).__name__}: {exc}"))
            raise
        results.put(("done", index, report or {}))


class ConsumerPool:
    """N persistent processes that run timed rounds together."""

    def __init__(self, processes: int) -> None:
        self.go, self.stop = _CTX.Event(), _CTX.Event()
        self.results: Any = _CTX.Queue()
        self.inbox: Any = _CTX.Queue()
        self.commands = [_CTX.Queue() for _ in range(processes)]
        self._running = 0
        self.procs = [
            _CTX.Process(
                target=_child,
                args=(i, q, self.results, self.go, self.stop, self.inbox),
                daemon=True,
            )
            for i, q in enumerate(self.commands)
        ]
        for p in self.procs:
            p.start()

    def __enter__(self) -> ConsumerPool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _collect(self, kind: str, n: int, timeout: float) -> list[Any]:
        got: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            try:
                what, index, value = self.results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                dead = [i for i, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"consumer process {dead[0]} died") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"consumer processes did not report {kind}") from None
                continue
            if what == "error":
                raise RuntimeError(f"consumer process {index} failed: {value}")
            if what == kind:
                got.append(value)
        return got

    def begin(self, target: str | list[str], per_process_args: list[tuple[Any, ...]]) -> float:
        """Start a round in the first len(per_process_args) processes (`target` is one
        function for all, or one per process); returns the instant "go" was given, once
        all of them reported ready."""
        targets = target if isinstance(target, list) else [target] * len(per_process_args)
        self._running = len(per_process_args)
        self.go.clear()
        self.stop.clear()
        for queue_, fn, args in zip(self.commands, targets, per_process_args, strict=False):
            queue_.put((fn, args))
        self._collect("ready", self._running, 120)
        started = time.perf_counter()
        self.go.set()
        return started

    def collect(self, n: int, timeout: float = 3600) -> list[dict[str, Any]]:
        """Reports of the next n processes that finish on their own."""
        reports = self._collect("done", n, timeout)
        self._running -= n
        return reports

    def end(self) -> list[dict[str, Any]]:
        """Stop the round; the reports of its processes still running."""
        self.stop.set()
        reports = self._collect("done", self._running, 120)
        self._running = 0
        return reports

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs[: self._running])

    def round(
        self,
        target: str,
        per_process_args: list[tuple[Any, ...]],
        client: redis.Redis,
        streams: list[str],
        groups: list[str],
        *,
        timeout: float = 3600.0,
        poll: float = 0.01,
        tick: Callable[[], object] | None = None,
    ) -> Timed:
        """Run `target` until every group caught up with every stream; time go -> then.
        `tick` runs at every poll (the projection scenario publishes the relay's wake-up
        there, as a relay adding the entries would have)."""
        started = self.begin(target, per_process_args)
        try:
            while not groups_done(client, streams, groups):
                if tick is not None:
                    tick()
                if time.perf_counter() - started > timeout:
                    raise RuntimeError("consumers did not catch up in time")
                if not self.alive():
                    raise RuntimeError("a consumer process died")
                time.sleep(poll)
            seconds = time.perf_counter() - started
        finally:
            self.stop.set()
        return Timed(seconds, self.end())

    def close(self) -> None:
        self.stop.set()
        self.go.set()
        for queue_ in self.commands:
            queue_.put(None)
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
