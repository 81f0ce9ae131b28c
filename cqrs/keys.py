"""The Redis key map: the only place where key names are formatted.

Layout rules (docs/keys.md has the table; the view keys of each projection are listed by
its view contract, `cqrs.contracts`):
- every key starts with the namespace;
- keys a Lua script or MULTI touches together share one hash tag (`{...}`), so every
  multi-key step stays in one Redis Cluster slot;
- user-supplied text (names, SKUs) never appears in a key: keys carry UUIDs, partition
  numbers and projection names only, so no input can change which keys are touched.
"""

from __future__ import annotations

import hashlib
from typing import Any
from uuid import UUID


def partition_of(partition_key: UUID, partitions: int) -> int:
    """Stable partition for a key: the same in every process and Python version
    (the builtin `hash` is salted per process, so it cannot be used)."""
    digest = hashlib.blake2b(partition_key.bytes, digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


class KeyMap:
    """Keys of one namespace; projection view keys come from `views()`."""

    def __init__(self, namespace: str) -> None:
        self.ns = namespace

    # --- transport -------------------------------------------------------------------
    def stream(self, partition: int) -> str:
        return f"{self.ns}:stream:{{p{partition}}}"

    def stream_pattern(self) -> str:
        return f"{self.ns}:stream:*"

    def meta(self) -> str:
        """Stream metadata (partition count) fixed when the first event is relayed."""
        return f"{self.ns}:meta"

    def relay_wakeup_channel(self) -> str:
        return f"{self.ns}:relay"

    def relay_mark(self, partition: int) -> str:
        """Hash: partition count -> the highest event-log position the relay appended to
        the partition's stream. Tagged like the stream, so the script that appends writes
        it in the same step and a replica receives both or neither; compared with the
        mark PostgreSQL keeps (`events.relay_marks`) to find entries a failover lost."""
        return f"{self.ns}:relayed:{{p{partition}}}"

    # --- projector -------------------------------------------------------------------
    def dead_letters(self, projection: str) -> str:
        return f"{self.ns}:dlq:{{{projection}}}"

    def lease(self, projection: str, partition: int) -> str:
        return f"{self.ns}:lease:{projection}:{{p{partition}}}"

    def workers(self, projection: str) -> str:
        return f"{self.ns}:workers:{projection}"

    def progress(self, projection: str) -> str:
        """Hash: position (event log) and time (ms) of the last batch a worker acknowledged
        for the projection, written after every acknowledged batch (for `cqrs status`)."""
        return f"{self.ns}:progress:{projection}"

    def generation(self, projection: str) -> str:
        """The live generation number (queries read it with every view)."""
        return f"{self.ns}:gen:{projection}"

    def projection_state(self, projection: str) -> str:
        """Hash: generation and projection version of the live views; missing = no views."""
        return f"{self.ns}:state:{projection}"

    def generation_counter(self, projection: str) -> str:
        return f"{self.ns}:gen-next:{projection}"

    def replay_lock(self, projection: str) -> str:
        return f"{self.ns}:replay:{projection}"

    def pause(self, projection: str) -> str:
        """Set while a replay switches generations: live workers leave the projection."""
        return f"{self.ns}:pause:{projection}"

    def projection_pattern(self, projection: str) -> str:
        """Every view key of every generation of a projection."""
        return f"{self.ns}:{projection}:g*"

    def repair(self, projection: str) -> str:
        """Set when a Redis master's data history changed (failover, restart without
        persistence): the projection's views may miss acknowledged updates and are
        rebuilt from the log; the value says which change, so only that rebuild clears it."""
        return f"{self.ns}:repair:{projection}"

    def applied_channel(self) -> str:
        """Pub/sub channel the projector publishes to after each batch (wakes waiters)."""
        return f"{self.ns}:applied"

    def views(self, projection: str, generation: int) -> Any:
        """The keys of one generation of a projection's views, with the key builders of
        its contract's layout (generic `ViewKeys` for a projection none registered)."""
        return _LAYOUTS.get(projection, ViewKeys)(self.ns, projection, generation)

    def namespace_pattern(self) -> str:
        return f"{self.ns}:*"


class ViewKeys:
    """Keys of one projection generation. A rebuild writes a new generation beside the live
    one, so every view key carries the generation."""

    def __init__(self, namespace: str, projection: str, generation: int) -> None:
        self.prefix = f"{namespace}:{projection}:g{generation}"

    def pattern(self) -> str:
        return f"{self.prefix}:*"

    # --- the generic builders every contract's key layout is made of -----------------
    def tagged(self, kind: str, tag: UUID | str) -> str:
        """A key of one aggregate (or other unit) of the view: `<prefix>:<kind>:{<tag>}`.
        Keys a step touches together share `tag`, so the step stays in one cluster slot.
        `tag` must come from the code (an id, a validated date), never from user text."""
        return f"{self.prefix}:{kind}:{{{tag}}}"

    def index(self, kind: str, tag: str) -> str:
        """A key of the whole generation (an index), tagged by the index it belongs to:
        an index and its bookkeeping share `tag` and so one slot."""
        return f"{self.prefix}:{kind}:{{{self.prefix}:{tag}}}"


# The key layout each registered view contract names (`ViewContract.layout`): a subclass
# of ViewKeys with the projection's own key builders, registered when the contract is
# built. The kernel keeps only the generic builders above.
_LAYOUTS: dict[str, type[ViewKeys]] = {}


def register_layout(projection: str, layout: type[ViewKeys]) -> None:
    _LAYOUTS[projection] = layout
