"""Several processes on one SQLite database (issue 11, item 3), at the store: each process's
repositories are their own connections (a writer, readers, the change feed's), so two
``open_sqlite`` of one file here behave as two verifier workers do. What one changes the
other learns through the change feed (migration 0005); each device's stream lease voids the
decisions of a stream a newer one replaced, on whichever process."""

from __future__ import annotations

import asyncio
import datetime
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509

from devtrust.core.ids import serial_of
from devtrust.core.tier import Tier
from devtrust.verifier.ca import ALWAYS, CertificateAuthority, DeviceIssuers, Issuer
from devtrust.verifier.decision import Decision
from devtrust.verifier.errors import Superseded
from devtrust.verifier.records import CertificateRecord, DeviceRecord, DeviceState, Standing
from devtrust.verifier.revocation import RevocationSink, Revoker
from devtrust.verifier.settings import CertificateSettings, RevocationSettings
from devtrust.verifier.storage import (
    Repositories,
    SqliteRepositories,
    open_repositories,
    open_sqlite,
    sqlite_engine,
)
from devtrust.verifier.storage.changes import (
    LEASE,
    POLICY,
    Change,
    ChangeFeed,
    check_lease,
    prune_rows,
)
from devtrust.verifier.storage.interfaces import StoredPolicy
from devtrust.verifier.storage.sql import Connection
from devtrust.verifier.storage.sqlite import _record
from devtrust.verifier.storage.sqlite_changes import SqliteChangeFeed
from devtrust.verifier.watch import TrustWatch, WatchFilter
from tests.db import decision, device, device_id

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
LIFETIME = datetime.timedelta(minutes=15)
CERTIFICATES = CertificateSettings(
    trust_domain="devtrust.local",
    device_lifetime=LIFETIME,
    channel_lifetime=datetime.timedelta(days=30),
    min_tier=Tier.AFFIRMING,
)

# The fixture `database`: the tests marked with it run on SQLite and on PostgreSQL.
pytest_plugins = ["tests.pg"]


def _clock() -> datetime.datetime:
    return T0


async def _never(_: float) -> None:
    await asyncio.Event().wait()


@dataclass
class Process:
    """One verifier process's view of the database: repositories, change feed, revoker."""

    repos: Repositories
    feed: ChangeFeed
    revoker: Revoker
    watch: TrustWatch


@asynccontextmanager
async def process(database: Path | str, name: str, *, poll: bool) -> AsyncIterator[Process]:
    """A process as start_verifier wires it; ``poll`` False: the feed is read only when a
    consumer catches up (what the check at hand must do on its own)."""
    ca = CertificateAuthority.create(common_name="device CA", now=T0 - datetime.timedelta(days=1))
    issuers = DeviceIssuers(
        [Issuer(cert=ca.cert, key=ca.key, activate_after=ALWAYS)],
        device_lifetime=LIFETIME,
        clock=_clock,
    )
    repos = await open_repositories(database)
    feed: ChangeFeed
    if isinstance(repos, SqliteRepositories):
        feed = SqliteChangeFeed(repos.path, repos.engine, origin=name, interval_s=0.01)
    else:
        feed = repos.change_feed(name)  # woken by NOTIFY
    revoker = Revoker(
        revocations=repos.revocations, signer=issuers, settings=RevocationSettings(), clock=_clock
    )
    watch = TrustWatch()
    await feed.open()
    revoker.follow(feed)
    watch.follow(feed)
    await revoker.start(sleep=_never)
    if poll:
        feed.run()
    try:
        yield Process(repos, feed, revoker, watch)
    finally:
        await revoker.aclose()
        await feed.aclose()
        await repos.close()


async def _certified(repos: Repositories, n: int) -> CertificateRecord:
    """Device n enrolled, with a live device certificate."""
    await repos.devices.save(device(n), now=T0, event="enrolled:enrolled")
    cert = CertificateRecord(
        serial_of(x509.random_serial_number()), device_id(n), "device", T0, T0 + LIFETIME, b""
    )
    await repos.certificates.record(cert)
    return cert


def _with_certificate(n: int) -> Decision:
    """A decision that issued a certificate (appraised before, stored after, a change)."""
    cert = CertificateRecord(
        serial_of(x509.random_serial_number()), device_id(n), "device", T0, T0 + LIFETIME, b""
    )
    return replace(decision(n, at=T0), certificate=cert, withheld="")


