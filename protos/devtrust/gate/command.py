"""``devtrust gate check CERT --ca-bundle FILE``: the gate's decision on a certificate file,
for scripts and for an operator asking "would this device get in?".

Exit status: 0 allowed, 1 denied, 2 usage error or unreadable input. One line on stdout,
the reason id first (``gate.zone: device ... zone 'x' is not allowed``), or one JSON object
with ``--json``. The time is now; the chain is CERT's certificates, leaf first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from devtrust.core.tier import Tier
from devtrust.gate.decision import Bundle, GateDecision, RevocationList, decide

EXIT_ALLOW, EXIT_DENY, EXIT_USAGE = 0, 1, 2


class _Unreadable(Exception):
    """An input file that cannot be used: exit 2."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _Unreadable(f"cannot read {what} {path}: {exc.strerror}") from exc


def _certificates(path: Path) -> list[x509.Certificate]:
    data = _read(path, "certificate")
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise _Unreadable(f"{path}: not a PEM or DER certificate: {exc}") from exc


def _bundle(path: Path) -> Bundle:
    try:
        return Bundle(tuple(_certificates(path)))
    except ValueError as exc:
        raise _Unreadable(f"{path}: {exc}") from exc


def _crl(path: Path) -> x509.CertificateRevocationList:
    data = _read(path, "CRL")
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise _Unreadable(f"{path}: not a PEM or DER CRL: {exc}") from exc


def _tier(text: str) -> Tier:
    try:
        return Tier.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parsers(sub: Any) -> None:
    """Add ``gate check`` to the ``devtrust`` subcommand parser ``sub``."""
    gate = sub.add_parser("gate", help="gate access on device certificates").add_subparsers(
        dest="action", required=True
    )
    p = gate.add_parser("check", help="decide on a device certificate as a relying party would")
    p.add_argument("cert", type=Path, metavar="CERT", help="PEM (leaf first) or DER certificate")
    p.add_argument(
        "--ca-bundle",
        type=Path,
        required=True,
        metavar="FILE",
        help="the device issuing CAs (PEM): the verifier's relying-party bundle",
    )
    p.add_argument(
        "--min-tier",
        type=_tier,
        default="affirming",
        metavar="TIER",
        help="the worst tier allowed: affirming, warning or contraindicated",
    )
    p.add_argument(
        "--zone", action="append", metavar="ZONE", help="a zone allowed (repeatable; none: any)"
    )
    p.add_argument(
        "--crl", type=Path, metavar="FILE", help="a CRL of the device issuer (PEM or DER)"
    )
    p.add_argument(
        "--trust-domain", metavar="TD", help="the SPIFFE trust domain required (none: any)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(tool=check)


def check(args: argparse.Namespace) -> int:
    try:
        chain = _certificates(args.cert)
        bundle = _bundle(args.ca_bundle)
        revoked = RevocationList(crl=_crl(args.crl)) if args.crl else None
    except _Unreadable as exc:
        print(f"devtrust: {exc}", file=sys.stderr)
        return EXIT_USAGE
    decision = decide(
        chain,
        bundle=bundle,
        now=datetime.datetime.now(datetime.UTC),
        min_tier=args.min_tier,
        zones=frozenset(args.zone) if args.zone is not None else None,
        revoked=revoked,
        trust_domain=args.trust_domain,
    )
    print(json.dumps(_json(decision)) if args.json else " ".join(str(decision).split()))
    return EXIT_ALLOW if decision.allow else EXIT_DENY


def _json(decision: GateDecision) -> dict[str, Any]:
    return {
        "allow": decision.allow,
        "reason": str(decision.reason),
        "message": decision.message,
        "device_id": decision.device_id,
        "tier": decision.tier.label if decision.tier is not None else None,
        "zone": decision.zone,
        "serial": decision.serial,
    }
