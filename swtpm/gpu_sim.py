"""Simulated NVIDIA GPUs for tests and ``devtrust simulate``: what a Hopper GPU in
confidential-computing mode returns when asked for an attestation, and the reference values
NVIDIA publishes for it, with test roots standing in for NVIDIA's.

- ``SimGpuRoots``: a device-identity root and intermediate (the intermediate issues each
  GPU's attestation-key certificate and its CRL), and a RIM root and signer. Every subject
  says "devtrust simulation ... NOT NVIDIA"; a verifier trusts them only when its
  configuration lists them (gpu.device_roots, gpu.rim_roots).
- ``SimGpu``: one GPU: a P-384 attestation key and its leaf certificate, its driver and VBIOS
  versions, its 64 measurement blocks, and its firmware ID (FWID: the report's opaque field
  20, and the FWID of the leaf's TCG DICE TcbInfo extension, the same bytes, as NVIDIA's
  verifier requires). ``report(nonce)`` is a byte-exact SPDM 1.1
  GET_MEASUREMENTS request and signed MEASUREMENTS response (DSP0274 1.1, section 10.11,
  with NVIDIA's opaque data), what ``devtrust.verifier.gpu.spdm`` parses and verifies.
- ``driver_rim`` / ``vbios_rim``: reference integrity manifests as SWID tags in NVIDIA's
  shape (tests/data/corpus/gpu/nvidia_nvtrust_attestation/*.swidtag): enveloped XML-DSig,
  C14N 1.1, ecdsa-sha384, the signer's chain in KeyInfo.
- Faults: ``SimGpu.tampered(block)`` (one block differs from the RIM), a revoked twin
  (``SimGpu.twin``: another attestation key, listed in the intermediate's CRL), and a replayed
  report (``SimAttester``: the report made for an earlier nonce sent again).

Imported by tests and the simulator only, never by the verifier package.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import os
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from xml.sax.saxutils import quoteattr

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from devtrust.v1 import attestation_pb2

if TYPE_CHECKING:
    from devtrust.verifier.gpu.rim_store import RimStore

__all__ = [
    "DRIVER_ACTIVE",
    "FAULT_FINDINGS",
    "VBIOS_ACTIVE",
    "GpuFault",
    "SimAttester",
    "SimGpu",
    "SimGpuFleet",
    "SimGpuRoots",
    "attests",
    "driver_rim",
    "fill_rim_store",
    "firmware_id",
    "reference_values",
    "tcb_info",
    "vbios_rim",
]

SIM = "devtrust simulation"
NOT_NVIDIA = "(NOT NVIDIA)"
BLOCKS = 64  # NVIDIA's Hopper reports: 64 blocks, SPDM indices 1..64 = RIM indices 0..63
DIGEST_SIZE = 48  # SHA-384
NONCE_SIZE = 32
# Which RIM indices each RIM holds active, as NVIDIA's GH100 RIMs do (the corpus's driver
# 545.00 and VBIOS 96.00.5E.00.01 RIMs): disjoint, so no index is claimed by both.
VBIOS_ACTIVE = frozenset({0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12})
DRIVER_ACTIVE = frozenset({7, *range(21, 41)})
# Indices whose RIM entry lists a second value (NVIDIA's driver RIM: 23 and 24 allow zeros).
_SECOND_ALTERNATIVE = frozenset({23, 24})

# SPDM 1.1 (DSP0274) codes and NVIDIA's opaque data field ids (nvtrust spdm_msrt_resp_msg.py).
_SPDM_1_1 = 0x11
_GET_MEASUREMENTS = 0xE0
_MEASUREMENTS = 0x60
_SIGNATURE_REQUESTED = 0x01
_ALL_MEASUREMENTS = 0xFF
_DMTF_SPEC = 0x01
_VALUE_TYPE = 0x01  # DMTFSpecMeasurementValueType as NVIDIA's blocks carry it
_OPAQUE_DRIVER_VERSION = 3
_OPAQUE_GPU_INFO = 4
_OPAQUE_VBIOS_VERSION = 6
_OPAQUE_NVDEC0_STATUS = 11
_OPAQUE_BOARD_ID = 14
_OPAQUE_CHIP_SKU = 15
_OPAQUE_CHIP_SKU_MOD = 16
_OPAQUE_PROJECT = 17
_OPAQUE_PROJECT_SKU = 18
_OPAQUE_PROJECT_SKU_MOD = 19
_OPAQUE_FWID = 20
NVDEC0_ENABLED = 0xAA  # nvtrust config.py NVDEC_STATUS; disabled (0x55) skips RIM index 35

# RIM XML (ISO/IEC 19770-2 SWID tag with TCG RIM IM attributes), NVIDIA's namespaces.
_SWID_NS = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
_SHA384_NS = "http://www.w3.org/2001/04/xmlenc#sha384"
_TCG_RIM_NS = "https://trustedcomputinggroup.org/resource/tcg-reference-integrity-manifest-rim-information-model/"

_ROOT_VALIDITY = datetime.timedelta(days=3650)
_LEAF_VALIDITY = datetime.timedelta(days=3650)
_CRL_VALIDITY = datetime.timedelta(days=7)
_BACKDATE = datetime.timedelta(hours=1)
# TCG DICE TcbInfo (DICE Attestation Architecture 6.1.1), the leaf's FWID: DiceTcbInfo
# { vendor [0], model [1], layer [4], fwids [6] { FWID { sha384, digest } } } in DER.
# (NVIDIA's Hopper leaves carry RIoT's CompositeDeviceID under the same OID; the verifier
# reads both: tests/test_gpu_spdm.py.)
_TCG_DICE_TCB_INFO = x509.ObjectIdentifier("2.23.133.5.4.1")
_SHA384_OID_DER = bytes.fromhex("0609608648016503040202")  # 2.16.840.1.101.3.4.2.2

# NVIDIA's GPU leaf names the GPU in a subjectAltName otherName of this type
# ("NVIDIA:GH100:48B02DB73E52137E"); the simulation's say "devtrust-simulation:GH100:...".
_NVIDIA_SAN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.412.274.1")


class GpuFault(enum.Enum):
    """What a simulated GPU can do wrong, and what the verifier should see."""

    MEASUREMENT = "gpu-measurement"  # one block differs from its RIM: gpu.measurement.mismatch
    REPLAY = "gpu-replay"  # the report made for an earlier nonce: gpu.report.nonce_mismatch
    REVOKED = "gpu-revoked"  # an attestation key in the CRL: gpu.certificate.revoked


# The finding that shows the verifier caught each fault (verifier/gpu/appraise.py).
FAULT_FINDINGS: Mapping[GpuFault, str] = {
    GpuFault.MEASUREMENT: "gpu.measurement.mismatch",
    GpuFault.REPLAY: "gpu.report.nonce_mismatch",
    GpuFault.REVOKED: "gpu.certificate.revoked",
}


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str, serial: str | None = None) -> x509.Name:
    attributes = [
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, SIM),
    ]
    if serial is not None:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return x509.Name(attributes)


def _key_usage(*, sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign,
        crl_sign=sign,
        encipher_only=False,
        decipher_only=False,
    )


def _certificate(
    *,
    subject: x509.Name,
    key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool,
    now: datetime.datetime,
    validity: datetime.timedelta,
    other_name: str | None = None,
    fwid: bytes | None = None,
) -> x509.Certificate:
    """A P-384 certificate in the profile of NVIDIA's device and RIM chains: CA certificates
    with critical basicConstraints and keyCertSign|cRLSign, leaves with digitalSignature
    only (and CA:FALSE), SKI and AKI on all, ecdsa-with-SHA384; a GPU leaf has NVIDIA's
    subjectAltName otherName (a UTF8String under ``_NVIDIA_SAN_OID``) and, with ``fwid``,
    a TCG DICE TcbInfo extension declaring it."""
    issuer_name = subject if issuer is None else issuer.subject
    issuer_public = key if issuer is None else issuer.public_key()
    assert isinstance(issuer_public, ec.EllipticCurvePublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(_key_usage(sign=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False
        )
    )
    if other_name is not None:
        utf8 = other_name.encode()
        if len(utf8) > 127:
            raise ValueError(f"subjectAltName otherName: at most 127 bytes, found {len(utf8)}")
        san = x509.OtherName(_NVIDIA_SAN_OID, b"\x0c" + bytes([len(utf8)]) + utf8)
        builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
    if fwid is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(_TCG_DICE_TCB_INFO, tcb_info(fwid)), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA384())


def _der(tag: int, content: bytes) -> bytes:
    """One DER TLV (definite, shortest length)."""
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def tcb_info(fwid: bytes, *, model: str = "GH100") -> bytes:
    """The DER of a DiceTcbInfo declaring ``fwid`` (SHA-384), the leaf's extension value."""
    if len(fwid) != DIGEST_SIZE:
        raise ValueError(f"FWID: expected {DIGEST_SIZE} bytes (SHA-384), found {len(fwid)}")
    fwid_der = _der(0x30, _SHA384_OID_DER + _der(0x04, fwid))
    return _der(
        0x30,
        _der(0x80, f"{SIM} {NOT_NVIDIA}".encode())
        + _der(0x81, model.encode())
        + _der(0x84, b"\x01")  # layer 1: the GSP FMC, the layer that holds the key
        + _der(0xA6, fwid_der),
    )


