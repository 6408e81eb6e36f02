"""The verifier drains (issue 12, C4): health NOT_SERVING, each attestation stream ended once
no evidence is outstanding on it (its decision stored and answered) with UNAVAILABLE and the
trailer ``devtrust-drain: 1``, new streams refused the same way, then it stops within
server.drain_s. In process here (RunningVerifier.drain, what SIGTERM runs), with real
swtpm-backed devices over real mTLS; tests/test_drain_process.py sends SIGTERM to real
processes."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtrust.swtpm import EndorsementCA
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc, query_pb2
from devtrust.verifier.attest_service import DRAIN_DETAILS
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.server import RunningVerifier
from devtrust.verifier.storage import open_sqlite
from tests.conftest import SwtpmFactory
from tests.env import (
    Agent,
    AttestStream,
    enrolled_agent,
    operator_stub,
    quote_evidence,
    read_message,
    running,
    stream_channel,
    verifier_config,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def drained(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the call ended as a drain ends it: UNAVAILABLE, the drain's details, the
    trailer."""
    trailer = dict(exc.trailing_metadata() or ())
    return (
        exc.code() == grpc.StatusCode.UNAVAILABLE
        and exc.details() == DRAIN_DETAILS
        and trailer.get("devtrust-drain") == "1"
    )


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def challenged(channel: grpc.aio.Channel) -> tuple[AttestStream, attestation_pb2.Challenge]:
    """A stream opened with Hello, and its first challenge."""
    call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=60)
    await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
    first = await read_message(call)
    assert first.HasField("challenge"), first
    return call, first.challenge


async def answered(
    call: AttestStream, agent: Agent, challenge: attestation_pb2.Challenge
) -> attestation_pb2.VerifierMessage:
    await call.write(attestation_pb2.AgentMessage(evidence=await quote_evidence(agent, challenge)))
    reply = await read_message(call)
    assert reply.HasField("result"), reply
    return reply


async def end_of(call: AttestStream) -> grpc.aio.AioRpcError:
    """The error the stream ends with (its next read)."""
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(call.read(), 15)
    return ended.value


def stored(database: Path, device_id: str) -> tuple[int, int | None]:
    """The device's stored appraisals (audit entries) and its latest stored score."""

    async def read() -> tuple[int, int | None]:
        repos = await open_sqlite(database, read_only=True)
        try:
            rows = await repos.engine.read(
                lambda db: db.execute(
                    "SELECT COUNT(*) FROM audit WHERE event = 'appraisal' AND device_id = ?",
                    (device_id,),
                ).fetchone()
            )
            latest = await repos.trust.latest(device_id)  # type: ignore[arg-type]
            return int(rows[0]), latest.score if latest is not None else None
        finally:
            await repos.close()

    return asyncio.run(read())


def test_a_drain_answers_the_evidence_outstanding_then_tells_the_stream_to_reconnect(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """A device's challenge is out when the drain starts. Health says NOT_SERVING at once
    for every name; a new stream is refused with the drain's status; the outstanding
    evidence is appraised, stored and answered (without a next challenge), then the stream
    ends with UNAVAILABLE and the trailer; the verifier stops well within the bound. What the
    device received is what the store holds."""
    config = verifier_config(workdir, pki, endorsement_ca)
    received: list[attestation_pb2.Result] = []

    async def scenario() -> tuple[float, str]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
            stream_channel(pki, verifier, agent.enrollment) as channel,
        ):
            device = agent.enrollment.device_id
            assert await health_of(channel) == SERVING
            call, challenge = await challenged(channel)
            started = time.monotonic()
            drain = asyncio.create_task(verifier.drain(10.0))
            await asyncio.sleep(0.2)
            for name in ("", "devtrust.v1.Attestation", "devtrust.v1.Query"):
                assert await health_of(channel, name) == NOT_SERVING, name
            refused = await end_of(attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=10))
            assert drained(refused), refused
            assert not drain.done()  # it waits for the evidence outstanding
            reply = await answered(call, agent, challenge)
            assert not reply.HasField("challenge")  # no new work on a draining stream
            received.append(reply.result)
            ended = await end_of(call)
            assert drained(ended), ended
            await asyncio.wait_for(drain, 10)
            assert verifier.stopped
            return time.monotonic() - started, device

    elapsed, device = asyncio.run(scenario())
    assert elapsed < 5.0, elapsed
    (result,) = received
    assert stored(Path(config.database), device) == (1, result.trust.score)


def test_a_drain_ends_idle_streams_at_once(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """Two devices: one stream between challenges (its next one 30 s away), one that has
    not sent Hello. Both end with the drain's status at once, and the drain is over in a
    fraction of its bound."""
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> float:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory(), "a") as a,
            enrolled_agent(workdir, pki, verifier, swtpm_factory(), "b") as b,
            stream_channel(pki, verifier, a.enrollment) as to_a,
            stream_channel(pki, verifier, b.enrollment) as to_b,
        ):
            call, challenge = await challenged(to_a)
            await answered(call, a, challenge)
            silent = attestation_pb2_grpc.AttestationStub(to_b).Attest(timeout=60)
            await _open(verifier, 2)
            started = time.monotonic()
            await verifier.drain(10.0)
            elapsed = time.monotonic() - started
            for stream in (call, silent):
                ended = await end_of(stream)
                assert drained(ended), ended
            return elapsed

    assert asyncio.run(scenario()) < 2.0


def test_a_stream_whose_evidence_never_comes_is_ended_at_the_bound(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """A device that was challenged and never answers does not hold the drain past its
    bound: its stream is ended with the drain's status, and the drain returns within the
    bound (2 s here; its evidence timeout is 30 s)."""
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> float:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
            stream_channel(pki, verifier, agent.enrollment) as channel,
        ):
            call, _ = await challenged(channel)
            started = time.monotonic()
            await verifier.drain(2.0)
            elapsed = time.monotonic() - started
            ended = await end_of(call)
            assert drained(ended), ended
            return elapsed

    elapsed = asyncio.run(scenario())
    assert 1.0 <= elapsed <= 2.5, elapsed


async def _open(verifier: RunningVerifier, count: int) -> None:
    """Wait until the verifier holds ``count`` streams (registered after their first read
    of the store)."""
    for _ in range(200):
        if verifier.attestation.open_streams == count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{verifier.attestation.open_streams} streams open, not {count}")


def test_a_unary_call_in_flight_finishes_before_the_verifier_stops(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """An operator's call is waiting for the database (another connection holds its write
    lock) when the drain starts: the drain waits for it, the call succeeds once the lock is
    released, then the verifier stops."""
    config = verifier_config(workdir, pki, endorsement_ca)
    request = query_pb2.CreateBootstrapTokenRequest(zone="lab", ttl_s=3600)

    async def scenario() -> None:
        async with running(config) as verifier:
            channel, stub = operator_stub(pki, verifier, workdir)
            lock = sqlite3.connect(config.database, isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
            try:
                call = asyncio.ensure_future(stub.CreateBootstrapToken(request, timeout=30))
                while verifier.calls is None or verifier.calls.count == 0:
                    await asyncio.sleep(0.01)
                drain = asyncio.create_task(verifier.drain(10.0))
                await asyncio.sleep(1.0)
                assert not call.done()
                assert not drain.done()
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            token = await asyncio.wait_for(call, 10)
            assert token.token
            await asyncio.wait_for(drain, 10)
            assert verifier.stopped
            await channel.close()

    asyncio.run(scenario())
