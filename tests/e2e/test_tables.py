"""Tables on a pipe at 80 columns (CI, `docker logs`, `| less`): ids are whole, headers
are whole (issue 13, item 4), and `dlq list` covers every projection by default with one
JSON shape for lists (items 7, 8)."""

from __future__ import annotations

import json

import redis

from cqrs.keys import KeyMap
from cqrs.projector.deadletters import dead_letter_fields
from cqrs.projector.registry import PROJECTIONS
from cqrs.settings import Settings
from tests.helpers import run_cli

LONG_ERROR = "handler failed: " + "x" * 150


def file_dead_letter(settings: Settings, projection: str) -> str:
    """A dead letter as a worker files it, written straight to the dead-letter stream."""
    client = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    keys = KeyMap(settings.namespace)
    fields = {"type": "ProductCreated", "event_id": "bcf34f62-31c3-4285-9d33-0123456789ab"}
    entry = dead_letter_fields(projection, keys.stream(0), "1-1", fields, LONG_ERROR, 5)
    try:
        return client.xadd(keys.dead_letters(projection), entry)
    finally:
        client.close()


def test_status_on_a_pipe_at_80_columns_keeps_headers_and_names_whole(
    cli_env: dict[str, str],
) -> None:
    env = {**cli_env, "COLUMNS": "80"}
    assert run_cli("run", "--drain", env=env).returncode == 0
    result = run_cli("status", env=env)
    assert result.returncode == 0, result.stderr
    for header in ("projection", "state", "pending", "last applied", "workers", "dlq"):
        assert header in result.stdout, result.stdout
    assert "…" not in result.stdout and "..." not in result.stdout


def test_dlq_list_defaults_to_every_projection_with_whole_ids(
    settings: Settings, cli_env: dict[str, str]
) -> None:
    ids = {name: file_dead_letter(settings, name) for name in ("products", "orders")}
    env = {**cli_env, "COLUMNS": "80"}
    result = run_cli("dlq", "list", env=env)
    assert result.returncode == 0, result.stderr
    for name, dlq_id in ids.items():
        assert name in result.stdout
        assert dlq_id in result.stdout
    assert LONG_ERROR in result.stdout  # the whole row, not folded or cut at 80 columns
    assert "…" not in result.stdout
    assert f"2 dead letter(s) in {len(PROJECTIONS)} projections" in result.stdout

    listed = json.loads(run_cli("dlq", "list", "--json", env=env).stdout)
    assert set(listed) == {"items", "next_cursor"} and listed["next_cursor"] is None
    assert {(d["projection"], d["id"]) for d in listed["items"]} == set(
        (name, dlq_id) for name, dlq_id in ids.items()
    )
    only = json.loads(run_cli("dlq", "list", "-p", "orders", "--json", env=env).stdout)
    assert [d["id"] for d in only["items"]] == [ids["orders"]]
    empty = json.loads(run_cli("dlq", "list", "-p", "customers", "--json", env=env).stdout)
    assert empty == {"items": [], "next_cursor": None}
