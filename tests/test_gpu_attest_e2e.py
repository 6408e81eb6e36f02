"""Issue 14 end to end: a swtpm device whose simulated Hopper GPU attests for itself, over the
real wire protocol (a verifier on loopback with mTLS and SQLite), in a zone whose policy
requires GPU attestation. The GPU's report is bound to the challenge (its nonce is
``gpu_nonce(challenge nonce, index)``) and travels in the quoted body.

- a GPU whose report verifies and matches its RIMs: the device is certified, and its GPU is
  a submod of the result with its own claims;
- a GPU whose measurement does not match its RIM, a report replayed from another challenge,
  a GPU whose attestation certificate is revoked, no report at all: each is named, and no
  certificate is issued (each test fails when its check is removed);
- the same report in a zone that does not require GPU attestation still counts (a bad GPU is
  contraindicated anywhere), and a GPU that says it cannot attest is then no finding.

Test roots stand in for NVIDIA's (devtrust.swtpm.gpu_sim); the verifier trusts them because
this test's configuration lists them, as a production configuration never would.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from devtrust.agent.state import new_key, spki
from devtrust.core.binding import gpu_nonce, sign_possession
from devtrust.swtpm import EndorsementCA
from devtrust.swtpm.gpu_sim import SimGpu, SimGpuRoots, fill_rim_store
from devtrust.v1 import attestation_pb2, common_pb2, query_pb2
from devtrust.verifier.config import GpuConfig, VerifierConfig
from devtrust.verifier.pki import PkiFiles
from tests.conftest import SwtpmFactory
from tests.env import (
    Agent,
    enrolled_agent,
    manual_stream,
    operator_stub,
    quote_evidence,
    running,
    verifier_config,
)

pytestmark = pytest.mark.swtpm

ZONE = "production-inference"
# What a test sends as GpuReports for a challenge's nonce; None: the body lists no GPU at all.
MakeReports = Callable[[bytes], list[attestation_pb2.GpuReport] | None]
POLICY = """\
policy_id: gpu-attestation-e2e
required_evidence:
  - evidence: gpu_attestation
    zones: [production-inference]
rules:
  - id: gpu.ecc
    description: ECC is on
    claim: hardware
    severity: warning
    scope: gpu
    expr: this.ecc_enabled == true
