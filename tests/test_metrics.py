"""The verifier's Prometheus endpoint (issue 13, item 3): each metric moves when its event
happens, on a real verifier (real mTLS, a real SQLite file, a swtpm device), the endpoint's
text parses with prometheus_client's own parser, and configuration mistakes name their key."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from devtrust.agent.config import AgentConfig
from devtrust.agent.config import MetricsConfig as AgentMetricsConfig
from devtrust.agent.enroll import enroll
from devtrust.agent.main import make_host
from devtrust.core.errors import ConfigError
from devtrust.core.ids import DeviceId, Nonce
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc, common_pb2
from devtrust.verifier.config import MetricsConfig, VerifierConfig
from devtrust.verifier.decision import Decision, Detections, Verdict, verdict_of
from devtrust.verifier.metrics import ENROLL_OUTCOMES, REVOKE_KINDS, loopback, serve
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.server import RunningVerifier
from devtrust.verifier.stream import (
    Appraise,
    Appraised,
    EvidenceReceived,
    HelloReceived,
    Opened,
    PostureChanged,
    SendChallenge,
    SendResult,
    StreamProtocol,
    StreamTiming,
    Tick,
)
from devtrust.verifier.trust import Claim, Finding, Severity, TrustResult
from tests.conftest import SwtpmFactory
from tests.env import (
    enrolled_agent,
    quote_evidence,
    read_message,
    running,
    stream_channel,
    verifier_config,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# Every metric family the verifier exports (the names as the parser gives them).
FAMILIES = {
    "devtrust_devices",
    "devtrust_devices_refreshed_timestamp_seconds",
    "devtrust_devices_compliant",
    "devtrust_appraisals",
    "devtrust_findings",
    "devtrust_appraisal_seconds",
    "devtrust_detection_seconds",
    "devtrust_certificates_issued",
    "devtrust_certificates_revoked",
    "devtrust_attestation_streams",
    "devtrust_enrollments",
}


def metrics_port(verifier: RunningVerifier) -> int:
    service = verifier.attestation.metrics_service
    assert service is not None, "metrics are off"
    return service.port


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


async def scrape(verifier: RunningVerifier) -> tuple[set[str], Samples]:
    """The endpoint's families and samples (name, sorted labels) -> value, parsed by
    prometheus_client's parser."""
    text = await asyncio.to_thread(scrape_text, metrics_port(verifier))
    families: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def until(verifier: RunningVerifier, name: str, want: float, **labels: str) -> Samples:
    """Scrape until ``name{labels}`` is ``want`` (gauges set by a task or a stream's end);
    the last scrape. Fails after 20 s with what it saw."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20.0
    while True:
        _, samples = await scrape(verifier)
        if value(samples, name, **labels) == want or loop.time() > deadline:
            assert value(samples, name, **labels) == want, (name, labels, samples)
            return samples
        await asyncio.sleep(0.05)


def with_metrics(config: VerifierConfig, listen: str = "127.0.0.1:0") -> VerifierConfig:
    return dataclasses.replace(config, metrics=MetricsConfig(listen=listen, refresh_s=0.1))


def test_each_metric_moves_with_its_event(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tpm = swtpm_factory()
    config = with_metrics(verifier_config(workdir, pki, endorsement_ca))
    caplog.set_level(logging.INFO, logger="devtrust.verifier.decision")

    async def scenario() -> None:
        async with running(config) as verifier:
            families, samples = await scrape(verifier)
            assert families == FAMILIES
            for outcome in ENROLL_OUTCOMES:  # every series there from the start, at 0
                assert ("devtrust_enrollments_total", (("outcome", outcome),)) in samples
            for kind in REVOKE_KINDS:
                assert ("devtrust_certificates_revoked_total", (("reason", kind),)) in samples
            assert value(samples, "devtrust_attestation_streams") == 0

            async with enrolled_agent(workdir, pki, verifier, tpm) as agent:
                device_id = DeviceId(agent.enrollment.device_id)
                _, samples = await scrape(verifier)
                assert value(samples, "devtrust_enrollments_total", outcome="enrolled") == 1
                assert value(samples, "devtrust_certificates_issued_total", kind="channel") == 1
                await verifier.repos.devices.set_assignment(
                    device_id,
                    zone="lab",
                    labels={},
                    now=datetime.datetime.now(datetime.UTC),
                    event="assigned:operator",
                )
                # The store's fleet: the device in zone lab, never appraised (tier none).
                await until(
                    verifier, "devtrust_devices", 1, zone="lab", state="enrolled", tier="none"
                )

                async with stream_channel(pki, verifier, agent.enrollment) as channel:
                    call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=30)
                    await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
                    first = await read_message(call)
                    await until(verifier, "devtrust_attestation_streams", 1)
                    # 1. Good evidence: an affirming appraisal, a device certificate, timed.
                    evidence = await quote_evidence(agent, first.challenge)
                    await call.write(attestation_pb2.AgentMessage(evidence=evidence))
                    reply = await read_message(call)
                    assert reply.result.trust.tier == common_pb2.TIER_AFFIRMING
                    _, samples = await scrape(verifier)
                    assert (
                        value(samples, "devtrust_appraisals_total", zone="lab", tier="affirming")
                        == 1
                    )
                    assert value(samples, "devtrust_certificates_issued_total", kind="device") == 1
                    assert value(samples, "devtrust_appraisal_seconds_count") == 1
                    assert value(samples, "devtrust_appraisal_seconds_sum") > 0
                    assert value(samples, "devtrust_detection_seconds_count") == 0
                    # Compliant in zone lab (minimum affirming, the default), from the store.
                    await until(verifier, "devtrust_devices_compliant", 1, zone="lab")
                    assert (
                        value(
                            samples,
                            "devtrust_findings_total",
                            finding="tpm.quote.qualifying_data_mismatch",
                        )
                        == 0
                    )
                    # 2. A posture change: a challenge at once, answered with a quote of
                    # another nonce: contraindicated, a finding, the time to detection, and
                    # the device certificate revoked (below the zone's minimum).
                    await call.write(
                        attestation_pb2.AgentMessage(
                            posture_changed=attestation_pb2.PostureChanged(
                                signals=["kernel_modules"]
                            )
                        )
                    )
                    second = await read_message(call)
                    assert second.HasField("challenge")
                    bad = await quote_evidence(agent, second.challenge, quoted_nonce=bytes(32))
                    await call.write(attestation_pb2.AgentMessage(evidence=bad))
                    reply = await read_message(call)
                    assert reply.result.trust.tier == common_pb2.TIER_CONTRAINDICATED
                    _, samples = await scrape(verifier)
                    assert (
                        value(
                            samples, "devtrust_appraisals_total", zone="lab", tier="contraindicated"
                        )
                        == 1
                    )
                    assert (
                        value(
                            samples,
                            "devtrust_findings_total",
                            finding="tpm.quote.qualifying_data_mismatch",
                        )
                        == 1
                    )
                    assert value(samples, "devtrust_detection_seconds_count") == 1
                    assert value(samples, "devtrust_appraisal_seconds_count") == 2
                    assert (
                        value(
                            samples,
                            "devtrust_certificates_revoked_total",
                            reason="tier_below_minimum",
                        )
                        == 1
                    )
                    call.cancel()
                await until(verifier, "devtrust_attestation_streams", 0)
                samples = await until(
                    verifier,
                    "devtrust_devices",
                    1,
                    zone="lab",
                    state="enrolled",
                    tier="contraindicated",
                )
                assert value(samples, "devtrust_devices_compliant", zone="lab") == 0
                # The series the device left stays, at 0.
                assert (
                    value(samples, "devtrust_devices", zone="lab", state="enrolled", tier="none")
                    == 0
                )
                assert (
                    "devtrust_devices",
                    (("state", "enrolled"), ("tier", "none"), ("zone", "lab")),
                ) in samples
                assert value(samples, "devtrust_devices_refreshed_timestamp_seconds") > 0

                # 3. A good appraisal again (a device certificate), then an operator
                # revokes the device: that certificate is revoked with it.
                async with stream_channel(pki, verifier, agent.enrollment) as channel:
                    call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=30)
                    await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
                    third = await read_message(call)
                    evidence = await quote_evidence(agent, third.challenge)
                    await call.write(attestation_pb2.AgentMessage(evidence=evidence))
                    assert (await read_message(call)).result.HasField("certificate")
                    call.cancel()
                await verifier.revoker.revoke(
                    device_id,
                    reason="test",
                    actor="operator/alice",
                    now=datetime.datetime.now(datetime.UTC),
                )
                _, samples = await scrape(verifier)
                assert value(samples, "devtrust_certificates_issued_total", kind="device") == 2
                assert (
                    value(samples, "devtrust_certificates_revoked_total", reason="device_revoked")
                    == 1
                )
                # 4. A revoked device enrolling again is refused.
                with pytest.raises(grpc.aio.AioRpcError, match="is revoked"):
                    await enroll(agent.cfg, agent.tpm, agent.files, host=make_host(agent.cfg))
                _, samples = await scrape(verifier)
                assert value(samples, "devtrust_enrollments_total", outcome="refused") == 1
                assert value(samples, "devtrust_enrollments_total", outcome="enrolled") == 1

    asyncio.run(scenario())
    # The decision log line, with the JSON log format's fields (core/logsetup.py).
    lines = [r for r in caplog.records if r.getMessage().startswith("appraisal device=")]
    assert len(lines) == 3
    last = lines[1]
    assert last.__dict__["tier"] == "contraindicated"
    assert last.__dict__["zone"] == "lab"
    assert last.__dict__["findings"] == ["tpm.quote.qualifying_data_mismatch"]
    assert last.__dict__["certificate"] is None
    assert isinstance(lines[0].__dict__["certificate"], str)
    assert len(last.__dict__["device_id"]) == 64


def test_no_metrics_listen_serves_nothing(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    config = verifier_config(workdir, pki, endorsement_ca)
    assert config.metrics.listen == ""

    async def scenario() -> None:
        async with running(config) as verifier:
            assert verifier.attestation.metrics_service is None

    asyncio.run(scenario())


def test_a_metrics_port_in_use_is_a_config_error_naming_the_key(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = with_metrics(verifier_config(workdir, pki, endorsement_ca), f"127.0.0.1:{port}")

        async def scenario() -> None:
            async with running(config):
                pass

        with pytest.raises(
            ConfigError, match=rf"cannot listen on 127\.0\.0\.1:{port} \(metrics\.listen\)"
        ):
            asyncio.run(scenario())


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        pytest.param('{listen: "9471"}', r"metrics: listen: expected HOST:PORT", id="no-host"),
        pytest.param('{listen: "::1:9471"}', r"metrics: listen: .*without brackets", id="ipv6"),
        pytest.param(
            '{listen: "127.0.0.1:7444"}',
            r"metrics\.listen .* port of listen\.attestation",
            id="clash",
        ),
        pytest.param("{refresh_s: 0}", r"metrics: refresh_s: give 0\.1 to 3600", id="refresh"),
        pytest.param("{listen: 1}", r"metrics\.listen", id="not-text"),
    ],
)
def test_metrics_configuration_mistakes_name_their_key(
    tmp_path: Path, metrics: str, message: str
) -> None:
    path = tmp_path / "verifier.yaml"
    path.write_text(f"metrics: {metrics}\n")
    with pytest.raises(ConfigError, match=message):
        VerifierConfig.load(path)


def test_the_shipped_configuration_serves_metrics_on_loopback() -> None:
    shipped = Path(__file__).resolve().parent.parent / "packaging" / "config" / "verifier.yaml"
    config = VerifierConfig.load(shipped)
    assert config.metrics.listen == "127.0.0.1:9471"


# --- the agent's metrics ------------------------------------------------------------------


def test_the_agents_metrics_follow_its_results(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> Samples:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            agent.cfg = dataclasses.replace(
                agent.cfg, metrics=AgentMetricsConfig(listen="127.0.0.1:0")
            )
            got = asyncio.Event()
            client = agent.client(on_result=lambda _: got.set())
            stop = asyncio.Event()
            task = asyncio.create_task(client.run(stop))
            try:
                await asyncio.wait_for(got.wait(), 20)
                text = await asyncio.to_thread(scrape_text, client.metrics_port)
            finally:
                stop.set()
                await task
            assert client.metrics_port == 0  # the endpoint stops with the client
            samples: Samples = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            return samples

    samples = asyncio.run(scenario())
    assert value(samples, "devtrust_agent_tier", tier="affirming") == 1
    assert value(samples, "devtrust_agent_tier", tier="contraindicated") == 0
    assert ("devtrust_agent_tier", (("tier", "none"),)) in samples
    now = datetime.datetime.now(datetime.UTC).timestamp()
    assert now - 60 < value(samples, "devtrust_agent_last_result_timestamp_seconds") <= now
    # The device certificate issued with that result: 15 minutes (and 1 backdated).
    assert value(samples, "devtrust_agent_certificate_expiry_timestamp_seconds") > now + 600
    assert value(samples, "devtrust_agent_collection_seconds_count") >= 1
    assert ("devtrust_agent_reconnects_total", ()) in samples


def test_the_agent_without_metrics_does_not_load_the_library() -> None:
    """Memory-lean (bench/agent_footprint.py): prometheus_client only when metrics are on."""
    code = (
        "import sys, devtrust.agent.main, devtrust.agent.attest\n"
        "assert 'prometheus_client' not in sys.modules, 'loaded'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        pytest.param("9472", r"metrics: listen: expected HOST:PORT", id="no-host"),
        pytest.param("localhost:99999", r"metrics: listen: expected HOST:PORT", id="port"),
        pytest.param("::1:9472", r"metrics: listen: .*without brackets", id="ipv6"),
    ],
)
def test_agent_metrics_mistakes_name_their_key(tmp_path: Path, listen: str, message: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(f'metrics: {{listen: "{listen}"}}\n')
    with pytest.raises(ConfigError, match=message):
        AgentConfig.load(path)


def test_the_shipped_agent_configuration_has_metrics_off() -> None:
    shipped = Path(__file__).resolve().parent.parent / "packaging" / "config" / "agent.yaml"
    text = shipped.read_text()
    assert AgentConfig.load(shipped).metrics.listen == ""
    assert 'listen: "127.0.0.1:9472"' in text  # how to turn it on


# --- which evidence answers a posture change (the time to detection) ----------------------


def _appraise(actions: Sequence[object]) -> Appraise:
    [action] = [a for a in actions if isinstance(a, Appraise)]
    return action


def test_the_evidence_a_posture_note_brought_carries_the_notes_time() -> None:
    """A note in IDLE brings a challenge: its evidence's Appraise carries the note's time. A
    note while a challenge is out is answered by the next challenge, not by the evidence
    already asked for (it may predate the change): that evidence carries none."""
    timing = StreamTiming(interval_s=60.0, posture_min_interval_s=0.0, stream_challenge_gap_s=0.0)
    nonces = iter(Nonce(bytes([n]) * 32) for n in range(1, 10))
    protocol = StreamProtocol(timing, "d" * 64, nonces=lambda: next(nonces))
    protocol.feed(Opened(0.0))
    protocol.feed(HelloReceived(0.5))  # the first challenge, at once
    assert _appraise(protocol.feed(EvidenceReceived(1.0))).posture_noted is None
    protocol.feed(Appraised(1.1, rebooted=False))
    challenge = protocol.feed(PostureChanged(5.0))
    assert any(isinstance(a, SendChallenge) for a in challenge)
    assert _appraise(protocol.feed(EvidenceReceived(5.2))).posture_noted == 5.0
    protocol.feed(Appraised(5.3, rebooted=False))  # idle until 65.3
    assert any(isinstance(a, SendChallenge) for a in protocol.feed(Tick(65.3)))
    protocol.feed(PostureChanged(65.5))  # while the interval's challenge is out
    assert _appraise(protocol.feed(EvidenceReceived(66.0))).posture_noted is None
    after = protocol.feed(Appraised(66.1, rebooted=False))
    assert any(isinstance(a, SendResult) and a.challenge is not None for a in after)
    assert _appraise(protocol.feed(EvidenceReceived(66.5))).posture_noted == 65.5


# --- only a changed verdict times a detection (review 13a, M1) ------------------------------


def _result(tier: Tier, *finding_ids: str) -> TrustResult:
    now = datetime.datetime.now(datetime.UTC)
    claims = {
        Tier.AFFIRMING: {Claim.INSTANCE_IDENTITY: 2},
        Tier.WARNING: {Claim.INSTANCE_IDENTITY: 32},
        Tier.CONTRAINDICATED: {Claim.INSTANCE_IDENTITY: 96},
    }[tier]
    findings = tuple(
        Finding(id=f, severity=Severity.WARNING, claim=Claim.INSTANCE_IDENTITY, message=f)
        for f in finding_ids
    )
    result = TrustResult(
        device_id=DeviceId("d" * 64),
        claims=claims,
        findings=findings,
        appraised_at=now,
        expires_at=now + datetime.timedelta(hours=1),
    )
    assert result.tier is tier
    return result


def _decided(result: TrustResult, *, seen: bool = True) -> Decision:
    return Decision(
        device_id=result.device_id,
        zone="lab",
        result=result,
        previous_tier=None,
        certificate=None,
        withheld="",
        tpm=None,
        rebooted=False,
        seen=seen,
    )


def test_a_detection_is_a_changed_verdict_once_per_device_per_window() -> None:
    detections = Detections(window_s=600.0)
    good = _result(Tier.AFFIRMING)
    warned = _result(Tier.WARNING, "policy.unknown")
    other = _result(Tier.WARNING, "gpu.driver.security_bulletins")
    before = verdict_of(good)

    def detection(
        result: TrustResult, previous: Verdict | None, now: float, **kw: bool
    ) -> float | None:
        return detections.detection(
            _decided(result, **kw), noted=now - 1.0, previous=previous, now=now
        )

    # The same verdict again (tier and findings): a re-appraisal, not a detection.
    assert detection(good, before, 10.0) is None
    # No note, no previous verdict, or the agent's word that its TPM does not answer: none.
    assert detections.detection(_decided(warned), noted=None, previous=before, now=10.0) is None
    assert detection(warned, None, 10.0) is None
    assert detection(warned, before, 10.0, seen=False) is None
    # Another tier, or the same tier with other findings: a detection, timed from the note.
    assert detection(warned, before, 10.0) == 9.0
    assert detection(other, verdict_of(warned), 10.0) == 9.0
    # Once timed, the device's next one counts only after the window.
    detections.timed(good.device_id, 10.0)
    assert detection(good, verdict_of(warned), 20.0) is None
    assert detection(good, verdict_of(warned), 609.0) is None
    assert detection(good, verdict_of(warned), 611.0) == 610.0
    # Another device has a window of its own; entries are forgotten after it.
    assert (
        detections.detection(
            dataclasses.replace(_decided(warned), device_id=DeviceId("e" * 64)),
            noted=19.0,
            previous=before,
            now=20.0,
        )
        == 19.0
    )
    assert len(detections) == 0  # the window of 10.0 passed at 611.0


def test_only_a_note_whose_answer_changed_the_verdict_is_timed(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """On a real stream: notes answered with the verdict the device had are not timed; the
    one that changed it is; a change back within the window is not timed again."""
    tpm = swtpm_factory()
    config = with_metrics(verifier_config(workdir, pki, endorsement_ca, posture_min_interval_s=0.0))
    note = attestation_pb2.AgentMessage(
        posture_changed=attestation_pb2.PostureChanged(signals=["kernel_modules"])
    )

    async def scenario() -> None:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
            stream_channel(pki, verifier, agent.enrollment) as channel,
        ):
            call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=60)
            await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
            challenge = (await read_message(call)).challenge

            async def answer(*, good: bool) -> int:
                """Answer the challenge out, then send a note: its challenge."""
                nonlocal challenge
                quoted = None if good else bytes(32)
                evidence = await quote_evidence(agent, challenge, quoted_nonce=quoted)
                await call.write(attestation_pb2.AgentMessage(evidence=evidence))
                reply = await read_message(call)
                await call.write(note)
                challenge = (await read_message(call)).challenge
                return int(reply.result.trust.tier)

            timed = "devtrust_detection_seconds_count"
            assert await answer(good=True) == common_pb2.TIER_AFFIRMING  # no note yet
            # The note's answer: affirming again, nothing detected.
            assert await answer(good=True) == common_pb2.TIER_AFFIRMING
            _, samples = await scrape(verifier)
            assert value(samples, timed) == 0
            assert value(samples, "devtrust_appraisal_seconds_count") == 2
            # The next note's answer changes the verdict: one detection.
            assert await answer(good=False) == common_pb2.TIER_CONTRAINDICATED
            _, samples = await scrape(verifier)
            assert value(samples, timed) == 1
            # The same verdict again, then a change back within the window: neither.
            assert await answer(good=False) == common_pb2.TIER_CONTRAINDICATED
            assert await answer(good=True) == common_pb2.TIER_AFFIRMING
            _, samples = await scrape(verifier)
            assert value(samples, timed) == 1
            assert value(samples, "devtrust_appraisal_seconds_count") == 5
            call.cancel()

    asyncio.run(scenario())


# --- an endpoint off loopback is said in the log (review 13a, L5) ----------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),  # noqa: S104 - the check's own case
        ("::", False),
        ("10.1.2.3", False),
        ("metrics.example", False),
    ],
)
def test_loopback_hosts(host: str, expected: bool) -> None:
    assert loopback(host) is expected


def test_an_endpoint_off_loopback_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="devtrust.verifier.metrics")
    for listen in ("127.0.0.1:0", "0.0.0.0:0"):
        endpoint = serve(listen, CollectorRegistry())
        asyncio.run(endpoint.aclose())
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "0.0.0.0:0" in warning.getMessage()
    assert "no authentication" in warning.getMessage()
