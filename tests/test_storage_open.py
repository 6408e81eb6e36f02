"""One entry point for every backend (issue 9, item 5): ``open_repositories`` picks the
backend from the configured database. A path and sqlite:///PATH are the same SQLite file, with
the same refusals; a PostgreSQL URL opens the PostgreSQL backend (a real server: tests/pg.py),
and what keeps it from opening is one line naming the URL without its password and what to
fix; any other form is refused naming the accepted ones, at open and when the configuration
is loaded."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from devtrust.core.errors import ConfigError
from devtrust.verifier.config import DatabaseUrl, VerifierConfig, database_location
from devtrust.verifier.records import DeviceRecord
from devtrust.verifier.storage import Repositories, open_repositories
from tests.db import NOW, device, device_id, run

if TYPE_CHECKING:  # imported by pytest as a plugin (pytest_plugins), not here
    from tests.pg import PgServer

FORMS = (
    "give a file path or sqlite:///PATH (SQLite), or postgresql://USER:PASSWORD@HOST:PORT/NAME "
    "(PostgreSQL)"
)
POSTGRES = "postgresql://devtrust:s3cret@db.internal:5432/devtrust?password=s3cret&sslmode=require"
SHOWN = "postgresql://devtrust:***@db.internal:5432/devtrust?password=***&sslmode=require"

# The fixtures `database` (each test on SQLite and PostgreSQL) and `pg_url`.
pytest_plugins = ["tests.pg"]


async def _save_then_read(first: Path | str, second: Path | str) -> DeviceRecord | None:
    repos: Repositories = await open_repositories(first)
    try:
        await repos.devices.save(device(1), now=NOW, event="enrolled:enrolled")
    finally:
        await repos.close()
    repos = await open_repositories(second, create=False, read_only=True)
    try:
        return await repos.devices.get(device_id(1))
    finally:
        await repos.close()


def test_a_path_and_an_sqlite_url_open_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "state").mkdir()
    path = tmp_path / "state" / "v.db"
    assert run(lambda: _save_then_read(path, f"sqlite:///{path}")) == device(1)
    # sqlite:///PATH takes PATH as written: relative, or absolute with a fourth slash.
    assert run(lambda: _save_then_read("sqlite:///state/w.db", "state/w.db")) == device(1)
    assert run(lambda: _save_then_read(str(path), f"sqlite:///{path}")) == device(1)
    assert sorted(p.name for p in (tmp_path / "state").iterdir() if p.suffix == ".db") == [
        "v.db",
        "w.db",
    ]


def test_an_sqlite_url_is_refused_as_its_path_is(tmp_path: Path) -> None:
    path = tmp_path / "db" / "v.db"
    for database in (path, f"sqlite:///{path}"):
        with pytest.raises(ConfigError) as err:
            run(lambda: open_repositories(database, create=False))  # noqa: B023
        assert str(err.value) == (
            f"database {path}: directory {path.parent} does not exist: create it, or fix "
            "`database:` in the configuration (it is not created: a typo would show an empty "
            "fleet)"
        )
    assert not path.parent.exists()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_postgresql_url_opens_the_server_database(scheme: str, pg_url: str) -> None:
    url = pg_url.replace("postgresql", scheme, 1)
    assert run(lambda: _save_then_read(url, DatabaseUrl(url))) == device(1)


def _refusal(database: str) -> str:
    with pytest.raises(ConfigError) as err:
        run(lambda: open_repositories(database))
    return str(err.value)


def test_postgresql_refusals_name_the_url_without_its_password_and_the_fix(
    pg_url: str, pg_server: PgServer
) -> None:
    server = pg_server
    shown = pg_url.replace(server.password, "***")
    wrong = _refusal(pg_url.replace(server.password, "not-it"))
    assert wrong.startswith(f"database {shown.replace(server.password, '***')}: PostgreSQL ")
    assert wrong.endswith("fix the user and password in `database:`")
    assert "password authentication failed" in wrong
    missing = pg_url.rsplit("/", 1)[0] + "/nosuchdb"
    gone = _refusal(missing)
    assert gone.startswith(f"database {missing.replace(server.password, '***')}: the server ")
    assert gone.endswith("create it (createdb -O USER NAME) or fix its name in `database:`")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = _refusal(f"postgresql://devtrust:s3cret@127.0.0.1:{port}/devtrust")
    assert down.startswith(f"database postgresql://devtrust:***@127.0.0.1:{port}/devtrust: ")
    assert down.endswith("start the server, or fix the host and port in `database:`")
    for message in (wrong, gone, down):
        assert "\n" not in message
        assert server.password not in message
        assert "s3cret" not in message
        assert "not-it" not in message


def test_postgresql_pool_size_is_checked(pg_url: str) -> None:
    bad = _refusal(pg_url + "?pool_size=0")
    assert bad.endswith(
        "pool_size='0': give the connections each verifier process may hold, 1 to 200"
    )


@pytest.mark.parametrize(
    ("database", "problem"),
    [
        ("mysql://root:pw@db/devtrust", f"'mysql://root:***@db/devtrust': mysql:// is not a "
         f"database devtrust can use: {FORMS}"),
        ("sqlite://host/v.db", "'sqlite://host/v.db': write sqlite:///PATH (three slashes: "
         "SQLite has no host; sqlite:////var/lib/devtrust/verifier.db for an absolute path)"),
        ("sqlite:///", "'sqlite:///': write sqlite:///PATH (three slashes: SQLite has no host; "
         "sqlite:////var/lib/devtrust/verifier.db for an absolute path)"),
        ("", f"'': expected {FORMS.removeprefix('give ')}"),
    ],
)  # fmt: skip
def test_other_forms_are_refused_naming_the_accepted_ones(
    tmp_path: Path, database: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as err:
        run(lambda: open_repositories(database))
    assert str(err.value) == f"database {problem}"
    config = tmp_path / "v.yaml"
    config.write_text(f"database: '{database}'\n")
    with pytest.raises(ConfigError) as err:
        VerifierConfig.load(config)
    if database:  # an empty path is refused by the loader as any empty path is
        assert str(err.value) == f"{config}.database: {problem}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.yaml"]


def test_the_configuration_reads_every_form(tmp_path: Path) -> None:
    config = tmp_path / "v.yaml"
    config.write_text("database: sqlite:///state/v.db\n")
    assert VerifierConfig.load(config).database == tmp_path / "state" / "v.db"
    config.write_text("database: sqlite:////var/lib/devtrust/v.db\n")
    assert VerifierConfig.load(config).database == Path("/var/lib/devtrust/v.db")
    config.write_text(f"database: {POSTGRES}\ntrust_domain: example.org\n")
    loaded = VerifierConfig.load(config)
    assert isinstance(loaded.database, DatabaseUrl)
    assert loaded.database.scheme == "postgresql"
    assert str.__str__(loaded.database) == POSTGRES  # what the driver will get
    assert loaded.trust_domain == "example.org"  # the rest is read as before
    # Shown (messages, logs) without the password.
    assert (str(loaded.database), f"{loaded.database}", repr(loaded.database)) == (
        SHOWN,
        SHOWN,
        repr(SHOWN),
    )
    assert "%s" % loaded.database == SHOWN  # noqa: UP031 (how logging formats it)
    assert database_location("v.db", base=tmp_path) == tmp_path / "v.db"
