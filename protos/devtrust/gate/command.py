"""``devtrust gate check CERT --ca-bundle FILE``: the gate's decision on a certificate file,
for scripts and for an operator asking "would this device get in?".

Exit status: 0 allowed, 1 denied, 2 usage error or unreadable input. One line on stdout,
the reason id first (``gate.zone: device ... zone 'x' is not allowed``), or one JSON object
with ``--json``. Given one of the verifier's other certificates (a channel, operator or server
one), which never get in, a line on stderr says which and what to give instead. The time is
now; the chain is CERT's certificates, leaf first.

``devtrust-gate check ...`` is the same command for a relying party's host, where the
devtrust-gate package installs the gate without the verifier (``main`` below).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import re
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from devtrust.core.tier import Tier
from devtrust.gate.decision import Bundle, GateDecision, Reason, RevocationList, decide

EXIT_ALLOW, EXIT_DENY, EXIT_USAGE = 0, 1, 2


class _Unreadable(Exception):
    """An input file that cannot be used: exit 2."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _Unreadable(f"cannot read {what} {path}: {exc.strerror}") from exc


def _certificates(path: Path, what: str = "certificate") -> list[x509.Certificate]:
    data = _read(path, what)
    if not data.strip():
        raise _Unreadable(f"{what} {path} is empty: give a PEM or DER certificate file")
    if b"-----BEGIN" in data and b"-----BEGIN CERTIFICATE-----" not in data:
        kinds = sorted(set(re.findall(rb"-----BEGIN ([A-Z0-9 ]+)-----", data)))
        held = ", ".join(k.decode() for k in kinds) or "none readable"
        raise _Unreadable(
            f"{what} {path}: not a PEM or DER certificate: its PEM blocks are {held}, "
            "none a CERTIFICATE"
        )
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise _Unreadable(f"{path}: not a PEM or DER certificate: {exc}") from exc


# Where each of the verifier's other certificates comes from, for a hint when one is given
# (none verifies against the device bundle: verifier/ca.py).
_NOT_DEVICE = {
    "agent": "an attestation-channel certificate (the agent's channel.pem)",
    "operator": "an operator certificate",
}


def _hint(chain: list[x509.Certificate], decision: GateDecision, path: Path) -> str | None:
    """What to check instead, when CERT is plainly not a device certificate."""
    if decision.allow or decision.reason is not Reason.UNTRUSTED:
        return None
    try:
        san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        kind = uri.removeprefix("spiffe://").split("/")[1:2]
        if uri.startswith("spiffe://") and kind and kind[0] in _NOT_DEVICE:
            return (
                f"{path} is {_NOT_DEVICE[kind[0]]} ({uri}), which the gate never takes: give "
                "a device certificate (spiffe://TD/device/ID: the agent's device.pem in its "
                "runtime_dir, /run/devtrust by default)"
            )
    if san.get_values_for_type(x509.DNSName) or san.get_values_for_type(x509.IPAddress):
        return f"{path} is a server certificate, which the gate never takes: give a device one"
    return None


def _bundle(path: Path) -> Bundle:
    try:
        return Bundle(tuple(_certificates(path, "CA bundle")))
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
    _add_check(gate)


def _add_check(sub: Any) -> None:
    p = sub.add_parser("check", help="decide on a device certificate as a relying party would")
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
    hint = _hint(chain, decision, args.cert)
    if hint is not None:
        print(f"devtrust: {hint}", file=sys.stderr)
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


def _version_line() -> str:
    # The installed distribution's version: the gate imports nothing of devtrust outside
    # core and itself (tests/test_layers.py), so not devtrust.__version__.
    try:
        return f"devtrust-gate {importlib.metadata.version('devtrust')}"
    except importlib.metadata.PackageNotFoundError:
        return "devtrust-gate (version unknown: devtrust is not installed)"


def main(argv: list[str] | None = None) -> int:
    """``devtrust-gate``: ``check`` alone, for a relying party's host, where the devtrust-gate
    package installs the gate without the verifier and its operator commands."""
    parser = argparse.ArgumentParser(
        prog="devtrust-gate",
        description="Decide on devtrust device certificates as a relying party would.",
    )
    parser.add_argument("--version", action="version", version=_version_line())
    _add_check(parser.add_subparsers(dest="action", required=True))
    return check(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
