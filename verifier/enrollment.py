"""Enrollment logic (DESIGN.md flow 1): check the EK and AK, make the credential challenge,
check the proof. No TPM is needed here: TPM2_MakeCredential is computed in software
(tpm2-pytss ``make_credential``, TPM 2.0 Part 1, 24 "Credential Protection").
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import math
import re
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from devtrust.core.binding import proof_for
from devtrust.core.ids import DeviceId, device_id_of
from devtrust.verifier.errors import MalformedInput, Rejected
from devtrust.verifier.records import DeviceState
from devtrust.verifier.tpm.constants import Alg, ObjectAttr
from devtrust.verifier.tpm.quote import ALLOWED_SIG_HASHES, ALLOWED_SIG_SCHEMES
from devtrust.verifier.tpm.structures import PublicArea, parse_public, public_key_matches

# TPM 2.0 Part 2, 8.3.3: what makes a key an attestation key. restricted + sign means the
# TPM only signs digests it computed itself over structures that start with TPM_GENERATED
# (Part 1, 25.2.5); fixedTPM and fixedParent mean it cannot leave this TPM; with
# sensitiveDataOrigin the TPM generated it, so nobody else ever held the private key.
AK_REQUIRED = (
    ObjectAttr.RESTRICTED
    | ObjectAttr.SIGN_ENCRYPT
    | ObjectAttr.FIXED_TPM
    | ObjectAttr.FIXED_PARENT
    | ObjectAttr.SENSITIVE_DATA_ORIGIN
)
AK_FORBIDDEN = ObjectAttr.DECRYPT
EK_REQUIRED = ObjectAttr.RESTRICTED | ObjectAttr.DECRYPT | ObjectAttr.FIXED_TPM
CREDENTIAL_SIZE = 32
# A credential challenge must be answered within this time, once.
ENROLLMENT_TTL = datetime.timedelta(minutes=5)


def device_id_for(ek_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> DeviceId:
    """sha256 of the EK's DER SubjectPublicKeyInfo, hex (DESIGN.md flow 1, step 4)."""
    spki = ek_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return device_id_of(spki)


def _flag_names(flags: int) -> str:
    return ",".join(a.name.lower() for a in ObjectAttr if flags & a and a.name) or "-"


def check_ak(ak: PublicArea) -> None:
    """Refuse anything that is not a restricted, TPM-resident signing key."""
    missing = AK_REQUIRED & ~ak.attributes
    if missing:
        raise Rejected(
            f"AK lacks required attributes: {_flag_names(missing)} "
            f"(has {_flag_names(ak.attributes)})"
        )
    if ak.attributes & AK_FORBIDDEN:
        raise Rejected("AK must not be a decryption key (decrypt is set)")
    if ak.type not in (Alg.RSA, Alg.ECC):
        raise Rejected(f"AK type 0x{ak.type:04x} is neither RSA nor ECC")
    if ak.scheme not in ALLOWED_SIG_SCHEMES or ak.scheme_hash not in ALLOWED_SIG_HASHES:
        raise Rejected(
            f"AK signing scheme 0x{ak.scheme:04x}/hash 0x{ak.scheme_hash:04x} is not "
            "allowed (rsassa, rsapss or ecdsa with sha256 or sha384)"
        )
    ak.public_key()  # a point off the curve or an empty modulus is malformed


def check_ek_attributes(ek_public: PublicArea) -> None:
    """An EK is a restricted decryption key that never leaves its TPM."""
    missing = EK_REQUIRED & ~ek_public.attributes
    if missing:
        raise Rejected(f"EK public area lacks {_flag_names(missing)}")


def check_ek_public(ek_public: PublicArea, ek_cert: x509.Certificate) -> None:
    check_ek_attributes(ek_public)
    key = ek_cert.public_key()
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise Rejected(f"EK certificate key type {type(key).__name__} is neither RSA nor ECC")
    if not public_key_matches(ek_public, key):
        raise Rejected("EK public area does not hold the key of the EK certificate")


@dataclass(frozen=True)
class CredentialChallenge:
    credential_blob: bytes  # TPM2B_ID_OBJECT
    encrypted_secret: bytes  # TPM2B_ENCRYPTED_SECRET
    secret: bytes


@dataclass(frozen=True)
class HostClaims:
    """What a host says of itself when it enrolls: stored with the device and shown to
    operators, never used to decide anything; its zone and labels least of all (operators
    assign those, verifier/inventory.py)."""

    hostname: str = ""
    os_release: str = ""
    kernel: str = ""
    machine_id: str = ""
    agent_version: str = ""
    zone: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        """As ``DeviceRecord.host`` keeps it: the host's zone and labels under names that
        say they are its claim."""
        return {
            "hostname": self.hostname,
            "os_release": self.os_release,
            "kernel": self.kernel,
            "machine_id": self.machine_id,
            "agent_version": self.agent_version,
            "claimed_zone": self.zone,
            "claimed_labels": dict(self.labels),
        }


