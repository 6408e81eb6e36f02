"""`devtrust audit verify` end to end (issue 12, item 4, "must show"): a database made by
the verifier's own repositories (enrollments, appraisals, an operator's zone change and
revocation, a role and a policy change) verifies intact; in a copy, an edit, a deletion, a
reordering, a truncated tail or an entry slipped in is named at its first broken record.
Retention (`devtrust audit prune`) keeps the rest verifiable, and a deletion past it shows.
"""

from __future__ import annotations

import datetime
import itertools
import json
import shutil
import sqlite3
from pathlib import Path

import psycopg
import pytest

from devtrust import cli
from devtrust.core.tier import Tier
from devtrust.verifier import audit_chain, audit_db
from devtrust.verifier.records import AuditEvent, DeviceState, Standing
from devtrust.verifier.storage import open_repositories
from devtrust.verifier.storage.interfaces import StoredPolicy
from tests import pg
from tests.db import NOW, decision, device, device_id, run

DEVICES = 3
APPRAISALS = 6  # per device, one a minute from NOW
OPERATOR = "operator/alice"
MINUTE = datetime.timedelta(minutes=1)


async def _fleet(database: str) -> None:
    """What a verifier writes for a small fleet, through its repositories."""
    repos = await open_repositories(database)
    try:
        for n in range(DEVICES):
            await repos.devices.save(device(n), now=NOW, event="enrolled:enrolled")
        for minute in range(APPRAISALS):
            for n in range(DEVICES):
                tier = Tier.WARNING if minute == 3 else Tier.AFFIRMING
                await repos.trust.record(decision(n, at=NOW + minute * MINUTE, tier=tier))
        before = Standing(DeviceState.ENROLLED, "", {})
        after = Standing(DeviceState.ENROLLED, "lab", {"rack": "4"})
        event = AuditEvent("assigned:operator", {"zone": "lab", "labels": {"rack": "4"}})
        later = NOW + APPRAISALS * MINUTE
        assert await repos.operations.apply(
            device_id(0), before=before, after=after, events=(event,), actor=OPERATOR, now=later
        )
        await repos.revocations.revoke_device(
            device_id(1), reason="stolen", actor=OPERATOR, now=later
        )
        await repos.roles.set("bob", "viewer", now=later, actor=OPERATOR)
        policy = StoredPolicy("p1", "ab" * 32, {"policy.yaml": "x: 1\n"}, later)
        await repos.policies().publish(policy, actor=OPERATOR, origin="test", now=later)
    finally:
        await repos.close()


