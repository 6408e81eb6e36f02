"""Attestation results as EAR, the EAT Attestation Result (draft-ietf-rats-ear), and their
signing as a JWT (a compact JWS, ES256). Pure: a ``TrustResult``, the verifier's identity and
``now`` in, a claims set out; a claims set and a key in, a token out; a token and a
certificate in, the verified claims out. No file or network I/O here (the keys are read by
verifier/pki.py ``load_ear_signer``).

The claim names are those of draft-ietf-rats-ear (the working group's cddl/ear.cddl and
ear-appraisal.cddl, profile ``tag:ietf.org,2026:rats/ear#03``): ``eat_profile``, ``iat``,
``ear_verifier_id`` {developer, build}, a top-level ``ear_status`` (the least favourable of
the submods'), ``submods``, and in each submod ``ear_status``, ``ear_trustworthiness_vector``
and ``ear_appraisal_policy_ids``. (Veraison's EAR libraries read the earlier labels of
profile ``tag:github.com,2023:veraison/ear``, ``ear.status`` and so on; the label constants
below are the one place that names them.) ``exp`` is the result's staleness bound (RFC 7519,
4.1.4); the device is the JWT subject ``sub`` (RFC 7519, 4.1.2).
devtrust's own claims are namespaced ``devtrust.*``: each submod's findings (id, severity,
claim, message, expected, found, subject) as ``devtrust.findings``, a GPU submod's full name
as ``devtrust.name``, and the result's score and evidence digest.

Submods: ``host`` (the TrustResult's own claims, which are already the worst of the host and
its GPUs, claim by claim) and one per GPU, ``gpu-<index>`` (verifier/policy.py names GPU
submods ``gpu<index>:<uuid>``; a name of another shape is kept as it is).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from devtrust import __version__
from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.verifier.errors import MalformedInput, Rejected
from devtrust.verifier.trust import (
    Claim,
    Finding,
    SubResult,
    TrustResult,
    finding_json,
    overall_tier,
)

EAT_PROFILE = "tag:ietf.org,2026:rats/ear#03"
HOST = "host"
ALG = "ES256"  # RFC 7518 3.4: ECDSA P-256, SHA-256, signature r || s (32 bytes each)
# Tokens larger than this are refused before any parsing (a host with 8 GPUs and every
# finding they can raise is a few tens of KiB).
MAX_TOKEN = 1024 * 1024

# The claim labels (JSON) of the profile.
STATUS = "ear_status"
VECTOR = "ear_trustworthiness_vector"
POLICY_IDS = "ear_appraisal_policy_ids"
VERIFIER_ID = "ear_verifier_id"
PROFILE = "eat_profile"
SUBMODS = "submods"
FINDINGS = "devtrust.findings"
NAME = "devtrust.name"

# Extended key usage of the EAR signing certificate: "devtrust EAR signing" (a UUID-derived
# OID, ITU-T X.667 arc 2.25, as devtrust.core.claims names its extension). The verifier's CA
# issues that certificate (relying parties hold ca.pem already, to reach the verifier); with
# this as its only EKU, TLS stacks refuse it for serverAuth and clientAuth, and a relying
# party accepts for EARs only a certificate that has it (``verify_ear_certificate``).
EAR_SIGNING_EKU = x509.ObjectIdentifier("2.25.55869554648333442542176167255748034157")

_GPU_SUBMOD = re.compile(r"gpu(\d{1,4}):")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class EarFormatError(MalformedInput):
    """A token or claims set that is not an EAR of this profile."""


class EarSignatureError(Rejected):
    """A token whose signature does not verify with the certificate given, or that is past
    its ``exp``."""


@dataclass(frozen=True)
class VerifierId:
    """``ear_verifier_id`` (draft-ietf-rats-ar4si 2.2.1): who made the result."""

    developer: str = "devtrust"
    build: str = f"devtrust-verifier {__version__}"


@dataclass(frozen=True)
class EarSigner:
    """The verifier's EAR signing key (ECDSA P-256) and its certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def __post_init__(self) -> None:
        if not isinstance(self.key.curve, ec.SECP256R1):
            raise TypeError(f"an EAR signing key is ECDSA P-256 (ES256), not {self.key.curve.name}")
        if self.key.public_key() != self.cert.public_key():
            raise ValueError("the EAR signing key is not the key of its certificate")

    @property
    def kid(self) -> str:
        return key_id(self.cert)


