"""View contracts: everything about one projection's views, said once, and their registry.

A projection's views are read by several parts that must agree: the projector writes the
keys, the query side reads them and waits on what was applied (read-your-writes), `cqrs
verify` recomputes them from PostgreSQL, `cqrs replay`/`status` name them and docs/keys.md
describes them. A `ViewContract` holds each of those facts once, and every one of those
parts derives from the registered contracts instead of keeping its own list.

Where contracts come from: the entry-point group `cqrs.projections`. Each entry point is
named after its projection and points at an object that *is* a `ViewContract` or carries
one as `.contract` (the projector's `Projection`: contract + handlers). The three built-in
projections are registered exactly like a plugin, in this project's pyproject.toml; the
`examples/sales-by-day` package registers a fourth from outside. The query side gets
contracts only through `registered_contracts()`, so it never imports the projector by
name (the kernel holds only this generic machinery; each contract lives beside its
projection's handlers).

A contract that lacks a part is refused when it is built (`ContractError`, naming the
projection and the part), so a forgotten read-your-writes rule or verify expectation
fails at start-up instead of silently skipping the view at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from cqrs.keys import ViewKeys, register_layout

if TYPE_CHECKING:  # verify hands contracts a psycopg connection; nothing here opens one
    import psycopg

ENTRY_POINT_GROUP = "cqrs.projections"
# A projection name becomes part of every key and of CLI and URL paths.
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


class ContractError(ValueError):
    """A projection whose contract or registration is incomplete or inconsistent."""


class ViewModel(BaseModel):
    """Base of every read model: immutable, field names as the view's fields."""

    model_config = ConfigDict(frozen=True)


@dataclass(frozen=True)
class KeySpec:
    """One kind of key a projection keeps in its generation (for docs/keys.md and verify).

    `example` builds the key from a generation's `ViewKeys` with placeholder ids, so the
    documented name is the name the code formats. `view` marks a served view (verify calls
    a missing or extra one a "view", anything else a "key")."""

    kind: str
    redis_type: str
    example: Callable[[ViewKeys], str]
    tag: str
    holds: str
    view: bool = False


@dataclass(frozen=True)
class Expected:
    """The content one key should have. `kind` is its Redis type: a hash compares field by
    field, a sorted set member by member (the score), a set as a whole. Empty content
    means the key must not exist (Redis drops empty containers)."""

    view: str  # the label differences carry
    kind: str  # "hash", "zset" or "set"
    content: dict[str, Any] | set[str]


# (views of the live generation, aggregate type, aggregate id, partition key) ->
# (hash key, field) holding the last version of that aggregate the projection applied,
# or None when the projection does not follow that aggregate type.
AppliedRule = Callable[[ViewKeys, str, UUID, UUID], "tuple[str, str] | None"]
# (PostgreSQL connection, views of the live generation) -> every key the projection
# should hold in that generation, with its content.
Expectation = Callable[["psycopg.Connection", ViewKeys], dict[str, Expected]]
# (views, the KEY a reader typed) -> the view's hash key; ValueError for a malformed KEY.
ViewKeyRule = Callable[[ViewKeys, str], str]
# (view fields, hash key) -> the read model; ValueError/ValidationError if invalid.
Reader = Callable[[dict[str, str], str], BaseModel]

_PARTS = {
    "keys": "its key layout (KeySpec list)",
    "model": "its read model (a pydantic model)",
    "view_key": "the key of a view by its id (view_key)",
    "applied": "what it has applied, for read-your-writes (applied)",
    "expect": "its expectation from PostgreSQL, for verify (expect)",
}


