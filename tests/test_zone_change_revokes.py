"""A device moved to another zone loses the certificates naming the old one (issue 10,
item 3): their claims extension carries the zone a relying party gates on, so SetZone
revokes them at once, on the feed and in the CRL, audited with the operator; a change of
labels alone (not in the certificate) revokes nothing; the device stays enrolled and its
next good attestation gets a certificate naming the new zone."""

from __future__ import annotations

import asyncio
import datetime
from dataclasses import replace
from pathlib import Path

from cryptography import x509

from devtrust.core.claims import DeviceClaims
from devtrust.core.ids import DeviceId
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import query_pb2, query_pb2_grpc
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.records import DeviceState
from tests.conftest import SwtpmFactory
from tests.env import enrolled_agent, operator_stub, running
from tests.test_query_api import _audit
from tests.test_revocation import _attest, _config, _issuer_of, _open, _revoked_in


def _claims(der: bytes) -> DeviceClaims:
    claims = DeviceClaims.from_certificate(x509.load_der_x509_certificate(der))
    assert claims is not None
    return claims


def test_set_zone_revokes_the_certificates_naming_the_old_zone(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    # alice both moves devices and reads the feed.
    config = replace(_config(workdir, pki, endorsement_ca), operators={"alice": "admin"})

    async def scenario() -> None:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            device_id = DeviceId(agent.enrollment.device_id)
            assert await verifier.repos.devices.set_assignment(
                device_id,
                zone="lab",
                labels={},
                now=datetime.datetime.now(datetime.UTC),
                event="assigned:operator",
            )
            query_channel, query = operator_stub(pki, verifier, workdir)
            feed = query_pb2_grpc.RevocationsStub(query_channel)
            watch = feed.WatchRevocations(query_pb2.WatchRevocationsRequest(), timeout=60)
            channel, call, challenge = await _open(pki, verifier, agent)
            try:
                first = await asyncio.wait_for(watch.read(), 10)
                assert isinstance(first, query_pb2.RevocationEvent)
                assert first.end_of_snapshot
                good, challenge = await _attest(agent, call, challenge)
                der = good.certificate.certificate_der
                serial = good.certificate.serial_hex
                assert _claims(der).zone == "lab"
                issuer = _issuer_of(pki, x509.load_der_x509_certificate(der))
                # Labels only: not in the certificate, nothing revoked.
                await query.SetZone(
                    query_pb2.SetZoneRequest(device_id=device_id, zone="lab", labels={"k": "v"}),
                    timeout=10,
                )
                crl = await feed.GetCrl(query_pb2.GetCrlRequest(), timeout=10)
                assert serial not in _revoked_in(crl.crl_der, issuer)
                # Another zone: the certificate naming "lab" is revoked at once.
                await query.SetZone(
                    query_pb2.SetZoneRequest(device_id=device_id, zone="edge", labels={"k": "v"}),
                    timeout=10,
                )
                event = await asyncio.wait_for(watch.read(), 5)
                assert isinstance(event, query_pb2.RevocationEvent)
                assert (event.serial_hex, event.device_id) == (serial, device_id)
                assert event.reason == "zone changed from lab to edge"
                crl = await feed.GetCrl(query_pb2.GetCrlRequest(), timeout=10)
                assert serial in _revoked_in(crl.crl_der, issuer)
                # Still enrolled: the next attestation gets a certificate naming "edge".
                moved, _ = await _attest(agent, call, challenge)
                assert moved.HasField("certificate")
                assert moved.certificate.serial_hex != serial
                assert _claims(moved.certificate.certificate_der).zone == "edge"
                record = await verifier.repos.devices.get(device_id)
                assert record is not None
                assert record.state is DeviceState.ENROLLED
            finally:
                watch.cancel()
                await channel.close()
                await query_channel.close()
            revocations = [
                (actor, detail)
                for event_name, actor, detail in _audit(Path(str(config.database)), device_id)
                if event_name == "certificates_revoked"
            ]
            assert revocations == [
                (
                    "operator/alice",
                    {"reason": "zone changed from lab to edge", "serials": [serial]},
                )
            ]

    asyncio.run(scenario())