def _live(path: Path, serial: str) -> bool:
    """The certificate is not revoked (read from the SQLite file itself)."""
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT revoked_at FROM certificates WHERE serial = ?", (serial,))
        return row.fetchone()[0] is None


async def _live_in(repos: Repositories, serial: str) -> bool:
    """The certificate is not revoked (either backend)."""
    return serial not in {r.serial for r in await repos.revocations.live(T0)}


# --- stream leases ---------------------------------------------------------------------------


def test_a_newer_stream_lease_on_another_process_voids_the_older_streams_decision(
    database: str,
) -> None:
    """Worker A's stream claimed the device's lease, then a newer stream on worker B did:
    A's decision, checked in its own write transaction, is refused (Superseded) and stores
    nothing; B's is stored. A learns of the newer lease on its feed, naming B's stream."""

    async def scenario() -> None:
        async with process(database, "a", poll=False) as a, process(database, "b", poll=False) as b:
            await a.repos.devices.save(device(1), now=T0, event="enrolled:enrolled")
            d = device_id(1)
            seen: list[Change] = []

            async def leases(changes: Sequence[Change]) -> None:
                seen.extend(c for c in changes if c.kind == LEASE)

            a.feed.subscribe(leases)
            old = await a.repos.streams().claim(d, "a/stream-1")
            new = await b.repos.streams().claim(d, "b/stream-2")
            assert new == old + 1
            stale = decision(1, at=T0)

            def store(token: int, made: Decision) -> Callable[[Connection], None]:
                def work(db: Connection) -> None:
                    check_lease(db, d, token)  # the hook: first, in the decision's transaction
                    _record(db, made)

                return work

            with pytest.raises(Superseded, match="b/stream-2"):
                await a.repos.engine.write(store(old, stale))  # type: ignore[attr-defined]
            assert await a.repos.trust.latest(d) is None
            fresh = decision(1, at=T0 + datetime.timedelta(seconds=1))
            await b.repos.engine.write(store(new, fresh))  # type: ignore[attr-defined]
            latest = await a.repos.trust.latest(d)
            assert latest is not None
            assert latest.appraised_at == fresh.at
            await a.feed.catch_up()
            assert [(c.device_id, c.ref, c.origin) for c in seen] == [(d, str(new), "b/stream-2")]
            assert await a.repos.streams().holder(d) == (new, "b/stream-2")

    asyncio.run(scenario())


def test_a_decision_without_a_lease_is_not_checked(tmp_path: Path) -> None:
    async def scenario() -> None:
        repos = await open_sqlite(tmp_path / "verifier.db")
        try:
            await repos.devices.save(device(1), now=T0, event="enrolled:enrolled")
            await repos.engine.write(lambda db: check_lease(db, device_id(1), None))
            with pytest.raises(Superseded, match="by nobody"):
                await repos.engine.write(lambda db: check_lease(db, device_id(1), 1))
        finally:
            await repos.close()

    asyncio.run(scenario())


# --- revocations across processes -----------------------------------------------------------


def test_a_revocation_on_one_process_reaches_the_others_feed_and_crl(database: str) -> None:
    """An operator revokes a device through worker A: a relying party subscribed to worker
    B's revocation feed gets it, B's CRL lists it, B knows the device is revoked."""

    async def scenario() -> None:
        async with process(database, "a", poll=True) as a, process(database, "b", poll=True) as b:
            cert = await _certified(a.repos, 1)
            feed = b.revoker.subscribe()
            assert (await asyncio.wait_for(anext(feed), 5)).end_of_snapshot
            assert await a.revoker.revoke(
                device_id(1), reason="stolen", actor="operator/alice", now=T0
            )
            entry = await asyncio.wait_for(anext(feed), 5)
            assert entry.revoked is not None
            assert (entry.revoked.serial, entry.revoked.reason) == (cert.serial, "stolen")
            assert b.revoker.device_revoked(device_id(1))
            while cert.serial not in b.revoker.crl.serials:  # signed again after the offer
                await asyncio.sleep(0.01)
            assert b.revoker.revoked_serials(device_id(1)) == (cert.serial,)
            # Published once on A, though its own feed brings the revocation back too.
            mine = a.revoker.subscribe()
            assert (await anext(mine)).revoked == entry.revoked
            assert (await anext(mine)).end_of_snapshot
            await a.feed.catch_up()
            await feed.aclose()
            await mine.aclose()

    asyncio.run(scenario())


