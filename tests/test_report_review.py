"""`devtrust report` after the review of issue 13 (notes/review13a.md): each finding's fix,
checked where it lives. A period's appraisals pass once, in time order, in memory that does
not grow with them (H1); a driver version a device wrote is never parsed into figures (M3);
one compliance definition, revoked devices leaving the history when they were revoked (M4);
the page's script policy (L6); the files written (L7); the chains verified in the figures'
snapshot, or said not to be (L8); the period's end and buckets (L9); the read-only reads
(L10); the password hidden only where it stands whole (L11)."""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import itertools
import json
import os
import re
import sqlite3
import tracemalloc
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from devtrust.core.errors import ConfigError
from devtrust.verifier import (
    audit_db,
    report_command,
    report_data,
    report_figures,
    report_html,
    tools,
)
from devtrust.verifier.document import Bulletins
from devtrust.verifier.report_data import Appraisal, AuditStatus, DeviceRow, FindingRow, Store
from devtrust.verifier.storage.pg_engine import hide
from tests.db import make_database
from tests.test_report import DRIVER_FOUND, report

UTC = datetime.UTC
NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
BULLETINS = Bulletins.load(report_command.BULLETINS)
# The reviewer's crafted version: below bulletin 5747, it names a bulletin of its own.
CRAFTED = "580.65.06 bulletin 1 (x, fixed in 999.1)"


def _device(n: int, *, zone: str = "lab", state: str = "enrolled", host: str = "") -> DeviceRow:
    return DeviceRow(
        f"{n:064x}", state, zone, host or f"node-{n}", NOW - datetime.timedelta(days=30), None
    )


def _appraisal(
    n: int, at: datetime.datetime, tier: str = "affirming", *, found: str = "", lasts: int = 3600
) -> Appraisal:
    findings = (
        (FindingRow("gpu.driver.security_bulletins", "warning", f"found {found}", found),)
        if found
        else ()
    )
    expires = at + datetime.timedelta(seconds=lasts)
    ids = tuple(f.id for f in findings)
    return Appraisal(f"{n:064x}", at, tier, expires, ids, findings=findings)


def _store(devices: list[DeviceRow], current: list[Appraisal], **more: Any) -> Store:
    audit = AuditStatus(True, True, 0, 0, 0, "", ())
    return Store(
        devices=tuple(devices),
        current={a.device_id: a for a in current},
        revoked=(),
        device_revoked_at=more.get("revoked_at", {}),
        policy=None,
        audit=audit,
    )


def _doc(store: Store, appraisals: list[Appraisal], *, since: datetime.datetime) -> dict[str, Any]:
    period = report_figures.Period(
        store, since=since, until=NOW, minimums=report_figures.Minimums()
    )
    for a in appraisals:
        period.add(a)
    return report_figures.compute(
        store, period, since=since, until=NOW, now=NOW,
        minimums=report_figures.Minimums(), bulletins=BULLETINS,
    )  # fmt: skip


# --- M3 ----------------------------------------------------------------------------------------


def test_a_crafted_driver_version_is_unparseable_and_gives_no_figures() -> None:
    crafted = (
        f"driver {CRAFTED}, bulletin 5747 (GPU Display Driver - January 2026, fixed in 580.126.09)"
    )
    lying = "driver 999.1, bulletin 1 (x, fixed in 999.1)"  # a valid version, a false text
    devices = [_device(1, host="honest"), _device(2, host="crafted"), _device(3, host="liar")]
    current = [
        _appraisal(1, NOW, "warning", found=DRIVER_FOUND),
        _appraisal(2, NOW, "warning", found=crafted),
        _appraisal(3, NOW, "warning", found=lying),
    ]
    doc = _doc(_store(devices, current), [], since=NOW - datetime.timedelta(hours=1))
    rows = {d["hostname"]: d for d in doc["drivers_below_bulletins"]}
    assert set(rows) == {"honest", "crafted", "liar"}  # each still listed: it has the finding
    honest = rows["honest"]
    assert honest["driver_version"] == "580.65.06"
    assert honest["bulletins"] == ["5703", "5747", "5821"]
    assert honest["max_cvss"] == 8.8
    assert rows["liar"]["driver_shown"].startswith("unmatched: 999.1 ")
    for name in ("crafted", "liar"):
        row = rows[name]
        assert row["driver_version"] is None, name
        assert (row["branch"], row["bulletins"], row["cves"], row["max_cvss"]) == (
            "",
            [],
            None,
            None,
        )
    assert rows["crafted"]["driver_shown"] == f"unparseable: {CRAFTED}"
    page = report_html.render(doc)
    assert "unparseable: 580.65.06 bulletin 1 (x, fixed in 999.1)" in page
    assert "R999" not in page


