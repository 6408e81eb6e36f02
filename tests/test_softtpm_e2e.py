"""Soft TPMs end to end: a real verifier on loopback (real gRPC with mTLS, a real SQLite file)
enrolls and attests devices whose TPM is devtrust.swtpm.soft.SoftTpm, driven by the agent's
own enrollment and attestation client, as the fleet simulator runs them; and refuses them
unless its configuration trusts the simulation root."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from devtrust.agent.attest import AttestationClient
from devtrust.agent.collect import RecordedHost
from devtrust.agent.config import AgentConfig, VerifierEndpoint
from devtrust.agent.enroll import enroll
from devtrust.agent.messages import AttestationResult
from devtrust.agent.state import Enrollment, MemoryFiles
from devtrust.core.errors import ConfigError
from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.swtpm.simroot import SimulationRoot
from devtrust.swtpm.soft import SoftTpm
from devtrust.v1 import attestation_pb2, common_pb2
from devtrust.verifier.config import EndorsementConfig, VerifierConfig
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.server import RunningVerifier, load_endorsements
from tests.env import running, verifier_config


class SoftHost(RecordedHost):
    """A recorded host whose event log is its soft TPM's, as it is now."""

    def __init__(self, tpm: SoftTpm) -> None:
        super().__init__(
            facts=common_pb2.HostFacts(hostname="sim-0001", os_release="Ubuntu 24.04 LTS"),
            posture=attestation_pb2.OsPosture(
                os_id="ubuntu", os_version="24.04", kernel_release="6.8.0-45-generic"
            ),
        )
        self.tpm = tpm

    async def event_log(self) -> bytes | None:
        return self.tpm.event_log()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> SimulationRoot:
    return SimulationRoot.create(tmp_path_factory.mktemp("sim-root"))


def simulation_config(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    root: SimulationRoot | None,
    **attestation: Any,
) -> VerifierConfig:
    """The tests' verifier, trusting the simulation root (None: the swtpm CA instead)."""
    endorsement = (
        EndorsementConfig(roots=[], trust_simulation_root=root.cert_path)
        if root is not None
        else EndorsementConfig(roots=[], trust_swtpm_local_ca=endorsement_ca.cert_path)
    )
    return replace(
        verifier_config(workdir, pki, endorsement_ca, **attestation), endorsement=endorsement
    )


def device_config(pki: PkiFiles, verifier: RunningVerifier, workdir: Path) -> AgentConfig:
    return AgentConfig(
        verifier=VerifierEndpoint(
            enrollment=f"127.0.0.1:{verifier.enrollment_port}",
            attestation=f"127.0.0.1:{verifier.attestation_port}",
            ca_bundle=pki.ca_cert,
        ),
        state_dir=workdir / "unused-state",
        runtime_dir=workdir / "unused-run",
        event_log=None,
        gpu_source="none",
        rpc_timeout_s=10.0,
        reconnect_max_s=1.0,
    )


async def results_of(
    cfg: AgentConfig,
    tpm: SoftTpm,
    files: MemoryFiles,
    enrollment: Enrollment,
    count: int = 1,
    between: Callable[[], None] | None = None,
) -> list[AttestationResult]:
    """Run the agent's attestation client until ``count`` results arrived; ``between`` is
    called after each result but the last (before the next challenge is answered)."""
    results: list[AttestationResult] = []
    done = asyncio.Event()

    def on_result(result: AttestationResult) -> None:
        results.append(result)
        if len(results) >= count:
            done.set()
        elif between is not None:
            between()

    stop = asyncio.Event()
    client = AttestationClient(
        cfg, tpm=tpm, host=SoftHost(tpm), files=files, enrollment=enrollment, on_result=on_result
    )
    task = asyncio.create_task(client.run(stop))
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        stop.set()
        await task
    return results


