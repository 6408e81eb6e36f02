"""SIGTERM drains a real `devtrust-verifier serve` process (issue 12, C4): one process, and a
parent with two workers (the parent passes SIGTERM on and waits). Health watchers see
NOT_SERVING, open attestation streams end with UNAVAILABLE and ``devtrust-drain: 1``, the
real agent's results are all in the store, and the process exits within server.drain_s."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtrust.agent.messages import AttestationResult
from devtrust.swtpm import EndorsementCA
from devtrust.verifier.pki import PkiFiles
from tests.conftest import SwtpmFactory
from tests.env import enrolled_agent, stream_channel
from tests.test_drain import answered, challenged, drained, end_of
from tests.test_workers import agent_creds, channel_to
from tests.verifier_process import (
    stored_appraisals,
    stored_serials,
    verifier_process,
    write_config,
)

DRAIN_S = 5.0
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_sigterm_drains_a_verifier_process(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """Device A runs the real attestation client; device B holds a stream by hand, between
    challenges, and a health watch. SIGTERM: the watch says NOT_SERVING, B's stream ends
    with the drain's status, the process exits 0 within the drain's bound, and every result
    either device received is in the store (A's certificates among its live ones)."""
    database = str(workdir / "verifier.db")
    config = write_config(
        workdir / "verifier.yaml",
        pki,
        endorsement_ca,
        database=database,
        server={"drain_s": DRAIN_S},
    )
    with verifier_process(workdir, config) as proc:
        results: list[AttestationResult] = []

        async def scenario() -> tuple[float, str, str, str]:
            async with (
                enrolled_agent(workdir, pki, proc.verifier, swtpm_factory(), "a") as a,
                enrolled_agent(workdir, pki, proc.verifier, swtpm_factory(), "b") as b,
                stream_channel(pki, proc.verifier, b.enrollment) as channel,
            ):
                got = asyncio.Event()

                def on_result(result: AttestationResult) -> None:
                    results.append(result)
                    got.set()

                stop = asyncio.Event()
                client = asyncio.create_task(a.client(on_result=on_result).run(stop))
                try:
                    watch = health_pb2_grpc.HealthStub(channel).Watch(
                        health_pb2.HealthCheckRequest(service=""), timeout=60
                    )
                    first = await asyncio.wait_for(watch.read(), 10)
                    assert first.status == health_pb2.HealthCheckResponse.SERVING
                    call, challenge = await challenged(channel)
                    reply = await answered(call, b, challenge)
                    await asyncio.wait_for(got.wait(), 30)
                    started = time.monotonic()
                    proc.signal(signal.SIGTERM)
                    status = await asyncio.wait_for(watch.read(), 10)
                    assert status.status == NOT_SERVING
                    ended = await end_of(call)
                    assert drained(ended), ended
                    code = await asyncio.to_thread(proc.wait, DRAIN_S + 10)
                    elapsed = time.monotonic() - started
                    assert code == 0, proc.text()
                finally:
                    stop.set()
                    await client
                return (
                    elapsed,
                    a.enrollment.device_id,
                    b.enrollment.device_id,
                    reply.result.trust.evidence_digest,
                )

        elapsed, device_a, device_b, digest_b = asyncio.run(scenario())
    assert elapsed < DRAIN_S + 2.0, elapsed
    log = proc.text()
    assert "drained in" in log, log
    assert "Traceback" not in log, log
    stored_a = asyncio.run(stored_appraisals(database, device_a))
    assert len(stored_a) >= len(results) >= 1
    received = {r.certificate.serial for r in results if r.certificate is not None}
    assert received
    assert received <= asyncio.run(stored_serials(database, device_a))
    stored_b = asyncio.run(stored_appraisals(database, device_b))
    assert [d["evidence_digest"] for d in stored_b] == [digest_b]


def test_sigterm_to_the_parent_drains_every_worker(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """Two workers, a device's stream on each. SIGTERM to the parent: both streams end with
    the drain's status, both workers drain, and the parent exits 0 within the bound."""
    database = str(workdir / "verifier.db")
    config = write_config(
        workdir / "verifier.yaml",
        pki,
        endorsement_ca,
        database=database,
        server={"drain_s": DRAIN_S},
    )
    with verifier_process(workdir, config, extra=("--workers", "2")) as proc:

        async def scenario() -> float:
            async with (
                enrolled_agent(workdir, pki, proc.verifier, swtpm_factory(), "a") as a,
                enrolled_agent(workdir, pki, proc.verifier, swtpm_factory(), "b") as b,
            ):
                calls = []
                channels: list[grpc.aio.Channel] = []
                try:
                    for worker, agent in enumerate((a, b)):
                        channel = await channel_to(
                            worker, proc.attestation_port, agent_creds(pki, agent)
                        )
                        channels.append(channel)
                        call, challenge = await challenged(channel)
                        await answered(call, agent, challenge)
                        calls.append(call)
                    started = time.monotonic()
                    proc.signal(signal.SIGTERM)
                    for call in calls:
                        ended = await end_of(call)
                        assert drained(ended), ended
                    code = await asyncio.to_thread(proc.wait, DRAIN_S + 15)
                    assert code == 0, proc.text()
                    return time.monotonic() - started
                finally:
                    for channel in channels:
                        await channel.close()

        elapsed = asyncio.run(scenario())
    assert elapsed < DRAIN_S + 3.0, elapsed
    log = proc.text()
    assert log.count("drained in") == 2, log
    assert "Traceback" not in log, log
