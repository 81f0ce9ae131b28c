"""Logging (one setup, text or JSON lines, passwords masked) and the health-check rules of
`cqrs status` (no I/O)."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from cqrs.logs import JsonFormatter, TextFormatter, configure_logging
from cqrs.projector.status import ProjectionStatus, RelayStatus, SystemStatus
from cqrs.settings import Settings

SECRET = "hunter2-Xy"


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord(
        {"name": "cqrs.projector.worker", "levelno": logging.WARNING, "levelname": "WARNING"}
    )
    record.msg, record.args = message, args
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_fields_and_never_a_password() -> None:
    record = _record(
        "cannot reach %s",
        f"redis://alice:{SECRET}@db.internal:6379/0",
        projection="orders",
        consumer="host-1-abc",
        event_id="e1",
        event_type="OrderPlaced",
    )
    try:
        raise ConnectionError(f"postgresql://app:{SECRET}@pg/shop refused")
    except ConnectionError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["msg"] == "cannot reach redis://alice:***@db.internal:6379/0"
    assert (data["projection"], data["consumer"]) == ("orders", "host-1-abc")
    assert (data["event_id"], data["event_type"]) == ("e1", "OrderPlaced")
    assert data["level"] == "warning" and data["logger"] == "cqrs.projector.worker"
    assert "postgresql://app:***@pg/shop" in data["exc"]
    assert SECRET not in line


def test_text_lines_append_the_fields_and_mask_passwords() -> None:
    line = TextFormatter().format(
        _record("lost %s", f"rediss://:{SECRET}@cache:6380/0", projection="products")
    )
    assert line.endswith("lost rediss://:***@cache:6380/0 projection=products")
    assert SECRET not in line


def test_configure_logging_installs_one_handler_with_the_chosen_format(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        stream = io.StringIO()
        monkeypatch.setattr("sys.stderr", stream)
        configure_logging(logging.INFO, log_format="json")
        configure_logging(logging.INFO, log_format="json")  # again: still one handler
        ours = [h for h in root.handlers if h.get_name() == "cqrs"]
        assert len(ours) == 1 and root.level == logging.INFO
        logging.getLogger("t").info("hello %s", "x", extra={"projection": "p"})
        assert json.loads(stream.getvalue().splitlines()[-1]) | {"ts": None} == {
            "ts": None,
            "level": "info",
            "logger": "t",
            "msg": "hello x",
            "projection": "p",
        }
        configure_logging(logging.INFO, log_format="text", log_level="ERROR")
        assert root.level == logging.ERROR
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_log_settings_accept_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CQRS_LOG_FORMAT", "JSON")
    monkeypatch.setenv("CQRS_LOG_LEVEL", "debug")
    settings = Settings()
    assert (settings.log_format, settings.log_level) == ("json", "DEBUG")
    assert settings.stall_seconds == 30 and settings.metrics_port == 0


def _projection(name: str, lag: int, pending: int, age: float | None) -> ProjectionStatus:
    return ProjectionStatus(
        name=name,
        state="behind",
        generation=1,
        version=1,
        code_version=1,
        stream_length=lag,
        lag=lag,
        pending=pending,
        oldest_pending_age_seconds=None,
        oldest_unapplied_age_seconds=age,
        dead_letters=0,
        last_position=None,
        last_applied_age_seconds=None,
        live_workers=1,
    )


def test_health_thresholds() -> None:
    report = SystemStatus(
        "ns",
        30.0,
        [_projection("products", 3, 2, 12.0), _projection("orders", 0, 0, None)],
        RelayStatus(True, unpublished=4, oldest_age_seconds=2.0),
    )
    assert report.violations(None, None) == []
    assert report.violations(5, 12.0) == []  # "exceeded" means strictly more
    assert report.violations(4, None) == [
        "products: 5 entries not applied (lag 3 + pending 2) > --max-lag 4"
    ]
    assert report.violations(3, None)[1] == "relay: 4 unpublished > --max-lag 3"
    assert [p.split(":")[0] for p in report.violations(None, 1.5)] == ["products", "relay"]
    down = SystemStatus("ns", 30.0, [], RelayStatus(False, error="cannot reach PostgreSQL"))
    assert down.violations(None, None) == []  # a report, not a health check
    assert down.violations(10, None) == ["relay: cannot check the outbox: cannot reach PostgreSQL"]
    assert report.as_json()["projections"]["products"]["unapplied"] == 5
