"""A stream its client cancels while the verifier is still taking the device over (waiting
for an older stream, its decision in flight, or the device's lease) leaves nothing behind
(review 13a, M2): no entry in the open streams, the streams gauge back at 0, and a drain
does not wait on it. Before the fix the entry was registered before the ``try`` that
removes it: the gauge stayed at 1 and every drain ran to its deadline.

Real verifier, real mTLS client, a swtpm-backed enrolled device; the lease claim is held
(an event, not a sleep) so that the client cancels exactly there."""

from __future__ import annotations

import asyncio
from pathlib import Path

from devtrust.core.ids import DeviceId
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc
from devtrust.verifier.attest_service import AttestationService, _Live
from devtrust.verifier.pki import PkiFiles
from tests.conftest import SwtpmFactory
from tests.env import enrolled_agent, running, stream_channel, verifier_config
from tests.test_metrics import until, with_metrics


class _HeldLeases:
    """The store's leases, with every claim held until its stream is cancelled: ``entered``
    is set when a stream is waiting there."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def claim(self, device_id: DeviceId, owner: str) -> int:
        self.entered.set()
        await asyncio.Event().wait()  # until cancelled
        raise AssertionError("unreachable")


async def _streams_gone(service: AttestationService) -> int:
    """The open streams once the cancelled one had its chance to end (at most 20 s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20.0
    while service.open_streams and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return service.open_streams


def test_a_stream_cancelled_while_taking_over_leaves_no_phantom(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    tpm = swtpm_factory()
    config = with_metrics(verifier_config(workdir, pki, endorsement_ca))

    async def scenario() -> None:
        async with running(config) as verifier:
            service = verifier.attestation
            held = _HeldLeases()
            service._leases = held
            async with (
                enrolled_agent(workdir, pki, verifier, tpm) as agent,
                stream_channel(pki, verifier, agent.enrollment) as channel,
            ):
                call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=30)
                await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
                await asyncio.wait_for(held.entered.wait(), 20)
                # Registered, waiting for the lease: the client gives up there.
                assert service.open_streams == 1
                await until(verifier, "devtrust_attestation_streams", 1)
                call.cancel()
                assert await _streams_gone(service) == 0
                await until(verifier, "devtrust_attestation_streams", 0)
            # Nothing to wait for: a drain with a deadline ten minutes away returns at once
            # (the guard below only turns a hang into a failure).
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(service.drain(loop.time() + 600.0), 30)

    asyncio.run(scenario())


def test_a_drain_does_not_wait_on_a_finished_streams_entry(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """Whatever leaves an entry behind, a drain skips an entry whose task is done instead of
    spinning on it until its deadline."""
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> None:
        async with running(config) as verifier:
            service = verifier.attestation
            done = asyncio.ensure_future(asyncio.sleep(0))
            await done
            service._live["phantom"] = _Live(done)
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(service.drain(loop.time() + 600.0), 30)

    asyncio.run(scenario())