def firmware_id(vbios_version: str) -> bytes:
    """The simulated GPU firmware's FWID: one per VBIOS version, as a firmware image's
    digest is one per image."""
    return hashlib.sha384(f"{SIM} GSP FMC for VBIOS {vbios_version}".encode()).digest()


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{path}: expected an EC private key, found {type(key).__name__}")
    return key


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class SimGpuRoots:
    """The simulation's stand-ins for NVIDIA's Device Identity CA and RIM signing CA, kept
    in ``directory``: ``device_root_path`` and ``rim_root_path`` are what a verifier lists
    in gpu.device_roots and gpu.rim_roots."""

    directory: Path
    device_root: x509.Certificate
    device_ca: x509.Certificate
    device_ca_key: ec.EllipticCurvePrivateKey = field(repr=False)
    device_root_key: ec.EllipticCurvePrivateKey = field(repr=False)
    rim_root: x509.Certificate
    rim_signer: x509.Certificate
    rim_signer_key: ec.EllipticCurvePrivateKey = field(repr=False)

    FILES: ClassVar[Mapping[str, str]] = {
        "device_root": "gpu-device-root.pem",
        "device_root_key": "gpu-device-root.key",
        "device_ca": "gpu-device-ca.pem",
        "device_ca_key": "gpu-device-ca.key",
        "rim_root": "gpu-rim-root.pem",
        "rim_signer": "gpu-rim-signer.pem",
        "rim_signer_key": "gpu-rim-signer.key",
    }

    @property
    def device_root_path(self) -> Path:
        return self.directory / self.FILES["device_root"]

    @property
    def rim_root_path(self) -> Path:
        return self.directory / self.FILES["rim_root"]

    @classmethod
    def create(cls, directory: Path, *, now: datetime.datetime | None = None) -> SimGpuRoots:
        """Make the four certificates (P-384, ten years from ``now``) and write them and
        their keys (0600) to ``directory``."""
        now = now or _utcnow()
        directory.mkdir(parents=True, exist_ok=True)
        root_key, ca_key, rim_root_key, signer_key = (_new_key() for _ in range(4))
        device_root = _certificate(
            subject=_name(f"{SIM} GPU Device Identity root CA {NOT_NVIDIA}"),
            key=root_key.public_key(),
            issuer=None,
            issuer_key=root_key,
            ca=True,
            now=now,
            validity=_ROOT_VALIDITY,
        )
        device_ca = _certificate(
            subject=_name(f"{SIM} GPU identity CA {NOT_NVIDIA}"),
            key=ca_key.public_key(),
            issuer=device_root,
            issuer_key=root_key,
            ca=True,
            now=now,
            validity=_ROOT_VALIDITY,
        )
        rim_root = _certificate(
            subject=_name(f"{SIM} RIM signing root CA {NOT_NVIDIA}"),
            key=rim_root_key.public_key(),
            issuer=None,
            issuer_key=rim_root_key,
            ca=True,
            now=now,
            validity=_ROOT_VALIDITY,
        )
        rim_signer = _certificate(
            subject=_name(f"{SIM} RIM signer {NOT_NVIDIA}"),
            key=signer_key.public_key(),
            issuer=rim_root,
            issuer_key=rim_root_key,
            ca=False,
            now=now,
            validity=_ROOT_VALIDITY,
        )
        roots = cls(
            directory=directory,
            device_root=device_root,
            device_ca=device_ca,
            device_ca_key=ca_key,
            device_root_key=root_key,
            rim_root=rim_root,
            rim_signer=rim_signer,
            rim_signer_key=signer_key,
        )
        for attr, filename in cls.FILES.items():
            value = getattr(roots, attr)
            if isinstance(value, x509.Certificate):
                (directory / filename).write_bytes(_pem(value))
            else:
                _write_private(directory / filename, _key_pem(value))
        return roots

    @classmethod
    def load(cls, directory: Path) -> SimGpuRoots:
        """The roots ``create`` wrote; a missing file is named."""
        values: dict[str, Any] = {}
        for attr, filename in cls.FILES.items():
            path = directory / filename
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: no such file: {directory} is not a GPU simulation root "
                    "(SimGpuRoots.create makes one)"
                )
            if attr.endswith("_key"):
                values[attr] = _load_key(path)
            else:
                values[attr] = x509.load_pem_x509_certificate(path.read_bytes())
        return cls(directory=directory, **values)

    @classmethod
    def open(cls, directory: Path) -> SimGpuRoots:
        """Load the roots in ``directory``, or create them there when it has none."""
        if (directory / cls.FILES["device_root"]).is_file():
            return cls.load(directory)
        return cls.create(directory)

    # -- GPUs -----------------------------------------------------------------------------

    def issue_leaf(
        self,
        key: ec.EllipticCurvePublicKey,
        *,
        serial: str,
        fwid: bytes | None = None,
        now: datetime.datetime | None = None,
    ) -> x509.Certificate:
        """An attestation-key certificate issued by the device-identity intermediate,
        declaring ``fwid`` in a TCG DICE TcbInfo extension when given."""
        return _certificate(
            subject=_name(f"{SIM} GPU attestation key {NOT_NVIDIA}", serial),
            key=key,
            issuer=self.device_ca,
            issuer_key=self.device_ca_key,
            ca=False,
            now=now or _utcnow(),
            validity=_LEAF_VALIDITY,
            other_name=f"devtrust-simulation:GH100:{serial[:16]}",
            fwid=fwid,
        )

    # -- revocation -----------------------------------------------------------------------

    def crls(
        self, revoked: Iterable[x509.Certificate] = (), *, now: datetime.datetime | None = None
    ) -> tuple[x509.CertificateRevocationList, x509.CertificateRevocationList]:
        """The root's CRL (revoking nothing: the intermediate is good) and the
        intermediate's, revoking each of ``revoked`` (leaves it issued)."""
        now = now or _utcnow()
        root_crl = self._crl(self.device_root, self.device_root_key, (), now)
        ca_crl = self._crl(self.device_ca, self.device_ca_key, revoked, now)
        return root_crl, ca_crl

    @staticmethod
    def _crl(
        issuer: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        revoked: Iterable[x509.Certificate],
        now: datetime.datetime,
    ) -> x509.CertificateRevocationList:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(now - datetime.timedelta(minutes=1))
            .next_update(now + _CRL_VALIDITY)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False
            )
            .add_extension(x509.CRLNumber(1), False)
        )
        for cert in revoked:
            if cert.issuer != issuer.subject:
                raise ValueError(
                    f"CRL of {issuer.subject.rfc4514_string()}: expected certificates it "
                    f"issued, found one issued by {cert.issuer.rfc4514_string()}"
                )
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(now - datetime.timedelta(minutes=1))
                .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), False)
                .build()
            )
        return builder.sign(key, hashes.SHA384())

    def write_revocation(
        self,
        directory: Path,
        revoked: Iterable[x509.Certificate] = (),
        *,
        now: datetime.datetime | None = None,
    ) -> list[Path]:
        """Write both CRLs (PEM) to ``directory``, what gpu.revocation names."""
        directory.mkdir(parents=True, exist_ok=True)
        root_crl, ca_crl = self.crls(revoked, now=now)
        paths = [directory / "gpu-device-root.crl", directory / "gpu-device-ca.crl"]
        for path, crl in zip(paths, (root_crl, ca_crl), strict=True):
            path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return paths

    # -- RIMs -----------------------------------------------------------------------------

    def sign_rim(self, xml: bytes) -> bytes:
        """Enveloped XML-DSig as NVIDIA signs its RIMs: C14N 1.1, ecdsa-sha384 / sha384, the
        signer's certificate then the root in KeyInfo's X509Data."""
        from lxml import etree  # noqa: PLC0415 - only when RIMs are made
        from signxml.algorithms import (  # noqa: PLC0415
            CanonicalizationMethod,
            DigestAlgorithm,
            SignatureConstructionMethod,
            SignatureMethod,
        )
        from signxml.signer import XMLSigner  # noqa: PLC0415

        parser = etree.XMLParser(resolve_entities=False, no_network=True)
        document = etree.fromstring(xml, parser)
        signer = XMLSigner(
            method=SignatureConstructionMethod.enveloped,
            signature_algorithm=SignatureMethod.ECDSA_SHA384,
            digest_algorithm=DigestAlgorithm.SHA384,
            c14n_algorithm=CanonicalizationMethod.CANONICAL_XML_1_1,
        )
        signed = signer.sign(
            document,
            key=self.rim_signer_key,
            cert=[_pem(self.rim_signer).decode(), _pem(self.rim_root).decode()],
        )
        return bytes(etree.tostring(signed))

    def rim(
        self,
        kind: str,
        version: str,
        *,
        product: str = "GH100",
        values: Mapping[int, Sequence[bytes]] | None = None,
    ) -> bytes:
        """A signed RIM (SWID tag) of ``kind`` "driver" or "vbios" for ``version``; the
        reference values are ``reference_values(kind, version)`` unless given."""
        return self.sign_rim(rim_xml(kind, version, product=product, values=values))


