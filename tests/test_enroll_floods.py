"""Enrollment floods and forged log lines (issue 7, items 8 and 9), over the real wire
protocol against a real verifier with real swtpm TPMs: Enroll is rate-limited per peer,
pending enrollments are capped and purged by the injected clock, a challenge is spent only by
its right answer and only once, and device-supplied text is escaped in the log."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from devtrust.agent.evidence import host_facts
from devtrust.agent.state import new_key, spki
from devtrust.agent.tpm import TpmBackend
from devtrust.core.binding import proof_for
from devtrust.swtpm import EndorsementCA, Swtpm
from devtrust.v1 import enrollment_pb2, enrollment_pb2_grpc
from devtrust.verifier.ca import CertificateAuthority
from devtrust.verifier.config import EnrollmentConfig, VerifierConfig
from devtrust.verifier.enroll_service import EnrollmentService
from devtrust.verifier.errors import NotFound
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.records import PendingEnrollment
from devtrust.verifier.server import load_endorsements
from devtrust.verifier.settings import Settings
from devtrust.verifier.storage import Enrollments, SqliteRepositories, open_sqlite
from tests.conftest import SwtpmFactory
from tests.db import sqlite_file
from tests.env import channel_credentials, running, verifier_config

pytestmark = pytest.mark.swtpm


class Clock:
    """The verifier's injected clock (certificates in play are valid around the real now)."""

    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += datetime.timedelta(**delta)


def _request(backend: TpmBackend, hostname: str = "host-1") -> enrollment_pb2.EnrollRequest:
    request = enrollment_pb2.EnrollRequest(
        ek_certificate=backend.ek_certificate() or b"",
        ek_public=backend.ek_public(),
        ak_public=backend.ak_public(),
        host=host_facts(),
        channel_key_spki=spki(new_key()),
    )
    request.host.hostname = hostname
    return request


def _answer(
    backend: TpmBackend,
    request: enrollment_pb2.EnrollRequest,
    challenge: enrollment_pb2.EnrollChallenge,
) -> enrollment_pb2.ActivateRequest:
    secret = backend.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    return enrollment_pb2.ActivateRequest(
        enrollment_id=challenge.enrollment_id,
        proof=proof_for(secret, challenge.enrollment_id, request.channel_key_spki),
    )


async def _code(call: Awaitable[object]) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


def _with(config: VerifierConfig, **settings: Any) -> VerifierConfig:
    return replace(config, enrollment=EnrollmentConfig(**settings))


def test_enroll_is_rate_limited_per_peer(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, shared_swtpm: Swtpm
) -> None:
    config = _with(verifier_config(workdir, pki, endorsement_ca), burst=2, rate_per_minute=1)
    clock = Clock()
    backend = TpmBackend(shared_swtpm.tcti)
    request = _request(backend)

    async def scenario() -> tuple[list[str], int, str]:
        async with (
            running(config, clock=clock) as verifier,
            grpc.aio.secure_channel(
                f"127.0.0.1:{verifier.enrollment_port}", channel_credentials(pki)
            ) as channel,
        ):
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            # Every call counts, even one refused for what it holds.
            outcomes = [
                await _code(stub.Enroll(request, timeout=10)),
                await _code(stub.Enroll(enrollment_pb2.EnrollRequest(), timeout=10)),
                await _code(stub.Enroll(request, timeout=10)),
            ]
            stored = (await verifier.repos.counts())["enrollments"]
            # Another connection from the same address (another port) shares the bucket.
            async with grpc.aio.secure_channel(
                f"127.0.0.1:{verifier.enrollment_port}", channel_credentials(pki)
            ) as other:
                outcomes.append(
                    await _code(
                        enrollment_pb2_grpc.EnrollmentStub(other).Enroll(request, timeout=10)
                    )
                )
            clock.advance(seconds=60)
            later = await _code(stub.Enroll(request, timeout=10))
            return outcomes, stored, later

    try:
        outcomes, stored, later = asyncio.run(scenario())
    finally:
        backend.close()
    assert outcomes[0] == "OK"
    assert outcomes[1].startswith("INVALID_ARGUMENT")
    for refused in outcomes[2:]:
        assert refused == (
            "RESOURCE_EXHAUSTED: too many Enroll calls from 127.0.0.1 (enrollment.burst 2, "
            "rate_per_minute 1): retry in 60 s"
        )
    assert stored == 1
    assert later == "OK"  # a minute later the bucket holds one call again


