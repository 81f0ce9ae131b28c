"""Output conventions shared by every CLI: one JSON object on stdout for scripts, rich for
people, and exactly one `error: ...` line on stderr for failures."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from cqrs.urls import mask_url

# Wide enough for any row we print: a table is never wider than its content, so this only
# lifts the limit, it pads nothing.
PIPE_WIDTH = 4000


def _stdout_width() -> int | None:
    """None (the terminal's own width) on a terminal; otherwise (pipes, CI, `docker logs`)
    full-width rows. Rich would assume 80 columns (or $COLUMNS) and squeeze tables into
    them, cutting ids to `bcf34f62-31c3-4285...`, which cannot be copied or grepped."""
    try:
        return None if sys.stdout.isatty() else PIPE_WIDTH
    except (AttributeError, ValueError):  # replaced or closed stdout
        return PIPE_WIDTH


out = Console(highlight=False, soft_wrap=True, width=_stdout_width())
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_REJECTED = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_REJECTED) -> NoReturn:
    line = " ".join(mask_url(str(message)).split())
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def validation_message(exc: ValidationError) -> str:
    """The first problem of a pydantic error as `field: reason` (one line)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if not isinstance(p, int)) or "input"
    msg = first["msg"].removeprefix("Value error, ")
    return f"invalid {where}: {msg}"


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def heading(title: str) -> None:
    """A section title: a rule across a terminal, one plain line elsewhere (a rule across
    the pipe width would be thousands of characters)."""
    if out.is_terminal:
        out.rule(title)
    else:
        out.print(f"== {title} ==")


def table(title: str | None, columns: Sequence[tuple[str, bool]]) -> Table:
    """A table whose cells are never cut: text columns fold what does not fit on a narrow
    terminal (an id stays whole, over two lines) instead of ending in an ellipsis, numbers
    stay on one line, and no header shrinks below its own width. `columns` is (header,
    numeric) pairs; numbers are right-aligned."""
    t = Table(title=title, title_justify="left")
    for header, numeric in columns:
        t.add_column(
            header,
            justify="right" if numeric else "left",
            no_wrap=numeric,
            overflow="fold",
            min_width=len(header),
        )
    return t
