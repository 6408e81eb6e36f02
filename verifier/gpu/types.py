"""The values GPU attestation passes between its parts: what a device sent of one GPU's
attestation (built at the gRPC edge), and the reference values of a verified RIM. Pure
values, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

# GpuReport.status (protos/devtrust/v1/attestation.proto).
REPORT = "report"
UNSUPPORTED = "unsupported"
ERROR = "error"
STATUSES = (REPORT, UNSUPPORTED, ERROR)


@dataclass(frozen=True, slots=True)
class GpuEvidence:
    """One GPU's attestation as the device sent it (a GpuReport within its limits)."""

    index: int
    status: str  # one of STATUSES
    detail: str = ""
    # The SPDM GET_MEASUREMENTS request || signed MEASUREMENTS response (binary).
    report: bytes = b""
    # DER certificates, the attestation key's first.
    certificates: tuple[bytes, ...] = ()


class RimKind(StrEnum):
    DRIVER = "driver"
    VBIOS = "vbios"


@dataclass(frozen=True, slots=True)
class ReferenceMeasurement:
    """The golden values of one measurement block."""

    # The SPDM measurement block index this applies to: the RIM's own index + 1 (RIM
    # indices count from 0, SPDM blocks from 1; nvtrust compares RIM index i with block i+1).
    index: int
    # Any of these values is good (SHA-384 digests, 48 bytes each for NVIDIA's RIMs).
    alternatives: tuple[bytes, ...]
    size: int
    name: str = ""


@dataclass(frozen=True, slots=True)
class Rim:
    """A reference integrity manifest whose signature verified (read only from the signed
    content): the golden values of the driver or of one VBIOS, for one version."""

    kind: RimKind
    # colloquialVersion as NVIDIA writes it: "545.00" (driver), "96.00.5E.00.01" (VBIOS).
    version: str
    product: str  # "GH100"
    tag_id: str
    # The active measurements only (inactive ones are not compared).
    measurements: tuple[ReferenceMeasurement, ...]
    # Subject of the certificate that signed it, and where it came from (a file name).
    signer: str = ""
    source: str = ""
    # "swid" (TCG RIM as a SWID tag, XML-DSig) or "corim" (CBOR, COSE_Sign1).
    format: str = "swid"


def same_version(a: str, b: str) -> bool:
    """Versions as NVIDIA writes them compare without case (VBIOS hex digits)."""
    return a.strip().lower() == b.strip().lower()


class RimSource(Protocol):
    """Where the appraisal finds RIMs: the RIM store, or the files `devtrust gpu check`
    was given. ``find`` returns the RIM of ``kind`` for ``version``; a source that holds
    one RIM of that kind for another version may return it (the appraisal then names the
    mismatch); None when it has none."""

    def find(self, kind: RimKind, version: str) -> Rim | None: ...
