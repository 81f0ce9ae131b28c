"""docs/settings.md is generated from the settings model and must match it (issue 13,
item 6): a new or changed setting fails here until the table is regenerated with
`python -m cqrs.settings --markdown > docs/settings.md`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cqrs.settings import Settings, settings_markdown

REPO = Path(__file__).resolve().parents[2]


def test_every_setting_says_what_it_means() -> None:
    missing = [name for name, f in Settings.model_fields.items() if not f.description]
    assert not missing, f"settings without a description: {missing}"


def test_docs_settings_md_is_generated_from_the_model() -> None:
    on_disk = (REPO / "docs" / "settings.md").read_text()
    assert on_disk == settings_markdown(), (
        "docs/settings.md is stale: python -m cqrs.settings --markdown > docs/settings.md"
    )


def test_the_generator_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cqrs.settings", "--markdown"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert result.stdout == settings_markdown()
    for name in Settings.model_fields:
        assert f"`CQRS_{name.upper()}`" in result.stdout


def test_readme_points_at_the_settings_table() -> None:
    readme = (REPO / "README.md").read_text()
    assert "docs/settings.md" in readme
    assert "see\n`cqrs/settings.py`" not in readme and "see `cqrs/settings.py`" not in readme
