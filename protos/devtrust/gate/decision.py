"""The gate's decision: may the holder of this certificate chain in? Pure: the chain, the
relying party's bundle, ``now`` and its requirements in; allow or deny with one stable reason
out (STYLE 1, 2). No I/O, no clock: the adapters (``devtrust.gate.adapters``) read the peer's
chain and the time, and the revocation follower (``devtrust.gate.follower``) keeps the feed.

The steps, each a reason of its own (``Reason``), in the order they are checked:

1. the chain verifies against the bundle with ``cryptography.x509.verification``'s client
   policy (RFC 5280 path validation, the CA/B web PKI profile, EKU clientAuth): a look-alike
   from another CA, with the same names but another key, fails here; validity at ``now`` is
   reported apart (expired, not yet valid) only for a chain that verifies at a time inside the
   leaf's validity, so that a stranger's certificate is never described as "ours, expired";
2. the leaf is a device X.509-SVID (SPIFFE X509-SVID specification, sections 2, 4.1, 4.3):
   exactly one URI SAN, ``spiffe://TD/device/ID`` with ID a device id, digitalSignature and
   no CRL signing (a CA or certificate signer as the leaf failed step 1 already). The
   verifier's agent-channel, operator and server certificates are not: a bundle that holds
   the CA signing those too lets them verify, and this step still refuses them;
3. its serial is not revoked: not on the feed's set and not on the CRL. The CRL counts only
   when signed by a CA of the bundle and current (nextUpdate not passed): an unsigned or
   out-of-date CRL denies with a reason of its own rather than allowing silently;
4. the claims extension (``devtrust.core.claims``) is present and readable, its tier meets
   the minimum (``Tier.meets``: NONE meets nothing), and its zone is one allowed.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from devtrust.core.claims import DeviceClaims
from devtrust.core.ids import parse_device_id, serial_of
from devtrust.core.spiffe import DEVICE, spiffe_name
from devtrust.core.tier import Tier


class Reason(StrEnum):
    """Why the gate decided as it did: stable ids that logs, tests and scripts match on."""

    ALLOWED = "gate.allowed"
    NO_CERTIFICATE = "gate.no_certificate"
    UNTRUSTED = "gate.untrusted"
    EXPIRED = "gate.expired"
    NOT_YET_VALID = "gate.not_yet_valid"
    NOT_DEVICE = "gate.not_device"
    TRUST_DOMAIN = "gate.trust_domain"
    MALFORMED = "gate.malformed"
    REVOKED = "gate.revoked"
    CRL_UNTRUSTED = "gate.crl_untrusted"
    CRL_STALE = "gate.crl_stale"
    FEED_STALE = "gate.feed_stale"
    NO_CLAIMS = "gate.no_claims"
    TIER = "gate.tier"
    ZONE = "gate.zone"


@dataclass(frozen=True)
class GateDecision:
    """One decision. ``device_id``, ``tier``, ``zone`` and ``serial`` are what the verified
    certificate says, empty or None where the chain did not verify (or had no claims)."""

    allow: bool
    reason: Reason
    message: str
    device_id: str = ""
    tier: Tier | None = None
    zone: str | None = None
    serial: str = ""

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass(frozen=True, eq=False)
class Bundle:
    """The CAs a relying party trusts for device certificates: the device issuing CAs (the
    verifier's relying-party bundle), every one a CA certificate."""

    certificates: tuple[x509.Certificate, ...]
    store: Store = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.certificates:
            raise ValueError("the CA bundle holds no certificate")
        for cert in self.certificates:
            try:
                ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            except x509.ExtensionNotFound:
                ca = False
            if not ca:
                raise ValueError(
                    f"the CA bundle holds {cert.subject.rfc4514_string()!r}, not a CA "
                    "certificate (basicConstraints CA is not set)"
                )
        object.__setattr__(self, "store", Store(list(self.certificates)))

    @classmethod
    def from_pem(cls, data: bytes) -> Bundle:
        """Every certificate of a PEM file (``device-bundle.pem``)."""
        return cls(tuple(x509.load_pem_x509_certificates(data)))


@dataclass(frozen=True)
class RevocationList:
    """What the relying party knows to be revoked: serials from the WatchRevocations feed
    and/or a CRL (its signature checked against the decision's bundle, its nextUpdate against
    the decision's ``now``). ``feed_problem``, when set,
    says why the feed cannot be relied on now (never synchronised, disconnected too long):
    every decision then denies, as an out-of-date CRL does."""

    serials: frozenset[int] = frozenset()
    crl: x509.CertificateRevocationList | None = None
    feed_problem: str = ""
    # Per bundle: whether a CA of it signed the CRL, and the CRL's serials. Both depend on
    # nothing but the CRL and the bundle, so they are worked out once, not per decision
    # (a 1,000-entry CRL's signature costs some 40 raw verifications; bench/gate.py).
    _read: dict[Bundle, tuple[bool, frozenset[int]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def crl_as_read(self, bundle: Bundle) -> tuple[bool, frozenset[int]]:
        """(the CRL is signed by a CA of ``bundle``, its revoked serials)."""
        crl = self.crl
        if crl is None:
            return True, frozenset()
        found = self._read.get(bundle)
        if found is None:
            signers = [c for c in bundle.certificates if c.subject == crl.issuer]
            keys = [c.public_key() for c in signers]
            signed = any(crl.is_signature_valid(k) for k in keys)  # type: ignore[arg-type]
            found = (signed, frozenset(r.serial_number for r in crl))
            self._read[bundle] = found
        return found


def _deny(
    reason: Reason,
    message: str,
    *,
    device_id: str = "",
    tier: Tier | None = None,
    zone: str | None = None,
    serial: str = "",
) -> GateDecision:
    return GateDecision(
        allow=False,
        reason=reason,
        message=message,
        device_id=device_id,
        tier=tier,
        zone=zone,
        serial=serial,
    )


def _shown(text: str, limit: int = 80) -> str:
    """A value from a certificate, quoted and cut, for a message."""
    return repr(text if len(text) <= limit else f"{text[: limit - 3]}...")


def _verify(chain: Sequence[x509.Certificate], bundle: Bundle, at: datetime.datetime) -> str | None:
    """None when the chain verifies at ``at``, else cryptography's reason without the
    certificate it names."""
    verifier = PolicyBuilder().store(bundle.store).time(at).build_client_verifier()
    try:
        verifier.verify(chain[0], list(chain[1:]))
    except VerificationError as exc:
        return str(exc).split(" (encountered processing", 1)[0]
    return None


def _chain_problem(
    chain: Sequence[x509.Certificate], bundle: Bundle, now: datetime.datetime
) -> GateDecision | None:
    """Step 1: trust, then validity at ``now``."""
    leaf = chain[0]
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now < start or now > end:
        # Ours but outside its validity, or a stranger's: verify it inside the validity.
        failed = _verify(chain, bundle, end if now > end else start)
        if failed is None:
            if now > end:
                return _deny(
                    Reason.EXPIRED,
                    f"certificate serial {serial_of(leaf.serial_number)} expired at "
                    f"{end.isoformat()}, now is {now.isoformat()}",
                )
            return _deny(
                Reason.NOT_YET_VALID,
                f"certificate serial {serial_of(leaf.serial_number)} is valid from "
                f"{start.isoformat()}, now is {now.isoformat()}",
            )
    else:
        failed = _verify(chain, bundle, now)
    if failed is not None:
        return _deny(
            Reason.UNTRUSTED,
            f"the chain does not verify against the CA bundle "
            f"({len(bundle.certificates)} CA certificates): {failed}",
        )
    return None


def _svid(leaf: x509.Certificate) -> tuple[str, str] | str:
    """Step 2: (trust domain, device id) of a device X.509-SVID, or why it is not one."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return "an X.509-SVID has subjectAltName and keyUsage"
    if len(uris) != 1:
        return f"{len(uris)} URI SANs, an X.509-SVID has exactly one"
    # A CA or a certificate signer as the leaf: step 1 refused it (the web PKI profile).
    if usage.crl_sign or not usage.digital_signature:
        return "a CRL signer, or without digitalSignature"
    uri = uris[0]
    domain = uri.removeprefix("spiffe://").split("/", 1)[0] if uri.startswith("spiffe://") else ""
    name = spiffe_name(uri, trust_domain=domain, kind=DEVICE) if domain else None
    if name is None:
        return f"its identity is {_shown(uri)}, expected spiffe://TRUST-DOMAIN/device/ID"
    try:
        return domain, parse_device_id(name)
    except ValueError as exc:
        return str(exc)


def _crl_problem(
    revoked: RevocationList,
    leaf: x509.Certificate,
    bundle: Bundle,
    now: datetime.datetime,
    device_id: str,
) -> GateDecision | None:
    """Step 3 for the CRL (RFC 5280 section 6.3: its issuer, signature and nextUpdate).
    Any CA of the bundle may sign it: during a rotation the one signing now publishes the
    CRL for certificates of the one before."""
    serial = serial_of(leaf.serial_number)
    crl = revoked.crl
    assert crl is not None
    signed, revoked_serials = revoked.crl_as_read(bundle)
    if not signed:
        reason = Reason.CRL_UNTRUSTED
        message = (
            f"the CRL of {_shown(crl.issuer.rfc4514_string())} is not signed by a CA of the bundle"
        )
    elif (next_update := crl.next_update_utc) is None or now > next_update:
        reason = Reason.CRL_STALE
        shown = next_update.isoformat() if next_update else "never (no nextUpdate)"
        message = f"the CRL is out of date: next update due {shown}, now is {now.isoformat()}"
    elif leaf.serial_number in revoked_serials:
        reason = Reason.REVOKED
        message = f"device {device_id}: certificate serial {serial} is revoked (CRL)"
    else:
        return None
    return _deny(reason, message, device_id=device_id, serial=serial)


def _revocation_problem(
    leaf: x509.Certificate,
    revoked: RevocationList,
    bundle: Bundle,
    now: datetime.datetime,
    device_id: str,
) -> GateDecision | None:
    """Step 3: the feed, then the CRL."""
    serial = serial_of(leaf.serial_number)
    if revoked.feed_problem:
        return _deny(
            Reason.FEED_STALE,
            f"device {device_id}: the revocation feed is not current: {revoked.feed_problem}",
            device_id=device_id,
            serial=serial,
        )
    if leaf.serial_number in revoked.serials:
        return _deny(
            Reason.REVOKED,
            f"device {device_id}: certificate serial {serial} is revoked (revocation feed)",
            device_id=device_id,
            serial=serial,
        )
    if revoked.crl is None:
        return None
    return _crl_problem(revoked, leaf, bundle, now, device_id)


def _verdict(
    leaf: x509.Certificate,
    claims: DeviceClaims,
    device_id: str,
    min_tier: Tier,
    zones: frozenset[str] | None,
) -> GateDecision:
    """Step 4 on the claims read."""
    serial = serial_of(leaf.serial_number)
    tier, zone = claims.tier, claims.zone
    if not tier.meets(min_tier):
        reason = Reason.TIER
        message = (
            f"device {device_id} in zone {_shown(zone)}: tier {tier.label} does not meet "
            f"the minimum {min_tier.label}"
        )
    elif zones is not None and zone not in zones:
        reason = Reason.ZONE
        allowed = ", ".join(sorted(map(_shown, zones))) or "none"
        message = (
            f"device {device_id} at tier {tier.label}: zone {_shown(zone)} is not allowed "
            f"(allowed: {allowed})"
        )
    else:
        reason = Reason.ALLOWED
        message = (
            f"device {device_id}, tier {tier.label}, zone {_shown(zone)}, serial {serial}, "
            f"valid until {leaf.not_valid_after_utc.isoformat()}"
        )
    return GateDecision(
        allow=reason is Reason.ALLOWED,
        reason=reason,
        message=message,
        device_id=device_id,
        tier=tier,
        zone=zone,
        serial=serial,
    )


def _decide(
    chain: Sequence[x509.Certificate],
    *,
    bundle: Bundle,
    now: datetime.datetime,
    min_tier: Tier,
    zones: frozenset[str] | None,
    revoked: RevocationList | None,
    trust_domain: str | None,
) -> GateDecision:
    leaf = chain[0]
    if (problem := _chain_problem(chain, bundle, now)) is not None:
        return problem
    found = _svid(leaf)
    if isinstance(found, str):
        return _deny(Reason.NOT_DEVICE, f"not a device certificate: {found}")
    domain, device_id = found
    if trust_domain is not None and domain != trust_domain:
        return _deny(
            Reason.TRUST_DOMAIN,
            f"device {device_id} is of trust domain {_shown(domain)}, "
            f"expected {_shown(trust_domain)}",
            device_id=device_id,
        )
    if revoked is not None:
        problem = _revocation_problem(leaf, revoked, bundle, now, device_id)
        if problem is not None:
            return problem
    claims = DeviceClaims.from_certificate(leaf)
    if claims is None:
        return _deny(
            Reason.NO_CLAIMS,
            f"device {device_id}: the certificate carries no tier and zone",
            device_id=device_id,
            serial=serial_of(leaf.serial_number),
        )
    return _verdict(leaf, claims, device_id, min_tier, zones)


def decide(
    chain: Sequence[x509.Certificate],
    *,
    bundle: Bundle,
    now: datetime.datetime,
    min_tier: Tier,
    zones: frozenset[str] | None,
    revoked: RevocationList | None,
    trust_domain: str | None = None,
) -> GateDecision:
    """Allow or deny the presenter of ``chain`` (leaf first, then any intermediates).

    ``zones``: the zones allowed, None for any; ``revoked``: None when the relying party
    follows no revocation (then a device is refused at the latest when its short-lived
    certificate expires); ``trust_domain``: the SPIFFE trust domain required, None for the
    one the bundle implies."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if not chain:
        return _deny(Reason.NO_CERTIFICATE, "no certificate was presented")
    try:
        return _decide(
            chain,
            bundle=bundle,
            now=now,
            min_tier=min_tier,
            zones=zones,
            revoked=revoked,
            trust_domain=trust_domain,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # An extension cryptography parses only when read, or claims that are not the JSON
        # object they should be.
        return _deny(Reason.MALFORMED, f"the certificate cannot be read: {exc}")
