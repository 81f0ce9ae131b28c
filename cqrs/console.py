"""Output conventions shared by every CLI: one JSON object on stdout for scripts, rich for
people, and exactly one `error: ...` line on stderr for failures."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from cqrs.urls import mask_url

out = Console(highlight=False, soft_wrap=True)
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