def test_soft_tpm_enrolls_and_attests_affirming(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, root: SimulationRoot
) -> None:
    config = simulation_config(workdir, pki, endorsement_ca, root)
    tpm = SoftTpm(root, seed=b"device 1")

    async def scenario() -> list[AttestationResult]:
        async with running(config) as verifier:
            cfg = device_config(pki, verifier, workdir)
            files = MemoryFiles(ca_bundle=pki.ca_cert.read_bytes())
            enrollment = await enroll(cfg, tpm, files, host=SoftHost(tpm))
            assert files.enrollment == enrollment
            await verifier.repos.devices.set_assignment(
                DeviceId(enrollment.device_id),
                zone="simulation",
                labels={},
                now=datetime.datetime.now(datetime.UTC),
                event="assigned:operator",
            )
            results = await results_of(cfg, tpm, files, enrollment)
            assert files.certificate is not None  # the device certificate, in memory
            return results

    [result] = asyncio.run(scenario())
    assert result.trust.findings == ()
    assert result.trust.tier is Tier.AFFIRMING
    assert result.certificate is not None


def test_pcr_tampering_is_found(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, root: SimulationRoot
) -> None:
    config = simulation_config(workdir, pki, endorsement_ca, root)
    tpm = SoftTpm(root)

    async def scenario() -> list[AttestationResult]:
        async with running(config) as verifier:
            cfg = device_config(pki, verifier, workdir)
            files = MemoryFiles(ca_bundle=pki.ca_cert.read_bytes())
            enrollment = await enroll(cfg, tpm, files, host=SoftHost(tpm))
            tpm.extend(4, b"a boot loader the log does not show", logged=False)
            return await results_of(cfg, tpm, files, enrollment)

    [result] = asyncio.run(scenario())
    assert [f.id for f in result.trust.findings] == ["eventlog.replay_mismatch"]
    assert result.trust.tier is not Tier.AFFIRMING


def test_clock_rolled_back_is_refused(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, root: SimulationRoot
) -> None:
    config = simulation_config(workdir, pki, endorsement_ca, root, interval_s=0.2)
    tpm = SoftTpm(root)

    async def scenario() -> list[AttestationResult]:
        async with running(config) as verifier:
            cfg = device_config(pki, verifier, workdir)
            files = MemoryFiles(ca_bundle=pki.ca_cert.read_bytes())
            enrollment = await enroll(cfg, tpm, files, host=SoftHost(tpm))
            while tpm.clock_ms() == 0:  # a clock that can go back
                await asyncio.sleep(0.001)
            return await results_of(
                cfg, tpm, files, enrollment, count=2, between=lambda: tpm.roll_back_clock(60_000)
            )

    first, second = asyncio.run(scenario())
    assert first.trust.findings == ()
    assert [f.id for f in second.trust.findings] == ["tpm.clock.backwards"]
    assert second.trust.tier is Tier.CONTRAINDICATED


def test_verifier_without_the_simulation_root_refuses_enrollment(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, root: SimulationRoot
) -> None:
    config = simulation_config(workdir, pki, endorsement_ca, None)
    tpm = SoftTpm(root)

    async def scenario() -> grpc.aio.AioRpcError:
        async with running(config) as verifier:
            cfg = device_config(pki, verifier, workdir)
            files = MemoryFiles(ca_bundle=pki.ca_cert.read_bytes())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await enroll(cfg, tpm, files, host=SoftHost(tpm))
            assert files.enrollment is None
            return err.value

    err = asyncio.run(scenario())
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "does not chain to a trusted endorsement root" in (err.details() or "")


def test_simulation_root_is_logged_as_a_warning(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    root: SimulationRoot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = simulation_config(workdir, pki, endorsement_ca, root)
    with caplog.at_level(logging.WARNING, logger="devtrust.verifier.server"):
        store = load_endorsements(config)
    assert store.roots == (root.certificate,)
    [record] = [r for r in caplog.records if "simulation EK root" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert str(root.cert_path) in record.getMessage()


@pytest.mark.parametrize("case", ["missing", "no certificate"])
def test_simulation_root_setting_must_name_a_certificate(
    case: str, workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    path = workdir / "simulation-ek-root.pem"
    if case == "no certificate":
        path.write_text("not a certificate\n")
    config = replace(
        verifier_config(workdir, pki, endorsement_ca),
        endorsement=EndorsementConfig(roots=[], trust_simulation_root=path),
    )
    expected = "does not exist" if case == "missing" else "holds no certificate"
    with pytest.raises(ConfigError, match=expected) as err:
        load_endorsements(config)
    assert "endorsement.trust_simulation_root" in str(err.value)