"""


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimGpuRoots, SimGpu, SimGpu]:
    """Test roots, a good GPU and a revoked one (another attestation key of the same kind)."""
    roots = SimGpuRoots.create(tmp_path_factory.mktemp("gpu-roots"))
    good = SimGpu.create(roots, 0)
    revoked = good.twin(roots)
    return roots, good, revoked


def _config(
    workdir: Path, pki: PkiFiles, ca: EndorsementCA, sim: tuple[SimGpuRoots, SimGpu, SimGpu]
) -> VerifierConfig:
    roots, good, revoked = sim
    store = workdir / "rims"
    fill_rim_store(roots, store, [(good.driver_version, good.vbios_version)])
    revocation = workdir / "gpu-revocation"
    roots.write_revocation(revocation, [revoked.leaf])
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    gpu = GpuConfig(
        device_roots=[roots.device_root_path],
        rim_roots=[roots.rim_root_path],
        rim_store=store,
        revocation=revocation,
    )
    return replace(verifier_config(workdir, pki, ca), policy=policy, gpu=gpu)


def _gpu_state(gpu: SimGpu) -> attestation_pb2.GpuState:
    return attestation_pb2.GpuState(
        source="nvml",
        driver_version=gpu.driver_version,
        gpus=[
            attestation_pb2.Gpu(
                index=gpu.index,
                name=gpu.name,
                uuid="GPU-e2e-0",
                vbios_version=gpu.vbios_version,
                ecc_enabled=True,
                architecture="hopper",
                cc_state="on",
            )
        ],
    )


def _body(
    agent: Agent,
    challenge: attestation_pb2.Challenge,
    state: attestation_pb2.GpuState,
    reports: list[attestation_pb2.GpuReport] | None,
) -> bytes:
    key = new_key()
    collected = datetime.datetime.now(datetime.UTC)
    body = attestation_pb2.EvidenceBody(
        host=common_pb2.HostFacts(hostname="gpu-e2e"),
        # No report at all stands for a host that hides its GPUs: it lists none.
        gpu=state if reports is not None else attestation_pb2.GpuState(source="nvml"),
        certify_key_spki=spki(key),
        certify_key_proof=sign_possession(key, challenge.nonce, agent.enrollment.device_id),
        gpu_reports=reports or [],
    )
    body.collected_at.FromDatetime(collected)
    return body.SerializeToString(deterministic=True)


def _report(gpu: SimGpu, nonce: bytes) -> attestation_pb2.GpuReport:
    return attestation_pb2.GpuReport(
        index=gpu.index, status="report", report=gpu.report(nonce), certificates=gpu.certificates()
    )


async def _attest(
    pki: PkiFiles,
    workdir: Path,
    config: VerifierConfig,
    tpm_factory: SwtpmFactory,
    make_reports: MakeReports,
    state: attestation_pb2.GpuState,
    *,
    zone: str = ZONE,
) -> attestation_pb2.VerifierMessage:
    tpm = tpm_factory()
    async with running(config) as verifier, enrolled_agent(workdir, pki, verifier, tpm) as agent:
        channel, query = operator_stub(pki, verifier, workdir)
        async with channel:
            await query.SetZone(
                query_pb2.SetZoneRequest(device_id=agent.enrollment.device_id, zone=zone),
                timeout=10,
            )

        async def build(challenge: attestation_pb2.Challenge) -> attestation_pb2.Evidence:
            body = _body(agent, challenge, state, make_reports(challenge.nonce))
            return await quote_evidence(agent, challenge, body=body)

        return await manual_stream(pki, verifier, agent, build)


def _ids(reply: attestation_pb2.VerifierMessage) -> list[str]:
    return [f.id for f in reply.result.trust.findings]


def _run(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    sim: tuple[SimGpuRoots, SimGpu, SimGpu],
    gpu: SimGpu,
    make_reports: MakeReports,
    *,
    zone: str = ZONE,
    state: attestation_pb2.GpuState | None = None,
) -> attestation_pb2.VerifierMessage:
    config = _config(workdir, pki, endorsement_ca, sim)
    state = state or _gpu_state(gpu)
    return asyncio.run(_attest(pki, workdir, config, swtpm_factory, make_reports, state, zone=zone))


def test_an_attesting_gpu_that_matches_its_rims_is_certified(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    sim: tuple[SimGpuRoots, SimGpu, SimGpu],
) -> None:
    good = sim[1]
    reply = _run(
        workdir,
        pki,
        endorsement_ca,
        swtpm_factory,
        sim,
        good,
        lambda nonce: [_report(good, gpu_nonce(nonce, good.index))],
    )
    trust = reply.result.trust
    assert reply.result.HasField("certificate"), _ids(reply)
    assert not [f for f in trust.findings if f.id.startswith("gpu.")], _ids(reply)
    [submod] = [s for s in trust.submods if s.name == "gpu0:GPU-e2e-0"]
    claims = {c.name: c.value for c in submod.claims}
    assert claims == {"hardware": 2, "executables": 2, "configuration": 2}, claims
    # A GPU's approved firmware is its own claim, not its host's (no reference values here:
    # the host's executables are not asserted).
    assert "executables" not in {c.name for c in trust.claims}, list(trust.claims)


@pytest.mark.parametrize(
    ("fault", "finding"),
    [
        ("measurement", "gpu.measurement.mismatch"),
        ("replayed", "gpu.report.nonce_mismatch"),
        ("revoked", "gpu.certificate.revoked"),
        ("no report", "gpu.attestation.required"),
        ("unsupported", "gpu.attestation.required"),
        ("another gpu's index", "gpu.report.nonce_mismatch"),
        ("no gpu listed", "gpu.attestation.required"),
        ("vbios not reported", "gpu.version.mismatch"),
        ("driver not reported", "gpu.version.mismatch"),
    ],
)
def test_a_gpu_that_does_not_attest_as_it_should_gets_no_certificate(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    sim: tuple[SimGpuRoots, SimGpu, SimGpu],
    fault: str,
    finding: str,
) -> None:
    """A device in a zone that requires GPU attestation whose GPU's measurement differs from
    its RIM (the rest of the report genuine and fresh), whose report answers another
    challenge, whose attestation key is revoked, or who sends no report (or says its GPU
    cannot attest) gets no certificate, and the finding names why."""
    _, good, revoked = sim
    stale = b"\x07" * 32

    def reports(nonce: bytes) -> list[attestation_pb2.GpuReport] | None:
        fresh = gpu_nonce(nonce, good.index)
        made: dict[str, Callable[[], list[attestation_pb2.GpuReport] | None]] = {
            "measurement": lambda: [_report(good.tampered(block=2), fresh)],
            "replayed": lambda: [_report(good, gpu_nonce(stale, good.index))],
            "revoked": lambda: [_report(revoked, fresh)],
            "unsupported": lambda: [
                attestation_pb2.GpuReport(index=0, status="unsupported", detail="no CC")
            ],
            "another gpu's index": lambda: [_report(good, gpu_nonce(nonce, good.index + 1))],
            "no report": lambda: [],
            "no gpu listed": lambda: None,
            "vbios not reported": lambda: [_report(good, fresh)],
            "driver not reported": lambda: [_report(good, fresh)],
        }
        return made[fault]()

    state = _gpu_state(good)
    if fault == "vbios not reported":
        state.gpus[0].vbios_version = ""
    if fault == "driver not reported":
        state.driver_version = ""
    reply = _run(workdir, pki, endorsement_ca, swtpm_factory, sim, good, reports, state=state)
    assert not reply.result.HasField("certificate"), _ids(reply)
    assert finding in _ids(reply), _ids(reply)
    assert reply.result.trust.tier == common_pb2.TIER_CONTRAINDICATED


def test_outside_the_zone_a_bad_gpu_still_counts_and_an_unsupported_one_does_not(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    sim: tuple[SimGpuRoots, SimGpu, SimGpu],
) -> None:
    _, good, _ = sim
    bad = _run(
        workdir / "bad",
        pki,
        endorsement_ca,
        swtpm_factory,
        sim,
        good,
        lambda nonce: [_report(good.tampered(block=2), gpu_nonce(nonce, good.index))],
        zone="batch",
    )
    assert "gpu.measurement.mismatch" in _ids(bad)
    assert not bad.result.HasField("certificate")
    unsupported = _run(
        workdir / "unsupported",
        pki,
        endorsement_ca,
        swtpm_factory,
        sim,
        good,
        lambda nonce: [attestation_pb2.GpuReport(index=0, status="unsupported", detail="no CC")],
        zone="batch",
    )
    assert unsupported.result.HasField("certificate"), _ids(unsupported)
    assert "gpu.attestation.required" not in _ids(unsupported)
