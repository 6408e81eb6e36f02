"""Issue 10, item 3: revocation. A device whose tier falls below its zone's minimum loses its
live certificates (not its enrollment) and gets no new one while it stays there; an
operator's revocation ends the device. Either way the serials are on the feed
(WatchRevocations) and in the CRL signed by the device issuer before the call returns;
expired certificates leave both; the CRL is signed again at a fixed interval.

Unit tests run the Revoker over a real SQLite file with an injected clock; end-to-end tests
run a real verifier with swtpm devices over mTLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.agent.enroll import enroll
from devtrust.agent.main import make_host
from devtrust.core.errors import ConfigError
from devtrust.core.ids import DeviceId, Serial, serial_of
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc, query_pb2, query_pb2_grpc
from devtrust.verifier.ca import ALWAYS, CertificateAuthority, DeviceIssuers, Issuer
from devtrust.verifier.config import CertificatesConfig, RevocationConfig, VerifierConfig
from devtrust.verifier.decision import Decision
from devtrust.verifier.errors import MalformedInput, NotFound, ResourceExhausted
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.records import CertificateRecord, DeviceRecord, DeviceState
from devtrust.verifier.revocation import RevocationEntry, RevocationSink, Revoker
from devtrust.verifier.server import RunningVerifier
from devtrust.verifier.settings import CertificateSettings, RevocationSettings, Settings
from devtrust.verifier.storage import SqliteRepositories, open_sqlite
from devtrust.verifier.trust import (
    CONFIGURATION_APPROVED,
    CONFIGURATION_UNSAFE,
    CONFIGURATION_VULNERABLE,
    Claim,
    TrustResult,
)
from tests.conftest import SwtpmFactory
from tests.env import (
    Agent,
    AttestStream,
    enrolled_agent,
    operator_stub,
    quote_evidence,
    read_message,
    running,
    stream_channel,
    verifier_config,
)
from tests.test_measured_boot_e2e import _extend

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
INTERVAL = datetime.timedelta(seconds=300)
LIFETIME = datetime.timedelta(minutes=15)


# --- a Revoker over a real SQLite file, on an injected clock ---------------------------------


class Clock:
    def __init__(self, now: datetime.datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)


@dataclass
class Bench:
    repos: SqliteRepositories
    revoker: Revoker
    ca: CertificateAuthority
    clock: Clock
    crl_path: Path

    async def device(self, name: str, *certs: tuple[str, datetime.timedelta]) -> DeviceId:
        """A device, enrolled, with certificates (kind, lifetime from now)."""
        device_id, now = DeviceId(name * 64), self.clock()
        record = DeviceRecord(device_id, DeviceState.ENROLLED, b"", b"", b"", "", {}, now)
        await self.repos.devices.save(record, now=now, event="enrolled:enrolled")
        for kind, lifetime in certs:
            serial = serial_of(x509.random_serial_number())
            cert = CertificateRecord(serial, device_id, kind, now, now + lifetime, b"")
            await self.repos.certificates.record(cert)
        return device_id

    async def state(self, device_id: DeviceId) -> DeviceState | None:
        record = await self.repos.devices.get(device_id)
        return record.state if record else None

    def crl(self) -> x509.CertificateRevocationList:
        return verified_crl(self.revoker.crl.der, self.ca.cert)

    def actors(self, event: str) -> list[str]:
        with sqlite3.connect(self.repos.path) as db:
            rows = db.execute("SELECT actor FROM audit WHERE event = ?", (event,)).fetchall()
        return [row[0] for row in rows]


def verified_crl(der: bytes, issuer: x509.Certificate) -> x509.CertificateRevocationList:
    """The CRL, once its signature is checked with the device issuer's key (every CRL read
    here is)."""
    crl = x509.load_der_x509_crl(der)
    public_key = issuer.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(public_key)
    assert crl.issuer == issuer.subject
    return crl


def crl_serials(crl: x509.CertificateRevocationList) -> set[str]:
    return {f"{r.serial_number:x}" for r in crl}


async def _never(_: float) -> None:
    await asyncio.Event().wait()


@asynccontextmanager
async def bench(tmp_path: Path, *, max_queued_events: int = 1024) -> AsyncIterator[Bench]:
    clock = Clock()
    ca = CertificateAuthority.create(common_name="device CA", now=T0 - datetime.timedelta(days=1))
    issuers = DeviceIssuers(
        [Issuer(cert=ca.cert, key=ca.key, activate_after=ALWAYS)],
        device_lifetime=LIFETIME,
        clock=clock,
    )
    crl_path = tmp_path / "crl" / "devices.crl.pem"
    settings = RevocationSettings(
        crl_interval=INTERVAL, crl_path=crl_path, max_queued_events=max_queued_events
    )
    repos = await open_sqlite(tmp_path / "verifier.db")
    revoker = Revoker(revocations=repos.revocations, signer=issuers, settings=settings, clock=clock)
    # The periodic refresh has a test of its own: here it never wakes.
    await revoker.start(sleep=_never)
    try:
        yield Bench(repos, revoker, ca, clock, crl_path)
    finally:
        await revoker.aclose()
        await repos.close()


async def _next(feed: AsyncIterator[RevocationEntry]) -> RevocationEntry:
    return await asyncio.wait_for(anext(feed), 5)


def test_an_operator_revocation_is_stored_and_published_at_once(tmp_path: Path) -> None:
    """The device is REVOKED; its live device certificates (not the expired one, not its
    channel certificate) are revoked with the time and reason, audited with the actor, on
    the feed and in the signed CRL (and its file) when revoke returns."""

    async def scenario() -> None:
        async with bench(tmp_path) as b:
            device = await b.device(
                "a", ("device", LIFETIME), ("device", LIFETIME), ("channel", LIFETIME)
            )
            b.clock.advance(1)
            expired = await b.device("a", ("device", datetime.timedelta(seconds=-1)))
            assert expired == device
            live = {
                c.serial for c in await b.repos.revocations.live_certificates(device, b.clock())
            }
            assert len(live) == 2
            feed = b.revoker.subscribe()
            assert (await _next(feed)).end_of_snapshot
            b.clock.advance(1)
            revoked = await b.revoker.revoke(
                device, reason="stolen", actor="operator/alice", now=b.clock()
            )
            assert set(revoked) == live
            # On the feed, in the CRL and its file: already when revoke returned.
            events = [await _next(feed), await _next(feed)]
            assert {e.revoked.serial for e in events if e.revoked} == live
            assert all(e.revoked and e.revoked.reason == "stolen" for e in events)
            assert not any(e.snapshot for e in events)
            assert crl_serials(b.crl()) == live
            on_disk = x509.load_pem_x509_crl(b.crl_path.read_bytes())
            assert crl_serials(on_disk) == live
            # Stored: the state, each certificate's time and reason, the audit's actor.
            assert await b.state(device) is DeviceState.REVOKED
            stored = await b.repos.revocations.live(b.clock())
            assert {(c.serial, c.revoked_at, c.reason) for c in stored} == {
                (s, b.clock(), "stolen") for s in live
            }
            assert await b.repos.revocations.live_certificates(device, b.clock()) == []
            assert b.actors("revoked") == ["operator/alice"]
            # A new subscriber gets them in its snapshot.
            fresh = b.revoker.subscribe()
            snapshot = [await _next(fresh), await _next(fresh), await _next(fresh)]
            assert [e.snapshot for e in snapshot] == [True, True, True]
            assert {e.revoked.serial for e in snapshot[:2] if e.revoked} == live
            assert snapshot[2].end_of_snapshot
            # Again: nothing more to revoke. Unknown devices and empty reasons are refused.
            assert (
                await b.revoker.revoke(device, reason="again", actor="operator/x", now=b.clock())
                == []
            )
            with pytest.raises(NotFound):
                await b.revoker.revoke(
                    DeviceId("f" * 64), reason="x", actor="operator/x", now=b.clock()
                )
            with pytest.raises(MalformedInput, match="needs a reason"):
                await b.revoker.revoke(device, reason="  ", actor="operator/x", now=b.clock())
            await feed.aclose()
            await fresh.aclose()
            assert b.revoker.subscribers == 0

    asyncio.run(scenario())


def test_expired_certificates_leave_the_feed_and_the_crl(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with bench(tmp_path) as b:
            short = await b.device("a", ("device", datetime.timedelta(seconds=60)))
            long = await b.device("b", ("device", LIFETIME))
            [gone] = await b.revoker.revoke(short, reason="r", actor="operator/a", now=b.clock())
            [kept] = await b.revoker.revoke(long, reason="r", actor="operator/a", now=b.clock())
            assert crl_serials(b.crl()) == {gone, kept}
            assert b.revoker.revoked_serials(short) == (gone,)
            b.clock.advance(60)  # `gone` expires now
            # Before the next CRL: the Result and a new subscriber's snapshot leave it out.
            assert b.revoker.revoked_serials(short) == ()
            feed = b.revoker.subscribe()
            entries = [await _next(feed), await _next(feed)]
            assert [e.revoked.serial if e.revoked else None for e in entries] == [kept, None]
            await feed.aclose()
            # The next CRL leaves it out.
            await b.revoker.refresh()
            assert crl_serials(b.crl()) == {kept}
            assert crl_serials(x509.load_pem_x509_crl(b.crl_path.read_bytes())) == {kept}
            assert [c.serial for c in await b.repos.revocations.live(b.clock())] == [kept]

    asyncio.run(scenario())


def test_the_crl_is_signed_again_at_each_interval(tmp_path: Path) -> None:
    """Nothing changes, yet each interval brings a new CRL (thisUpdate = now, nextUpdate =
    now + 2 intervals, a larger CRL number); not sooner."""

    async def scenario() -> tuple[list[float], list[x509.CertificateRevocationList]]:
        async with bench(tmp_path) as b:
            crls = [b.crl()]
            asked: list[float] = []
            woken = asyncio.Event()

            async def sleep(seconds: float) -> None:
                asked.append(seconds)
                if len(asked) > 3:
                    woken.set()
                    await asyncio.Event().wait()  # for ever
                b.clock.advance(seconds if len(asked) != 2 else seconds / 2)
                await asyncio.sleep(0)

            task = asyncio.create_task(b.revoker.maintain(sleep=sleep))
            await asyncio.wait_for(woken.wait(), 5)
            task.cancel()
            crls.append(b.crl())
            return asked, crls

    asked, crls = asyncio.run(scenario())
    first, last = crls
    # 300 s: refreshed; then a sleep woken early (half of it): not refreshed, it sleeps the
    # rest; then refreshed again.
    assert asked[:4] == [300.0, 300.0, 150.0, 300.0]
    assert first.last_update_utc == T0
    assert last.last_update_utc == T0 + 2 * INTERVAL
    assert last.next_update_utc == T0 + 4 * INTERVAL
    number = x509.CRLNumber
    assert (
        last.extensions.get_extension_for_class(number).value.crl_number
        > first.extensions.get_extension_for_class(number).value.crl_number
    )


def test_a_subscriber_that_falls_behind_is_dropped_and_the_others_are_not(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with bench(tmp_path, max_queued_events=2) as b:
            devices = [await b.device(name, ("device", LIFETIME)) for name in "abc"]
            slow, quick = b.revoker.subscribe(), b.revoker.subscribe()
            assert (await _next(slow)).end_of_snapshot
            assert (await _next(quick)).end_of_snapshot
            seen = []
            for device in devices:
                await b.revoker.revoke(device, reason="r", actor="operator/a", now=b.clock())
                entry = await _next(quick)
                assert entry.revoked is not None
                seen.append(entry.revoked.device_id)
            assert seen == devices
            with pytest.raises(ResourceExhausted, match=r"revocation\.max_queued_events"):
                await _next(slow)
            await quick.aclose()
            assert b.revoker.subscribers == 0

    asyncio.run(scenario())


def _decision(
    device_id: DeviceId, zone: str, configuration: int, at: datetime.datetime
) -> Decision:
    result = TrustResult(
        device_id=device_id,
        claims={Claim.CONFIGURATION: configuration},
        findings=(),
        appraised_at=at,
        expires_at=at + datetime.timedelta(minutes=3),
    )
    return Decision(
        device_id=device_id,
        zone=zone,
        result=result,
        previous_tier=Tier.AFFIRMING,
        certificate=None,
        withheld="",
        tpm=None,
        rebooted=False,
    )


def test_the_sink_revokes_below_the_zone_minimum_and_names_the_serials(tmp_path: Path) -> None:
    """Zone lab accepts warning, the others need affirming (min_tier): a warning in prod
    revokes, a warning in lab does not, contraindicated in lab does. Each decision of the
    device leaves with its revoked serials, its enrollment kept."""
    certificates = CertificateSettings(
        trust_domain="devtrust.local",
        device_lifetime=LIFETIME,
        channel_lifetime=LIFETIME,
        min_tier=Tier.AFFIRMING,
        zone_min_tier={"lab": Tier.WARNING},
    )

    async def scenario() -> None:
        async with bench(tmp_path) as b:
            sink = RevocationSink(b.revoker, certificates)
            prod = await b.device("a", ("device", LIFETIME))
            lab = await b.device("b", ("device", LIFETIME))
            # Affirming: nothing revoked, the decision left as it is.
            good = _decision(prod, "prod", CONFIGURATION_APPROVED, b.clock())
            assert await sink.publish(good) is None
            assert crl_serials(b.crl()) == set()
            out = await sink.publish(_decision(prod, "prod", CONFIGURATION_VULNERABLE, b.clock()))
            assert out is not None
            [serial] = out.revoked_serials
            assert crl_serials(b.crl()) == {serial}
            assert await b.state(prod) is DeviceState.ENROLLED
            # Earlier revocations travel with later decisions, good or bad.
            later = await sink.publish(_decision(prod, "prod", CONFIGURATION_APPROVED, b.clock()))
            assert later is not None
            assert later.revoked_serials == (serial,)
            stored = await b.repos.revocations.live(b.clock())
            assert [(c.serial, c.reason) for c in stored] == [
                (serial, "tier warning is below the minimum affirming of zone prod")
            ]
            assert b.actors("certificates_revoked") == ["verifier"]
            assert (
                await sink.publish(_decision(lab, "lab", CONFIGURATION_VULNERABLE, b.clock()))
                is None
            )
            out = await sink.publish(_decision(lab, "lab", CONFIGURATION_UNSAFE, b.clock()))
            assert out is not None
            assert len(out.revoked_serials) == 1
            assert crl_serials(b.crl()) == {serial, *out.revoked_serials}

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("yaml_text", "problem"),
    [
        ("certificates: {zone_min_tier: {prod: best}}", "zone_min_tier.prod: unknown tier"),
        ("certificates: {zone_min_tier: {prod: none}}", "zone_min_tier.prod: none would"),
        ("certificates: {zone_min_tier: [prod]}", "certificates.zone_min_tier: expected"),
        ("revocation: {crl_interval_s: 0}", "crl_interval_s must be positive"),
    ],
)
def test_the_zone_minimums_and_the_crl_interval_are_checked_at_load(
    tmp_path: Path, yaml_text: str, problem: str
) -> None:
    path = tmp_path / "verifier.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=problem):
        VerifierConfig.load(path)


def test_a_zone_minimum_is_what_the_settings_apply(tmp_path: Path) -> None:
    path = tmp_path / "verifier.yaml"
    path.write_text(
        "certificates: {min_tier: affirming, zone_min_tier: {lab: warning}}\n"
        "revocation: {crl_interval_s: 60, crl_path: crl.pem}\n"
    )
    settings = Settings.from_config(VerifierConfig.load(path))
    assert settings.certificates.min_tier_for("lab") is Tier.WARNING
    assert settings.certificates.min_tier_for("prod") is Tier.AFFIRMING
    assert settings.revocation.crl_interval == datetime.timedelta(seconds=60)
    assert settings.revocation.crl_path == tmp_path / "crl.pem"


# --- end to end: swtpm devices, a real verifier, the feed over gRPC ---------------------------


def _config(workdir: Path, pki: PkiFiles, ek_ca: EndorsementCA) -> VerifierConfig:
    """Zone prod needs affirming; every other zone takes any appraised tier."""
    return replace(
        verifier_config(workdir, pki, ek_ca, interval_s=0.2),
        certificates=CertificatesConfig(
            min_tier="contraindicated", zone_min_tier={"prod": "affirming"}
        ),
        revocation=RevocationConfig(crl_path=workdir / "devices.crl.pem"),
        # The feed's reader: a relying party (verifier/authz.py).
        operators={"alice": "relying-party"},
    )


def _issuer_of(pki: PkiFiles, cert: x509.Certificate) -> x509.Certificate:
    """The CA certificate of the PKI that signed ``cert`` (the device issuer)."""
    for path in (pki.device_ca_cert, pki.ca_cert):
        if path.exists():
            ca = x509.load_pem_x509_certificate(path.read_bytes())
            if ca.subject == cert.issuer:
                cert.verify_directly_issued_by(ca)
                return ca
    raise AssertionError(f"no CA of the PKI issued {cert.subject}")


def _revoked_in(crl_der: bytes, issuer: x509.Certificate) -> set[str]:
    return crl_serials(verified_crl(crl_der, issuer))


async def _open(
    pki: PkiFiles, verifier: RunningVerifier, agent: Agent
) -> tuple[grpc.aio.Channel, AttestStream, attestation_pb2.Challenge]:
    channel = stream_channel(pki, verifier, agent.enrollment)
    call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=30)
    await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
    first = await read_message(call)
    return channel, call, first.challenge


async def _attest(
    agent: Agent, call: AttestStream, challenge: attestation_pb2.Challenge
) -> tuple[attestation_pb2.Result, attestation_pb2.Challenge]:
    """Answer ``challenge``; the Result and the next challenge."""
    await call.write(attestation_pb2.AgentMessage(evidence=await quote_evidence(agent, challenge)))
    reply = await read_message(call)
    assert reply.HasField("result")
    following = reply if reply.HasField("challenge") else await read_message(call)
    return reply.result, following.challenge


def test_a_device_whose_pcr_turns_bad_is_revoked_on_the_feed_and_in_the_crl(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    config = _config(workdir, pki, endorsement_ca)

    async def scenario() -> None:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            device_id = DeviceId(agent.enrollment.device_id)
            # In zone prod, whose minimum (affirming) is above min_tier (contraindicated).
            assert await verifier.repos.devices.set_assignment(
                device_id,
                zone="prod",
                labels={},
                now=datetime.datetime.now(datetime.UTC),
                event="assigned:operator",
            )
            feed_channel, _ = operator_stub(pki, verifier, workdir)
            feed = query_pb2_grpc.RevocationsStub(feed_channel)
            watch = feed.WatchRevocations(query_pb2.WatchRevocationsRequest(), timeout=60)
            channel, call, challenge = await _open(pki, verifier, agent)
            try:
                first = await asyncio.wait_for(watch.read(), 10)
                assert isinstance(first, query_pb2.RevocationEvent)
                assert first.end_of_snapshot
                good, challenge = await _attest(agent, call, challenge)
                assert good.HasField("certificate")
                assert list(good.revoked_serials) == []
                serial = Serial(good.certificate.serial_hex)
                issuer = _issuer_of(
                    pki, x509.load_der_x509_certificate(good.certificate.certificate_der)
                )
                # PCR 7 moves without an event in the log: the replay fails.
                await _extend(agent, 7, b"an unlogged driver")
                bad, challenge = await _attest(agent, call, challenge)
                assert bad.trust.tier == good.trust.tier + 2  # affirming -> contraindicated
                assert not bad.HasField("certificate")
                assert list(bad.revoked_serials) == [serial]
                # On the feed at once, and in the CRL (GetCrl and the file).
                event = await asyncio.wait_for(watch.read(), 5)
                assert isinstance(event, query_pb2.RevocationEvent)
                assert (event.serial_hex, event.device_id) == (serial, device_id)
                assert not event.snapshot
                assert event.reason == (
                    "tier contraindicated is below the minimum affirming of zone prod"
                )
                crl = await feed.GetCrl(query_pb2.GetCrlRequest(), timeout=10)
                assert serial in _revoked_in(crl.crl_der, issuer)
                assert crl.next_update.ToDatetime() - crl.this_update.ToDatetime() == 2 * INTERVAL
                assert config.revocation.crl_path is not None
                on_disk = x509.load_pem_x509_crl(config.revocation.crl_path.read_bytes())
                der = on_disk.public_bytes(serialization.Encoding.DER)
                assert serial in _revoked_in(der, issuer)
                # Still bad: still no certificate, still told which one is revoked; the
                # device stays enrolled.
                again, _ = await _attest(agent, call, challenge)
                assert not again.HasField("certificate")
                assert list(again.revoked_serials) == [serial]
                record = await verifier.repos.devices.get(device_id)
                assert record is not None
                assert record.state is DeviceState.ENROLLED
            finally:
                watch.cancel()
                await channel.close()
                await feed_channel.close()

    asyncio.run(scenario())


def test_an_operator_revocation_is_published_at_once_and_the_device_is_done(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    config = _config(workdir, pki, endorsement_ca)

    async def scenario() -> None:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            device_id = DeviceId(agent.enrollment.device_id)
            feed_channel, _ = operator_stub(pki, verifier, workdir)
            feed = query_pb2_grpc.RevocationsStub(feed_channel)
            watch = feed.WatchRevocations(query_pb2.WatchRevocationsRequest(), timeout=60)
            channel, call, challenge = await _open(pki, verifier, agent)
            try:
                first = await asyncio.wait_for(watch.read(), 10)
                assert isinstance(first, query_pb2.RevocationEvent)
                assert first.end_of_snapshot
                good, challenge = await _attest(agent, call, challenge)
                serial = good.certificate.serial_hex
                issuer = _issuer_of(
                    pki, x509.load_der_x509_certificate(good.certificate.certificate_der)
                )
                revoked = await verifier.revoker.revoke(
                    device_id,
                    reason="decommissioned",
                    actor="operator/alice",
                    now=datetime.datetime.now(datetime.UTC),
                )
                assert revoked == [serial]
                event = await asyncio.wait_for(watch.read(), 5)
                assert isinstance(event, query_pb2.RevocationEvent)
                assert (event.serial_hex, event.reason) == (serial, "decommissioned")
                crl = await feed.GetCrl(query_pb2.GetCrlRequest(), timeout=10)
                assert serial in _revoked_in(crl.crl_der, issuer)
                # The open stream appraises nothing more; no new stream, no enrollment.
                await call.write(
                    attestation_pb2.AgentMessage(evidence=await quote_evidence(agent, challenge))
                )
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await call.read()
                assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
            finally:
                watch.cancel()
                await channel.close()
                await feed_channel.close()
            async with stream_channel(pki, verifier, agent.enrollment) as again:
                stream = attestation_pb2_grpc.AttestationStub(again).Attest(timeout=10)
                # The verifier may end the call before the Hello is sent: the write then
                # fails, and the call's status is the refusal.
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stream.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
                assert await stream.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "is revoked" in (await stream.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as reenroll:
                await enroll(agent.cfg, agent.tpm, agent.files, host=make_host(agent.cfg))
            assert reenroll.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # A restarted verifier publishes what it revoked before.
        async with running(config) as verifier:
            operator_channel, _ = operator_stub(pki, verifier, workdir)
            async with operator_channel:
                crl = await query_pb2_grpc.RevocationsStub(operator_channel).GetCrl(
                    query_pb2.GetCrlRequest(), timeout=10
                )
            assert serial in _revoked_in(crl.crl_der, issuer)

    asyncio.run(scenario())