def test_a_certificate_stored_on_one_process_after_another_revoked_the_device_is_withheld(
    database: str,
) -> None:
    """Worker B appraised the device before an operator revoked it through worker A, and
    stored the certificate it issued after that revocation committed: B's revocation sink
    reads the feed up to now before handing the certificate out (B's poller never ran),
    so it revokes it and withholds it."""

    async def scenario() -> None:
        async with process(database, "a", poll=False) as a, process(database, "b", poll=False) as b:
            await _certified(a.repos, 1)
            await a.revoker.revoke(device_id(1), reason="stolen", actor="operator/alice", now=T0)
            made = _with_certificate(1)
            await b.repos.trust.record(made)  # the store sink, first
            assert made.certificate is not None
            assert await _live_in(b.repos, made.certificate.serial)
            out = await RevocationSink(b.revoker, CERTIFICATES).publish(made)
            assert out is not None
            assert out.certificate is None
            assert out.withheld == "withheld: the device is revoked"
            assert not await _live_in(b.repos, made.certificate.serial)
            assert made.certificate.serial in out.revoked_serials

    asyncio.run(scenario())


def test_a_certificate_for_the_old_zone_stored_after_another_process_moved_it_is_withheld(
    database: str,
) -> None:
    async def scenario() -> None:
        async with process(database, "a", poll=False) as a, process(database, "b", poll=False) as b:
            await _certified(a.repos, 1)
            before = Standing(DeviceState.ENROLLED, "", {})
            after = Standing(DeviceState.ENROLLED, "prod", {})
            assert await a.repos.operations.apply(
                device_id(1), before=before, after=after, events=[], actor="operator/alice", now=T0
            )
            await a.revoker.zone_changed(
                device_id(1), was="", zone="prod", actor="operator/alice", now=T0
            )
            made = _with_certificate(1)  # zone "": appraised before the move
            await b.repos.trust.record(made)
            out = await RevocationSink(b.revoker, CERTIFICATES).publish(made)
            assert out is not None
            assert out.certificate is None
            assert "moved to another zone" in out.withheld
            assert made.certificate is not None
            assert not await _live_in(b.repos, made.certificate.serial)

    asyncio.run(scenario())


# --- the trust watch across processes -------------------------------------------------------


def test_a_watch_on_one_process_sees_the_changes_stored_by_another(database: str) -> None:
    """A watcher on worker B gets the device's first result stored by worker A, nothing for
    a result with the same tier and score, then the next change with its previous tier."""

    async def scenario() -> None:
        async with process(database, "a", poll=True) as a, process(database, "b", poll=True) as b:
            await a.repos.devices.save(device(1, zone="prod"), now=T0, event="enrolled:enrolled")
            watcher = b.watch.subscribe(WatchFilter())
            second = T0 + datetime.timedelta(seconds=1)
            await a.repos.trust.record(decision(1, at=T0))
            await a.repos.trust.record(decision(1, at=second))
            await a.repos.trust.record(
                decision(1, at=second + datetime.timedelta(seconds=1), tier=Tier.WARNING)
            )
            first = await asyncio.wait_for(watcher.next(), 5)
            assert first is not None
            assert first.result is not None
            assert (first.device_id, first.zone, first.previous_tier) == (
                device_id(1),
                "prod",
                None,
            )
            changed = await asyncio.wait_for(watcher.next(), 5)
            assert changed is not None
            assert changed.result is not None
            assert (changed.previous_tier, changed.result.tier) == (Tier.AFFIRMING, Tier.WARNING)
            # The sink of B's own process publishes nothing itself: the feed brings all.
            await b.watch.publish(decision(1, at=T0, tier=Tier.CONTRAINDICATED))
            assert watcher._queue.empty()
            watcher.close()

    asyncio.run(scenario())


