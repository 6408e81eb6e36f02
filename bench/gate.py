"""Gate decisions and device certificate issuance per second on one core, against raw ECDSA
P-256 signature verification in the same run.

A decision (``devtrust.gate.decide``) on one device certificate: chain verification against
the bundle with ``cryptography.x509.verification`` (one ECDSA P-256 verify), the X.509-SVID
checks, the claims, tier and zone; with the feed's revoked serials (1,000 of them), and with
a CRL of as many instead (its signature checked once per bundle, its nextUpdate and serials
at each decision).
Issuance: ``CertificateAuthority.issue_device`` (build and sign; the device key is the
agent's, made elsewhere). The baselines: ``verify`` of the device certificate's signature
with the CA's public key, and ``sign`` of the same bytes with the CA's key. Each repeat
times ROUNDS calls of each, alternating, so machine noise hits all alike; medians.

    .venv/bin/python -m bench.gate [--rounds 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import json
import random

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bench.common import rates
from devtrust.core.claims import DeviceClaims
from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.gate import Bundle, GateDecision, RevocationList, decide
from devtrust.verifier.ca import CertificateAuthority

REVOKED = 1000
LIFETIME = datetime.timedelta(minutes=15)


def _crl(
    ca: CertificateAuthority, serials: list[int], now: datetime.datetime
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(minutes=10))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def bench(rounds: int, repeats: int) -> dict[str, object]:
    now = datetime.datetime.now(datetime.UTC)
    ca = CertificateAuthority.create(common_name="devtrust device CA (bench)", now=now)
    device_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    claims = DeviceClaims(tier=Tier.AFFIRMING, zone="production-inference")
    device = DeviceId("ab" * 32)

    def issue() -> x509.Certificate:
        return ca.issue_device(
            trust_domain="devtrust.local",
            device_id=device,
            public_key=device_key,
            claims=claims,
            now=now,
            lifetime=LIFETIME,
        )

    cert = issue()
    bundle = Bundle((ca.cert,))
    serials = [random.getrandbits(159) for _ in range(REVOKED)]
    feed = RevocationList(serials=frozenset(serials))
    crl = RevocationList(crl=_crl(ca, serials, now))
    zones = frozenset({"production-inference"})

    def decide_with(revoked: RevocationList) -> GateDecision:
        return decide(
            [cert], bundle=bundle, now=now, min_tier=Tier.WARNING, zones=zones, revoked=revoked
        )

    assert decide_with(feed).allow
    assert decide_with(crl).allow
    ca_public, tbs, signature = ca.key.public_key(), cert.tbs_certificate_bytes, cert.signature

    def raw_verify() -> None:
        ca_public.verify(signature, tbs, ec.ECDSA(hashes.SHA256()))

    def raw_sign() -> bytes:
        return ca.key.sign(tbs, ec.ECDSA(hashes.SHA256()))

    def gate_feed() -> GateDecision:
        return decide_with(feed)

    def gate_crl() -> GateDecision:
        return decide_with(crl)

    verify_rate, sign_rate, feed_rate, crl_rate, issue_rate = rates(
        [raw_verify, raw_sign, gate_feed, gate_crl, issue], rounds, repeats
    )
    return {
        "raw_verify_per_s": round(verify_rate),
        "raw_sign_per_s": round(sign_rate),
        "decisions_per_s": round(feed_rate),
        "decisions_with_crl_per_s": round(crl_rate),
        "certificates_issued_per_s": round(issue_rate),
        "decision_ratio": round(feed_rate / verify_rate, 3),
        "decision_with_crl_ratio": round(crl_rate / verify_rate, 3),
        "issue_ratio": round(issue_rate / verify_rate, 3),
        "revoked_serials": REVOKED,
        "rounds": rounds,
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(json.dumps(bench(args.rounds, args.repeats), indent=2))


if __name__ == "__main__":
    main()
