"""`devtrust report` on both backends (a store filled through the storage API: the figures
equal the store's, read with plain SQL), on an empty fleet, with a zone filter, and its
usage errors: exit 2 and one clear line, never a traceback."""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
import stat
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtrust.cli import main
from tests.db import make_database
from tests.test_report import (
    IMG_HOST,
    SCRIPT_HOST,
    check_figures,
    expected,
    fill,
    flatten,
    report,
    sqlite_rows,
)

pytest_plugins = ["tests.pg"]


def _rows(url: str) -> Any:
    if "://" not in url:
        return sqlite_rows(Path(url))

    def rows(sql: str) -> list[Any]:
        with psycopg.connect(url) as conn:
            return list(conn.execute(sql).fetchall())

    return rows


def test_the_figures_match_the_store_on_each_backend(database: str) -> None:
    now = datetime.datetime.now(datetime.UTC)
    fill(database, now)
    since = (now - datetime.timedelta(minutes=30)).isoformat()
    run = report("--database", database, "--since", since, "--json", "-")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["version"] == 3
    # The period ends now: the fleet is today's, the stored current results (``expected``
    # reads them from the trust rows).
    assert doc["fleet_at"] == {"at": doc["generated_at"], "now": True, "devices_later": 0}
    password = urllib.parse.urlsplit(database).password
    assert not password or password not in run.stdout  # the URL is shown without it
    check_figures(flatten(doc), expected(_rows(database), doc, {}))
    # What fill wrote, as the report reads it.
    assert doc["fleet"]["devices"] == 5
    assert doc["zones"]["lab"]["states"] == {"enrolled": 1, "pending_approval": 1, "revoked": 1}
    assert doc["time_to_detect"]["count"] == 2
    seconds = sorted(d["seconds"] for d in doc["time_to_detect"]["detections"])
    assert seconds == [180.0, 39 * 60.0]
    assert [c["serial"] for c in doc["revoked_certificates"]] == ["5eed0004"]
    assert [d["hostname"] for d in doc["drivers_below_bulletins"]] == [SCRIPT_HOST]
    hosts = {d["hostname"] for f in doc["findings"] for d in f["devices"]}
    assert {SCRIPT_HOST, IMG_HOST} <= hosts


