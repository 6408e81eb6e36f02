"""Each GPU's own attestation at the verifier's gRPC edge (verifier/wire.py,
verifier/wire_body.py): EvidenceBody.gpu_reports within their limits (each limit named when
passed) become ``Evidence.gpu_reports`` (verifier.gpu.types.GpuEvidence), and stay out of what
policy reads and out of the policy cache's key, which must not change per challenge."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf import json_format

from devtrust.agent.collect import RecordedHost, collect_body
from devtrust.agent.evidence import evidence_body
from devtrust.agent.gpu.attest import RecordedAttester
from devtrust.v1 import attestation_pb2, common_pb2
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.errors import LimitExceeded, MalformedInput
from devtrust.verifier.gpu.appraise import GpuAnchors, HostGpu, appraise_gpus
from devtrust.verifier.gpu.rim import FileRims
from devtrust.verifier.gpu.types import GpuEvidence
from devtrust.verifier.wire import evidence_from_wire
from devtrust.verifier.wire_body import (
    MAX_GPU_CERTIFICATE,
    MAX_GPU_CERTIFICATES,
    MAX_GPU_DETAIL,
    MAX_GPU_REPORT,
    MAX_GPU_TEXT,
    WireBody,
    body_from_json,
    body_from_wire,
)
from tests.corpus import corpus_root

NOW = datetime.datetime(2026, 12, 2, 4, 30, tzinfo=datetime.UTC)
NVTRUST = corpus_root() / "gpu" / "nvidia_nvtrust_attestation"
REPORT = bytes.fromhex((NVTRUST / "attestationReport-545.00.txt").read_text().strip())
CHAIN = tuple(
    c.public_bytes(Encoding.DER)
    for c in x509.load_pem_x509_certificates((NVTRUST / "gpuAkCertChain-545.00.txt").read_bytes())
)
HOST = common_pb2.HostFacts(hostname="gpu-07")
GPU = attestation_pb2.GpuState(
    driver_version="545.00",
    gpus=[attestation_pb2.Gpu(index=i, vbios_version="96.00.5E.00.01") for i in (0, 1)],
)


def report(index: int = 0, **fields: Any) -> attestation_pb2.GpuReport:
    args: dict[str, Any] = {
        "index": index,
        "status": "report",
        "report": REPORT,
        "certificates": CHAIN,
    }
    args.update(fields)
    return attestation_pb2.GpuReport(**args)


def unsupported(index: int) -> attestation_pb2.GpuReport:
    return attestation_pb2.GpuReport(index=index, status="unsupported", detail="Ampere (7)")


def body_bytes(
    reports: list[attestation_pb2.GpuReport],
    *,
    gpu: attestation_pb2.GpuState | None = GPU,
    now: datetime.datetime = NOW,
) -> bytes:
    """A body as the agent sends it: the reports after the other fields (agent/collect.py)."""
    data = evidence_body(host=HOST, certify_key_spki=b"", now=now, gpu=gpu)
    tail = attestation_pb2.EvidenceBody(gpu_reports=reports)
    return data + tail.SerializeToString(deterministic=True)


def evidence_msg(data: bytes) -> attestation_pb2.Evidence:
    return attestation_pb2.Evidence(
        nonce=b"n" * 32, quote_attest=b"a", quote_signature=b"s", body=data
    )


def test_gpu_reports_become_gpu_evidence() -> None:
    data = body_bytes([report(0), unsupported(1)])
    evidence = evidence_from_wire(evidence_msg(data), LimitsConfig())
    assert evidence.gpu_reports == (
        GpuEvidence(index=0, status="report", detail="", report=REPORT, certificates=CHAIN),
        GpuEvidence(index=1, status="unsupported", detail="Ampere (7)"),
    )
    assert evidence.body == data  # the quoted bytes, as sent, reports included


def test_a_body_without_reports_has_none() -> None:
    """An agent before GPU attestation: no report, nothing refused."""
    data = evidence_body(host=HOST, certify_key_spki=b"", now=NOW, gpu=GPU)
    assert evidence_from_wire(evidence_msg(data), LimitsConfig()).gpu_reports == ()


@pytest.mark.parametrize(
    ("name", "reports", "error", "message"),
    [
        (
            "more reports than max_gpus",
            [report(0), report(1), report(1)],
            LimitExceeded,
            r"EvidenceBody\.gpu_reports: 3 entries, more than the limit of 2 "
            r"\(limits\.max_gpus\)",
        ),
        (
            "an index not among gpu.gpus",
            [report(0), report(7)],
            MalformedInput,
            r"EvidenceBody\.gpu_reports\[1\]: GPU index 7 is not a GPU of "
            r"EvidenceBody\.gpu\.gpus \(indices listed: 0, 1\)",
        ),
        (
            "an index twice",
            [report(1), unsupported(1)],
            MalformedInput,
            r"EvidenceBody\.gpu_reports\[1\]: GPU index 1 has a report already",
        ),
        (
            "an unknown status",
            [report(0, status="fine")],
            MalformedInput,
            r"gpu_reports\[0\]\.status: expected one of report, unsupported, error, "
            r"got 'fine'",
        ),
        (
            "a detail too long",
            [attestation_pb2.GpuReport(index=0, status="error", detail="x" * 1025)],
            LimitExceeded,
            rf"gpu_reports\[0\]\.detail: 1025 characters, more than {MAX_GPU_DETAIL}",
        ),
        (
            "a report too large",
            [report(0, report=bytes(MAX_GPU_REPORT + 1))],
            LimitExceeded,
            rf"gpu_reports\[0\]\.report: {MAX_GPU_REPORT + 1} bytes, more than {MAX_GPU_REPORT}",
        ),
        (
            "too many certificates",
            [report(0, certificates=[CHAIN[0]] * (MAX_GPU_CERTIFICATES + 1))],
            LimitExceeded,
            rf"gpu_reports\[0\]\.certificates: 9 certificates, more than {MAX_GPU_CERTIFICATES}",
        ),
        (
            "a certificate too large",
            [report(0, certificates=[CHAIN[0], bytes(MAX_GPU_CERTIFICATE + 1)])],
            LimitExceeded,
            rf"gpu_reports\[0\]\.certificates\[1\]: {MAX_GPU_CERTIFICATE + 1} bytes, more "
            rf"than {MAX_GPU_CERTIFICATE}",
        ),
        (
            "status report without a report",
            [report(0, report=b"")],
            MalformedInput,
            r"gpu_reports\[0\]: status report without report",
        ),
        (
            "status report without certificates",
            [report(0, certificates=[])],
            MalformedInput,
            r"gpu_reports\[0\]: status report without certificates",
        ),
        (
            "status unsupported with a report",
            [attestation_pb2.GpuReport(index=0, status="unsupported", report=REPORT)],
            MalformedInput,
            r"gpu_reports\[0\]: status unsupported with a report or certificates",
        ),
        (
            "status error with certificates",
            [attestation_pb2.GpuReport(index=0, status="error", certificates=CHAIN)],
            MalformedInput,
            r"gpu_reports\[0\]: status error with a report or certificates",
        ),
    ],
)
def test_reports_past_their_limits_are_refused_naming_them(
    name: str, reports: list[attestation_pb2.GpuReport], error: type[Exception], message: str
) -> None:
    data = body_bytes(reports)
    with pytest.raises(error, match=message):
        body_from_wire(data, LimitsConfig(max_gpus=2))
    with pytest.raises(error, match=message):
        evidence_from_wire(evidence_msg(data), LimitsConfig(max_gpus=2))


def test_the_limits_are_inclusive() -> None:
    """Exactly at each limit: accepted."""
    at_limits = report(
        0,
        detail="d" * MAX_GPU_DETAIL,
        report=bytes(MAX_GPU_REPORT),
        certificates=[bytes(MAX_GPU_CERTIFICATE)] * MAX_GPU_CERTIFICATES,
    )
    body = body_from_wire(body_bytes([at_limits, unsupported(1)]), LimitsConfig(max_gpus=2))
    assert len(body.gpu_reports) == 2


@pytest.mark.parametrize("field", ["uuid", "name", "pci_bus_id", "vbios_version"])
def test_a_gpu_text_past_its_limit_is_refused_naming_it(field: str) -> None:
    """A GPU's strings name it in every finding about it (issue 14 review H2: a 3.8 MB body
    made 492 MB of finding text through long UUIDs): bounded, exactly the limit accepted."""

    def body(length: int) -> bytes:
        gpu = attestation_pb2.Gpu(index=0)
        setattr(gpu, field, "x" * length)
        return attestation_pb2.EvidenceBody(
            gpu=attestation_pb2.GpuState(gpus=[gpu])
        ).SerializeToString()

    body_from_wire(body(MAX_GPU_TEXT), LimitsConfig())
    with pytest.raises(LimitExceeded, match=rf"EvidenceBody.gpu.gpus\[0\].{field}: 257 characters"):
        body_from_wire(body(MAX_GPU_TEXT + 1), LimitsConfig())


def test_a_gpu_state_text_past_its_limit_is_refused_naming_it() -> None:
    data = attestation_pb2.EvidenceBody(
        gpu=attestation_pb2.GpuState(driver_version="5" * (MAX_GPU_TEXT + 1))
    ).SerializeToString()
    with pytest.raises(LimitExceeded, match=r"EvidenceBody.gpu.driver_version: 257 characters"):
        body_from_wire(data, LimitsConfig())


def test_a_report_for_a_body_without_gpus_is_refused() -> None:
    with pytest.raises(MalformedInput, match=r"GPU index 0 is not .* \(indices listed: none\)"):
        body_from_wire(body_bytes([report(0)], gpu=None), LimitsConfig())


# --- out of policy's reach -------------------------------------------------------------------


def test_plain_leaves_the_reports_out() -> None:
    evidence = evidence_from_wire(evidence_msg(body_bytes([report(0), report(1)])), LimitsConfig())
    values = evidence.body_doc.plain()
    assert "gpu_reports" not in values
    assert values["gpu"]["driver_version"] == "545.00"
    # and a body read from JSON (`devtrust policy eval` on `devtrust-agent collect --json`)
    text = json_format.MessageToJson(
        attestation_pb2.EvidenceBody.FromString(body_bytes([report(0)])),
        preserving_proto_field_name=True,
    )
    assert "gpu_reports" in text
    assert "gpu_reports" not in body_from_json(text.encode()).plain()


def test_the_posture_digest_does_not_change_with_the_reports() -> None:
    """The policy cache's key: two challenges' bodies differing only in their GPU reports
    (another nonce each time, or none) have the same digest, from the bytes received and
    from the message alike."""
    other = REPORT[:4] + bytes(32) + REPORT[36:]
    bodies = [
        body_bytes([report(0), report(1)]),
        body_bytes([report(0, report=other), unsupported(1)]),
        body_bytes([]),
    ]
    limits = LimitsConfig()
    digests = {evidence_from_wire(evidence_msg(b), limits).body_doc.posture_digest for b in bodies}
    assert len(digests) == 1
    from_messages = {
        WireBody(attestation_pb2.EvidenceBody.FromString(b)).posture_digest for b in bodies
    }
    assert from_messages == digests
    # while what policy reads still moves it
    changed = body_bytes([report(0)], gpu=attestation_pb2.GpuState(driver_version="550.90.07"))
    assert WireBody(attestation_pb2.EvidenceBody.FromString(changed)).posture_digest not in digests


# --- from the agent to the appraisal ---------------------------------------------------------


def test_a_recorded_report_reaches_the_appraisal_and_its_nonce_is_named() -> None:
    """The agent's body (a recorded host: the corpus report, made for another nonce) through
    the edge into the pure GPU appraisal: the report arrives intact, and its nonce, which
    is not gpu_nonce(this challenge, 0), is the verifier's finding."""
    challenge = bytes(range(32))
    host = RecordedHost(
        facts=HOST,
        posture=attestation_pb2.OsPosture(),
        gpu=attestation_pb2.GpuState(
            driver_version="545.00",
            gpus=[attestation_pb2.Gpu(index=0, uuid="GPU-0", vbios_version="96.00.5E.00.01")],
        ),
        attester=RecordedAttester.from_nvtrust(
            NVTRUST / "attestationReport-545.00.txt", NVTRUST / "gpuAkCertChain-545.00.txt"
        ),
    )
    data = asyncio.run(collect_body(host, now=NOW, nonce=challenge))
    evidence = evidence_from_wire(evidence_msg(data), LimitsConfig())
    [sent] = evidence.gpu_reports
    assert (sent.report, sent.certificates) == (REPORT, CHAIN)
    root = x509.load_pem_x509_certificate((NVTRUST / "verifier_device_root.pem").read_bytes())
    [verdict] = appraise_gpus(
        evidence.gpu_reports,
        [HostGpu(0, "gpu0:GPU-0", "96.00.5E.00.01")],
        driver_version="545.00",
        challenge_nonce=challenge,
        anchors=GpuAnchors(device_roots=(root,), rims=FileRims(())),
        now=datetime.datetime(2024, 6, 1, tzinfo=datetime.UTC),
        device_id="ab" * 32,
        required=True,
    )
    assert "gpu.report.nonce_mismatch" in {f.id for f in verdict.findings}