def test_pending_enrollments_are_capped_per_device_and_in_all(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, shared_swtpm: Swtpm
) -> None:
    per_device = _with(verifier_config(workdir, pki, endorsement_ca), max_pending_per_device=2)
    in_all = replace(_with(per_device, max_pending=2), database=workdir / "all.db")
    clock = Clock()
    backend = TpmBackend(shared_swtpm.tcti)

    async def scenario(config: VerifierConfig) -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with (
            running(config, clock=clock) as verifier,
            grpc.aio.secure_channel(
                f"127.0.0.1:{verifier.enrollment_port}", channel_credentials(pki)
            ) as channel,
        ):
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            requests = [_request(backend) for _ in range(3)]
            challenges = []
            outcomes = []
            for request in requests:
                try:
                    challenges.append(await stub.Enroll(request, timeout=10))
                    outcomes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(f"{exc.code().name}: {exc.details()}")
            out["outcomes"] = outcomes
            out["stored"] = (await verifier.repos.counts())["enrollments"]
            if config is per_device:
                # Waiting challenges are never dropped for newer ones (anyone can call
                # Enroll with a device's public EK and AK): the first still enrolls.
                out["oldest"] = await _code(
                    stub.Activate(_answer(backend, requests[0], challenges[0]), timeout=10)
                )
            else:
                # Expired ones are purged by the verifier's clock, not the wall clock.
                clock.advance(minutes=5, seconds=1)
                out["after expiry"] = await _code(stub.Enroll(_request(backend), timeout=10))
                out["stored after expiry"] = (await verifier.repos.counts())["enrollments"]
        return out

    try:
        device = asyncio.run(scenario(per_device))
        total = asyncio.run(scenario(in_all))
    finally:
        backend.close()
    assert device["outcomes"][:2] == ["OK", "OK"]
    assert device["outcomes"][2].startswith("RESOURCE_EXHAUSTED: device ")
    assert (
        "(enrollment.max_pending_per_device 2): answer one, or retry in 300 s"
        in (device["outcomes"][2])
    )
    assert device["stored"] == 2
    assert device["oldest"] == "OK"
    assert total["outcomes"][:2] == ["OK", "OK"]
    assert total["outcomes"][2] == (
        "RESOURCE_EXHAUSTED: 2 enrollments await their Activate (enrollment.max_pending 2): "
        "retry in 300 s"
    )
    assert total["stored"] == 2
    assert total["after expiry"] == "OK"
    assert total["stored after expiry"] == 1


