"""`cqrs repartition N` refuses a bad N before it touches anything (no server is needed to
see it): one `error:` line on stderr, nothing on stdout, exit 2."""

from __future__ import annotations

import sys

import pytest

import cqrs.app.cli


@pytest.fixture(scope="module")
def mounted() -> None:
    if not cqrs.app.cli.app.registered_groups:
        cqrs.app.cli._mount_packages()


@pytest.mark.parametrize(
    ("argument", "says"),
    [("0", "greater than or equal to 1"), ("1025", "less than or equal to 1024"),
     ("eight", "valid integer"), ("2.5", "valid integer")],
)  # fmt: skip
def test_bad_partition_counts_are_one_line_usage_errors(
    argument: str,
    says: str,
    mounted: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(cqrs.app.cli, "_mount_packages", lambda: None)  # mounted once
    monkeypatch.setattr(sys, "argv", ["cqrs", "repartition", argument, "--yes"])
    with pytest.raises(SystemExit) as exited:
        cqrs.app.cli.main()
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("error: Invalid value for 'N'") and says in line, line
