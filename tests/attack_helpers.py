"""Helpers shared by the attack tests (tests/test_attacks_*.py)."""

from __future__ import annotations

import asyncio

import grpc

from devtrust.v1 import attestation_pb2
from tests.env import AttestStream


async def _flood(
    call: AttestStream,
    note: attestation_pb2.AgentMessage,
    count: int,
    reading: asyncio.Future[object],
) -> None:
    for _ in range(count):
        try:
            await call.write(note)
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
            break  # the verifier ended the call: its status comes with the pending read
    await asyncio.wait_for(reading, 10)