@dataclass(frozen=True)
class EnrollRequest:
    """An Enroll call, converted at the edge (verifier/wire_enroll.py): ``ek_public`` is not
    empty and the host's claims are within their limits; the rest is checked here and in
    the Enrollment service, in the order of DESIGN.md flow 1."""

    ek_public: bytes  # TPM2B_PUBLIC
    ak_public: bytes  # TPM2B_PUBLIC
    channel_key_spki: bytes  # the agent's channel key, certified once enrolled
    host: HostClaims
    ek_certificate: bytes = b""  # DER; empty for an allowlisted EK (some cloud vTPMs)
    ek_intermediates: tuple[bytes, ...] = ()  # DER or PEM, each one or more certificates
    bootstrap_token: str = ""


@dataclass(frozen=True)
class IssuedChallenge:
    """What the agent gets back from Enroll: the credential to activate, never its secret."""

    enrollment_id: str
    device_id: DeviceId
    credential_blob: bytes
    encrypted_secret: bytes


@dataclass(frozen=True)
class ActivateRequest:
    enrollment_id: str
    proof: bytes


@dataclass(frozen=True)
class Activated:
    """The outcome of a correct Activate: the device enrolled, with its channel certificate
    (DER), or pending an operator's approval, without one."""

    device_id: DeviceId
    state: DeviceState
    ca_chain: tuple[bytes, ...]
    channel_certificate: bytes = b""


def make_challenge(ek_public_bytes: bytes, ak_name: bytes) -> CredentialChallenge:
    """TPM2_MakeCredential(EK, secret, AK name): only the TPM holding both can recover it."""
    # tpm2-pytss loads the TSS2 libraries: only the enrollment server needs them, not every
    # command that imports the verifier (tests/test_layers.py).
    from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC  # noqa: PLC0415
    from tpm2_pytss.utils import make_credential  # noqa: PLC0415

    secret = secrets.token_bytes(CREDENTIAL_SIZE)
    try:
        ek_public, _ = TPM2B_PUBLIC.unmarshal(ek_public_bytes)
    except Exception as exc:
        raise MalformedInput(f"EK public area: {exc}") from exc
    blob, enc_secret = make_credential(ek_public, secret, TPM2B_NAME(ak_name))
    return CredentialChallenge(
        credential_blob=bytes(blob.marshal()),
        encrypted_secret=bytes(enc_secret.marshal()),
        secret=secret,
    )


def check_proof(
    proof: bytes, *, secret: bytes, enrollment_id: str, channel_key_spki: bytes
) -> None:
    expected = proof_for(secret, enrollment_id, channel_key_spki)
    if not hmac.compare_digest(proof, expected):
        raise Rejected(
            "credential activation proof is wrong: the TPM that holds this EK did "
            "not activate the credential for this AK"
        )


ENROLLMENT_ID_RE = re.compile(r"[0-9a-f]{32}")


def new_enrollment_id() -> str:
    return secrets.token_hex(16)


def parse_ak(ak_public: bytes) -> PublicArea:
    if not ak_public:
        raise MalformedInput("AK public area is empty")
    return parse_public(ak_public)


# --- Enroll floods (issue 7, item 8) --------------------------------------------------------


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string: one bucket per IP, whatever its port.

    ``ipv4:127.0.0.1:53412`` -> ``127.0.0.1``; an IPv6 address counts as its /64 (one host
    holds a whole /64 and could rotate through it), ``ipv6:[2001:db8::1]:5000`` ->
    ``2001:db8::/64``; an IPv4-mapped IPv6 address counts as its IPv4 address; anything else
    (``unix:...``) stays whole."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0] or rest
    elif kind == "ipv6":
        host = rest[1:].partition("]")[0] if rest.startswith("[") else rest
    else:
        return peer
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if not address.is_loopback:
            return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class RateLimiter:
    """One token bucket per key: ``burst`` calls at once, refilled at ``rate_per_minute``.

    Pure: the caller passes ``now`` (seconds, any epoch). Memory stays bounded: a bucket that
    has refilled completely is the same as no bucket, so idle keys are forgotten, and past
    ``max_keys`` the least recently seen key is dropped."""

    def __init__(self, *, rate_per_minute: float, burst: int, max_keys: int = 100_000) -> None:
        if rate_per_minute <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate_per_minute must be positive, burst and max_keys at least 1")
        self._rate = rate_per_minute / 60.0  # tokens per second
        self._burst = float(burst)
        self._max_keys = max_keys
        self._idle_s = self._burst / self._rate  # time to refill an empty bucket
        # key -> (tokens, time of last update), least recently seen first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, *, now: float) -> float:
        """Spend one token of ``key``'s bucket: 0.0 when allowed, else the seconds until
        one is available (nothing is spent then)."""
        self._forget_idle(now)
        tokens, last = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + max(0.0, now - last) * self._rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self._rate
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait

    def _forget_idle(self, now: float) -> None:
        while self._buckets:
            key, (_, last) = next(iter(self._buckets.items()))
            if now - last < self._idle_s:
                return
            del self._buckets[key]


def retry_after_s(wait: float) -> int:
    return max(1, math.ceil(wait))
