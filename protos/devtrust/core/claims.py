"""The device certificate's claims extension: the tier and zone a relying party gates on,
read here without the CA (``devtrust.verifier.ca`` writes it into the certificates it issues).

A UUID-derived OID (ITU-T X.667, arc 2.25) names the extension; its value is a DER
UTF8String holding compact JSON: ``{"tier": "affirming", "zone": "..."}``. The tier travels
as its label; a label this code does not know is an error, never a guess: a relying party
must not gate on a tier it cannot read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cryptography import x509

from devtrust.core.tier import Tier

DEVICE_CLAIMS_OID = x509.ObjectIdentifier("2.25.248085958843377620432384009404546624061")


def _der_utf8string(text: str) -> bytes:
    body = text.encode()
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(octets)]) + octets
    return b"\x0c" + length + body


def _parse_der_utf8string(der: bytes) -> str:
    if len(der) < 2 or der[0] != 0x0C:
        raise ValueError("device claims extension is not a UTF8String")
    n, pos = der[1], 2
    if n & 0x80:
        count = n & 0x7F
        n, pos = int.from_bytes(der[2 : 2 + count], "big"), 2 + count
    if pos + n != len(der):
        raise ValueError("device claims extension has a bad length")
    return der[pos:].decode()


_TIERS = {t.label: t for t in Tier}


@dataclass(frozen=True)
class DeviceClaims:
    tier: Tier
    zone: str

    def to_extension(self) -> x509.UnrecognizedExtension:
        value = json.dumps({"tier": self.tier.label, "zone": self.zone}, separators=(",", ":"))
        return x509.UnrecognizedExtension(DEVICE_CLAIMS_OID, _der_utf8string(value))

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> DeviceClaims | None:
        try:
            ext = cert.extensions.get_extension_for_oid(DEVICE_CLAIMS_OID).value
        except x509.ExtensionNotFound:
            return None
        assert isinstance(ext, x509.UnrecognizedExtension)
        data = json.loads(_parse_der_utf8string(ext.value))
        label = str(data["tier"])
        tier = _TIERS.get(label)
        if tier is None:
            shown = label if len(label) <= 40 else f"{label[:37]}..."
            raise ValueError(
                f"device claims extension: unknown tier {shown!r} (known: {', '.join(_TIERS)})"
            )
        return cls(tier=tier, zone=str(data.get("zone", "")))
