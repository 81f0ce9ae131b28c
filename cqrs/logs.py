"""The one place that configures logging for every `cqrs` process.

Two formats: `text` for people (one line, time, level, logger, message, then the
structured fields as `key=value`) and `json` (one object per line with the same fields),
chosen with the root options `--log-format` / `--log-level` or `CQRS_LOG_FORMAT` /
`CQRS_LOG_LEVEL`. Structured fields travel in `extra=` (projection, consumer, event id and
type, entry id, counts); whatever a record carries beyond the standard attributes is
printed. Every formatted line goes through `mask_url`, so a connection URL inside a
message or a traceback never shows its password.

Long-running commands (relay, project, run, serve) log at INFO by default, everything
else at WARNING; an explicit level wins everywhere.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from cqrs.urls import mask_url

# The attributes every LogRecord has; anything else on a record came from `extra=`.
# (uvicorn adds `color_message`, an ANSI-coloured copy of the message.)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}

_chosen: dict[str, str | None] = {"format": None, "level": None}
_HANDLER_NAME = "cqrs"


def set_cli_options(log_format: str | None, log_level: str | None) -> None:
    """Remember the root options (`cqrs --log-format ... --log-level ...`)."""
    _chosen["format"] = log_format
    _chosen["level"] = log_level


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            extra = " ".join(f"{k}={v}" for k, v in fields.items())
            head, sep, rest = line.partition("\n")  # keep a traceback below the fields
            line = f"{head} {extra}{sep}{rest}"
        return mask_url(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update(_fields(record))
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return mask_url(json.dumps(data, default=str, ensure_ascii=False))


def configure_logging(
    default_level: int | str = logging.WARNING,
    *,
    log_format: str | None = None,
    log_level: str | None = None,
) -> None:
    """Install one stderr handler on the root logger (replacing the one an earlier call
    installed).

    Precedence: explicit arguments, then the root CLI options, then the settings
    (`CQRS_LOG_FORMAT` / `CQRS_LOG_LEVEL`), then `default_level` and text."""
    fmt = log_format or _chosen["format"]
    level = log_level or _chosen["level"]
    if fmt is None or level is None:
        from pydantic import ValidationError

        from cqrs.settings import Settings

        try:
            settings = Settings()
            fmt = fmt or settings.log_format
            level = level or settings.log_level
        except ValidationError:
            pass  # the command reports a broken setting itself, as one line
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:  # ours from an earlier call; others stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(str(level).upper() if level else default_level)
    # Client libraries chatter at DEBUG/INFO; keep them at WARNING unless we debug them.
    for noisy in ("httpx", "httpcore", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
