"""Attacks on issue 10's trust (review): each test is a hole found and closed, and fails when
its fix is taken out.

1. An operator revokes a device while one of its appraisals runs: the attestor read the device
   (not revoked yet) before, issued a certificate, and the store committed it after the
   revocation took the device's live certificates. That certificate must be revoked on the
   feed and in the CRL, and never handed to the agent.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509

from devtrust.agent import workload
from devtrust.core.ids import serial_of
from devtrust.core.tier import Tier
from devtrust.verifier.records import CertificateRecord
from devtrust.verifier.revocation import RevocationSink
from devtrust.verifier.settings import CertificateSettings
from devtrust.verifier.trust import CONFIGURATION_APPROVED
from tests.test_revocation import LIFETIME, _decision, bench, crl_serials


@pytest.mark.parametrize("change", ["revoked", "moved"])
def test_a_certificate_issued_while_the_device_is_revoked_is_revoked_not_handed_out(
    tmp_path: Path, change: str
) -> None:
    """Also (2.) when the operator moved the device to another zone meanwhile: the
    certificate names the old zone."""
    certificates = CertificateSettings(
        trust_domain="devtrust.local",
        device_lifetime=LIFETIME,
        channel_lifetime=LIFETIME,
        min_tier=Tier.AFFIRMING,
    )

    async def scenario() -> None:
        async with bench(tmp_path) as b:
            sink = RevocationSink(b.revoker, certificates)
            device = await b.device("a")
            now = b.clock()
            # The appraisal read the device before the revocation and issued this one.
            serial = serial_of(x509.random_serial_number())
            issued = CertificateRecord(serial, device, "device", now, now + LIFETIME, b"")
            decision = replace(
                _decision(device, "prod", CONFIGURATION_APPROVED, now), certificate=issued
            )
            if change == "revoked":
                revoked = await b.revoker.revoke(
                    device, reason="stolen", actor="operator/o", now=now
                )
            else:
                revoked = await b.revoker.zone_changed(
                    device, was="prod", zone="lab", actor="operator/o", now=now
                )
            assert revoked == []
            # The store sink commits the decision after the revocation, then the
            # revocation sink sees it.
            await b.repos.trust.record(decision)
            out = await sink.publish(decision)
            assert out is not None
            assert out.certificate is None
            assert out.trust_bundle == ()
            assert serial in out.revoked_serials
            assert serial in crl_serials(b.crl())
            assert [
                c.serial for c in await b.repos.revocations.live_certificates(device, now)
            ] == []

    asyncio.run(scenario())


class _ManyGroups:
    """A unix socket whose peer is in more groups than getsockopt can read: the kernel says
    ERANGE for every buffer, and Python refuses a buffer over 1024 bytes, as CPython does."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes:
        self.sizes.append(buflen)
        if buflen > 1024:
            raise OSError("getsockopt buflen out of range")
        raise OSError(errno.ERANGE, "Numerical result out of range")


def test_a_peer_in_too_many_groups_counts_by_uid_and_primary_group_only() -> None:
    # Before: the retry asked for 256 KiB, which Python refuses, and the connection of an
    # allowed user in many groups failed with an error instead of being judged.
    sock = _ManyGroups()
    assert workload._peer_groups(sock) == ()
    assert max(sock.sizes) <= 1024