@dataclass(frozen=True)
class ViewContract:
    """Everything about one projection's views. Every part is required; the defaults
    exist only so a missing one is reported by name (`ContractError`) rather than as a
    bare TypeError."""

    name: str
    keys: tuple[KeySpec, ...] = ()
    # The class of its key builders: `ViewKeys` with the projection's own builders added,
    # so `KeyMap.views(name, generation)` hands every caller this layout.
    layout: type[ViewKeys] = ViewKeys
    model: type[BaseModel] | None = None
    view_key: ViewKeyRule | None = None
    applied: AppliedRule | None = None
    expect: Expectation | None = None
    # How a view's fields become the model; default: `model.model_validate`.
    read: Reader | None = None
    # A view counts as present when this field is set (a hash that only bookkeeping
    # touched is not a view yet); empty: any field.
    present_field: str = "version"
    # What KEY means for `cqrs query view NAME KEY` (help texts, errors).
    key_help: str = "id"
    description: str = ""
    aggregate_types: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not self.name or not set(self.name) <= _NAME_CHARS:
            raise ContractError(
                f"projection name {self.name!r}: use lower-case letters, digits and '-'"
            )
        missing = [what for part, what in _PARTS.items() if not getattr(self, part)]
        if missing:
            raise ContractError(
                f"projection {self.name!r}: its contract lacks {'; '.join(missing)}"
            )
        if not (isinstance(self.model, type) and issubclass(self.model, BaseModel)):
            raise ContractError(f"projection {self.name!r}: model must be a pydantic model")
        for part in ("view_key", "applied", "expect"):
            if not callable(getattr(self, part)):
                raise ContractError(f"projection {self.name!r}: {part} must be callable")
        if not any(spec.view for spec in self.keys):
            raise ContractError(
                f"projection {self.name!r}: its key layout names no served view (KeySpec view=True)"
            )
        if not (isinstance(self.layout, type) and issubclass(self.layout, ViewKeys)):
            raise ContractError(f"projection {self.name!r}: layout must be a ViewKeys subclass")
        if self.layout is not ViewKeys:
            register_layout(self.name, self.layout)

    def read_view(self, data: dict[str, str], key: str) -> BaseModel:
        """The read model of a view's fields (raises ValidationError/ValueError)."""
        if self.read is not None:
            return self.read(data, key)
        assert self.model is not None  # checked at construction
        return self.model.model_validate(data)

    def present(self, data: dict[str, str]) -> bool:
        return bool(data.get(self.present_field)) if self.present_field else bool(data)

    def view_kinds(self) -> set[str]:
        return {spec.kind for spec in self.keys if spec.view}


def contract_of(name: str, value: object) -> ViewContract:
    """The contract an entry point's object carries (a ViewContract or a `.contract`)."""
    contract = value if isinstance(value, ViewContract) else getattr(value, "contract", None)
    if not isinstance(contract, ViewContract):
        raise ContractError(
            f"projection {name!r}: entry point object {value!r} is neither a ViewContract "
            "nor carries one as .contract"
        )
    if contract.name != name:
        raise ContractError(
            f"projection {name!r}: the entry point's name differs from its contract's "
            f"name {contract.name!r}"
        )
    return contract


@dataclass(frozen=True)
class Registered:
    """One loaded entry point: the object and the distribution that registered it."""

    name: str
    value: Any
    distribution: str