def test_rows_pruned_unread_make_a_process_reload_and_drop_its_watchers(database: str) -> None:
    async def scenario() -> None:
        async with process(database, "a", poll=False) as a, process(database, "b", poll=False) as b:
            cert = await _certified(a.repos, 1)
            watcher = b.watch.subscribe(WatchFilter())
            await a.revoker.revoke(device_id(1), reason="stolen", actor="operator/alice", now=T0)
            for n in range(2, 6):
                await a.repos.devices.save(device(n), now=T0, event="enrolled:enrolled")
                await a.repos.trust.record(decision(n, at=T0))
            engine = a.repos.engine  # type: ignore[attr-defined]
            assert await engine.write(lambda db: prune_rows(db, 1)) > 0
            await b.feed.catch_up()
            # The revocation's row is gone: B read the live set again.
            assert b.revoker.revoked_serials(device_id(1)) == (cert.serial,)
            with pytest.raises(Exception, match="fell 1024 changes behind"):
                await watcher.next()

    asyncio.run(scenario())


# --- writers of several processes -----------------------------------------------------------


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    """Group commits of two processes interleave on the write lock: every write of both is
    stored, and the feed's seqs are dense (each process's triggers ran in order)."""
    path = tmp_path / "verifier.db"

    async def scenario() -> None:
        a, b = await open_sqlite(path), await open_sqlite(path)
        try:

            async def fleet(repos: SqliteRepositories, first: int) -> None:
                records = [device(n) for n in range(first, first + 100)]
                await asyncio.gather(
                    *(repos.devices.save(r, now=T0, event="enrolled:enrolled") for r in records)
                )
                await asyncio.gather(
                    *(repos.trust.record(decision(r_n(r), at=T0)) for r in records)
                )

            def r_n(record: DeviceRecord) -> int:
                return int(record.device_id, 16)

            await asyncio.gather(fleet(a, 1), fleet(b, 1001))
            counts = await a.counts()
            assert (counts["devices"], counts["trust"]) == (200, 200)
            with sqlite3.connect(path) as db:
                seqs = [r[0] for r in db.execute("SELECT seq FROM changes ORDER BY seq")]
            assert seqs == list(range(1, 201))
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_writer_waits_for_another_process_holding_the_write_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another connection holds the write lock past busy_timeout: the writer says so and
    waits again rather than failing its batch; once the lock is released, the write commits."""
    monkeypatch.setattr(sqlite_engine, "BUSY_TIMEOUT_MS", 20)
    path = tmp_path / "verifier.db"
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        held.set()
        release.wait(30)
        db.execute("COMMIT")
        db.close()

    async def scenario() -> None:
        repos = await open_sqlite(path)
        holder = threading.Thread(target=hold)
        try:
            holder.start()
            await asyncio.to_thread(held.wait, 30)
            write = asyncio.ensure_future(
                repos.devices.save(device(1), now=T0, event="enrolled:enrolled")
            )
            while not any("write lock is held" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.01)
            assert not write.done()
            release.set()
            await write
            assert await repos.devices.get(device_id(1)) is not None
        finally:
            release.set()
            holder.join()
            await repos.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())


def test_a_policy_published_on_one_process_reaches_the_others(database: str) -> None:
    """A policy published through worker (or replica) A is stored with its documents, and
    its row on the feed, naming A and the digest, reaches B, which reads the same policy
    back; the publication is audited ("policy_changed", no device)."""
    policy = StoredPolicy(
        policy_id="fleet-7",
        digest="ab" * 32,
        documents={"policy.yaml": "rules: []\n", "bulletins.yaml": "x: 1\n"},
        published_at=T0,
    )

    async def scenario() -> None:
        async with process(database, "a", poll=True) as a, process(database, "b", poll=True) as b:
            seen: asyncio.Queue[Change] = asyncio.Queue()

            async def policies(changes: Sequence[Change]) -> None:
                for change in changes:
                    if change.kind == POLICY:
                        seen.put_nowait(change)

            b.feed.subscribe(policies)
            assert await b.repos.policies().current() is None
            await a.repos.policies().publish(policy, actor="operator/alice", origin="a", now=T0)
            change = await asyncio.wait_for(seen.get(), 5)
            assert (change.origin, change.ref, change.device_id) == ("a", policy.digest, "")
            assert await b.repos.policies().current() == policy
            engine = b.repos.engine  # type: ignore[attr-defined]
            audited = await engine.read(
                lambda db: [
                    tuple(r)
                    for r in db.execute(
                        "SELECT device_id, actor FROM audit WHERE event = 'policy_changed'"
                    ).fetchall()
                ]
            )
            assert audited == [("", "operator/alice")]

    asyncio.run(scenario())