def test_a_period_that_ended_earlier_shows_the_fleet_as_it_was_then(
    database: str, tmp_path: Path
) -> None:
    """--until 18.5 minutes ago: the fleet then, from the audit (each device's latest
    appraisal before then, judged then; the device revoked 12 minutes ago still enrolled),
    not today's results judged now beside a history of then. ``expected`` computes it from
    the audit rows with plain SQL; the figures fill wrote make it differ from now's."""
    now = datetime.datetime.now(datetime.UTC)
    fill(database, now)
    since, until = now - datetime.timedelta(minutes=40), now - datetime.timedelta(minutes=18.5)
    page = tmp_path / "r.html"
    run = report(
        "--database", database, "--since", since.isoformat(), "--until", until.isoformat(),
        "--json", "-", "--html", str(page),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["fleet_at"] == {"at": until.isoformat(), "now": False, "devices_later": 0}
    check_figures(flatten(doc), expected(_rows(database), doc, {}))
    # Then: script affirming (its 3-minute result of -20 min), steady affirming, img's and
    # gone's results expired, gone not yet revoked, no driver finding yet. Now it is 1/3.
    fleet = doc["fleet"]
    assert fleet["states"] == {"enrolled": 4, "pending_approval": 1, "revoked": 0}
    assert fleet["tiers"] == {"affirming": 2, "warning": 0, "contraindicated": 0, "none": 2}
    assert fleet["compliance"] == 0.5
    assert doc["drivers_below_bulletins"] == []
    assert doc["revoked_devices"] == []
    # One compliance: the history's last bucket (ending at --until) is the headline's.
    assert doc["history"]["ends"][-1] == until.isoformat()
    assert doc["history"]["fleet"][-1] == fleet["compliance"]
    for zone, z in doc["zones"].items():
        assert doc["history"]["zones"][zone][-1] == z["compliance"], zone
    text = page.read_text(encoding="utf-8")
    shown = until.isoformat()[:19].replace("T", " ")
    assert f"<h2>The fleet at {shown} UTC</h2>" in text
    assert "The fleet now" not in text
    assert 'data-key="fleet.compliance" data-value="0.5"' in text


def test_a_zone_filter_reports_that_zone_only(tmp_path: Path) -> None:
    db = tmp_path / "verifier.db"
    fill(str(db), datetime.datetime.now(datetime.UTC))
    run = report("--database", str(db), "--zone", "lab", "--json", "-", "--days", "1")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["zone_filter"] == "lab"
    assert list(doc["zones"]) == ["lab"]
    assert doc["fleet"]["devices"] == 3
    assert all(d["zone"] == "lab" for f in doc["findings"] for d in f["devices"])


def test_an_empty_fleet_gives_a_valid_report_saying_so(tmp_path: Path) -> None:
    db = tmp_path / "verifier.db"
    make_database(db)
    page, out = tmp_path / "r.html", tmp_path / "r.json"
    run = report("--database", str(db), "--html", str(page), "--json", str(out))
    assert run.returncode == 0, run.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["empty"] is True
    assert doc["fleet"]["devices"] == 0
    assert doc["fleet"]["compliance"] is None
    assert doc["zones"] == {}
    assert doc["audit"]["intact"] is True
    assert "the fleet is empty" in doc["notes"]
    text = page.read_text(encoding="utf-8")
    assert "No devices" in text
    assert 'data-key="fleet.devices" data-value="0"' in text


@pytest.mark.parametrize(
    ("name", "args", "says"),
    [
        ("no output", ["--database", "{db}"], "give --html FILE and/or --json FILE"),
        ("no database", ["--json", "-"], "give --database FILE|URL (or --config naming one)"),
        ("no such file", ["--database", "{tmp}/nothing.db", "--json", "-"], "no such file"),
        (
            "not a database",
            ["--database", "{tmp}/junk.db", "--json", "-"],
            "is not an SQLite database",
        ),
        (
            "empty period",
            ["--database", "{db}", "--json", "-", "--since", "2026-12-01", "--until", "2026-11-01"],
            "the period is empty",
        ),
        (
            "bad time",
            ["--database", "{db}", "--json", "-", "--since", "yesterday"],
            "is not a time",
        ),
        ("no days", ["--database", "{db}", "--json", "-", "--days", "0"], "more than 0"),
        (
            "days and since",
            ["--database", "{db}", "--json", "-", "--days", "1", "--since", "2026-11-01"],
            "not allowed with argument",
        ),
        ("bad scheme", ["--database", "mysql://x/y", "--json", "-"], "mysql://"),
        ("no config", ["--config", "{tmp}/none.yaml", "--json", "-"], "--config"),
        (
            "unwritable",
            ["--database", "{db}", "--html", "{tmp}/no/such/dir/r.html"],
            "--html",
        ),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    tmp_path: Path, name: str, args: list[str], says: str
) -> None:
    db = tmp_path / "verifier.db"
    make_database(db)
    (tmp_path / "junk.db").write_bytes(b"this is no database" * 100)
    run = report(*(a.format(db=db, tmp=tmp_path) for a in args))
    assert run.returncode == 2, (name, run.stdout, run.stderr)
    assert says in run.stderr, (name, run.stderr)
    assert "Traceback" not in run.stderr
    assert run.stdout == ""


def test_a_broken_audit_chain_is_reported_with_its_first_broken_record(tmp_path: Path) -> None:
    db = tmp_path / "verifier.db"
    fill(str(db), datetime.datetime.now(datetime.UTC))
    with sqlite3.connect(db) as conn:
        (entry, chain, seq) = conn.execute(
            "SELECT id, chain, chain_seq FROM audit WHERE event = 'appraisal' ORDER BY id LIMIT 1"
        ).fetchone()
        conn.execute("UPDATE audit SET tier = 'affirming!' WHERE id = ?", (entry,))
    page = tmp_path / "r.html"
    run = report("--database", str(db), "--json", "-", "--html", str(page))
    assert run.returncode == 0, run.stderr
    audit = json.loads(run.stdout)["audit"]
    assert audit["intact"] is False
    assert audit["broken"][0].startswith(f"chain {chain} seq {seq} (id {entry})")
    text = page.read_text(encoding="utf-8")
    assert 'data-key="audit.intact" data-value="false"' in text
    assert "Audit trail BROKEN" in text


def test_a_report_to_a_device_writes_into_it_and_leaves_it_a_device(tmp_path: Path) -> None:
    """`--html /dev/null` (or a pipe) is written to, never renamed over: replacing /dev/null
    with a regular file would break every program on the machine."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    db = tmp_path / "v.db"
    make_database(db)
    assert main(["report", "--database", str(db), "--json", str(fifo)]) == 0
    reader.join(10)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert b'"version"' in got[0]
