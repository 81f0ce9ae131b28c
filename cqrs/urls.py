"""Connection URL handling: users write plain URLs; drivers are chosen here.

Passwords must never reach a terminal or a log line, so everything that prints a URL goes
through `mask_url`.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class UrlError(ValueError):
    """A connection URL that cannot be used; the message is safe to print."""


_PG_SCHEMES = {"postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2"}
_REDIS_SCHEMES = {"redis", "rediss", "unix", "valkey", "valkeys"}


def mask_url(url: str) -> str:
    """Replace the password of a URL (and of any URL embedded in a message) with `***`."""
    return re.sub(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", r"\1***@", url)


def sqlalchemy_url(url: str) -> str:
    """Return the SQLAlchemy URL for a plain `postgresql://` URL, forcing psycopg 3."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _PG_SCHEMES:
        raise UrlError(f"not a PostgreSQL URL: {mask_url(url)!r} (expected postgresql://...)")
    return f"postgresql+psycopg://{rest}"


def libpq_url(url: str) -> str:
    """Return a URL that psycopg/libpq accepts directly (LISTEN connections bypass SQLAlchemy)."""
    _, _, rest = sqlalchemy_url(url).partition("://")
    return f"postgresql://{rest}"


def with_connect_timeout(url: str, seconds: int) -> str:
    """The URL with libpq's `connect_timeout` added, unless it already names one.

    Without it, an address that accepts TCP but never answers (another service's port,
    a firewall that swallows packets after the handshake) holds a command for minutes.
    Carried in the URL, the timeout reaches every connection made from it: SQLAlchemy's
    pool and the direct psycopg connections (relay, replay, verify, status) alike."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "connect_timeout" for key, _ in query):
        return url
    query.append(("connect_timeout", str(seconds)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def redis_url(url: str) -> str:
    """Return a URL redis-py's `from_url` accepts; `valkey://` is the same protocol."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _REDIS_SCHEMES:
        raise UrlError(f"not a Redis URL: {mask_url(url)!r} (expected redis:// or rediss://)")
    if scheme in {"valkey", "valkeys"}:
        scheme = "redis" if scheme == "valkey" else "rediss"
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))
