"""How audit entries are written (verifier/storage/audit_rows.py) on real databases: every
event the verifier writes is a typed one (its call sites read from the source), an unknown
one is refused with nothing written, checkpoints every N entries, entries written before the
chains sealed (at their chain's next entry, or by `devtrust audit seal`) and never an entry
slipped in later; on PostgreSQL, two replicas appending to one device's chain at once keep
it intact."""

from __future__ import annotations

import ast
import asyncio
import datetime
import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from devtrust import cli
from devtrust.core.ids import Serial
from devtrust.verifier import audit_chain, audit_db
from devtrust.verifier.audit_chain import Event
from devtrust.verifier.records import (
    CertificateRecord,
    DeviceRecord,
    DeviceState,
    PendingEnrollment,
)
from devtrust.verifier.storage import audit_rows, open_repositories, pg_engine
from devtrust.verifier.storage.postgresql import PgRepositories
from devtrust.verifier.storage.sqlite_engine import open_database
from tests import pg
from tests.db import NOW, decision, device, device_id, make_database, run

ROOT = Path(__file__).resolve().parent.parent
MINUTE = datetime.timedelta(minutes=1)


# --- every call site's event is a typed one ------------------------------------------------


def _constants(trees: list[ast.Module]) -> dict[str, str]:
    """Module-level string constants of every module, by name (EVENT = "...")."""
    return {
        t.id: node.value.value
        for tree in trees
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for t in node.targets
        if isinstance(t, ast.Name) and isinstance(node.value.value, str)
    }