def test_a_driver_version_is_digits_and_dots_of_bounded_length() -> None:
    assert report_figures.driver_version("driver 580.65.06") == ("580.65.06", "580.65.06")
    for bad in (
        "580",
        "580.65.06.1.2",
        "5" * 40 + ".1",
        "580.65\u202e.06",
        "580.65.06 x",
        "v580.1",
    ):
        version, shown = report_figures.driver_version(f"driver {bad}")
        assert version is None, bad
        assert "\u202e" not in shown
    assert report_figures.driver_version("bulletin 5747 (x, fixed in 580.1)")[0] is None


# --- M4 ----------------------------------------------------------------------------------------


def test_history_counts_a_revoked_device_until_its_revocation_only() -> None:
    since = NOW - datetime.timedelta(hours=6)
    revoked = NOW - datetime.timedelta(hours=3)
    devices = [_device(1), _device(2, state="revoked"), _device(3, state="pending_approval")]
    first = since + datetime.timedelta(minutes=1)
    good = _appraisal(1, first, lasts=86400)
    bad = _appraisal(2, first, "contraindicated", lasts=86400)
    store = _store(devices, [good], revoked_at={f"{2:064x}": revoked})
    doc = _doc(store, [good, bad], since=since)
    history = doc["history"]
    ends = [datetime.datetime.fromisoformat(e) for e in history["ends"]]
    for end, fleet, enrolled in zip(ends, history["fleet"], history["enrolled"], strict=True):
        # The pending device never counts; the revoked one (contraindicated) until revoked.
        assert enrolled == (2 if end < revoked else 1), end
        assert fleet == (0.5 if end < revoked else 1.0), end
    assert history["fleet"][-1] == doc["fleet"]["compliance"] == 1.0


# --- L9 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("days", [1 / 24, 1, 7, 30, 61, 365, 3660, 20000])
def test_buckets_are_aligned_to_utc_and_capped(days: float) -> None:
    since = NOW - datetime.timedelta(days=days) + datetime.timedelta(seconds=37)
    size, _, ends = report_figures.buckets(since, NOW)
    assert len(ends) <= report_figures.MAX_BUCKETS
    assert ends[-1] == NOW
    assert ends[0] > since
    for end in ends[:-1]:
        assert end.timestamp() % size == 0, end  # whole minutes, hours, days (UTC)
    assert all(a < b for a, b in itertools.pairwise(ends))


def test_until_in_the_future_is_now() -> None:
    args = argparse.Namespace(until=NOW + datetime.timedelta(days=400), since=None, days=1)
    assert report_command.period_of(args, NOW) == (NOW - datetime.timedelta(days=1), NOW)
    late = argparse.Namespace(until=None, since=NOW + datetime.timedelta(days=1), days=None)
    with pytest.raises(tools.UsageError, match="the period is empty"):
        report_command.period_of(late, NOW)


# --- L6 ----------------------------------------------------------------------------------------


def test_the_page_allows_only_its_own_scripts() -> None:
    page = report_html.render(_doc(_store([], []), [], since=NOW - datetime.timedelta(days=1)))
    (policy,) = re.findall(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)
    rules = dict(
        [*part.split(" ", 1), ""][:2] for part in policy.replace("&#x27;", "'").split("; ")
    )
    assert rules["base-uri"] == "'none'"
    assert rules["form-action"] == "'none'"
    assert rules["default-src"] == "'none'"
    assert "unsafe-inline" not in rules["script-src"]
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(scripts) == 2
    hashes = {
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in scripts
    }
    assert set(rules["script-src"].split()) == hashes