def reference_values(kind: str, version: str) -> dict[int, tuple[bytes, ...]]:
    """The golden values of the active RIM indices of a driver or VBIOS version: a function
    of the version only, so every simulated GPU with that version matches one RIM."""
    if kind not in ("driver", "vbios"):
        raise ValueError(f"RIM kind: expected 'driver' or 'vbios', found {kind!r}")
    active = DRIVER_ACTIVE if kind == "driver" else VBIOS_ACTIVE
    out: dict[int, tuple[bytes, ...]] = {}
    for index in sorted(active):
        value = hashlib.sha384(f"{SIM} {kind} {version} measurement {index}".encode()).digest()
        if kind == "driver" and index in _SECOND_ALTERNATIVE:
            out[index] = (value, bytes(DIGEST_SIZE))
        else:
            out[index] = (value,)
    return out


def _inactive_value(index: int) -> bytes:
    return hashlib.sha384(f"{SIM} inactive measurement {index}".encode()).digest()


def rim_xml(
    kind: str,
    version: str,
    *,
    product: str = "GH100",
    values: Mapping[int, Sequence[bytes]] | None = None,
) -> bytes:
    """The unsigned SWID tag, laid out as NVIDIA's (Entity, Meta with colloquialVersion and
    the TCG RIM attributes, a Payload of 64 Measurement resources, inactive ones zero)."""
    values = reference_values(kind, version) if values is None else values
    tag_id = hashlib.sha384(f"{SIM} {kind} RIM {product} {version}".encode()).hexdigest()
    lines = [
        f'<SoftwareIdentity xmlns="{_SWID_NS}" xmlns:ns0="{_SWID_NS}" xmlns:ns2="{_SHA384_NS}" '
        f'corpus="false" name={quoteattr(product)} patch="false" supplemental="false" '
        f'tagId="{tag_id}" version="1.0" tagVersion="0">',
        f'    <ns0:Entity name="{SIM} {NOT_NVIDIA}" role="softwareCreator tagCreator"/>',
        f'    <ns0:Meta xmlns:ns1="{_TCG_RIM_NS}" colloquialVersion={quoteattr(version)} '
        f'edition="GPU" product={quoteattr(product)} revision="r1" PayloadType="direct" '
        f'ns1:BindingSpec="RIMIM" ns1:BindingSpecVersion="1.01" '
        f'ns1:PlatformManufacturerId="5703" ns1:PlatformManufacturerStr="{SIM}" '
        f'ns1:PlatformModel={quoteattr(product)} ns1:FirmwareManufacturer="{SIM}" '
        f'ns1:FirmwareManufacturerId="5703"/>',
        f'    <ns0:Payload xmlns:SHA384="{_SHA384_NS}">',
    ]
    for index in range(BLOCKS):
        alternatives = tuple(values.get(index, ()))
        active = bool(alternatives)
        if not active:
            alternatives = (bytes(DIGEST_SIZE),)
        hashes_text = " ".join(
            f'ns2:Hash{n}="{value.hex()}"' for n, value in enumerate(alternatives)
        )
        lines.append(
            f'        <ns0:Resource type="Measurement" index="{index}" '
            f'active="{"True" if active else "False"}" alternatives="{len(alternatives)}" '
            f'{hashes_text} name="Measurement_{index}" size="{DIGEST_SIZE}"/>'
        )
    lines += ["    </ns0:Payload>", "</SoftwareIdentity>"]
    return ("\n".join(lines) + "\n").encode()


