"""The agent's parts: the TPM, the host probe and the identity files (DESIGN.md "Code layout").

``devtrust-agent`` chooses one implementation of each at start (``devtrust.agent.main``) and
hands them to enrollment and to the attestation client, which never construct one. The real
ones are the TPM over tpm2-pytss (``devtrust.agent.tpm``), the host under a root directory with
NVML, nvidia-smi captures or procfs for the GPUs (``devtrust.agent.collect``), and files in the
state and runtime directories (``devtrust.agent.state``). A simulator puts a TPM in process,
recorded hosts and identities in memory behind the same interfaces, and runs thousands of
clients on one event loop; tests drive the client's logic without swtpm.

Every call that may wait on hardware or the disk is a coroutine: how an implementation keeps
the event loop free (a worker thread, nothing at all) is its own business.

The host probe returns protobuf messages (HostFacts, OsPosture, GpuState), by decision: they
are the parts of the evidence body, whose serialized bytes the quote binds and whose schema is
the contract the verifier's policy reads; converting them to values and back on every
challenge would cost time and invite a second schema (``devtrust.agent.wire`` says more).
Everything else the agent exchanges with the verifier is a value (``messages``).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.agent.state import DeviceIdentity, Enrollment
from devtrust.v1 import attestation_pb2, common_pb2

Selection = Sequence[tuple[str, Sequence[int]]]
"""PCR selection as (bank name, indices): [("sha256", [0, 1, 7])]."""
PcrValues = Mapping[tuple[str, int], bytes]
"""PCR values by (bank name, index)."""
PostureListener = Callable[[list[str]], None]
"""Called with the names of the posture signals that changed (``posture.WATCHED``)."""
Unsubscribe = Callable[[], None]


@dataclass(frozen=True)
class Quote:
    """A TPM2_Quote and the PCR values it covers."""

    attest: bytes  # TPMS_ATTEST, as signed
    signature: bytes  # TPMT_SIGNATURE
    pcrs: PcrValues


class Tpm(Protocol):
    """The host's TPM: its endorsement key, the devtrust AK, and the commands enrollment and
    attestation need. Failures raise ``devtrust.agent.errors.TpmError``."""

    async def ek_certificate(self) -> bytes | None:
        """The EK certificate (DER), or None for a TPM without one (some cloud vTPMs)."""
        ...

    async def ek_public(self) -> bytes:
        """TPM2B_PUBLIC of the EK."""
        ...

    async def ak_public(self) -> bytes:
        """TPM2B_PUBLIC of the AK (created and persisted on first use)."""
        ...

    async def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the AK and the EK: the secret, if both are ours."""
        ...

    async def pcr_read(self, selection: Selection) -> PcrValues: ...

    async def quote(self, qualifying_data: bytes, selection: Selection) -> Quote:
        """TPM2_Quote by the AK over ``selection``, with the PCR values it covers."""
        ...


class HostProbe(Protocol):
    """What the host reports of itself, and when its posture changes.

    ``subscribe`` registers a listener for posture changes (already debounced: one note per
    window, DESIGN.md flow 2) and returns the call that removes it. However many clients
    subscribe, an implementation watches the host once.
    """

    async def facts(self) -> common_pb2.HostFacts: ...

    async def posture(self) -> attestation_pb2.OsPosture: ...

    async def gpu(self) -> attestation_pb2.GpuState: ...

    async def gpu_reports(
        self, indices: Sequence[int], nonce: bytes
    ) -> list[attestation_pb2.GpuReport]:
        """Each GPU of ``indices`` asked to attest with ``gpu_nonce(nonce, index)`` (the
        challenge's nonce), one report per GPU, status "unsupported" or "error" for those
        that cannot; no reports at all from a host without an attester."""
        ...

    async def event_log(self) -> bytes | None:
        """The TCG event log of the host's TPM as it is now; None when there is none."""
        ...

    def subscribe(self, listener: PostureListener) -> Unsubscribe: ...


class IdentityFiles(Protocol):
    """Where the agent keeps its identities: the enrollment (channel key and certificate, the
    verifier's CA), the device certificate local workloads present, and the CA bundle that
    the configuration names. Read at start (the CA bundle once per enrollment run); the
    client keeps its device certificate in memory and writes only a renewed one."""

    async def load_enrollment(self, *, now: datetime.datetime | None = None) -> Enrollment | None:
        """The saved enrollment, or None when there is none or its certificate is in its last
        day (the agent then enrolls again, with a new channel key)."""
        ...

    async def save_enrollment(self, enrollment: Enrollment) -> None: ...

    async def device_certificate(self) -> x509.Certificate | None: ...

    async def save_device_certificate(
        self, key: ec.EllipticCurvePrivateKey, cert_der: bytes, ca_pem: bytes
    ) -> None: ...

    async def device_identity(self) -> DeviceIdentity | None:
        """The saved certificate with its key and bundle (what the Workload API serves), or
        None when one is missing or unreadable."""
        ...

    async def delete_device_certificate(self) -> None:
        """Remove the device key and certificate: the device lost trust."""
        ...

    async def read_ca_bundle(self, path: Path) -> bytes:
        """The bundle at ``path`` (``verifier.ca_bundle``), as it is: ``OSError`` when it
        cannot be read; the caller checks what it holds."""
        ...