# --- L7 ----------------------------------------------------------------------------------------


def test_the_files_written_are_new_files_of_mode_0640(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    victim = tmp_path / "victim"
    victim.write_text("keep", encoding="utf-8")
    # The name the command used to write through: a link planted there is not followed.
    (tmp_path / f".r.html.{os.getpid()}.tmp").symlink_to(victim)
    old = os.umask(0o022)
    try:
        report_command._write(out, "<p>report</p>", "--html")
    finally:
        os.umask(old)
    assert victim.read_text(encoding="utf-8") == "keep"
    assert out.read_text(encoding="utf-8") == "<p>report</p>"
    assert not out.is_symlink()
    assert out.stat().st_mode & 0o777 == 0o640
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f".r.html.{os.getpid()}.tmp", "r.html", "victim"])


def test_text_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    with pytest.raises(tools.UsageError, match=r"--html .*r.html: .*surrogate"):
        report_command._write(out, "lone \ud800 surrogate", "--html")
    assert list(tmp_path.iterdir()) == []


# --- H1, L8, L10 (the reads) --------------------------------------------------------------------


def _big(path: Path, devices: int, per: int) -> None:
    """A store with ``per`` appraisals of each of ``devices`` devices in the last day,
    written with plain SQL (off the chains: the report is told not to verify them)."""
    make_database(path)
    start = datetime.datetime.now(UTC) - datetime.timedelta(hours=23)
    with sqlite3.connect(path) as db:
        for n in range(devices):
            db.execute(
                "INSERT INTO devices (device_id, state, ek_certificate, ek_public, ak_public, "
                "ak_name, host, zone, labels, enrolled_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (f"{n:064x}", "enrolled", b"", b"", b"", "", '{"hostname": "h"}', "lab", "{}",
                 (start - datetime.timedelta(days=1)).isoformat()),
            )  # fmt: skip
        rows = []
        for i in range(per):
            for n in range(devices):
                at = start + datetime.timedelta(seconds=60 * i + n)
                tier = "warning" if i % 5 == 4 else "affirming"
                findings = [{"id": f"f.{i % 3}", "message": "m" * 200}] if tier == "warning" else []
                expires = (at + datetime.timedelta(hours=1)).isoformat()
                detail = json.dumps(
                    {"expires_at": expires, "findings": findings, "claims": {}, "pad": "p" * 300}
                )
                rows.append((at.isoformat(), f"{n:064x}", "appraisal", tier, detail, "device"))
        db.executemany(
            "INSERT INTO audit (at, device_id, event, tier, detail, actor) VALUES (?,?,?,?,?,?)",
            rows,
        )


def _peak(path: Path) -> tuple[int, int]:
    """The report's peak of Python memory on ``path`` (in-process), and its appraisals."""
    tracemalloc.start()
    try:
        args = report_command_args(path)
        now = datetime.datetime.now(UTC)
        since, until = now - datetime.timedelta(days=1), now
        with report_data.reading(str(path)) as db:
            store = db.store(since=since, until=until, zone=None, verify=False)
            period = report_figures.Period(
                store, since=since, until=until, minimums=report_figures.Minimums()
            )
            count = db.stream(
                period, {d.device_id for d in store.devices}, since=since, until=until
            )
        del args
        return tracemalloc.get_traced_memory()[1], count
    finally:
        tracemalloc.stop()


def report_command_args(path: Path) -> list[str]:
    return ["--database", str(path), "--json", "-", "--no-verify-chains"]