class Store:
    """A database of one backend, as `--database` names it, and the tampering done to it
    by someone with its file or its credentials: plain SQL, ``?`` marks."""

    def __init__(self, backend: str, base: Path) -> None:
        self.backend = backend
        self.name = ""
        if backend == "sqlite":
            self.url = str(base / "verifier.db")
        else:
            self.name = pg.server().create_database()
            self.url = pg.server().url(self.name)

    def copy(self, tmp_path: Path) -> Store:
        twin = Store.__new__(Store)
        twin.backend = self.backend
        if self.backend == "sqlite":
            twin.name, twin.url = "", str(tmp_path / "copy.db")
            shutil.copy(self.url, twin.url)
            return twin
        twin.name = f"{self.name}_c{next(_copies)}"
        with psycopg.connect(pg.server().url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {twin.name} TEMPLATE {self.name}")
        twin.url = pg.server().url(twin.name)
        return twin

    def sql(self, statement: str, *params: object) -> list[tuple[object, ...]]:
        if self.backend == "sqlite":
            with sqlite3.connect(self.url) as db:
                rows = db.execute(statement, params).fetchall()
            db.close()
            return rows
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(statement.replace("?", "%s"), params)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []


_copies = itertools.count(1)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Store:
    store = Store(request.param, tmp_path_factory.mktemp("audit"))
    run(lambda: _fleet(store.url))
    return store


@pytest.fixture
def copy(fleet: Store, tmp_path: Path) -> Store:
    """A copy of the fleet's database to tamper with."""
    return fleet.copy(tmp_path)


def audit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = cli.main(["audit", *argv])
    out = capsys.readouterr()
    return status, out.out + out.err


def verify(capsys: pytest.CaptureFixture[str], store: Store) -> tuple[int, str]:
    return audit(capsys, "verify", "--database", store.url)


def entry_id(store: Store, chain: str, seq: int) -> int:
    [(found,)] = store.sql("SELECT id FROM audit WHERE chain = ? AND chain_seq = ?", chain, seq)
    assert isinstance(found, int)
    return found


DEV0 = device_id(0)
DEV2 = device_id(2)
# The shards announcing the fleet's chains (the devices', policy, roles): each is a chain,
# announced on the root "chains".
SHARDS = {audit_chain.announced_on(c) for c in [*map(device_id, range(DEVICES)), "policy", "roles"]}


def test_the_untouched_database_verifies(fleet: Store, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = verify(capsys, fleet)
    # 3 devices, policy, roles: enrollment + 6 appraisals each, a zone change, a revocation;
    # and the shards announcing the other five, and "chains" announcing the shards.
    entries = DEVICES * (1 + APPRAISALS) + 1 + 1 + 1 + 1 + (DEVICES + 2) + len(SHARDS)
    chains = DEVICES + 2 + len(SHARDS) + 1
    assert (status, out.strip()) == (0, f"audit intact: {chains} chains, {entries} entries")
    status, out = audit(capsys, "verify", "--database", fleet.url, "--json")
    report = json.loads(out)
    assert report["intact"] is True
    assert report["broken"] == []
    assert report["heads"]["policy"]["seq"] == 1
    assert report["heads"][DEV2]["seq"] == 1 + APPRAISALS


def test_every_entry_is_on_its_chain_with_its_actor(fleet: Store) -> None:
    rows = fleet.sql("SELECT chain, chain_seq, event, actor FROM audit ORDER BY id")
    assert all(chain is not None for chain, *_ in rows)
    events = {(str(chain), str(event), str(actor)) for chain, _, event, actor in rows}
    assert (DEV0, "enrolled:enrolled", "device") in events
    assert (DEV0, "appraisal", "device") in events
    assert (DEV0, "assigned:operator", OPERATOR) in events
    assert (device_id(1), "revoked", OPERATOR) in events
    assert ("roles", "role_changed", OPERATOR) in events
    assert ("policy", "policy_changed", OPERATOR) in events
    seqs = [int(str(seq)) for chain, seq, *_ in rows if chain == DEV2]
    assert seqs == list(range(1, 1 + 1 + APPRAISALS))


def test_an_edit_is_named(copy: Store, capsys: pytest.CaptureFixture[str]) -> None:
    target = entry_id(copy, DEV0, 5)  # the appraisal at minute 3: warning
    copy.sql("UPDATE audit SET tier = 'affirming' WHERE id = ?", target)
    status, out = verify(capsys, copy)
    assert status == 1
    first = out.splitlines()[0]
    assert first == (
        f"audit broken: chain {DEV0} seq 5 (id {target}): edited: its content does not "
        "hash to its stored hash"
    )


def test_an_edit_of_the_detail_json_is_named(
    copy: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    target = entry_id(copy, DEV2, 1)
    copy.sql("UPDATE audit SET detail = ? WHERE id = ?", '{"zone": "prod"}', target)
    status, out = verify(capsys, copy)
    assert status == 1
    assert out.startswith(f"audit broken: chain {DEV2} seq 1 (id {target}): edited")


def test_an_edit_with_its_hash_recomputed_is_named_at_the_next_link(
    copy: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whoever knows the encoding and rewrites one entry's hash breaks the link after it."""
    [row] = copy.sql(
        "SELECT id, chain_seq, at, device_id, event, actor, tier, detail, prev_hash FROM audit "
        "WHERE chain = ? AND chain_seq = 3",
        DEV0,
    )
    target, seq, at, dev, event, actor, _, detail, prev = (str(v) for v in row)
    forged = audit_chain.Entry(
        DEV0, int(seq), audit_chain.canonical_at(at), dev, event, actor, "none",
        detail,
    )  # fmt: skip
    digest = audit_chain.link(prev, forged)
    copy.sql("UPDATE audit SET tier = 'none', hash = ? WHERE id = ?", digest, target)
    status, out = verify(capsys, copy)
    assert status == 1
    after = entry_id(copy, DEV0, 4)
    assert out.startswith(
        f"audit broken: chain {DEV0} seq 4 (id {after}): edited: its prev_hash is not the "
        f"hash of seq 3 (id {target})"
    )


def test_a_deletion_is_named(copy: Store, capsys: pytest.CaptureFixture[str]) -> None:
    copy.sql("DELETE FROM audit WHERE id = ?", entry_id(copy, DEV2, 3))
    status, out = verify(capsys, copy)
    assert status == 1
    assert out.startswith(f"audit broken: chain {DEV2} seq 3: missing: entries 3..3 are gone")


def test_a_deleted_tail_is_named(copy: Store, capsys: pytest.CaptureFixture[str]) -> None:
    copy.sql("DELETE FROM audit WHERE chain = ? AND chain_seq >= 6", DEV2)
    status, out = verify(capsys, copy)
    assert status == 1
    assert out.startswith(
        f"audit broken: chain {DEV2} seq 6: missing: entries 6..7 are gone: the head is at "
        "seq 7, the last entry at seq 5"
    )


def test_a_reordering_is_named(copy: Store, capsys: pytest.CaptureFixture[str]) -> None:
    """Two entries of a chain swap places (their row ids)."""
    a, b = entry_id(copy, DEV0, 2), entry_id(copy, DEV0, 3)
    copy.sql("UPDATE audit SET id = -1 WHERE id = ?", a)
    copy.sql("UPDATE audit SET id = ? WHERE id = ?", a, b)
    copy.sql("UPDATE audit SET id = ? WHERE id = -1", b)
    status, out = verify(capsys, copy)
    assert status == 1
    assert out.startswith(f"audit broken: chain {DEV0} seq 3 (id {a}): out of order")


def test_an_entry_slipped_in_off_the_chains_is_named(
    copy: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    copy.sql(
        "INSERT INTO audit (at, device_id, event, tier, detail, actor) "
        "VALUES (?, ?, 'approved', '', '{}', ?)",
        NOW.isoformat(),
        DEV0,
        OPERATOR,
    )
    status, out = verify(capsys, copy)
    assert status == 1
    assert f"audit broken: chain {DEV0} seq 0 (id " in out
    assert "1 entries are on no chain (the first: event 'approved')" in out


def test_verify_reads_one_chain_and_refuses_what_it_cannot_read(
    copy: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy.sql("DELETE FROM audit WHERE id = ?", entry_id(copy, DEV2, 3))
    assert audit(capsys, "verify", "--database", copy.url, "--chain", DEV0)[0] == 0
    assert audit(capsys, "verify", "--database", copy.url, "--chain", DEV2)[0] == 1
    status, out = audit(capsys, "verify", "--database", str(tmp_path / "none.db"))
    assert status == 2
    assert out.strip() == (
        f"devtrust: no verifier database at {tmp_path / 'none.db'}: run `devtrust-verifier "
        "serve` once, or fix --database"
    )
    with pytest.raises(SystemExit) as exc:
        cli.main(["audit", "verify"])
    assert exc.value.code == 2


# --- retention -----------------------------------------------------------------------------


def test_prune_keeps_the_chains_verifiable(copy: Store, capsys: pytest.CaptureFixture[str]) -> None:
    cut = (NOW + 3 * MINUTE).isoformat()
    status, out = audit(capsys, "prune", "--database", copy.url, "--before", cut)
    assert status == 0
    # Each device chain: its enrollment and its appraisals at minutes 0, 1, 2.
    assert f"pruned {DEVICES * 4} entries before {cut} from {DEVICES} chains" in out
    assert verify(capsys, copy)[0] == 0
    first = copy.sql("SELECT MIN(chain_seq) FROM audit WHERE chain = ?", DEV0)
    assert first == [(5,)]
    [(actor,)] = copy.sql("SELECT actor FROM audit WHERE event = 'audit_pruned'")
    assert str(actor).startswith("local/")
    # A chain's last entry stays, however old (the policy's, published before the cut).
    status, out = audit(capsys, "prune", "--database", copy.url, "--before", "2099-01-01")
    assert status == 2
    assert "is in the future" in out
    assert copy.sql("SELECT COUNT(*) FROM audit WHERE chain = 'policy'") == [(1,)]


def test_a_deletion_after_pruning_is_named(copy: Store, capsys: pytest.CaptureFixture[str]) -> None:
    cut = (NOW + 3 * MINUTE).isoformat()
    assert audit(capsys, "prune", "--database", copy.url, "--before", cut)[0] == 0
    copy.sql("DELETE FROM audit WHERE id = ?", entry_id(copy, DEV0, 5))
    status, out = verify(capsys, copy)
    assert status == 1
    assert out.startswith(
        f"audit broken: chain {DEV0} seq 6 (id {entry_id(copy, DEV0, 6)}): missing: entries "
        "1..5 are gone and no pruning checkpoint at seq 5 accounts for them"
    )


def test_prune_everything_old_keeps_each_last_entry(
    copy: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = datetime.datetime.now(datetime.UTC).isoformat()
    assert audit(capsys, "prune", "--database", copy.url, "--before", cut)[0] == 0
    assert verify(capsys, copy)[0] == 0
    rows = copy.sql("SELECT chain, COUNT(*) FROM audit GROUP BY chain")
    per_chain = {str(chain): int(str(n)) for chain, n in rows}
    # One entry left per chain, and the audit chain's own record of the pruning; the
    # announcing chains (of the other six, and of the shards) are never pruned, nor "audit".
    announcing = {c: per_chain.pop(c) for c in list(per_chain) if c in audit_chain.ANNOUNCING}
    assert sum(announcing.values()) == DEVICES + 3 + len(announcing) - 1
    assert set(per_chain.values()) == {1}
    assert len(per_chain) == DEVICES + 3
    [(detail,)] = copy.sql("SELECT detail FROM audit WHERE event = 'audit_pruned'")
    pruned = json.loads(str(detail))["pruned"]
    marks = copy.sql("SELECT chain, chain_seq, hash FROM audit_checkpoints WHERE pruned = 1")
    assert sorted(pruned) == sorted([str(c), int(str(n)), str(h)] for c, n, h in marks)


# --- a chain rewritten with its hashes: only heads kept elsewhere show it ------------------


def _rewrite(store: Store, chain: str, *, seq: int, tier: str) -> None:
    """What someone able to write the database and knowing the encoding does: edit entry
    ``seq`` of ``chain``, then recompute every hash after it, and the head."""
    rows = store.sql(
        "SELECT id, chain_seq, at, device_id, event, actor, tier, detail FROM audit "
        "WHERE chain = ? ORDER BY chain_seq",
        chain,
    )
    prev = audit_chain.GENESIS
    for row in rows:
        id_, n, at, dev, event, actor, old_tier, detail = (str(v) for v in row)
        new_tier = tier if int(n) == seq else old_tier
        entry = audit_chain.Entry(
            chain, int(n), audit_chain.canonical_at(at), dev, event, actor, new_tier, detail
        )
        digest = audit_chain.link(prev, entry)
        store.sql(
            "UPDATE audit SET tier = ?, prev_hash = ?, hash = ? WHERE id = ?",
            new_tier, prev, digest, int(id_),
        )  # fmt: skip
        prev = digest
    store.sql("UPDATE audit_heads SET hash = ? WHERE chain = ?", prev, chain)


def test_a_rewritten_chain_shows_only_against_heads_recorded_before(
    fleet: Store, copy: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = audit(capsys, "verify", "--database", fleet.url, "--json")
    assert status == 0
    heads = tmp_path / "heads.json"
    heads.write_text(out)
    _rewrite(copy, DEV2, seq=5, tier="affirming")  # the warning at minute 3
    # The database alone cannot show it: every hash in it agrees.
    assert verify(capsys, copy)[0] == 0
    status, out = audit(capsys, "verify", "--database", copy.url, "--against", str(heads))
    assert status == 1
    last = entry_id(copy, DEV2, 7)
    assert out.startswith(
        f"audit broken: chain {DEV2} seq 7 (id {last}): checkpoint mismatch: the head recorded "
        "earlier at seq 7 holds another hash"
    )


def test_a_chain_rewritten_from_its_first_entry_shows_against_its_announcement(
    copy: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first hash of every chain is announced on its shard of "chains": a rewrite from
    seq 1 (hashes and head) shows without heads kept elsewhere."""
    _rewrite(copy, DEV2, seq=1, tier="hardware")
    status, out = verify(capsys, copy)
    assert status == 1
    assert out.startswith(
        f"audit broken: chain {DEV2} seq 1 (id {entry_id(copy, DEV2, 1)}): checkpoint "
        "mismatch: the chain_started announcement at seq 1 holds another hash"
    )


def test_a_truncated_tail_shows_against_heads_recorded_before(
    fleet: Store, copy: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    heads = tmp_path / "heads.json"
    heads.write_text(audit(capsys, "verify", "--database", fleet.url, "--json")[1])
    [(h,)] = copy.sql("SELECT hash FROM audit WHERE chain = ? AND chain_seq = 5", DEV2)
    copy.sql("DELETE FROM audit WHERE chain = ? AND chain_seq > 5", DEV2)
    copy.sql("UPDATE audit_heads SET seq = 5, hash = ? WHERE chain = ?", h, DEV2)
    assert verify(capsys, copy)[0] == 0
    status, out = audit(capsys, "verify", "--database", copy.url, "--against", str(heads))
    assert status == 1
    assert f"audit broken: chain {DEV2} seq 6: missing: a checkpoint at seq 7 lies past" in out
    heads.write_text('{"heads": {"x": {"seq": 1, "hash": "zz"}}}')
    status, out = audit(capsys, "verify", "--database", copy.url, "--against", str(heads))
    assert (status, out.strip()) == (
        2,
        f"devtrust: --against {heads}: not the output of `devtrust audit verify --json`",
    )


def test_a_time_edited_into_garbage_is_named_not_a_crash(
    copy: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    target = entry_id(copy, DEV0, 2)
    copy.sql("UPDATE audit SET at = 'yesterday' WHERE id = ?", target)
    status, out = verify(capsys, copy)
    assert status == 1
    assert out.startswith(f"audit broken: chain {DEV0} seq 2 (id {target}): edited")


def test_prune_refuses_a_broken_audit(copy: Store, capsys: pytest.CaptureFixture[str]) -> None:
    """Retention would delete the evidence of a break before the cut: it does nothing."""
    target = entry_id(copy, DEV0, 2)
    copy.sql("DELETE FROM audit WHERE id = ?", target)
    cut = (NOW + 3 * MINUTE).isoformat()
    status, out = audit(capsys, "prune", "--database", copy.url, "--before", cut)
    assert status == 1
    assert out.startswith(f"audit broken: chain {DEV0} seq 2: missing")
    assert "prune refused: it would delete what shows the break" in out
    assert copy.sql("SELECT COUNT(*) FROM audit WHERE event = 'audit_pruned'") == [(0,)]
    assert verify(capsys, copy)[0] == 1


# --- review 12: H2 (a faked pruning), M3 (a chain deleted whole), M4 (a row slipped in
# before its chain began), L1 (garbage values), L2 (prune reads outside a write) ----------


def _fake_pruning(store: Store, chain: str, upto: int) -> int:
    """What someone with the database does to erase a chain's first entries: delete them,
    and insert a pruning checkpoint holding the prev_hash of the first one left (copied,
    no hash computed). The id of that first entry."""
    [(first, prev)] = store.sql(
        "SELECT id, prev_hash FROM audit WHERE chain = ? AND chain_seq = ?", chain, upto + 1
    )
    store.sql("DELETE FROM audit WHERE chain = ? AND chain_seq <= ?", chain, upto)
    store.sql(
        "INSERT INTO audit_checkpoints (chain, chain_seq, hash, at, pruned) VALUES (?,?,?,?,1)",
        chain, upto, prev, NOW.isoformat(),
    )  # fmt: skip
    return int(str(first))


def test_a_faked_pruning_is_named(
    copy: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _fake_pruning(copy, DEV0, 3)  # its enrollment and two appraisals
    status, out = verify(capsys, copy)
    assert status == 1
    assert out.startswith(
        f"audit broken: chain {DEV0} seq 4 (id {first}): missing: entries 1..3 are gone and "
        "the pruning checkpoint at seq 3 is named by no audit_pruned entry"
    )


def test_a_faked_pruning_past_a_recorded_head_is_named_against_it(
    copy: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Heads recorded, the chain grows, then its prefix up to past the recorded head is
    erased with a faked pruning: the recorded head lies before the chain's first entry."""
    heads = tmp_path / "heads.json"
    heads.write_text(audit(capsys, "verify", "--database", copy.url, "--json")[1])
    later = NOW + 2 * APPRAISALS * MINUTE
    run(lambda: _decisions(copy.url, *(decision(0, at=later + n * MINUTE) for n in range(3))))
    recorded = 1 + APPRAISALS + 1  # enrollment, appraisals, the zone change
    first = _fake_pruning(copy, DEV0, recorded + 1)
    status, out = audit(capsys, "verify", "--database", copy.url, "--against", str(heads))
    assert status == 1
    assert out.startswith(
        f"audit broken: chain {DEV0} seq {recorded + 2} (id {first}): missing: the head "
        f"recorded earlier at seq {recorded} lies before the chain's first entry (seq "
        f"{recorded + 2}) and no recorded pruning accounts for it"
    )


async def _decisions(url: str, *decisions: object) -> None:
    repos = await open_repositories(url)
    try:
        for d in decisions:
            await repos.trust.record(d)  # type: ignore[arg-type]
    finally:
        await repos.close()


def test_a_chain_deleted_whole_is_named(copy: Store, capsys: pytest.CaptureFixture[str]) -> None:
    for table in ("audit", "audit_heads", "audit_checkpoints"):
        copy.sql(f"DELETE FROM {table} WHERE chain = ?", DEV2)  # noqa: S608
    status, out = verify(capsys, copy)
    assert status == 1
    assert out.startswith(
        f"audit broken: chain {DEV2} seq 1: missing: the whole chain is gone (entries and "
        "head): chain_started at seq "
    )
    status, out = audit(capsys, "verify", "--database", copy.url, "--chain", DEV2)
    assert status == 1
    assert "the whole chain is gone" in out
    # DEV0's shard deleted whole: DEV0 is one no entry announces.
    shard = audit_chain.announced_on(DEV0)
    for table in ("audit", "audit_heads", "audit_checkpoints"):
        copy.sql(f"DELETE FROM {table} WHERE chain = ?", shard)  # noqa: S608
    status, out = verify(capsys, copy)
    assert status == 1
    assert (
        f"audit broken: chain {DEV0} seq 0: not announced: no chain_started entry on the "
        f"chain {shard} announces it" in out
    )
    # With every chain it announced: the root "chains" names the shard gone.
    for (name,) in copy.sql("SELECT chain FROM audit_heads"):
        if audit_chain.announced_on(str(name)) == shard:
            for table in ("audit", "audit_heads", "audit_checkpoints"):
                copy.sql(f"DELETE FROM {table} WHERE chain = ?", name)  # noqa: S608
    status, out = verify(capsys, copy)
    assert status == 1
    assert out.startswith(
        f"audit broken: chain {shard} seq 1: missing: the whole chain is gone (entries and "
        "head): chain_started at seq "
    )
    assert "of the chain chains announced it" in out
    # And the root deleted whole too: every shard left is one no entry announces.
    for table in ("audit", "audit_heads", "audit_checkpoints"):
        copy.sql(f"DELETE FROM {table} WHERE chain = 'chains'")  # noqa: S608
    status, out = verify(capsys, copy)
    assert status == 1
    other = min(SHARDS - {shard})
    assert f"audit broken: chain {other} seq 0: not announced: no chain_started entry" in out


def test_a_chain_that_does_not_exist_is_refused(
    fleet: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = audit(capsys, "verify", "--database", fleet.url, "--chain", "dev-typo")
    assert (status, out.strip()) == (2, "devtrust: --chain dev-typo: the audit has no such chain")


def test_a_row_slipped_in_before_its_chain_began_stays_named(
    copy: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """A forged row for a device with no chain yet: the device's first genuine entry does
    not seal it onto the new chain (review M4)."""
    copy.sql(
        "INSERT INTO audit (at, device_id, event, tier, detail, actor) "
        "VALUES (?, ?, 'approved', '', '{}', ?)",
        NOW.isoformat(), device_id(7), OPERATOR,
    )  # fmt: skip

    async def enroll() -> None:
        repos = await open_repositories(copy.url)
        try:
            await repos.devices.save(device(7), now=NOW, event="enrolled:enrolled")
        finally:
            await repos.close()

    run(enroll)
    status, out = verify(capsys, copy)
    assert status == 1
    assert f"audit broken: chain {device_id(7)} seq 0 (id " in out
    assert "1 entries are on no chain (the first: event 'approved'): inserted after the " in out


def test_a_hash_edited_into_garbage_is_named_not_a_crash(
    copy: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    first = entry_id(copy, DEV0, 3)
    copy.sql("DELETE FROM audit WHERE chain = ? AND chain_seq <= 2", DEV0)
    copy.sql("UPDATE audit SET prev_hash = 'zz' WHERE id = ?", first)
    copy.sql(
        "INSERT INTO audit_checkpoints (chain, chain_seq, hash, at, pruned) "
        "VALUES (?, 2, 'zz', ?, 1)",
        DEV0, NOW.isoformat(),
    )  # fmt: skip
    status, out = verify(capsys, copy)
    assert status == 1
    assert f"audit broken: chain {DEV0} seq 3 (id {first}): " in out
    if copy.backend == "sqlite":  # SQLite keeps text in an integer column
        copy.sql("UPDATE audit_heads SET seq = 'seven' WHERE chain = ?", DEV2)
        copy.sql("UPDATE audit_checkpoints SET chain_seq = 'two' WHERE chain = ?", DEV0)
        status, out = verify(capsys, copy)
        assert status == 1
        assert f"audit broken: chain {DEV2} seq 7 (id {entry_id(copy, DEV2, 7)}): head" in out


def test_a_database_that_fails_while_read_is_one_line(
    copy: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """A driver error during the read (here a column gone) is one line, exit 2."""
    copy.sql("ALTER TABLE audit RENAME COLUMN hash TO hash_gone")
    status, out = verify(capsys, copy)
    assert (status, out.strip()) == (
        2,
        "devtrust: the audit could not be read: "
        + ("no such column: hash" if copy.backend == "sqlite" else 'column "hash" does not exist'),
    )


def test_prune_reads_in_a_read_only_snapshot(fleet: Store) -> None:
    """Review L2: the checks prune runs before it deletes (a whole verify) read in a
    read-only transaction, not in its SERIALIZABLE read-write one."""
    with audit_db.opened(fleet.url, write=True) as db, db.snapshot():
        if fleet.backend == "sqlite":
            [(mode,)] = list(db.rows("PRAGMA query_only"))
            assert mode in (0, 1)  # one writer: nothing to contend with
            return
        [row] = list(
            db.rows(
                "SELECT current_setting('transaction_isolation'), "
                "current_setting('transaction_read_only')"
            )
        )
    assert tuple(row) == ("repeatable read", "on")
