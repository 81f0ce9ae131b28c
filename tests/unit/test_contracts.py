"""View contracts and the projection registry: a projection that lacks a part is refused
at registration with its name and the part; the registry loads entry points; docs/keys.md
is the table the contracts generate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cqrs.contracts import (
    ContractError,
    KeySpec,
    ViewContract,
    ViewModel,
    builtin_contracts,
    key_table,
    load_registered,
    registered_contracts,
    with_key_table,
)
from cqrs.projector.projection import Projection
from cqrs.projector.registry import PROJECTIONS, load_projections

REPO = Path(__file__).resolve().parents[2]


class DemoView(ViewModel):
    day: str


def _parts(**overrides: Any) -> dict[str, Any]:
    parts: dict[str, Any] = {
        "name": "demo",
        "keys": (KeySpec("day", "hash", lambda v: v.tagged("day", "<d>"), "d", "x", view=True),),
        "model": DemoView,
        "view_key": lambda views, key: views.tagged("day", key),
        "applied": lambda views, kind, aggregate_id, partition: None,
        "expect": lambda conn, views: {},
    }
    return {**parts, **overrides}


@pytest.mark.parametrize(
    ("missing", "said"),
    [
        ("applied", "read-your-writes"),
        ("expect", "for verify"),
        ("model", "read model"),
        ("keys", "key layout"),
        ("view_key", "view_key"),
    ],
)
def test_a_contract_lacking_a_part_is_refused_naming_projection_and_part(
    missing: str, said: str
) -> None:
    with pytest.raises(ContractError) as info:
        ViewContract(**_parts(**{missing: None if missing != "keys" else ()}))
    assert "projection 'demo'" in str(info.value)
    assert said in str(info.value)


def test_a_contract_without_a_served_view_or_with_a_bad_name_is_refused() -> None:
    spec = KeySpec("day", "hash", lambda v: v.tagged("day", "<d>"), "d", "x")
    with pytest.raises(ContractError, match="names no served view"):
        ViewContract(**_parts(keys=(spec,)))
    with pytest.raises(ContractError, match="lower-case"):
        ViewContract(**_parts(name="Demo View"))


def test_a_projection_is_checked_when_built() -> None:
    contract = ViewContract(**_parts())
    with pytest.raises(ContractError, match="projection 'other': its contract is named 'demo'"):
        Projection(name="other", version=1, handlers={"OrderPlaced": print}, contract=contract)
    with pytest.raises(ContractError, match="projection 'demo': it has no handlers"):
        Projection(name="demo", version=1, handlers={}, contract=contract)
    with pytest.raises(ContractError, match="unknown event types"):
        Projection(name="demo", version=1, handlers={"OrderLost": print}, contract=contract)


@dataclass
class FakeEntryPoint:
    """What `importlib.metadata.EntryPoint` offers the loader: a name, a value, load()."""

    name: str
    loaded: Any
    value: str = "fake.module:OBJECT"
    dist: Any = None

    def load(self) -> Any:
        if isinstance(self.loaded, Exception):
            raise self.loaded
        return self.loaded


def test_the_registry_refuses_what_is_not_a_registered_projection() -> None:
    contract = ViewContract(**_parts())
    bare = Projection(name="demo", version=1, handlers={"OrderPlaced": print})
    with pytest.raises(ContractError, match="projection 'demo': entry point object"):
        load_projections([FakeEntryPoint("demo", object())])
    with pytest.raises(ContractError, match="projection 'demo': entry point object"):
        load_projections([FakeEntryPoint("demo", bare)])  # a Projection without a contract
    with pytest.raises(ContractError, match="must name a Projection"):
        load_projections([FakeEntryPoint("demo", _Carrier(bare, contract))])
    with pytest.raises(ContractError, match="must name a Projection"):
        load_projections([FakeEntryPoint("demo", contract)])
    with pytest.raises(ContractError, match="differs from its contract's name"):
        load_registered([FakeEntryPoint("sales", contract)])
    with pytest.raises(ContractError, match="cannot load entry point"):
        load_registered([FakeEntryPoint("demo", ImportError("no module named fake"))])
    with pytest.raises(ContractError, match="registered twice"):
        load_registered([FakeEntryPoint("demo", contract), FakeEntryPoint("demo", contract)])
    with pytest.raises(ContractError, match="no projection is registered"):
        load_registered([])


@dataclass
class _Carrier:
    """A Projection-like object without a contract, but carrying one for the kernel."""

    projection: Projection
    contract: ViewContract


def test_the_registry_loads_a_complete_projection() -> None:
    contract = ViewContract(**_parts())
    demo = Projection(name="demo", version=1, handlers={"OrderPlaced": print}, contract=contract)
    assert load_projections([FakeEntryPoint("demo", demo)]) == {"demo": demo}


def test_the_built_in_projections_are_registered_through_entry_points() -> None:
    contracts = registered_contracts()
    assert list(contracts)[:3] == ["customers", "orders", "products"]
    assert set(PROJECTIONS) == set(contracts)
    assert all(PROJECTIONS[n].contract is c for n, c in contracts.items())
    assert list(builtin_contracts()) == ["customers", "orders", "products"]


def test_docs_keys_md_is_the_table_the_contracts_generate() -> None:
    path = REPO / "docs" / "keys.md"
    document = path.read_text()
    assert with_key_table(document, builtin_contracts()) == document, (
        "docs/keys.md is out of date: run `python -m cqrs.contracts docs/keys.md`"
    )
    assert "`<ns>:orders:g<g>:order:{<id>}`" in key_table(builtin_contracts())