def test_the_periods_appraisals_are_streamed_in_memory_that_does_not_grow(tmp_path: Path) -> None:
    small, large = tmp_path / "small.db", tmp_path / "large.db"
    _big(small, 20, 40)
    _big(large, 20, 800)
    small_peak, small_count = _peak(small)
    large_peak, large_count = _peak(large)
    assert (small_count, large_count) == (800, 16000)
    # Twenty times the appraisals: the memory is the devices' and the findings', not theirs.
    assert large_peak < 2 * small_peak + 512 * 1024, (small_peak, large_peak)
    # And the command's figures are those appraisals'.
    run = report(*report_command_args(large))
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["appraisals"] == 16000
    assert {f["id"]: f["appraisals"] for f in doc["findings"]} == {
        "f.0": 20 * 53, "f.1": 20 * 54, "f.2": 20 * 53,
    }  # fmt: skip
    assert doc["audit"]["verified"] is False
    assert "--no-verify-chains" in doc["audit"]["why"]


def test_the_period_is_read_by_its_index(tmp_path: Path) -> None:
    db = tmp_path / "v.db"
    make_database(db)
    with sqlite3.connect(db) as conn:
        plan = " ".join(
            str(r[3])
            for r in conn.execute("EXPLAIN QUERY PLAN " + report_data._PERIOD["sqlite"], ("a", "b"))
        )
        revoked = " ".join(
            str(r[3])
            for r in conn.execute(
                "EXPLAIN QUERY PLAN SELECT device_id, at FROM audit WHERE event = 'revoked' "
                "ORDER BY at, id"
            )
        )
    assert "USING INDEX audit_event_at" in plan
    assert "TEMP B-TREE" not in plan  # no sort: the index's order
    assert "audit_event_at" in revoked


def test_chains_are_verified_in_the_figures_snapshot_and_only_up_to_a_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "v.db"
    make_database(db)

    def elsewhere(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("verified in a snapshot of its own")

    monkeypatch.setattr(audit_db, "verify", elsewhere)
    with report_data.reading(str(db)) as reading:
        assert reading.store(since=NOW, until=NOW, zone=None, verify=None).audit.verified
        assert not reading.store(since=NOW, until=NOW, zone=None, verify=False).audit.verified
    monkeypatch.setattr(report_data, "VERIFY_LIMIT", -1)
    with report_data.reading(str(db)) as reading:
        status = reading.store(since=NOW, until=NOW, zone=None, verify=None).audit
        assert (status.verified, status.intact) == (False, None)
        assert "--verify-chains" in status.why
        assert reading.store(since=NOW, until=NOW, zone=None, verify=True).audit.verified


def test_an_sqlite_file_rewritten_during_the_read_is_read_again(tmp_path: Path) -> None:
    db = tmp_path / "v.db"
    make_database(db)
    reads = []

    def write(key: str) -> None:
        """A verifier's write, checkpointed into the file when it closes."""
        with closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, 'y')", (key,))

    def read() -> int:
        reads.append(1)
        if len(reads) == 1:  # a verifier started meanwhile, and checkpointed
            write("x")
        return len(reads)

    assert report_data.consistent(str(db), read) == 2

    def always() -> int:
        reads.append(1)
        write(str(len(reads)))
        return 0

    with pytest.raises(ConfigError, match="changed while it was read, 3 times"):
        report_data.consistent(str(db), always)


def test_postgresql_sessions_are_read_only_by_default() -> None:
    url = report_data.read_only_url(
        "postgresql://u:pw@h:5432/db?sslmode=require&options=-c%20x%3D1"
    )
    assert url.startswith("postgresql://u:pw@h:5432/db?")
    assert "sslmode=require" in url
    assert "options=-c%20x%3D1%20-c%20default_transaction_read_only%3Don" in url


# --- L11 ---------------------------------------------------------------------------------------


def test_a_one_letter_password_is_hidden_only_where_it_stands_whole() -> None:
    text = (
        'connection to server at "127.0.0.1", port 5432 failed: is the server accepting '
        "connections? (postgresql://devtrust:p@127.0.0.1/db?password=p 'p')"
    )
    assert hide(text, ["p"]) == (
        'connection to server at "127.0.0.1", port 5432 failed: is the server accepting '
        "connections? (postgresql://devtrust:***@127.0.0.1/db?password=*** '***')"
    )
    assert hide("user=u password=s3cret host=h", ["s3cret"]) == "user=u password=*** host=h"
