"""The README's main job: `cqrs demo` on a fresh CQRS_HOME with the embedded servers."""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers import run_cli


def test_demo_on_fresh_embedded_servers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRS_")}
    env |= {"CQRS_HOME": str(tmp_path / "home"), "COLUMNS": "160"}
    try:
        first = run_cli("demo", env=env, timeout=300)
        assert first.returncode == 0, first.stderr[-2000:]
        for expected in (
            "20 products, 5 customers, 30 orders",
            "catalog by price",
            "their orders, newest first",
            "top products by units sold",
            "(renamed)",
            "demo done",
        ):
            assert expected in first.stdout, expected
        # Safe to run twice: fresh ids and SKUs, no duplicate-SKU rejection.
        second = run_cli("demo", env=env, timeout=300)
        assert second.returncode == 0, second.stderr[-2000:]
        verify = run_cli("verify", env=env, timeout=120)
        assert verify.returncode == 0, verify.stdout[-2000:]
    finally:
        down = run_cli("down", env=env, timeout=120)
        assert down.returncode == 0, down.stderr
