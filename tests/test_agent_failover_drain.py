"""The agent's side of a drain (issue 12, C4) and of a verifier that refuses: two scripted
verifiers (grpc.aio servers on loopback with real mTLS, tests/test_agent_client.py), the real
attestation client with a TPM double, configured with both addresses.

A drain (UNAVAILABLE with trailing metadata ``devtrust-drain: 1``) sends the agent to the next
address at once, within a second of jitter and without backoff; UNAVAILABLE without the
trailer sends it there after its backoff; a stream that ends cleanly is reopened at the same
address.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc

from devtrust.agent.attest import AttestationClient
from devtrust.agent.backoff import Backoff
from devtrust.agent.config import AgentConfig, VerifierEndpoint
from devtrust.agent.messages import AttestationResult
from devtrust.agent.state import MemoryFiles
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc
from devtrust.verifier.pki import PkiFiles
from tests.agent_parts import FakeTpm, recorded_host
from tests.test_agent_client import (
    Peer,
    Script,
    ScriptedVerifier,
    affirming,
    challenge,
    enrollment,
)

# Any backoff wait in these tests is this long: an agent that reconnects sooner did not back
# off.
BACKOFF_S = 30.0


@asynccontextmanager
async def scripted(
    pki: PkiFiles, scripts: list[Script]
) -> AsyncIterator[tuple[ScriptedVerifier, int]]:
    verifier = ScriptedVerifier(scripts)
    server = grpc.aio.server()
    attestation_pb2_grpc.add_AttestationServicer_to_server(verifier, server)
    creds = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield verifier, port
    finally:
        await server.stop(None)


async def run_client(
    pki: PkiFiles,
    tmp_path: Path,
    first: list[Script],
    second: list[Script],
    *,
    until: asyncio.Event,
    backoff_s: float = BACKOFF_S,
) -> tuple[ScriptedVerifier, ScriptedVerifier, list[AttestationResult]]:
    """The client with both addresses until ``until``; each backoff wait is ``backoff_s``."""
    results: list[AttestationResult] = []
    async with AsyncExitStack() as stack:
        a, port_a = await stack.enter_async_context(scripted(pki, first))
        b, port_b = await stack.enter_async_context(scripted(pki, second))
        addresses = [f"127.0.0.1:{port_a}", f"localhost:{port_b}"]
        cfg = AgentConfig(
            verifier=VerifierEndpoint(
                enrollment=addresses, attestation=addresses, ca_bundle=pki.ca_cert
            ),
            state_dir=tmp_path / "state",
            runtime_dir=tmp_path / "run",
            rpc_timeout_s=5.0,
        )
        client = AttestationClient(
            cfg,
            tpm=FakeTpm(),
            host=recorded_host(),
            files=MemoryFiles(),
            enrollment=enrollment(pki),
            on_result=results.append,
            backoff=Backoff(min_s=backoff_s, max_s=backoff_s, uniform=lambda low, high: high),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(client.run(stop))
        try:
            await asyncio.wait_for(until.wait(), 20)
        finally:
            stop.set()
            await task
    for verifier in (a, b):
        if verifier.error is not None:
            raise verifier.error
    return a, b, results


def test_a_drain_sends_the_agent_to_the_next_address_at_once(pki: PkiFiles, tmp_path: Path) -> None:
    ended: list[float] = []
    arrived: list[float] = []
    done = asyncio.Event()

    async def drains(peer: Peer) -> None:
        nonce = os.urandom(32)
        assert (await peer.evidence(challenge(nonce))).nonce == nonce
        await peer.write(attestation_pb2.VerifierMessage(result=affirming()))
        ended.append(time.monotonic())
        await peer.abort(
            grpc.StatusCode.UNAVAILABLE,
            "verifier draining: reconnect to another verifier",
            (("devtrust-drain", "1"),),
        )

    async def serves(peer: Peer) -> None:
        arrived.append(time.monotonic())
        nonce = os.urandom(32)
        assert (await peer.evidence(challenge(nonce))).nonce == nonce
        done.set()

    a, b, results = asyncio.run(run_client(pki, tmp_path, [drains], [serves], until=done))
    assert (a.streams, b.streams) == (1, 1)
    assert len(results) == 1
    # At most the drain's second of jitter (and a handshake): no 30 s backoff.
    assert arrived[0] - ended[0] < 1.5


def test_unavailable_without_the_trailer_is_a_failure_the_agent_backs_off_from(
    pki: PkiFiles, tmp_path: Path
) -> None:
    """The same refusal without ``devtrust-drain: 1``: the agent moves on, but after its
    backoff (here a fixed 30 s), so the second verifier is not reached within the test's
    few seconds. The drain's haste depends on the trailer, not on the status alone."""
    refused = asyncio.Event()

    async def refuses(peer: Peer) -> None:
        refused.set()
        await peer.abort(grpc.StatusCode.UNAVAILABLE, "verifier shutting down", ())

    async def never(peer: Peer) -> None:
        raise AssertionError("reached the second verifier without backing off")

    async def scenario() -> tuple[ScriptedVerifier, ScriptedVerifier]:
        wait = asyncio.Event()

        async def later() -> None:
            await refused.wait()
            await asyncio.sleep(2.0)
            wait.set()

        helper = asyncio.create_task(later())
        a, b, _ = await run_client(pki, tmp_path, [refuses], [never], until=wait)
        await helper
        return a, b

    a, b = asyncio.run(scenario())
    assert (a.streams, b.streams) == (1, 0)


def test_a_stream_ended_cleanly_is_reopened_at_the_same_address(
    pki: PkiFiles, tmp_path: Path
) -> None:
    done = asyncio.Event()

    async def closes(peer: Peer) -> None:
        nonce = os.urandom(32)
        await peer.evidence(challenge(nonce))
        await peer.write(attestation_pb2.VerifierMessage(result=affirming()))

    async def serves(peer: Peer) -> None:
        await peer.evidence(challenge(os.urandom(32)))
        done.set()

    a, b, _ = asyncio.run(
        run_client(pki, tmp_path, [closes, serves], [], until=done, backoff_s=0.05)
    )
    assert (a.streams, b.streams) == (2, 0)
