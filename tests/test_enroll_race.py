"""Activate against an operator's revocation (review H3), on SQLite and PostgreSQL: a
revocation that commits while a device's re-enrollment is being answered is never undone.

The race is forced: the service's repositories run over an engine whose connection, right
after the statement that reads the device for Activate, has a second repository set on the
same database (another replica, or another worker on SQLite) revoke the device. Before the
fix that read was a transaction of its own and the save a later one, which wrote the device
back as enrolled with a fresh, unrevoked channel certificate.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from devtrust.agent.tpm import TpmBackend
from devtrust.core.ids import DeviceId
from devtrust.swtpm import EndorsementCA, Swtpm
from devtrust.verifier.ca import CertificateAuthority
from devtrust.verifier.enroll_service import EnrollmentService
from devtrust.verifier.errors import Rejected
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.records import DeviceState
from devtrust.verifier.server import load_endorsements
from devtrust.verifier.settings import Settings
from devtrust.verifier.storage import Repositories, open_repositories
from devtrust.verifier.storage.repositories import SqlRepositories
from devtrust.verifier.storage.sql import Connection, Cursor, Engine, Fragments
from tests.db import NOW, device
from tests.env import verifier_config
from tests.test_enroll_floods import PeerContext, _answer, _request

pytestmark = pytest.mark.swtpm
pytest_plugins = ["tests.pg"]
T = TypeVar("T")
READ_DEVICE = "SELECT * FROM devices WHERE device_id"
# How long the hook waits for the other replica's revocation: it commits at once unless this
# transaction holds the database (SQLite's one writer), when it commits after this one.
OTHER_WAIT_S = 2.0


class _Hooked:
    """A connection that runs ``hook`` once, right after the statement reading the device."""

    def __init__(self, inner: Connection, hook: Callable[[], None]) -> None:
        self._inner = inner
        self._hook = hook

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        cursor = self._inner.execute(sql, parameters)
        if sql.startswith(READ_DEVICE):
            self._hook()
        return cursor

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor:
        return self._inner.executemany(sql, parameters)


class HookedEngine:
    def __init__(self, inner: Engine) -> None:
        self._inner = inner
        self.armed: Callable[[], None] | None = None

    @property
    def location(self) -> str:
        return self._inner.location

    @property
    def sql(self) -> Fragments:
        return self._inner.sql

    def _fire(self) -> None:
        hook, self.armed = self.armed, None
        if hook is not None:
            hook()

    async def write(self, work: Callable[[Connection], T]) -> T:
        return await self._inner.write(lambda db: work(_Hooked(db, self._fire)))

    async def read(self, work: Callable[[Connection], T]) -> T:
        return await self._inner.read(lambda db: work(_Hooked(db, self._fire)))

    def close(self) -> None:
        self._inner.close()


def _revoke_meanwhile(other: Repositories, device_id: DeviceId, done: list[object]) -> None:
    """The operator's RevokeDevice on the other replica, committed (or, on SQLite, queued
    behind the transaction that holds the database) before the hooked work goes on."""

    def revoke() -> None:
        done.append(
            asyncio.run(
                other.revocations.revoke_device(
                    device_id, reason="stolen", actor="operator/alice", now=_now()
                )
            )
        )

    thread = threading.Thread(target=revoke)
    thread.start()
    thread.join(OTHER_WAIT_S)
    done.append(thread)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _service(
    repos: Repositories, workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> EnrollmentService:
    config = verifier_config(workdir, pki, endorsement_ca)
    settings = Settings.from_config(config)
    return EnrollmentService(
        repos=repos,
        endorsements=load_endorsements(config),
        ca=CertificateAuthority.load(pki.ca_cert, pki.ca_key),
        settings=settings.enrollment,
        certificates=settings.certificates,
        limits=settings.limits,
        clock=_now,
    )


def test_a_revocation_committed_during_a_re_enrollment_is_kept(
    database: str,
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    shared_swtpm: Swtpm,
) -> None:
    backend = TpmBackend(shared_swtpm.tcti)
    context: Any = PeerContext()

    async def scenario() -> tuple[str, DeviceState | None, int, list[object]]:
        opened = await open_repositories(database)
        other = await open_repositories(database)
        assert isinstance(opened, SqlRepositories)
        engine = HookedEngine(opened.engine)
        repos: Any = SqlRepositories(engine)
        service = _service(repos, workdir, pki, endorsement_ca)
        done: list[object] = []
        try:
            request = _request(backend)
            first = await service.Enroll(request, context)
            await service.Activate(_answer(backend, request, first), context)
            device_id = DeviceId(first.device_id)
            # The device enrolls again (it holds its EK and AK, so its proof checks out)
            # while the operator revokes it on the other replica.
            request = _request(backend)
            again = await service.Enroll(request, context)
            engine.armed = lambda: _revoke_meanwhile(other, device_id, done)
            try:
                await service.Activate(_answer(backend, request, again), context)
                outcome = "OK"
            except Rejected as exc:
                outcome = f"Rejected: {exc}"
            thread = done[-1]
            assert isinstance(thread, threading.Thread)
            await asyncio.to_thread(thread.join)
            found = await other.devices.get(device_id)
            live = await other.revocations.live_certificates(device_id, _now())
            return outcome, None if found is None else found.state, len(live), done[:-1]
        finally:
            await opened.close()
            await other.close()

    try:
        outcome, state, live, revoked = asyncio.run(scenario())
    finally:
        backend.close()
    assert state is DeviceState.REVOKED  # before the fix: ENROLLED again
    assert live == 0  # no certificate the revocation never saw
    assert len(revoked) == 1
    assert revoked[0] is not None
    if database.startswith("postgresql"):
        # The revocation committed inside Activate's transaction, which ran again and
        # refused the revoked device: PERMISSION_DENIED, as for any revoked device.
        assert outcome.startswith("Rejected: ")
        assert "is revoked" in outcome
    else:
        # SQLite's one writer: the revocation waited for Activate's transaction and then
        # revoked the certificate it recorded.
        assert outcome == "OK"


def test_a_revoked_device_is_refused_and_nothing_is_written(
    database: str,
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    shared_swtpm: Swtpm,
) -> None:
    """The revocation commits after the service looked the challenge up and checked the
    proof, before its transaction: refused, the challenge still waiting, no audit entry."""
    backend = TpmBackend(shared_swtpm.tcti)
    context: Any = PeerContext()

    async def scenario() -> tuple[dict[str, int], dict[str, int]]:
        repos = await open_repositories(database)
        service = _service(repos, workdir, pki, endorsement_ca)
        try:
            request = _request(backend)
            first = await service.Enroll(request, context)
            await service.Activate(_answer(backend, request, first), context)
            device_id = DeviceId(first.device_id)
            request = _request(backend)
            again = await service.Enroll(request, context)
            answer = _answer(backend, request, again)
            await repos.revocations.revoke_device(
                device_id, reason="stolen", actor="operator/alice", now=_now()
            )
            before = await repos.counts()
            with pytest.raises(Rejected, match="is revoked"):
                await service.Activate(answer, context)
            return before, await repos.counts()
        finally:
            await repos.close()

    try:
        before, after = asyncio.run(scenario())
    finally:
        backend.close()
    assert after == before  # the challenge not taken, no device row, certificate or audit


def test_save_leaves_a_revoked_device_revoked(database: str) -> None:
    async def scenario() -> tuple[bool, DeviceState | None, int, int]:
        repos = await open_repositories(database)
        try:
            record = device(1)
            assert await repos.devices.save(record, now=NOW, event="enrolled:enrolled")
            await repos.revocations.revoke_device(
                record.device_id, reason="stolen", actor="operator/alice", now=NOW
            )
            audited = len(await repos.audit.history(record.device_id))
            saved = await repos.devices.save(record, now=NOW, event="enrolled:enrolled")
            found = await repos.devices.get(record.device_id)
            after = len(await repos.audit.history(record.device_id))
            return saved, None if found is None else found.state, audited, after
        finally:
            await repos.close()

    saved, state, audited, after = asyncio.run(scenario())
    assert saved is False
    assert state is DeviceState.REVOKED
    assert after == audited