def _writes_audit(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return "audit" in name or name == "AuditEvent"


def _call_site_events() -> Iterator[tuple[str, int, str]]:
    """(file, line, event) for every event the verifier's code names where it writes an
    audit entry: an ``event=`` keyword, or an argument of ``AuditEvent(...)`` or of a
    function whose name says audit, given a literal, a module constant or ``Event.NAME``;
    an f-string names its prefix + "*"."""
    paths = sorted((ROOT / "verifier").rglob("*.py"))
    trees = [ast.parse(path.read_text(encoding="utf-8")) for path in paths]
    constants = _constants(trees)
    for path, tree in zip(paths, trees, strict=True):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            args: list[ast.expr] = [k.value for k in node.keywords if k.arg == "event"]
            if _writes_audit(node):
                args += node.args
            for arg in args:
                where = (str(path.relative_to(ROOT)), node.lineno)
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield (*where, arg.value)
                elif isinstance(arg, ast.Name) and arg.id.isupper() and arg.id in constants:
                    yield (*where, constants[arg.id])
                elif (
                    isinstance(arg, ast.Attribute)
                    and isinstance(arg.value, ast.Name)
                    and arg.value.id == "Event"
                ):
                    # Event.NAME: a member that does not exist is an AttributeError here.
                    yield (*where, getattr(Event, arg.attr).value)
                elif isinstance(arg, ast.JoinedStr):
                    head = arg.values[0]
                    assert isinstance(head, ast.Constant), where
                    yield (*where, f"{head.value!s}*")


def test_every_call_site_names_a_typed_event() -> None:
    found = list(_call_site_events())
    events = {e for _, _, e in found}
    # The reader sees the sites known to exist (a walk that found nothing would pass).
    assert {"appraisal", "approved", "assigned:inventory", "enrolled:*", "revoked"} <= events
    assert {"certificates_revoked", "policy_changed", "role_changed"} <= events
    for file, line, event in found:
        if event.endswith("*"):
            assert any(e.startswith(event[:-1]) for e in Event), (file, line, event)
        else:
            assert event in set(Event), f"{file}:{line}: {event!r} is no audit_chain.Event"
    # Enrollment names its event from the state it leaves the device in.
    for state in (DeviceState.ENROLLED, DeviceState.PENDING_APPROVAL):
        audit_chain.event_type(f"enrolled:{state.value}")


def test_an_unknown_event_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    async def scenario() -> tuple[object, object]:
        repos = await open_repositories(tmp_path / "v.db")
        try:
            with pytest.raises(ValueError, match="audit event 'enrolled' is not one of"):
                await repos.devices.save(device(1), now=NOW, event="enrolled")
            return await repos.devices.get(device_id(1)), await repos.counts()
        finally:
            await repos.close()

    record, counts = run(scenario)
    assert record is None
    assert isinstance(counts, dict)
    assert counts["audit"] == 0


def test_every_event_is_written_on_its_chain(tmp_path: Path) -> None:
    make_database(tmp_path / "v.db")
    db, _ = open_database(tmp_path / "v.db", create=False, read_only=False)
    with closing(db):
        for event in Event:
            kind = audit_chain.EVENTS[event]
            actor = "local/root" if audit_chain.Actor.LOCAL in kind.actors else ""
            dev = "" if kind.chain else device_id(1)
            if event == Event.CHAIN_STARTED:  # only append's own, naming the chain announced
                with pytest.raises(ValueError, match="names no chain"):
                    audit_rows.append(db, at=NOW, device_id=dev, event=event, detail={})
                continue
            audit_rows.append(db, at=NOW, device_id=dev, event=event, detail={}, actor=actor)
        rows = db.execute("SELECT chain, event, detail FROM audit ORDER BY id").fetchall()
    assert [tuple(r[:2]) for r in rows if r[1] != Event.CHAIN_STARTED] == [
        (audit_chain.EVENTS[e].chain or device_id(1), str(e))
        for e in Event
        if e != Event.CHAIN_STARTED
    ]
    # Each chain's first entry is announced on its shard of "chains", in its transaction;
    # each shard's first entry on the root "chains".
    started = [(json.loads(r[2]).get("chain"), r[0]) for r in rows if r[1] == Event.CHAIN_STARTED]
    chains = [device_id(1), "policy", "roles", "audit"]
    shards = {audit_chain.announced_on(c) for c in chains}
    assert sorted(started) == sorted(
        [(c, audit_chain.announced_on(c)) for c in chains] + [(s, "chains") for s in shards]
    )
    assert all(on in audit_chain.ANNOUNCING for _, on in started)


# --- checkpoints ---------------------------------------------------------------------------


def _appraisals(db: sqlite3.Connection, count: int, *, every: int = 1000) -> None:
    for n in range(count):
        audit_rows.append(
            db,
            at=NOW + n * MINUTE,
            device_id=device_id(1),
            event="appraisal",
            detail={"n": n},
            tier="affirming",
            checkpoint_every=every,
        )


def test_checkpoints_every_n_entries_show_a_truncation_with_its_head_rewritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "v.db"
    make_database(path)
    db, _ = open_database(path, create=False, read_only=False)
    with closing(db):
        _appraisals(db, 7, every=3)
        marks = db.execute("SELECT chain_seq, pruned FROM audit_checkpoints").fetchall()
        assert [tuple(m) for m in marks] == [(3, 0), (6, 0)]
        assert cli.main(["audit", "verify", "--database", str(path)]) == 0
        # The tail after seq 4 gone, and the head made to match what is left.
        [(h,)] = db.execute(
            "SELECT hash FROM audit WHERE chain = ? AND chain_seq = 4", (device_id(1),)
        ).fetchall()
        db.execute("DELETE FROM audit WHERE chain = ? AND chain_seq > 4", (device_id(1),))
        db.execute("UPDATE audit_heads SET seq = 4, hash = ? WHERE chain = ?", (h, device_id(1)))
    capsys.readouterr()
    assert cli.main(["audit", "verify", "--database", str(path)]) == 1
    assert capsys.readouterr().out == (
        f"audit broken: chain {device_id(1)} seq 5: missing: a checkpoint at seq 6 lies past "
        "the last entry (seq 4)\n"
    )


# --- entries written before the chains -----------------------------------------------------


def _unseal(path: Path) -> None:
    """The database as schema step 7 leaves one made before it: every entry off a chain."""
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("DELETE FROM audit WHERE event = 'chain_started'")
        db.execute("UPDATE audit SET chain = NULL, chain_seq = NULL, prev_hash = NULL, hash = NULL")
        db.execute("DELETE FROM audit_heads")
        db.execute("DELETE FROM audit_checkpoints")
        db.execute("UPDATE audit_legacy SET last_id = (SELECT MAX(id) FROM audit)")


def _old_fleet(path: Path) -> None:
    async def scenario() -> None:
        repos = await open_repositories(path)
        try:
            for n in (1, 2):
                await repos.devices.save(device(n), now=NOW, event="enrolled:enrolled")
                await repos.trust.record(decision(n, at=NOW + MINUTE))
        finally:
            await repos.close()

    run(scenario)
    _unseal(path)


def _verify(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = cli.main(["audit", "verify", "--database", str(path)])
    return status, capsys.readouterr().out


def test_old_entries_are_sealed_by_the_command_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "v.db"
    _old_fleet(path)
    status, out = _verify(path, capsys)
    assert status == 1
    assert "4 entries are on no chain" in out
    assert "devtrust audit seal" in out
    assert cli.main(["audit", "seal", "--database", str(path)]) == 0
    assert capsys.readouterr().out == "sealed 4 entries written before the chains\n"
    # The two device chains, the shards announcing them, and "chains" announcing those.
    shards = len({audit_chain.announced_on(device_id(n)) for n in (1, 2)})
    expected = f"audit intact: {3 + shards} chains, {6 + shards} entries\n"
    assert _verify(path, capsys) == (0, expected)
    assert cli.main(["audit", "seal", "--database", str(path)]) == 0
    assert capsys.readouterr().out == "sealed 0 entries written before the chains\n"
    with closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT chain, chain_seq, event FROM audit WHERE event <> 'chain_started' ORDER BY id"
        ).fetchall()
    assert rows == [
        (device_id(1), 1, "enrolled:enrolled"),
        (device_id(1), 2, "appraisal"),
        (device_id(2), 1, "enrolled:enrolled"),
        (device_id(2), 2, "appraisal"),
    ]


def test_old_entries_are_sealed_at_their_chain_next_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "v.db"
    _old_fleet(path)
    run(lambda: _record(path, decision(1, at=NOW + 2 * MINUTE)))
    with closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT chain_seq FROM audit WHERE device_id = ? ORDER BY id", (device_id(1),)
        ).fetchall()
    assert rows == [(1,), (2,), (3,)]
    status, out = _verify(path, capsys)
    assert status == 1  # device 2 has had no entry since: its old ones wait for the seal
    with closing(sqlite3.connect(path)) as db:
        [(first,)] = db.execute(
            "SELECT MIN(id) FROM audit WHERE device_id = ?", (device_id(2),)
        ).fetchall()
    assert out.startswith(f"audit broken: chain {device_id(2)} seq 0 (id {first}): not on its")
    assert cli.main(["audit", "seal", "--database", str(path)]) == 0
    assert _verify(path, capsys)[0] == 0