def driver_rim(roots: SimGpuRoots, version: str, *, product: str = "GH100") -> bytes:
    return roots.rim("driver", version, product=product)


def vbios_rim(roots: SimGpuRoots, version: str, *, product: str = "GH100") -> bytes:
    return roots.rim("vbios", version, product=product)


def fill_rim_store(
    roots: SimGpuRoots,
    store: Path,
    versions: Iterable[tuple[str, str]],
    *,
    now: datetime.datetime | None = None,
) -> RimStore:
    """The verifier's RIM store at ``store`` (gpu.rim_store) holding a driver and a VBIOS
    RIM for each (driver, VBIOS) version pair, each verified by the store as
    ``devtrust gpu rim add`` does (against the simulation's RIM root)."""
    from devtrust.verifier.gpu.rim_store import RimStore  # noqa: PLC0415 - store side only

    now = now or _utcnow()
    opened = RimStore.open(store)
    drivers, vbioses = set(), set()
    for driver, vbios in versions:
        drivers.add(driver)
        vbioses.add(vbios)
    for kind, wanted in (("driver", drivers), ("vbios", vbioses)):
        for version in sorted(wanted):
            opened.add(
                roots.rim(kind, version),
                roots=[roots.rim_root],
                at=now,
                source=f"simulated {kind} RIM {version}",
            )
    return opened


