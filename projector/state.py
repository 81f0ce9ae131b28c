"""Which generation of a projection's views is live, and whether it must be (re)built.

`<ns>:state:<projection>` records the live generation and the projection version that
built it; `<ns>:gen:<projection>` repeats the generation for queries (one GET in their
pipeline). A projection whose state is missing (never built, or Redis lost its data) or
whose recorded version differs from the code's must be built from history before live
workers touch it.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from cqrs.keys import KeyMap


@dataclass(frozen=True)
class ProjectionState:
    generation: int
    version: int


def read_state(client: redis.Redis, keys: KeyMap, projection: str) -> ProjectionState | None:
    data = client.hgetall(keys.projection_state(projection))
    if not data.get("generation"):
        return None
    return ProjectionState(int(data["generation"]), int(data.get("version", 0)))


def live_generation(client: redis.Redis, keys: KeyMap, projection: str) -> int:
    """0 when the projection has no live views."""
    return int(client.get(keys.generation(projection)) or 0)


def write_state(client: redis.Redis, keys: KeyMap, projection: str, state: ProjectionState) -> None:
    """The switch to a new generation. The generation key is the one queries read, so it is
    written last: from that SET on, every query sees only the new, complete views."""
    client.hset(
        keys.projection_state(projection),
        mapping={"generation": state.generation, "version": state.version},
    )
    client.set(keys.generation(projection), state.generation)
