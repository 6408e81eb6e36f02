"""Signed CoRIMs in NVIDIA's shape for tests (draft-ietf-rats-corim-06, as NVIDIA's
"Device Attestation and CoRIM-based Reference Measurement Sharing" describes): tag 502
around a COSE_Sign1 (tag 18) signed ES384 by the simulation's RIM signer
(``gpu_sim.SimGpuRoots``), protected header {alg, content type, corim-meta {signer: NVIDIA
stand-in}}, optional x5chain; payload a corim-map (tag 501) with NVIDIA's RIM id, CoMIDs
(tag 506) whose reference-triples give each SPDM measurement index its digests, and a
dependent-rims locator with the signer certificate's thumbprint.

The builders are separate (``comid``, ``corim_map``, ``sign``) so tests can make malformed
CoRIMs; ``corim`` makes a good one whose values are ``gpu_sim.reference_values`` (what
``SimGpu`` measures). Imported by tests only, never by the verifier package.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from devtrust.swtpm.gpu_sim import (
    NOT_NVIDIA,
    SIM,
    SimGpuRoots,
    _certificate,
    _name,
    reference_values,
)

__all__ = [
    "CorimPki",
    "comid",
    "corim",
    "corim_id",
    "corim_map",
    "sign",
    "spdm_values",
    "thumbprint",
]

SHA384 = 7  # Named Information hash algorithm id
ES384 = -35
_HASHES: Mapping[int, tuple[type[hashes.HashAlgorithm], int]] = {
    -7: (hashes.SHA256, 32),
    -35: (hashes.SHA384, 48),
    -36: (hashes.SHA512, 66),
}


@dataclass(frozen=True)
class CorimPki:
    """NVIDIA's CoRIM PKI in three levels ("COSE Validation"): a CoRIM root CA, a product
    sub-CA, and the product signer whose key (on ``curve``) signs the CoRIM."""

    root: x509.Certificate
    sub_ca: x509.Certificate
    signer: x509.Certificate
    signer_key: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def create(
        cls, curve: ec.EllipticCurve | None = None, *, now: datetime.datetime | None = None
    ) -> CorimPki:
        now = now or datetime.datetime.now(datetime.UTC)
        validity = datetime.timedelta(days=365)
        root_key, ca_key = (
            ec.generate_private_key(ec.SECP384R1()),
            ec.generate_private_key(ec.SECP384R1()),
        )
        signer_key = ec.generate_private_key(curve or ec.SECP384R1())
        root = _certificate(
            subject=_name(f"{SIM} CoRIM root CA {NOT_NVIDIA}"),
            key=root_key.public_key(),
            issuer=None,
            issuer_key=root_key,
            ca=True,
            now=now,
            validity=validity,
        )
        sub_ca = _certificate(
            subject=_name(f"{SIM} CoRIM sub-CA {NOT_NVIDIA}"),
            key=ca_key.public_key(),
            issuer=root,
            issuer_key=root_key,
            ca=True,
            now=now,
            validity=validity,
        )
        signer = _certificate(
            subject=_name(f"{SIM} CoRIM product signer {NOT_NVIDIA}"),
            key=signer_key.public_key(),
            issuer=sub_ca,
            issuer_key=ca_key,
            ca=False,
            now=now,
            validity=validity,
        )
        return cls(root, sub_ca, signer, signer_key)


def corim_id(
    kind: str, version: str, *, product: str = "GH100", project: str = "1010_0200_882"
) -> str:
    """NVIDIA's RIM id: NV_GPU_DRIVER_GH100_550.90.07, NV_GPU_VBIOS_1010_0200_882_96009F0001."""
    if kind == "driver":
        return f"NV_GPU_DRIVER_{product}_{version}"
    return f"NV_GPU_VBIOS_{project}_{version.replace('.', '').upper()}"


def spdm_values(kind: str, version: str) -> dict[int, tuple[bytes, ...]]:
    """``reference_values`` keyed by SPDM block index (RIM index + 1), as CoRIMs number them."""
    return {index + 1: values for index, values in reference_values(kind, version).items()}


