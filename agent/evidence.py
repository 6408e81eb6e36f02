"""What the agent reports: the host's facts and the serialized EvidenceBody the quote binds
(how it binds: ``devtrust.core.binding.qualifying_data``).
"""

from __future__ import annotations

import datetime
import platform
import socket
from collections.abc import Sequence
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from devtrust import __version__
from devtrust.v1 import attestation_pb2, common_pb2


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def host_facts(*, root: Path = Path("/")) -> common_pb2.HostFacts:
    """What the host says of itself. Zone and labels are not among it: operators assign them
    (HostFacts.zone and .labels stay empty from this agent)."""
    os_release = ""
    for line in _read(root / "etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            os_release = line.split("=", 1)[1].strip().strip('"')
    return common_pb2.HostFacts(
        hostname=socket.gethostname(),
        os_release=os_release,
        kernel=platform.release(),
        machine_id=_read(root / "etc/machine-id"),
        agent_version=__version__,
    )


def evidence_body(
    *,
    host: common_pb2.HostFacts,
    certify_key_spki: bytes,
    now: datetime.datetime,
    os: attestation_pb2.OsPosture | None = None,
    gpu: attestation_pb2.GpuState | None = None,
    certify_key_proof: bytes = b"",
    gpu_reports: Sequence[attestation_pb2.GpuReport] = (),
) -> bytes:
    """The serialized EvidenceBody: these bytes are what the quote binds, the proof of
    possession of the key to certify (``devtrust.core.binding``) and each GPU's own report
    (asked with the challenge's nonce) included."""
    collected = Timestamp()
    collected.FromDatetime(now)
    body = attestation_pb2.EvidenceBody(
        collected_at=collected,
        certify_key_spki=certify_key_spki,
        certify_key_proof=certify_key_proof,
        host=host,
        os=os,
        gpu=gpu,
        gpu_reports=gpu_reports,
    )
    return body.SerializeToString(deterministic=True)
