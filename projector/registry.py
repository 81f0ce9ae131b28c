"""Every projection the system runs: the entry points of the group `cqrs.projections`.

The three built-in projections are registered in this project's pyproject.toml exactly as
a plugin registers its own (examples/sales-by-day), and loaded through the kernel's one
loader (`cqrs.contracts.load_registered`), which the query side uses for the contracts.
Each entry point must name a `Projection` carrying its contract; anything else, or a
projection that lacks a part, stops the process at start with the projection's name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from importlib.metadata import EntryPoint

from cqrs.contracts import ContractError, Registered, load_registered, registered
from cqrs.projector.projection import Projection


def projections_of(loaded: dict[str, Registered]) -> dict[str, Projection]:
    """The `Projection` of each loaded entry point, checked."""
    out: dict[str, Projection] = {}
    for name, entry in loaded.items():
        projection = entry.value
        if not isinstance(projection, Projection):
            raise ContractError(
                f"projection {name!r}: the entry point must name a Projection (contract and "
                f"handlers), not {type(projection).__name__}"
            )
        if projection.contract is None:
            raise ContractError(f"projection {name!r}: registered without a contract")
        out[name] = projection
    return out


def load_projections(points: Iterable[EntryPoint] | None = None) -> dict[str, Projection]:
    """{name: Projection} of `points` (default: every installed entry point)."""
    return projections_of(registered() if points is None else load_registered(points))


class _Registered(Mapping[str, Projection]):
    """{name: Projection}, loaded on first use rather than at import: importing the CLI or
    a module that names the registry starts nothing, and a plugin that lacks a part fails
    the first command that needs the projections, as one error naming it."""

    def __init__(self) -> None:
        self._loaded: dict[str, Projection] | None = None

    def _all(self) -> dict[str, Projection]:
        if self._loaded is None:
            self._loaded = load_projections()
        return self._loaded

    def __getitem__(self, name: str) -> Projection:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return f"PROJECTIONS({list(self)!r})"


PROJECTIONS: Mapping[str, Projection] = _Registered()