def test_two_right_answers_issue_one_channel_certificate(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    config = verifier_config(workdir, pki, endorsement_ca)
    backend = TpmBackend(swtpm_factory().tcti)

    async def scenario() -> tuple[list[str], dict[str, int]]:
        async with (
            running(config) as verifier,
            grpc.aio.secure_channel(
                f"127.0.0.1:{verifier.enrollment_port}", channel_credentials(pki)
            ) as channel,
        ):
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            request = _request(backend)
            answer = _answer(backend, request, await stub.Enroll(request, timeout=10))
            outcomes = await asyncio.gather(
                *(_code(stub.Activate(answer, timeout=10)) for _ in range(2))
            )
            return sorted(outcomes), (await verifier.repos.counts())

    try:
        outcomes, counts = asyncio.run(scenario())
    finally:
        backend.close()
    assert outcomes[0].startswith("NOT_FOUND: ")
    assert outcomes[1] == "OK"
    assert counts["certificates"] == 1


class RacingEnrollments:
    """Enrollments shared with another replica whose right answer lands between this
    replica's lookup of the challenge and its spending of it."""

    def __init__(self, inner: Enrollments) -> None:
        self._inner = inner
        self.put = inner.put
        self.take = inner.take

    async def get(self, enrollment_id: str) -> PendingEnrollment | None:
        pending = await self._inner.get(enrollment_id)
        if pending is not None:
            assert await self._inner.take(enrollment_id)  # the other replica wins
        return pending


class RacingRepositories:
    def __init__(self, inner: SqliteRepositories) -> None:
        self.inner = inner
        self.location = inner.location
        self.devices = inner.devices
        self.enrollments = RacingEnrollments(inner.enrollments)
        self.tokens = inner.tokens
        self.trust = inner.trust
        self.certificates = inner.certificates
        self.audit = inner.audit
        self.revocations = inner.revocations
        self.roles = inner.roles
        self.operations = inner.operations
        self.counts = inner.counts
        self.close = inner.close
        self.policies = inner.policies
        self.streams = inner.streams
        self.change_feed = inner.change_feed


class PeerContext:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"


def test_a_challenge_spent_meanwhile_is_not_answered_twice(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, shared_swtpm: Swtpm
) -> None:
    config = verifier_config(workdir, pki, endorsement_ca)
    settings = Settings.from_config(config)
    backend = TpmBackend(shared_swtpm.tcti)
    context: Any = PeerContext()

    async def scenario() -> dict[str, int]:
        repos = RacingRepositories(await open_sqlite(sqlite_file(config.database)))
        try:
            service = EnrollmentService(
                repos=repos,
                endorsements=load_endorsements(config),
                ca=CertificateAuthority.load(pki.ca_cert, pki.ca_key),
                settings=settings.enrollment,
                certificates=settings.certificates,
                limits=settings.limits,
                clock=lambda: datetime.datetime.now(datetime.UTC),
            )
            request = _request(backend)
            challenge = await service.Enroll(request, context)
            with pytest.raises(NotFound, match="was answered already"):
                await service.Activate(_answer(backend, request, challenge), context)
            return await repos.counts()
        finally:
            await repos.close()

    try:
        counts = asyncio.run(scenario())
    finally:
        backend.close()
    assert counts["devices"] == 0
    assert counts["certificates"] == 0


def test_device_text_cannot_forge_log_lines(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    shared_swtpm: Swtpm,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    config = verifier_config(workdir, pki, endorsement_ca)
    backend = TpmBackend(shared_swtpm.tcti)
    request = _request(backend, hostname="h\nFORGED verifier line")
    request.host.zone = "z\nFORGED zone line"
    request.host.labels["k\nFORGED"] = "v\r\nFORGED label line"

    async def scenario() -> list[str]:
        async with (
            running(config) as verifier,
            grpc.aio.secure_channel(
                f"127.0.0.1:{verifier.enrollment_port}", channel_credentials(pki)
            ) as channel,
        ):
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            challenge = await stub.Enroll(request, timeout=10)
            return [
                await _code(
                    stub.Activate(
                        enrollment_pb2.ActivateRequest(enrollment_id="x\nFORGED activate line"),
                        timeout=10,
                    )
                ),
                await _code(stub.Activate(_answer(backend, request, challenge), timeout=10)),
            ]

    try:
        outcomes = asyncio.run(scenario())
    finally:
        backend.close()
    assert outcomes[0].startswith("NOT_FOUND")
    assert outcomes[1] == "OK"
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "\n" in m or "\r" in m]
    logged = "\n".join(messages)
    for escaped in ("h\\nFORGED verifier line", "z\\nFORGED zone line"):
        assert escaped in logged
    assert "FORGED activate" not in logged  # an id that is none is not echoed at all