def key_id(cert: x509.Certificate) -> str:
    """The JWS ``kid`` of a signer: hex SHA-256 of its certificate (DER)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# --- the claims ------------------------------------------------------------------------------


def submod_key(name: str) -> str:
    """The EAR submod name of a TrustResult submod: ``gpu-<index>`` for a GPU."""
    m = _GPU_SUBMOD.match(name)
    return f"gpu-{int(m.group(1))}" if m else name


def _epoch(when: datetime.datetime) -> int:
    return int(when.timestamp())


def _vector(claims: dict[Claim, int]) -> dict[str, int]:
    """The trustworthiness vector (draft-ietf-rats-ar4si 2.3), in the order of its claims."""
    return {c.value: claims[c] for c in Claim if c in claims}


def _appraisal(
    claims: dict[Claim, int], findings: tuple[Finding, ...], policy_id: str
) -> dict[str, Any]:
    out: dict[str, Any] = {STATUS: overall_tier(claims).label, VECTOR: _vector(claims)}
    if policy_id:
        out[POLICY_IDS] = [policy_id]
    out[FINDINGS] = [finding_json(f) for f in findings]
    return out


def _gpu_appraisal(sub: SubResult, policy_id: str) -> dict[str, Any]:
    out = _appraisal(sub.claims, sub.findings, policy_id)
    out[NAME] = sub.name
    return out


def _worst(submods: dict[str, dict[str, Any]]) -> str:
    """The least favourable status of the submods (contraindicated, warning, affirming,
    none: ``Tier``'s order)."""
    return max(Tier.parse(s[STATUS]) for s in submods.values()).label


def ear_claims(
    result: TrustResult, *, verifier_id: VerifierId, now: datetime.datetime
) -> dict[str, Any]:
    """The EAR claims set of ``result`` issued at ``now``. Give the result as of ``now``
    (``TrustResult.at``): past its staleness bound every claim is void (status none)."""
    submods: dict[str, dict[str, Any]] = {
        HOST: _appraisal(result.claims, result.findings, result.policy_id)
    }
    for sub in result.submods:
        key = submod_key(sub.name)
        if key in submods:  # two GPUs of one index: a malformed result, never merged
            raise ValueError(f"device {result.device_id}: two submods named {key}")
        submods[key] = _gpu_appraisal(sub, result.policy_id)
    return {
        PROFILE: EAT_PROFILE,
        "iat": _epoch(now),
        "exp": _epoch(result.expires_at),
        "sub": result.device_id,
        VERIFIER_ID: {"developer": verifier_id.developer, "build": verifier_id.build},
        STATUS: _worst(submods),
        SUBMODS: submods,
        "devtrust.appraised-at": _epoch(result.appraised_at),
        "devtrust.score": result.score,
        "devtrust.evidence-digest": result.evidence_digest,
    }


def unappraised_claims(
    device_id: DeviceId, *, verifier_id: VerifierId, now: datetime.datetime
) -> dict[str, Any]:
    """The EAR of a device never appraised: status none, no vector, no ``exp``."""
    return {
        PROFILE: EAT_PROFILE,
        "iat": _epoch(now),
        "sub": device_id,
        VERIFIER_ID: {"developer": verifier_id.developer, "build": verifier_id.build},
        STATUS: Tier.NONE.label,
        SUBMODS: {HOST: {STATUS: Tier.NONE.label, FINDINGS: []}},
    }


def ear_json(claims: dict[str, Any]) -> str:
    """The claims set as the JSON the JWT signs: UTF-8, no insignificant whitespace."""
    return json.dumps(claims, separators=(",", ":"), ensure_ascii=False)


# --- the JWT ---------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str, part: str) -> bytes:
    """Base64url without padding (RFC 7515 2); anything else is refused, not repaired."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise EarFormatError(f"EAR token: the {part} is not base64url without padding")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise EarFormatError(f"EAR token: the {part} is not base64url") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # two values for one claim: which one a reader takes is not defined
            raise EarFormatError(f"EAR token: the claim {key!r} is given twice")
        out[key] = value
    return out


def _json_object(data: bytes, part: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EarFormatError(f"EAR token: the {part} is not JSON (UTF-8)") from None
    if not isinstance(value, dict):
        raise EarFormatError(f"EAR token: the {part} is not a JSON object")
    return value


def sign_ear(claims: dict[str, Any], signer: EarSigner) -> str:
    """``claims`` as a compact JWS (RFC 7515 7.1), ES256, header {alg, typ JWT, kid}."""
    header = {"alg": ALG, "typ": "JWT", "kid": signer.kid}
    signing_input = f"{_b64(ear_json(header).encode())}.{_b64(ear_json(claims).encode())}"
    der = signer.key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _ear_eku(policy: Any, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    if eku is None or EAR_SIGNING_EKU not in eku:
        raise ValueError(f"no extended key usage {EAR_SIGNING_EKU.dotted_string} (EAR signing)")


def verify_ear_certificate(
    cert: x509.Certificate,
    *,
    roots: Sequence[x509.Certificate],
    at: datetime.datetime,
    intermediates: Sequence[x509.Certificate] = (),
) -> None:
    """What a relying party checks of an EAR signer before ``verify_ear``: a chain to one
    of ``roots`` (the verifier's ca.pem) valid at ``at`` (cryptography.x509.verification,
    RFC 5280), and the EAR signing EKU on the leaf. Raises ``EarSignatureError``."""
    ee = ExtensionPolicy.permit_all().require_present(
        x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ear_eku
    )
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots)))
        .time(at)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
        .build_client_verifier()
    )
    try:
        verifier.verify(cert, list(intermediates))
    except VerificationError as exc:
        raise EarSignatureError(
            f"EAR signing certificate {cert.subject.rfc4514_string()} (serial "
            f"{cert.serial_number:x}) is not an EAR signer of the verifier's CA at "
            f"{at.isoformat()}: {exc}"
        ) from None


def verify_ear(
    token: str, cert: x509.Certificate, *, now: datetime.datetime | None = None
) -> dict[str, Any]:
    """The claims of ``token`` once its signature verifies with ``cert``'s key; with
    ``now``, also unexpired. What a relying party does, once ``verify_ear_certificate``
    accepted ``cert``. Raises ``EarFormatError`` or ``EarSignatureError``."""
    # 1. The compact serialization (RFC 7515 7.1): three base64url parts.
    if len(token) > MAX_TOKEN:
        raise EarFormatError(f"EAR token: {len(token)} characters, more than {MAX_TOKEN}")
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise EarFormatError(
            f"EAR token: expected a compact JWS (three parts), found {len(parts)} parts"
        )
    header = _json_object(_unb64(parts[0], "header"), "header")
    # 2. The header: ES256 only (never "none", never a MAC keyed with the public key: RFC
    #    8725 2.1, 3.1), no extension the verifier would have to understand (RFC 7515 4.1.11).
    if header.get("alg") != ALG:
        raise EarSignatureError(f"EAR token: expected alg {ALG}, found {header.get('alg')!r}")
    if "crit" in header:
        raise EarFormatError(f"EAR token: unknown critical header parameters {header['crit']!r}")
    kid = key_id(cert)
    if "kid" in header and header["kid"] != kid:
        raise EarSignatureError(
            f"EAR token: signed by key {str(header['kid'])[:64]!r}, expected {kid} (the "
            "certificate given)"
        )
    # 3. The signature: r || s over the ASCII of header.payload, with the certificate's key.
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
        public.curve, ec.SECP256R1
    ):
        raise EarSignatureError("EAR certificate: expected an ECDSA P-256 key (ES256)")
    raw = _unb64(parts[2], "signature")
    if len(raw) != 64:
        raise EarSignatureError(f"EAR token: expected a 64-byte signature, found {len(raw)}")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public.verify(der, f"{parts[0]}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EarSignatureError(
            f"EAR token: the signature does not verify with the key of certificate {kid}"
        ) from None
    # 4. The claims: this profile, and unexpired at ``now``.
    claims = _json_object(_unb64(parts[1], "payload"), "payload")
    if claims.get(PROFILE) != EAT_PROFILE:
        raise EarFormatError(
            f"EAR token: expected {PROFILE} {EAT_PROFILE}, found {claims.get(PROFILE)!r}"
        )
    if now is not None and "exp" in claims:
        exp = claims["exp"]
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise EarFormatError(f"EAR token: exp is not a number of seconds: {exp!r}")
        if _epoch(now) >= exp:
            expired = datetime.datetime.fromtimestamp(exp, datetime.UTC).isoformat()
            raise EarSignatureError(
                f"EAR token: expired at {expired} (exp), before {now.isoformat()}"
            )
    return claims
