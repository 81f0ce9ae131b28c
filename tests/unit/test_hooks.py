"""`cqrs.hooks`: how the composition hands one side's service to another (no I/O)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from cqrs import hooks as hooks_module
from cqrs.hooks import hooks


def test_the_composition_hands_over_publish_pending_and_ensure_schema(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hooks, "publish_pending", None)
    monkeypatch.setattr(hooks, "ensure_schema", None)
    from cqrs.app.cli import install_hooks
    from cqrs.commands.migrations import ensure_schema
    from cqrs.relay import publish_pending

    install_hooks()
    assert hooks.publish_pending is publish_pending
    assert hooks.ensure_schema is ensure_schema


def test_publish_after_commit_goes_through_the_hook_and_never_fails_the_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cqrs.commands.cli import _publish_now

    wiring = SimpleNamespace(database_url="postgresql://x", redis=object(), settings=object())
    monkeypatch.setattr(hooks, "publish_pending", None)
    _publish_now(wiring)  # type: ignore[arg-type]  # unset: the running relay publishes

    calls: list[tuple[Any, ...]] = []
    hooks_module.install(publish_pending=lambda *args: calls.append(args) or 1)
    _publish_now(wiring)  # type: ignore[arg-type]
    assert calls == [(wiring.database_url, wiring.redis, wiring.settings)]

    def broken(*_args: Any) -> int:
        raise ConnectionError("redis went away")

    hooks_module.install(publish_pending=broken)
    _publish_now(wiring)  # type: ignore[arg-type]  # logged at DEBUG, the command succeeded


def test_the_relay_creates_the_schema_only_through_the_hook(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cqrs.relay.cli import ensure_schema

    wiring = SimpleNamespace(engine=object())
    monkeypatch.setattr(hooks, "ensure_schema", None)
    ensure_schema(wiring)  # type: ignore[arg-type]  # unset: nothing to do, nothing fails
    seen: list[object] = []
    monkeypatch.setattr(hooks, "ensure_schema", seen.append)
    ensure_schema(wiring)  # type: ignore[arg-type]
    assert seen == [wiring.engine]
