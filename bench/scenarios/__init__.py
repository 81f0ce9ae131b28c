"""The benchmark scenarios, in the order they run. Each module has `run(ctx) -> rows`."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.backend import BenchBackend
from bench.stats import Row

SCENARIOS = ("commands", "relay", "projection", "e2e", "queries", "rebuild", "memory")
# Run only when named: `cluster` starts a Redis Cluster of its own (bench.scenarios.cluster).
OPT_IN = ("cluster",)
ALIASES = {"end-to-end": "e2e", "end_to_end": "e2e", "query": "queries", "replay": "rebuild"}


@dataclass
class Context:
    backend: BenchBackend
    quick: bool = False
    repeat: int = 3
    # Figures one scenario leaves for another (rebuild compares with live projection).
    figures: dict[str, Any] = field(default_factory=dict)
    say: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True)

    def size(self, quick: int, full: int) -> int:
        return quick if self.quick else full


def runner(name: str) -> Callable[[Context], list[Row]]:
    module = importlib.import_module(f"bench.scenarios.{name}")
    return module.run
