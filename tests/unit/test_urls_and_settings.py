from __future__ import annotations

import pytest
from pydantic import ValidationError

from cqrs.settings import Settings
from cqrs.urls import UrlError, libpq_url, mask_url, redis_url, sqlalchemy_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://alice:p%40ss@host/0", "rediss://alice:***@host/0"),
        (
            "error at postgresql://a:b@c/d and redis://x:y@z",
            "error at postgresql://a:***@c/d and redis://x:***@z",
        ),
        ("postgresql://nopass@h/db", "postgresql://nopass@h/db"),
    ],
)
def test_mask_url_hides_every_password(url: str, expected: str) -> None:
    assert mask_url(url) == expected


def test_plain_urls_get_the_psycopg3_driver() -> None:
    assert sqlalchemy_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert (
        sqlalchemy_url("postgres://u@h/db?sslmode=require")
        == "postgresql+psycopg://u@h/db?sslmode=require"
    )
    assert libpq_url("postgresql+psycopg://u@h/db") == "postgresql://u@h/db"
    assert redis_url("valkey://h:1/0") == "redis://h:1/0"
    assert redis_url("rediss://h:1/0") == "rediss://h:1/0"
    with pytest.raises(UrlError, match=r"\*\*\*"):
        sqlalchemy_url("mysql://u:secret@h/db")
    with pytest.raises(UrlError):
        redis_url("http://h")


def test_settings_reject_unsafe_namespaces_and_foreign_urls() -> None:
    for bad in ("a{b}", "a:b", "a*", "", "x" * 65):
        with pytest.raises(ValidationError):
            Settings(namespace=bad)
    with pytest.raises(ValidationError):
        Settings(database_url="mysql://x")
    assert Settings(namespace="shop-1.eu").namespace == "shop-1.eu"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CQRS_NAMESPACE", "fromenv")
    monkeypatch.setenv("CQRS_PARTITIONS", "16")
    settings = Settings()
    assert (settings.namespace, settings.partitions) == ("fromenv", 16)