def test_an_entry_slipped_in_after_its_chain_began_is_never_sealed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "v.db"
    _old_fleet(path)
    assert cli.main(["audit", "seal", "--database", str(path)]) == 0
    with closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "INSERT INTO audit (at, device_id, event, tier, detail, actor) "
            "VALUES (?, ?, 'approved', '', '{}', 'operator/mallory')",
            (NOW.isoformat(), device_id(1)),
        )
    assert cli.main(["audit", "seal", "--database", str(path)]) == 0
    assert "sealed 0 entries" in capsys.readouterr().out
    run(lambda: _record(path, decision(1, at=NOW + 2 * MINUTE)))
    status, out = _verify(path, capsys)
    assert status == 1
    assert "1 entries are on no chain (the first: event 'approved'): inserted after" in out


def test_an_entry_slipped_in_before_its_chain_began_is_never_sealed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review M4: a row inserted off the chains for a device (or a named chain) that has
    no chain yet is not folded into the chain its next genuine entry starts: only rows
    from before schema step 7 are sealed."""
    path = tmp_path / "v.db"
    make_database(path)
    with closing(sqlite3.connect(path)) as db, db:
        for dev, event in ((device_id(3), "approved"), ("", "role_changed")):
            db.execute(
                "INSERT INTO audit (at, device_id, event, tier, detail, actor) "
                "VALUES (?, ?, ?, '', '{}', 'operator/mallory')",
                (NOW.isoformat(), dev, event),
            )

    async def scenario() -> None:
        repos = await open_repositories(path)
        try:
            await repos.devices.save(device(3), now=NOW, event="enrolled:enrolled")
            await repos.roles.set("bob", "viewer", now=NOW, actor="operator/alice")
        finally:
            await repos.close()

    run(scenario)
    assert cli.main(["audit", "seal", "--database", str(path)]) == 0
    assert "sealed 0 entries" in capsys.readouterr().out
    with closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT chain, actor FROM audit ORDER BY id LIMIT 2").fetchall()
    assert rows == [(None, "operator/mallory"), (None, "operator/mallory")]
    status, out = _verify(path, capsys)
    assert status == 1
    assert out.startswith(
        f"audit broken: chain {device_id(3)} seq 0 (id 1): not on its chain: 2 entries are "
        "on no chain (the first: event 'approved'): inserted after the chains began (id "
        "above 0, the last entry from before them): not written by the verifier"
    )


async def _record(path: Path | str, *decisions: object) -> None:
    repos = await open_repositories(path)
    try:
        for d in decisions:
            await repos.trust.record(d)  # type: ignore[arg-type]
    finally:
        await repos.close()


# --- replicas ------------------------------------------------------------------------------


def test_two_replicas_appending_to_one_chain_keep_it_intact(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two verifier processes' repositories on one PostgreSQL store appraisals of the same
    device at once: their appends conflict on the chain's head row, one transaction runs
    again, and the chain has every entry once, in order."""
    server = pg.server()
    url = server.url(server.create_database())
    per_replica = 25

    async def scenario() -> None:
        first = await open_repositories(url)
        second = await open_repositories(url)
        try:
            await first.devices.save(device(1), now=NOW, event="enrolled:enrolled")

            # Every decision at once: each replica's pool runs several transactions, and
            # all of them extend the one chain.
            await asyncio.gather(
                *(
                    (first if n % 2 else second).trust.record(decision(1, at=NOW + n * MINUTE))
                    for n in range(1, 1 + 2 * per_replica)
                )
            )
        finally:
            await first.close()
            await second.close()

    run(scenario)
    assert cli.main(["audit", "verify", "--database", url]) == 0
    # The device's chain, its shard announcing it and "chains" announcing the shard.
    assert capsys.readouterr().out == f"audit intact: 3 chains, {3 + 2 * per_replica} entries\n"
    with audit_db.opened(url, write=False) as db:
        rows = db.rows("SELECT chain_seq FROM audit WHERE chain = ? ORDER BY id", (device_id(1),))
        seqs = [int(r[0]) for r in rows]
    assert seqs == list(range(1, 2 + 2 * per_replica))