def load_registered(points: Iterable[EntryPoint] | None = None) -> dict[str, Registered]:
    """Load every entry point of `cqrs.projections` (or `points`), each checked.

    Built-in projections come first, then plugins, each by name, so listings and replays
    keep a stable order whatever is installed. A name two
    distributions register, an entry point that cannot be imported, and an empty registry
    are errors: each would silently drop or shadow a projection otherwise."""
    found = list(entry_points(group=ENTRY_POINT_GROUP) if points is None else points)
    loaded: dict[str, Registered] = {}
    for point in found:
        dist = point.dist.name if getattr(point, "dist", None) is not None else ""
        if point.name in loaded:
            raise ContractError(
                f"projection {point.name!r} is registered twice (by "
                f"{loaded[point.name].distribution!r} and {dist!r})"
            )
        try:
            value = point.load()
        except ContractError:
            raise  # a contract refused while its module was imported: it names itself
        except Exception as exc:
            raise ContractError(
                f"projection {point.name!r}: cannot load entry point {point.value!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        contract_of(point.name, value)
        loaded[point.name] = Registered(point.name, value, dist)
    if not loaded:
        raise ContractError(
            f"no projection is registered under the entry-point group {ENTRY_POINT_GROUP!r}: "
            "install the project (pip install -e .) so its entry points exist"
        )
    own = sorted(
        (r for r in loaded.values() if r.distribution == BUILTIN_DISTRIBUTION),
        key=lambda r: r.name,
    )
    others = sorted((r for r in loaded.values() if r not in own), key=lambda r: r.name)
    return {r.name: r for r in [*own, *others]}


BUILTIN_DISTRIBUTION = "cqrs-projector"


@cache
def _registered() -> dict[str, Registered]:
    return load_registered()


def registered() -> dict[str, Registered]:
    """The installed projections (loaded once per process; entry points do not change
    while it runs)."""
    return dict(_registered())


def registered_contracts() -> dict[str, ViewContract]:
    """{projection name: contract} of every installed projection, built-ins first."""
    return {name: contract_of(name, r.value) for name, r in _registered().items()}


def builtin_contracts(
    contracts: Mapping[str, ViewContract] | None = None,
) -> dict[str, ViewContract]:
    """The contracts this project ships (docs/keys.md documents these; plugins document
    their own keys)."""
    own = {n for n, r in _registered().items() if r.distribution == BUILTIN_DISTRIBUTION}
    source = registered_contracts() if contracts is None else contracts
    return {n: c for n, c in source.items() if n in own}


def cents(amount: object) -> int:
    """Money string/Decimal -> integer cents for the Lua money op (exact, no floats)."""
    if type(amount) is Decimal:  # a payload's Money: the same value without a text trip
        return int((amount * 100).to_integral_exact())
    return int((Decimal(str(amount)) * 100).to_integral_exact())


def money(value: object) -> str:
    """How views store money: a decimal string with two places."""
    return f"{Decimal(str(value)):.2f}"


def iso(value: Any) -> str | None:
    """How views store a moment: ISO 8601 in UTC (None stays None)."""
    from datetime import UTC

    return value.astimezone(UTC).isoformat() if value else None


def uuid_key(text: str) -> str:
    """A view id typed by a reader, as the key carries it; ValueError if not a UUID."""
    return str(UUID(text))


# --- docs/keys.md ------------------------------------------------------------------------

KEYS_DOC_BEGIN = "<!-- view keys: generated from the view contracts (python -m cqrs.contracts) -->"
KEYS_DOC_END = "<!-- end of generated view keys -->"


def key_table(contracts: Mapping[str, ViewContract]) -> str:
    """The view-key rows of docs/keys.md, from the contracts' key layouts: the names are
    the ones the key builders format (placeholders for ids and the generation)."""
    lines = [
        "| key | type | hash tag | written by | contents |",
        "|---|---|---|---|---|",
    ]
    for name, contract in contracts.items():
        views = contract.layout("<ns>", name, "<g>")  # type: ignore[arg-type]
        for spec in contract.keys:
            what = f"{spec.holds} (served view)" if spec.view else spec.holds
            lines.append(
                f"| `{spec.example(views)}` | {spec.redis_type} | {spec.tag} | {name} | {what} |"
            )
    return "\n".join(lines)


def with_key_table(document: str, contracts: Mapping[str, ViewContract]) -> str:
    """`document` with the text between the markers replaced by `key_table`."""
    head, begin, rest = document.partition(KEYS_DOC_BEGIN)
    _old, end, tail = rest.partition(KEYS_DOC_END)
    if not begin or not end:
        raise ValueError("the key map document lacks the generated-section markers")
    return f"{head}{KEYS_DOC_BEGIN}\n{key_table(contracts)}\n{KEYS_DOC_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """`python -m cqrs.contracts [PATH]`: rewrite the generated table of docs/keys.md
    (default PATH) from the built-in contracts."""
    import sys
    from pathlib import Path

    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "docs/keys.md")
    path.write_text(with_key_table(path.read_text(), builtin_contracts()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    # Through the imported module: run as __main__ this file is a second copy, whose
    # ViewContract class is not the one the registered contracts are built from.
    from cqrs.contracts import main as _main

    raise SystemExit(_main())
