"""The example's tests run against real PostgreSQL and Redis with the project's own test
fixtures (tests/conftest.py of the repository this example lives in): a database and a
Redis namespace of each test's own. Installed elsewhere, without that repository, they
have nothing to run against and are skipped."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
if (REPO / "tests" / "conftest.py").exists() and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

try:
    from tests.conftest import backend, cli_env, database_url, settings, wiring
except ImportError:  # outside the repository: the test module skips itself
    pass
else:
    __all__ = ["backend", "cli_env", "database_url", "settings", "wiring"]