def _burst_of_first_enrollments(url: str, count: int) -> tuple[list[object], int, int]:
    """``count`` devices, each with an enrollment waiting, activated all at once through two
    replicas' repositories (each its own pool): every activation writes the device's
    chain's first entry and its announcement. The outcomes, the conflicts lost, and the
    most runs any one write took."""
    most = 0
    conflicts = pg_engine._conflicts

    def counting(attempt: int, exc: BaseException, where: str) -> None:
        nonlocal most
        most = max(most, attempt + 1)
        conflicts(attempt, exc, where)

    def certificate(n: int) -> CertificateRecord:
        return CertificateRecord(
            serial=Serial(f"{n:040x}"),
            device_id=device_id(n),
            kind="channel",
            not_before=NOW,
            not_after=NOW + datetime.timedelta(days=1),
            der=b"der",
        )

    def decide(n: int) -> Callable[[object, object], DeviceRecord]:
        return lambda existing, token: device(n)

    async def scenario() -> tuple[list[object], int]:
        first = await open_repositories(url)
        second = await open_repositories(url)
        assert isinstance(first, PgRepositories)
        assert isinstance(second, PgRepositories)
        try:
            for n in range(count):
                pending = PendingEnrollment(
                    enrollment_id=f"e{n}",
                    record=device(n),
                    secret=b"s",
                    channel_key_spki=b"k",
                    expires_at=NOW + datetime.timedelta(minutes=5),
                )
                await first.enrollments.put(pending, now=NOW, max_per_device=4, max_total=count)
            outcomes = await asyncio.gather(
                *(
                    (first if n % 2 else second).devices.activate(
                        f"e{n}",
                        device_id=device_id(n),
                        token_sha256="",
                        decide=decide(n),
                        certificate=certificate(n),
                        now=NOW,
                    )
                    for n in range(count)
                ),
                return_exceptions=True,
            )
            return list(outcomes), first.engine.conflicts + second.engine.conflicts
        finally:
            await first.close()
            await second.close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pg_engine, "_conflicts", counting)
        outcomes, lost = run(scenario)
    return outcomes, lost, most


def test_a_burst_of_first_enrollments_on_two_replicas_all_succeed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A fleet enrolling at once (40 devices, two replicas): every first entry is announced,
    on the shard of "chains" its chain's name hashes to, so the announcements spread over
    sixteen heads and no write loses every run (the 1,000-device burst lost one, on the one
    "chains" head, and took a replica's health down); the audit verifies."""
    server = pg.server()
    url = server.url(server.create_database())
    count = 40
    outcomes, lost, most = _burst_of_first_enrollments(url, count)
    assert [o for o in outcomes if isinstance(o, BaseException)] == []
    assert most < pg_engine.MAX_ATTEMPTS, (lost, most)
    assert cli.main(["audit", "verify", "--database", url]) == 0
    shards = {audit_chain.announced_on(device_id(n)) for n in range(count)}
    assert len(shards) > 8  # spread, not one head
    # Each device's chain (its enrollment), its shard, and the root announcing the shards.
    out = capsys.readouterr().out.splitlines()[-1]
    assert (
        out == f"audit intact: {count + len(shards) + 1} chains, {2 * count + len(shards)} entries"
    )
