"""`cqrs doctor` against private redis-server processes, and connection URLs with
credentials: a password (`requirepass`) and an ACL user work from the URL, and no
password ever appears in what `status`, `doctor` or a failure prints.

Every redis-server here is our own subprocess on a free loopback port (persistence off),
killed by PID when the test ends.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from cqrs.settings import Settings
from tests.conftest import settings_env
from tests.helpers import cli_parallel
from tests.integration.ops_support import self_signed_certificate, start_redis
from tests.procs import fleet


def _checks(data: dict) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in data["checks"]}


def _env(settings: Settings, redis_url: str, database_url: str | None = None) -> dict[str, str]:
    env = settings_env(settings)
    env["CQRS_REDIS_URL"] = redis_url
    if database_url:
        env["CQRS_DATABASE_URL"] = database_url
    return env


def _with_password(url: str, password: str) -> tuple[str, str]:
    """The URL with a password (PostgreSQL in CI trusts loopback, so any password
    works); when the URL already has one, that one is the secret to look for."""
    parts = urlsplit(url)
    if parts.password:
        return url, parts.password
    user = parts.username or "postgres"
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), password


def test_doctor_fails_on_allkeys_lru_and_passes_on_noeviction(
    settings: Settings, tmp_path: Path
) -> None:
    with fleet(tmp_path) as procs:
        _lru, lru_url = start_redis(procs, tmp_path, "--maxmemory-policy", "allkeys-lru")
        _ok, ok_url = start_redis(
            procs, tmp_path, "--maxmemory-policy", "noeviction", "--maxmemory", "64mb"
        )
        lru, ok = cli_parallel(
            (("doctor", "--json"), _env(settings, lru_url)),
            (("doctor", "--json"), _env(settings, ok_url)),
        )
        assert lru.returncode == 1, (lru.stdout, lru.stderr)
        data = json.loads(lru.stdout)
        assert not data["ok"]
        policy = _checks(data)["maxmemory-policy"]
        assert policy["status"] == "error" and "allkeys-lru" in policy["detail"]
        assert "noeviction" in policy["fix"]

        assert ok.returncode == 0, (ok.stdout, ok.stderr)
        data = json.loads(ok.stdout)
        checks = _checks(data)
        assert data["ok"] and not [c for c in data["checks"] if c["status"] == "error"]
        assert checks["maxmemory-policy"]["status"] == "ok"
        assert checks["redis version"]["status"] == "ok"
        assert checks["persistence"]["status"] == "warning"  # --appendonly no --save ""
        assert "rebuild" in checks["persistence"]["detail"]
        assert checks["schema"]["status"] == "ok"
        assert checks["stream retention"]["status"] == "ok"


def test_password_acl_user_and_tls_work_from_the_url_and_are_never_printed(
    settings: Settings, tmp_path: Path
) -> None:
    assert settings.database_url
    database_url, pg_secret = _with_password(settings.database_url, "pg-s3cret-Kq")
    redis_secret, acl_secret = "sekret-Zr81", "pw-alice-W4t"
    with fleet(tmp_path) as procs:
        _a, password_url = start_redis(
            procs, tmp_path, "--requirepass", redis_secret, url_auth=f":{redis_secret}@"
        )
        _b, acl_url = start_redis(
            procs,
            tmp_path,
            "--user",
            "default",
            "off",
            "--user",
            "alice",
            "on",
            f">{acl_secret}",
            "~*",
            "&*",
            "+@all",
            url_auth=f"alice:{acl_secret}@",
        )
        # TLS (rediss://) with a password, the CA given in the URL's query string.
        _c, tls_url = start_redis(
            procs,
            tmp_path,
            "--requirepass",
            redis_secret,
            url_auth=f":{redis_secret}@",
            tls=self_signed_certificate(tmp_path),
        )
        secrets = (pg_secret, redis_secret, acl_secret, "wrong-Pq77")
        wrong = password_url.replace(redis_secret, "wrong-Pq77")
        password_env = _env(settings, password_url, database_url)
        acl_env = _env(settings, acl_url, database_url)
        wrong_env = _env(settings, wrong, database_url)
        tls_env = _env(settings, tls_url, database_url)
        # All at once: each call pays an interpreter start-up, none depends on another.
        (
            password_status,
            password_doctor,
            acl_status,
            acl_doctor,
            tls_doctor,
            wrong_status,
            wrong_doctor,
            wrong_worker,
        ) = results = cli_parallel(
            (("status", "--json"), password_env),
            (("doctor",), password_env),  # the rich report, for people
            (("status", "--json"), acl_env),
            (("doctor", "--json"), acl_env),
            (("doctor", "--json"), tls_env),
            (("status",), wrong_env),
            (("doctor", "--json"), wrong_env),
            (("project", "--drain"), wrong_env),
        )
        printed = [text for r in results for text in (r.stdout, r.stderr)]
        for result in results[:5]:  # the credentials work (status and doctor read Redis)
            assert result.returncode == 0, (result.args, result.stdout, result.stderr)
        assert "redis://:***@127.0.0.1" in password_doctor.stdout  # URL shown, password not
        assert json.loads(password_status.stdout)["relay"]["reachable"]
        assert json.loads(acl_status.stdout)["projections"]
        assert (
            "redis://alice:***@127.0.0.1"
            in _checks(json.loads(acl_doctor.stdout))["redis"]["detail"]
        )
        tls_check = _checks(json.loads(tls_doctor.stdout))["redis"]
        assert "rediss://:***@127.0.0.1" in tls_check["detail"]

        # Wrong credentials: one error line, exit 1.
        assert wrong_status.returncode == 1 and wrong_status.stdout == ""
        lines = wrong_status.stderr.strip().splitlines()
        # A wrong password is said as such (the one translation of driver errors).
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: Redis refused the credentials"), lines
        data = json.loads(wrong_doctor.stdout)
        assert wrong_doctor.returncode == 1 and _checks(data)["redis"]["status"] == "error"
        assert "authentication" in _checks(data)["redis"]["detail"]
        # Any other command: one line naming the (masked) URL, exit 1.
        assert wrong_worker.returncode == 1
        assert wrong_worker.stderr.strip().splitlines() == [
            f"error: Redis refused the credentials at {wrong.replace('wrong-Pq77', '***')}: "
            "invalid username-password pair or user is disabled."
        ]

    for text in printed:
        for secret in secrets:
            assert secret not in text


def test_postgres_sslmode_passes_through_the_url(settings: Settings, tmp_path: Path) -> None:
    """`?sslmode=` reaches libpq: `disable` connects; against a server without TLS,
    `require` is refused by libpq itself (and reported, not raised)."""
    assert settings.database_url
    with psycopg.connect(settings.database_url.replace("+psycopg", "")) as conn:
        ssl_on = conn.execute("SHOW ssl").fetchone()[0] == "on"
    base = settings.database_url
    sep = "&" if "?" in base else "?"
    disable = _env(settings, settings.redis_url or "", f"{base}{sep}sslmode=disable")
    require = {**disable, "CQRS_DATABASE_URL": f"{base}{sep}sslmode=require"}
    plain, tls = cli_parallel(
        (("status", "--only", "relay", "--json"), disable),
        (("status", "--only", "relay", "--max-age", "60", "--json"), require),
    )
    data = json.loads(plain.stdout)
    assert plain.returncode == 0 and data["relay"]["reachable"], (data, plain.stderr)
    if ssl_on:
        pytest.skip("this PostgreSQL serves TLS; the refusal case needs one that does not")
    data = json.loads(tls.stdout)
    assert tls.returncode == 1
    assert not data["relay"]["reachable"] and "SSL" in data["relay"]["error"]


def test_up_prints_urls_without_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cqrs up` masks whatever URLs the embedded servers report."""
    from typer.testing import CliRunner

    import cqrs.app.cli
    from cqrs import embedded

    class Servers:
        database_url = "postgresql://cqrs:pg-embedded-Y6@127.0.0.1:5999/cqrs"
        redis_url = "redis://:valkey-embedded-Y6@127.0.0.1:6999/0"
        postgres_pid = redis_pid = 1
        home = Path("/nonexistent")

    def status(_home: Path) -> dict:
        return {
            "running": True,
            "postgres": {"alive": True, "pid": 1, "url": Servers.database_url},
            "redis": {"alive": True, "pid": 1, "url": Servers.redis_url},
        }

    monkeypatch.setattr(embedded, "ensure_started", lambda *_a, **_k: Servers())
    monkeypatch.setattr(embedded, "status", status)
    runner = CliRunner()
    for args in (["up"], ["up", "--json"], ["up", "--status"], ["up", "--status", "--json"]):
        result = runner.invoke(
            cqrs.app.cli.app, args, env={"CQRS_NAMESPACE": f"t{uuid.uuid4().hex[:6]}"}
        )
        assert result.exit_code == 0, result.output
        assert "127.0.0.1:5999" in result.output and "***@" in result.output
        assert "embedded-Y6" not in result.output
