"""Numbered schema migrations (issue 9, item 5) on real SQLite files: from an empty database
and from the databases of earlier releases, refusal of a newer one, a failed step that leaves
the step before; and the one numbering every dialect's steps keep (migrations/README.md)."""

from __future__ import annotations

import datetime
import functools
import re
import sqlite3
from pathlib import Path

import pytest

from devtrust.core.errors import ConfigError
from devtrust.core.tier import Tier
from devtrust.verifier.records import BootstrapToken, DeviceRecord
from devtrust.verifier.storage import DeviceQuery, codec, open_sqlite, schema, sqlite_schema
from devtrust.verifier.trust import TrustResult
from tests.db import NOW, decision, device, device_id, run

DATA = Path(__file__).parent / "data" / "storage"
MIGRATIONS = Path(schema.__file__).parent / "migrations"


def tables(path: Path) -> dict[str, set[str]]:
    with sqlite3.connect(path) as db:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        out = {n: {r[1] for r in db.execute(f"PRAGMA table_info({n})")} for n in names}
    db.close()
    return out


def versions(path: Path) -> tuple[list[int], str]:
    with sqlite3.connect(path) as db:
        applied = [int(r[0]) for r in db.execute("SELECT version FROM schema_migrations")]
        [(meta,)] = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
    db.close()
    return applied, str(meta)


def test_an_empty_database_gets_every_migration_in_order(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    run(lambda: _open_and_close(path))
    latest = sqlite_schema.latest_version()
    assert latest >= 2
    assert versions(path) == (list(range(1, latest + 1)), str(latest))
    assert "expires_at" in tables(path)["trust"]
    # Opening again applies nothing twice.
    run(lambda: _open_and_close(path))
    assert versions(path) == (list(range(1, latest + 1)), str(latest))


async def _open_and_close(path: Path, *, read_only: bool = False) -> None:
    repos = await open_sqlite(path, read_only=read_only)
    await repos.close()


def _release_db(path: Path, schema: Path) -> None:
    """A database as the release before migrations made it, with one device, its result,
    and a token."""
    result = decision(1, tier=Tier.WARNING).result
    with sqlite3.connect(path) as db:
        db.executescript(schema.read_text())
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', '1')")
        db.execute(
            "INSERT INTO devices (device_id, state, ek_certificate, ek_public, ak_public, "
            "ak_name, host, zone, labels, enrolled_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            codec.device_to_row(device(1, zone="lab", labels={"rack": "7"})),
        )
        db.execute(
            "INSERT INTO trust VALUES (?,?,?,?,?)",
            (
                result.device_id,
                result.tier.label,
                result.score,
                codec.result_to_json(result),
                codec.iso(result.appraised_at),
            ),
        )
        db.execute(
            "INSERT INTO bootstrap_tokens (token_sha256, created_at, expires_at) VALUES (?,?,?)",
            ("ab" * 32, codec.iso(NOW), codec.iso(NOW + datetime.timedelta(hours=1))),
        )
    db.close()


@pytest.mark.parametrize("schema", ["schema-v1.sql", "schema-v1-issue6.sql"])
def test_a_database_of_the_release_before_migrations_upgrades(tmp_path: Path, schema: str) -> None:
    path = tmp_path / "v.db"
    _release_db(path, DATA / schema)
    assert "schema_migrations" not in tables(path)

    async def scenario() -> tuple[
        DeviceRecord | None, TrustResult | None, BootstrapToken | None, list[str], list[str]
    ]:
        repos = await open_sqlite(path)
        try:
            token = await repos.tokens.get("ab" * 32)
            fresh = await repos.devices.list(
                DeviceQuery(tier=Tier.WARNING, now=NOW + datetime.timedelta(minutes=1))
            )
            stale = await repos.devices.list(
                DeviceQuery(tier=Tier.NONE, now=NOW + datetime.timedelta(minutes=3))
            )
            return (
                await repos.devices.get(device_id(1)),
                await repos.trust.latest(device_id(1)),
                token,
                [r.device_id for r in fresh],
                [r.device_id for r in stale],
            )
        finally:
            await repos.close()

    record, latest, token, fresh, stale = run(scenario)
    latest_version = sqlite_schema.latest_version()
    assert versions(path) == (list(range(1, latest_version + 1)), str(latest_version))
    assert record == device(1, zone="lab", labels={"rack": "7"})
    assert latest == decision(1, tier=Tier.WARNING).result
    assert token is not None
    assert (token.zone, token.labels) == ("", {})  # the columns issue 7 added
    assert "event_log_parts" in tables(path)
    # The result's staleness bound, backfilled from its JSON, filters in SQL.
    assert fresh == stale == [device_id(1)]


def test_a_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    run(lambda: _open_and_close(path))
    newer = sqlite_schema.latest_version() + 1
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_migrations (version, name) VALUES (?, 'future')", (newer,))
    db.close()
    before = path.read_bytes()
    for read_only in (False, True):
        with pytest.raises(ConfigError) as err:
            run(functools.partial(_open_and_close, path, read_only=read_only))
        assert str(err.value).startswith(
            f"database {path} has schema version {newer}, newer than this devtrust's "
            f"{newer - 1} (devtrust "
        )
        assert str(err.value).endswith(
            "run the devtrust release that made it, or a newer one (the database is left as it is)"
        )
    assert path.read_bytes() == before


def test_a_failed_migration_leaves_the_step_before(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    _release_db(path, DATA / "schema-v1.sql")
    with sqlite3.connect(path) as db:  # makes step 2's index impossible to create
        db.execute("CREATE TABLE devices_zone (x)")
    db.close()
    with pytest.raises(
        ConfigError,
        match=r"schema migration 0002_device_filters failed \(.*devices_zone.*\): it is left at "
        "schema version 1, as it was",
    ):
        run(lambda: _open_and_close(path))
    assert versions(path) == ([1], "1")
    assert "expires_at" not in tables(path)["trust"]


# --- one numbering for every dialect ----------------------------------------------------------


def _steps(folder: Path) -> list[tuple[int, str]]:
    """A dialect folder's steps as (number, name), each script's file name checked."""
    steps = []
    for script in sorted(folder.glob("*.sql")):
        match = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", script.name)
        assert match, f"{folder.name}/{script.name}: not named NNNN_name.sql"
        steps.append((int(match[1]), match[2]))
    return steps


def test_every_dialect_has_the_same_numbered_steps() -> None:
    """migrations/README.md: step N is the same change, under the same name, in every
    dialect present, numbered from 1 without gaps; and the runner ships exactly these."""
    folders = sorted(p for p in MIGRATIONS.iterdir() if p.is_dir() and any(p.glob("*.sql")))
    assert [f.name for f in folders] == list(schema.dialects())
    assert "sqlite" in schema.dialects()
    reference = _steps(MIGRATIONS / "sqlite")
    assert [number for number, _ in reference] == list(range(1, len(reference) + 1))
    assert reference[:2] == [(1, "initial"), (2, "device_filters")]
    for folder in folders:
        assert _steps(folder) == reference, f"{folder.name} differs from sqlite"
        shipped = [(m.version, m.name) for m in schema.migrations(folder.name)]
        assert shipped == reference
        assert schema.latest_version(folder.name) == len(reference)
    assert not list(MIGRATIONS.glob("*.sql")), "a step outside a dialect folder runs nowhere"
