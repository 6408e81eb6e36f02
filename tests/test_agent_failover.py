"""An agent with several verifier addresses (issue 12, C6), with real processes: the first
address dead, a verifier killed with kill -9 under the agent, every verifier gone while the
device certificate runs out.

Two `devtrust-verifier serve` processes share one SQLite file (as the workers of one verifier
do; PostgreSQL replicas have tests of their own); each has its own ports and its own log, which
says which one appraised what. The agent is the real attestation client over swtpm.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from devtrust.agent.attest import AttestationClient
from devtrust.agent.channel import VerifierError
from devtrust.agent.config import AgentConfig, TpmConfig, VerifierEndpoint
from devtrust.agent.enroll import enroll_retrying
from devtrust.agent.main import make_host, make_tpm
from devtrust.agent.messages import AttestationResult
from devtrust.agent.state import AgentFiles
from devtrust.agent.tpm import AsyncTpm
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA, Swtpm
from devtrust.swtpm.bootlog import header_only_log
from devtrust.verifier.pki import PkiFiles, init_pki
from tests.conftest import SwtpmFactory
from tests.env import running, verifier_config
from tests.verifier_process import VerifierProcess, write_config
from tests.verifier_process import verifier_process as shared_verifier_process

pytestmark = pytest.mark.swtpm

# The agent's backoff in these tests: the first wait after a stream that delivered a result
# is drawn from 0 to this.
RECONNECT_MIN_S = 0.5
BEHIND = -datetime.timedelta(seconds=50)


def dead_address() -> str:
    """A loopback address where nothing listens (bound, then closed: connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def verifier_process(
    directory: Path, database: Path, pki: PkiFiles, ek_ca: EndorsementCA, name: str
) -> Iterator[VerifierProcess]:
    """`devtrust-verifier serve` on ports 0 (it says which in its log), on ``database``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(
        directory / "verifier.yaml",
        pki,
        ek_ca,
        database=str(database),
        attestation={"interval_s": 2, "stream_challenge_gap_s": 0},
    )
    with shared_verifier_process(directory, config, name=name) as proc:
        yield proc


def agent_config(
    workdir: Path,
    pki: PkiFiles,
    tpm: Swtpm,
    *,
    enrollment: list[str],
    attestation: list[str],
    reconnect_min_s: float = RECONNECT_MIN_S,
) -> AgentConfig:
    return AgentConfig(
        verifier=VerifierEndpoint(
            enrollment=enrollment, attestation=attestation, ca_bundle=pki.ca_cert
        ),
        tpm=TpmConfig(tcti=tpm.tcti),
        state_dir=workdir / "agent" / "state",
        runtime_dir=workdir / "agent" / "run",
        event_log=header_only_log(workdir / "agent" / "event-log.bin"),
        gpu_source="none",
        rpc_timeout_s=10.0,
        reconnect_min_s=reconnect_min_s,
        reconnect_max_s=max(2.0, reconnect_min_s),
    )


@dataclass
class RunningAgent:
    client: AttestationClient
    results: list[AttestationResult]
    device_id: str
    cfg: AgentConfig


@contextlib.asynccontextmanager
async def attesting(
    cfg: AgentConfig, *, before_run: Callable[[], None] = lambda: None
) -> AsyncIterator[RunningAgent]:
    """Enroll (at the first enrollment address that answers), then attest until the end;
    ``before_run`` runs in between."""
    tpm: AsyncTpm = make_tpm(cfg)
    files = AgentFiles(cfg.state_dir, cfg.runtime_dir)
    stop = asyncio.Event()
    try:
        enrollment = await enroll_retrying(cfg, tpm, files, host=make_host(cfg), stop=stop)
        assert enrollment is not None
        before_run()
        results: list[AttestationResult] = []
        client = AttestationClient(
            cfg,
            tpm=tpm,
            host=make_host(cfg),
            files=files,
            enrollment=enrollment,
            on_result=results.append,
        )
        task = asyncio.create_task(client.run(stop))
        try:
            yield RunningAgent(client, results, enrollment.device_id, cfg)
        finally:
            stop.set()
            await task
    finally:
        tpm.close()


async def until(check: Callable[[], bool], what: str, limit_s: float) -> float:
    """Seconds until ``check`` held; fails the test after ``limit_s``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < limit_s, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def test_the_first_address_dead_the_agent_enrolls_and_attests_at_the_second(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> AttestationResult:
        async with running(config) as verifier:
            cfg = agent_config(
                workdir,
                pki,
                tpm,
                enrollment=[dead_address(), f"127.0.0.1:{verifier.enrollment_port}"],
                attestation=[dead_address(), f"localhost:{verifier.attestation_port}"],
            )
            async with attesting(cfg) as agent:
                await until(lambda: bool(agent.results), "a result", 20)
                first: AttestationResult = agent.results[0]
                return first

    result = asyncio.run(scenario())
    assert result.trust.tier is Tier.AFFIRMING
    assert result.certificate is not None


def test_each_record_of_a_name_is_dialled_by_address_and_tls_checks_the_name(
    workdir: Path, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """A server certificate that names only ``localhost`` (not 127.0.0.1): the agent resolves
    localhost, dials its record by IP address and still checks the name, so it attests; the
    same verifier configured by its IP address fails on the name, one line, no retry."""
    tpm = swtpm_factory()
    pki = init_pki(
        workdir / "pki-by-name",
        hostnames=["localhost"],
        now=datetime.datetime.now(datetime.UTC),
    )
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> tuple[AttestationResult, str]:
        async with running(config) as verifier:
            cfg = agent_config(
                workdir,
                pki,
                tpm,
                enrollment=[f"localhost:{verifier.enrollment_port}"],
                attestation=[f"localhost:{verifier.attestation_port}"],
            )
            async with attesting(cfg) as agent:
                await until(lambda: bool(agent.results), "a result", 20)
                first: AttestationResult = agent.results[0]
            by_ip = replace(
                cfg,
                verifier=replace(
                    cfg.verifier, attestation=[f"127.0.0.1:{verifier.attestation_port}"]
                ),
            )
            files = AgentFiles(by_ip.state_dir, by_ip.runtime_dir)
            enrollment = await files.load_enrollment()
            assert enrollment is not None
            atpm = make_tpm(by_ip)
            client = AttestationClient(
                by_ip, tpm=atpm, host=make_host(by_ip), files=files, enrollment=enrollment
            )
            try:
                with pytest.raises(VerifierError) as caught:
                    await asyncio.wait_for(client.run(asyncio.Event()), 20)
            finally:
                atpm.close()
            return first, str(caught.value)

    result, error = asyncio.run(scenario())
    assert result.trust.tier is Tier.AFFIRMING
    assert "the verifier's certificate does not name 127.0.0.1 (it names localhost)" in error
    assert "\n" not in error


def test_a_verifier_killed_under_the_agent_the_agent_moves_to_the_other(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    tpm = swtpm_factory()
    database = workdir / "shared.db"
    measured: dict[str, float] = {}

    async def scenario() -> None:
        with (
            verifier_process(workdir / "a", database, pki, endorsement_ca, "a") as a,
            verifier_process(workdir / "b", database, pki, endorsement_ca, "b") as b,
        ):
            cfg = agent_config(
                workdir,
                pki,
                tpm,
                enrollment=[f"127.0.0.1:{p.enrollment_port}" for p in (a, b)],
                attestation=[f"127.0.0.1:{p.attestation_port}" for p in (a, b)],
            )
            async with attesting(cfg) as agent:
                device = agent.device_id
                await until(lambda: len(a.appraisals(device)) >= 2, "two appraisals at a", 30)
                assert b.appraisals(device) == []
                results_before = len(agent.results)
                a.kill()
                measured["moved_s"] = await until(
                    lambda: bool(b.appraisals(device)), "an appraisal at b", 20
                )
                await until(lambda: len(agent.results) > results_before, "the agent's result", 10)
                assert b.appraisals(device)[0] == "affirming"
                assert agent.results[-1].trust.tier is Tier.AFFIRMING

    asyncio.run(scenario())
    print(f"attested at the other verifier {measured['moved_s']:.2f} s after kill -9")
    # The stream fails at once (the connection is reset); the wait before the next address is
    # at most reconnect_min_s (the backoff was reset by the results before); then one
    # handshake, Hello, a challenge and its appraisal.
    assert measured["moved_s"] < RECONNECT_MIN_S + 5.0


def test_a_verifier_drained_with_sigterm_sends_the_agent_to_the_other_at_once(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """SIGTERM: the verifier drains (C4) and ends the agent's stream with the drain trailer;
    the agent goes to the other verifier within the drain's second of jitter, not after its
    backoff (10 s here; tests/test_agent_failover_drain.py pins that exactly)."""
    tpm = swtpm_factory()
    database = workdir / "shared.db"
    measured: dict[str, float] = {}

    async def scenario() -> int | None:
        with (
            verifier_process(workdir / "a", database, pki, endorsement_ca, "a") as a,
            verifier_process(workdir / "b", database, pki, endorsement_ca, "b") as b,
        ):
            cfg = agent_config(
                workdir,
                pki,
                tpm,
                enrollment=[f"127.0.0.1:{p.enrollment_port}" for p in (a, b)],
                attestation=[f"127.0.0.1:{p.attestation_port}" for p in (a, b)],
                reconnect_min_s=10.0,
            )
            async with attesting(cfg) as agent:
                device = agent.device_id
                await until(lambda: len(a.appraisals(device)) >= 1, "an appraisal at a", 30)
                a.signal(signal.SIGTERM)  # it drains (C4) and exits
                measured["moved_s"] = await until(
                    lambda: bool(b.appraisals(device)), "an appraisal at b", 20
                )
                assert b.appraisals(device)[0] == "affirming"
                code = await asyncio.to_thread(a.wait, 30)
        return code

    code = asyncio.run(scenario())
    print(f"attested at the other verifier {measured['moved_s']:.2f} s after SIGTERM")
    assert code == 0
    assert measured["moved_s"] < 4.0


def test_the_certificate_is_served_until_it_expires_while_no_verifier_answers(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """Once the device is enrolled, the verifier's clock runs 50 s behind, so the shortest
    certificate it issues (60 s) ends 10 s from now. Then every verifier is gone: the agent
    moves between its two dead addresses with backoff, keeps serving the certificate, and
    deletes it at its expiry."""
    tpm = swtpm_factory()
    config = replace(
        verifier_config(workdir, pki, endorsement_ca),
        certificates=replace(
            verifier_config(workdir, pki, endorsement_ca).certificates, device_lifetime_s=60
        ),
    )

    offset = [datetime.timedelta(0)]

    def clock() -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + offset[0]

    seen: dict[str, object] = {}

    async def scenario() -> None:
        async with running(config, clock=clock) as verifier:
            cfg = agent_config(
                workdir,
                pki,
                tpm,
                enrollment=[f"127.0.0.1:{verifier.enrollment_port}"],
                attestation=[f"127.0.0.1:{verifier.attestation_port}", dead_address()],
            )
            async with attesting(cfg, before_run=lambda: offset.__setitem__(0, BEHIND)) as agent:
                cert_file = cfg.runtime_dir / "device.pem"
                key_file = cfg.runtime_dir / "device.key"
                await until(lambda: agent.client.certificate is not None, "a certificate", 20)
                cert = agent.client.certificate
                assert cert is not None
                await verifier.stop(grace=None)
                left = (
                    cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
                ).total_seconds()
                seen["left_s"] = left
                # Served while no verifier answers, across the agent's moves between addresses.
                await asyncio.sleep(max(0.0, left - 2.0))
                seen["served_before_expiry"] = cert_file.exists() and key_file.exists()
                seen["client_before_expiry"] = agent.client.certificate is not None
                gone = await until(lambda: not cert_file.exists(), "the certificate's removal", 10)
                seen["removed_after_s"] = left - 2.0 + gone
                seen["key_removed"] = not key_file.exists()
                seen["expired_at_removal"] = (
                    datetime.datetime.now(datetime.UTC) >= cert.not_valid_after_utc
                )

    asyncio.run(scenario())
    left, removed = seen["left_s"], seen["removed_after_s"]
    print(f"certificate: {left:.1f} s left at the outage, removed {removed:.1f} s into it")
    assert 3.0 < seen["left_s"] < 15.0  # type: ignore[operator]
    assert seen["served_before_expiry"] is True
    assert seen["client_before_expiry"] is True
    assert seen["key_removed"] is True
    assert seen["expired_at_removal"] is True