def comid(
    values: Mapping[int, Sequence[bytes]],
    *,
    tag_id: str = "devtrust-simulation-comid",
    product: str = "GH100",
    version: str | None = None,
) -> dict[Any, Any]:
    """A concise-mid-tag: tag-identity, one reference triple (environment class vendor and
    model) with a measurement-map per SPDM index {mkey: index, mval: {digests}}; with
    ``version``, a first measurement-map carrying only mval version."""
    measurements: list[dict[Any, Any]] = []
    if version is not None:
        measurements.append({1: {0: {0: version}}})
    measurements += [
        {0: index, 1: {2: [[SHA384, value] for value in alternatives]}}
        for index, alternatives in sorted(values.items())
    ]
    environment = {0: {1: f"{SIM} {NOT_NVIDIA}", 2: product}}
    return {1: {0: tag_id}, 4: {0: [[environment, measurements]]}}


def thumbprint(cert: x509.Certificate) -> list[Any]:
    """dependent-rims thumbprint: [sha-256, digest of the certificate's DER]."""
    return [1, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()]


def corim_map(
    identifier: Any,
    comids: Sequence[dict[Any, Any] | bytes | cbor2.CBORTag],
    *,
    signer: x509.Certificate | None = None,
    extra: Mapping[int, Any] | None = None,
) -> cbor2.CBORTag:
    """corim-map (tag 501): id, tags (each CoMID encoded, tag 506; bytes and tags as
    given), dependent-rims with ``signer``'s thumbprint when given."""
    tags = [
        c
        if isinstance(c, cbor2.CBORTag)
        else cbor2.CBORTag(506, c if isinstance(c, bytes) else cbor2.dumps(c))
        for c in comids
    ]
    body: dict[Any, Any] = {0: identifier, 1: tags}
    if signer is not None:
        body[2] = [{0: "https://rim.example/devtrust-simulation-signer.pem", 1: thumbprint(signer)}]
    body.update(extra or {})
    return cbor2.CBORTag(501, body)


def sign(
    payload: Any,
    key: ec.EllipticCurvePrivateKey,
    *,
    alg: int = ES384,
    x5chain: Sequence[x509.Certificate] = (),
    x5chain_protected: bool = True,
    protected: Mapping[int, Any] | None = None,
    tag18: bool = True,
) -> bytes:
    """The signed CoRIM: #6.502(#6.18([protected, unprotected, payload, signature])) with
    ``payload`` CBOR-encoded unless bytes, ES``alg`` raw r || s over the Sig_structure."""
    header: dict[Any, Any] = {
        1: alg,
        3: "application/rim+cbor",
        8: cbor2.dumps({0: {0: f"NVIDIA stand-in: {SIM}"}}),
    }
    unprotected: dict[Any, Any] = {}
    if x5chain:
        ders = [c.public_bytes(serialization.Encoding.DER) for c in x5chain]
        (header if x5chain_protected else unprotected)[33] = ders if len(ders) > 1 else ders[0]
    header.update(protected or {})
    protected_bytes = cbor2.dumps(header)
    payload_bytes = payload if isinstance(payload, bytes) else cbor2.dumps(payload)
    digest, size = _HASHES[alg]
    der = key.sign(
        cbor2.dumps(["Signature1", protected_bytes, b"", payload_bytes]), ec.ECDSA(digest())
    )
    r, s = decode_dss_signature(der)
    message: Any = [
        protected_bytes,
        unprotected,
        payload_bytes,
        r.to_bytes(size, "big") + s.to_bytes(size, "big"),
    ]
    if tag18:
        message = cbor2.CBORTag(18, message)
    return cbor2.dumps(cbor2.CBORTag(502, message))


def corim(
    roots: SimGpuRoots,
    kind: str,
    version: str,
    *,
    product: str = "GH100",
    values: Mapping[int, Sequence[bytes]] | None = None,
    x5chain: bool = True,
) -> bytes:
    """A good signed CoRIM of ``kind`` ("driver"/"vbios") for ``version``: values by SPDM
    index (default ``spdm_values``), signed by ``roots.rim_signer``; x5chain holds the
    signer (else the verifier needs it given), dependent-rims its thumbprint."""
    values = spdm_values(kind, version) if values is None else values
    payload = corim_map(
        corim_id(kind, version, product=product),
        [comid(values, tag_id=f"{SIM} {kind} {version}", product=product)],
        signer=roots.rim_signer,
    )
    return sign(payload, roots.rim_signer_key, x5chain=[roots.rim_signer] if x5chain else ())