def _vbios_bytes(version: str) -> bytes:
    """96.00.9F.00.01 -> NVIDIA's 8 bytes: u32 0x96009F00 and u32 0x01, little-endian."""
    groups = version.split(".")
    if len(groups) != 5 or not all(len(g) == 2 for g in groups):
        raise ValueError(
            f"VBIOS version: expected five groups of two hex digits, found {version!r}"
        )
    try:
        major = int("".join(groups[:4]), 16)
        minor = int(groups[4], 16)
    except ValueError:
        raise ValueError(f"VBIOS version: expected hex digits, found {version!r}") from None
    return struct.pack("<II", major, minor)


def _text(value: str) -> bytes:
    return value.encode("ascii") + b"\x00"


@dataclass(frozen=True)
class SimGpu:
    """One simulated Hopper GPU in CC mode. Frozen: a fault makes a changed copy."""

    index: int
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # the intermediate and the root
    driver_version: str = "550.90.07"
    vbios_version: str = "96.00.9F.00.01"
    name: str = "NVIDIA H100 80GB HBM3"
    project: str = "1010"
    project_sku: str = "0200"
    chip_sku: str = "882"
    nvdec0_status: int = NVDEC0_ENABLED
    # SPDM block index (1..64) -> value; made from the versions' reference values.
    measurements: Mapping[int, bytes] = field(default_factory=dict)
    # The firmware ID the report states (opaque field 20) and the leaf declares; b"": the
    # report states none (NVIDIA's older firmware; the verifier then does not compare).
    fwid: bytes = b""

    @classmethod
    def create(
        cls,
        roots: SimGpuRoots,
        index: int,
        *,
        driver_version: str = "550.90.07",
        vbios_version: str = "96.00.9F.00.01",
        name: str = "NVIDIA H100 80GB HBM3",
        now: datetime.datetime | None = None,
    ) -> SimGpu:
        """A GPU with a fresh attestation key whose measurements match the RIMs of its
        driver and VBIOS versions (``reference_values``)."""
        _vbios_bytes(vbios_version)  # refuse a malformed version now, not at report time
        key = _new_key()
        serial = (
            hashlib.sha1(  # noqa: S324 - NVIDIA's serialNumber: a 20-byte key id
                key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
            .hexdigest()
            .upper()
        )
        fwid = firmware_id(vbios_version)
        leaf = roots.issue_leaf(key.public_key(), serial=serial, fwid=fwid, now=now)
        driver = reference_values("driver", driver_version)
        vbios = reference_values("vbios", vbios_version)
        measurements: dict[int, bytes] = {}
        for rim_index in range(BLOCKS):
            values = driver.get(rim_index) or vbios.get(rim_index)
            measurements[rim_index + 1] = values[0] if values else _inactive_value(rim_index)
        return cls(
            index=index,
            key=key,
            leaf=leaf,
            chain=(roots.device_ca, roots.device_root),
            driver_version=driver_version,
            vbios_version=vbios_version,
            name=name,
            measurements=measurements,
            fwid=fwid,
        )

    def twin(self, roots: SimGpuRoots, *, now: datetime.datetime | None = None) -> SimGpu:
        """The same GPU with another attestation key and certificate (for a revoked twin:
        list its ``leaf`` in the CRL)."""
        other = SimGpu.create(
            roots,
            self.index,
            driver_version=self.driver_version,
            vbios_version=self.vbios_version,
            name=self.name,
            now=now,
        )
        return replace(self, key=other.key, leaf=other.leaf, fwid=other.fwid)

    def tampered(self, block: int = 2) -> SimGpu:
        """Fault: SPDM block ``block`` (default 2: RIM index 1, VBIOS FSP) holds another
        value than its RIM allows."""
        if block not in self.measurements:
            raise ValueError(f"block {block}: expected one of 1..{BLOCKS}")
        changed = dict(self.measurements)
        changed[block] = hashlib.sha384(b"tampered " + changed[block]).digest()
        return replace(self, measurements=changed)

    def certificates(self) -> list[bytes]:
        """DER, the attestation key's certificate first, then the intermediate and root (as
        NVML returns the chain)."""
        return [c.public_bytes(serialization.Encoding.DER) for c in (self.leaf, *self.chain)]

    def opaque_data(self) -> bytes:
        """NVIDIA's opaque data: (type u16, size u16, value) records, in the order the
        recorded Hopper reports have them."""
        records = [
            (_OPAQUE_VBIOS_VERSION, _vbios_bytes(self.vbios_version)),
            (_OPAQUE_BOARD_ID, bytes.fromhex("b1030000")),
            (_OPAQUE_CHIP_SKU, _text(self.chip_sku)),
            (_OPAQUE_CHIP_SKU_MOD, _text("0")),
            (_OPAQUE_PROJECT, _text(self.project)),
            (_OPAQUE_PROJECT_SKU, _text(self.project_sku)),
            (_OPAQUE_PROJECT_SKU_MOD, b"\x00\x00"),
            (_OPAQUE_DRIVER_VERSION, _text(self.driver_version)),
            (_OPAQUE_GPU_INFO, bytes.fromhex("8001000000000000")),
            (_OPAQUE_NVDEC0_STATUS, bytes([self.nvdec0_status])),
        ]
        if self.fwid:
            records.append((_OPAQUE_FWID, self.fwid))
        return b"".join(struct.pack("<HH", kind, len(value)) + value for kind, value in records)

    def report(self, nonce: bytes, *, responder_nonce: bytes | None = None) -> bytes:
        """GET_MEASUREMENTS request || MEASUREMENTS response (DSP0274 1.1 section 10.11):

        1. request: SPDMVersion 0x11, code 0xE0, Param1 0x01 (signature requested), Param2
           0xFF (all blocks), the requester's 32-byte ``nonce``, SlotIDParam 0;
        2. response: 0x11, 0x60, Param1 0, Param2 0, NumberOfBlocks, a u24 record length,
           the blocks (Index, MeasurementSpecification 0x01 DMTF, u16 size; value type, u16
           value size, 48-byte value), the responder's nonce, u16 OpaqueLength, the opaque
           data;
        3. signature: ECDSA P-384 over SHA-384 of request || response-so-far, raw r || s.
        """
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"GPU nonce: expected {NONCE_SIZE} bytes, found {len(nonce)}")
        responder_nonce = os.urandom(NONCE_SIZE) if responder_nonce is None else responder_nonce
        if len(responder_nonce) != NONCE_SIZE:
            raise ValueError(
                f"responder nonce: expected {NONCE_SIZE} bytes, found {len(responder_nonce)}"
            )
        request = (
            bytes([_SPDM_1_1, _GET_MEASUREMENTS, _SIGNATURE_REQUESTED, _ALL_MEASUREMENTS])
            + nonce
            + b"\x00"
        )
        record = b"".join(
            struct.pack("<BBH", block, _DMTF_SPEC, 3 + len(value))
            + struct.pack("<BH", _VALUE_TYPE, len(value))
            + value
            for block, value in sorted(self.measurements.items())
        )
        opaque = self.opaque_data()
        response = (
            bytes([_SPDM_1_1, _MEASUREMENTS, 0, 0, len(self.measurements)])
            + len(record).to_bytes(3, "little")
            + record
            + responder_nonce
            + struct.pack("<H", len(opaque))
            + opaque
        )
        der = self.key.sign(request + response, ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        return request + response + r.to_bytes(48, "big") + s.to_bytes(48, "big")


class SimAttester:
    """The agent's GPU attester over simulated GPUs (``GpuAttester`` in
    devtrust.agent.gpu.attest): one ``GpuReport`` per ``attest(index, nonce)``. The agent
    calls it from one worker thread per GPU at once; ``inject`` and ``heal`` come from the
    simulator's event loop: one lock orders them.

    Faults, set with ``inject`` and undone with ``heal``: MEASUREMENT swaps the GPU for a
    tampered copy; REPLAY sends, from then on, the report made for the last nonce before it;
    REVOKED gives the GPU an attestation key whose certificate the CRL lists (``revoked``,
    or the twin given at construction: the CRL must list it before the verifier starts).
    """

    def __init__(
        self,
        gpus: Iterable[SimGpu],
        *,
        revoked_twins: Mapping[int, SimGpu] | None = None,
    ) -> None:
        self.gpus: dict[int, SimGpu] = {gpu.index: gpu for gpu in gpus}
        self._good = dict(self.gpus)
        self._twins = dict(revoked_twins or {})
        self._last: dict[int, bytes] = {}
        self._replaying: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self.faults: dict[int, GpuFault] = {}
        self.reports = 0

    @property
    def indices(self) -> list[int]:
        return sorted(self.gpus)

    def inject(self, fault: GpuFault, index: int, *, revoked: SimGpu | None = None) -> None:
        """Make GPU ``index`` misbehave as ``fault`` says until ``heal``; ValueError when it
        has no simulated GPU (or, for REVOKED, no revoked identity to take)."""
        with self._lock:
            gpu = self.gpus.get(index)
            if gpu is None:
                raise ValueError(f"GPU {index}: expected one of {sorted(self.gpus)}")
            if fault is GpuFault.MEASUREMENT:
                self.gpus[index] = gpu.tampered()
            elif fault is GpuFault.REVOKED:
                twin = revoked or self._twins.get(index)
                if twin is None:
                    raise ValueError(f"GPU {index}: no revoked twin was made for it")
                self.gpus[index] = replace(
                    gpu, key=twin.key, leaf=twin.leaf, chain=twin.chain, fwid=twin.fwid
                )
            else:
                earlier = self._last.get(index) or gpu.report(os.urandom(NONCE_SIZE))
                self._replaying[index] = earlier
            self.faults[index] = fault

    def heal(self, index: int) -> None:
        """Undo GPU ``index``'s fault: its own key and measurements, fresh reports."""
        with self._lock:
            if index in self._good:
                self.gpus[index] = self._good[index]
            self._replaying.pop(index, None)
            self.faults.pop(index, None)

    def report_bytes(self, index: int, nonce: bytes) -> bytes:
        with self._lock:
            replay = self._replaying.get(index)
            gpu = self.gpus[index]
        if replay is not None:
            return replay
        report = gpu.report(nonce)
        with self._lock:
            self._last[index] = report
        return report

    def attest(self, index: int, nonce: bytes) -> attestation_pb2.GpuReport:
        """Status "report" for a simulated GPU, "unsupported" for an index the host has no
        simulated GPU at."""
        with self._lock:
            self.reports += 1
            gpu = self.gpus.get(index)
        if gpu is None:
            return attestation_pb2.GpuReport(
                index=index,
                status="unsupported",
                detail="no simulated GPU attestation at this index",
            )
        return attestation_pb2.GpuReport(
            index=index,
            status="report",
            report=self.report_bytes(index, nonce),
            certificates=gpu.certificates(),
        )

    def close(self) -> None:
        """Nothing to release (the agent's protocol closes NVML)."""


def attests(product_name: str) -> bool:
    """Whether a GPU of this product name attests itself (Hopper and later: H100, H200,
    GH200, B200, GB200, ...; not A100 and older)."""
    words = product_name.removeprefix("NVIDIA ").split()
    model = words[0].upper() if words else ""
    return model[:2] in ("GH", "GB") or model[:1] in ("H", "B", "R")


@dataclass
class SimGpuFleet:
    """Simulated GPU attestation for a whole ``devtrust simulate`` run, in ``directory``:
    the roots, a RIM store with the RIMs of every (driver, VBIOS) version the fleet runs,
    and the CRLs revoking ``spares`` (attestation identities the gpu-revoked fault gives a
    GPU). Made before the verifier starts; its ``verifier_config`` is verifier.yaml's
    ``gpu:`` section."""

    roots: SimGpuRoots
    rim_store: Path
    revocation: Path
    spares: list[SimGpu]

    @classmethod
    def prepare(
        cls, directory: Path, *, versions: Iterable[tuple[str, str]], revoked: int
    ) -> SimGpuFleet:
        roots = SimGpuRoots.open(directory / "roots")
        store = directory / "rims"
        fill_rim_store(roots, store, versions)
        spares = [SimGpu.create(roots, 0) for _ in range(revoked)]
        revocation = directory / "revocation"
        roots.write_revocation(revocation, [spare.leaf for spare in spares])
        return cls(roots, store, revocation, spares)

    def verifier_config(self) -> dict[str, Any]:
        return {
            "device_roots": [str(self.roots.device_root_path)],
            "rim_roots": [str(self.roots.rim_root_path)],
            "rim_store": str(self.rim_store),
            "revocation": str(self.revocation),
        }

    def attester(self, gpus: Iterable[tuple[int, str, str]], *, driver_version: str) -> SimAttester:
        """An attester for one host's GPUs, given as (index, product name, VBIOS version):
        a simulated GPU for each that attests (``attests``) with a VBIOS version of NVIDIA's
        form; the others answer "unsupported"."""
        simulated = [
            SimGpu.create(
                self.roots,
                index,
                driver_version=driver_version,
                vbios_version=vbios,
                name=name,
            )
            for index, name, vbios in gpus
            if attests(name) and _vbios_ok(vbios)
        ]
        return SimAttester(simulated)

    def take_revoked(self) -> SimGpu | None:
        """A revoked identity not yet used (each is given to one GPU); None when spent."""
        return self.spares.pop() if self.spares else None


def _vbios_ok(version: str) -> bool:
    try:
        _vbios_bytes(version)
    except ValueError:
        return False
    return True
