"""Deadlines and keepalives on every call (issue 12): a unary call that overruns the
server's bound (server.call_timeout_s) ends DEADLINE_EXCEEDED whatever deadline its client
set; a client that opens a stream and says nothing is cut off (the Hello timeout); a peer
gone silent under an idle stream (a dead host: no byte, no ping answer) is dropped by HTTP/2
keepalive (server.keepalive_s, keepalive_timeout_s)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from devtrust.core.errors import ConfigError
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import attestation_pb2_grpc, query_pb2
from devtrust.verifier.config import ServerConfig, VerifierConfig
from devtrust.verifier.pki import PkiFiles
from tests.conftest import SwtpmFactory
from tests.env import (
    channel_credentials,
    enrolled_agent,
    operator_stub,
    running,
    stream_channel,
    verifier_config,
)
from tests.test_drain import answered, challenged


def test_a_unary_call_that_overruns_the_servers_bound_gets_deadline_exceeded(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """Another connection holds the database's write lock: the operator's CreateBootstrapToken
    waits for it. The client allows 30 s; the verifier ends the call after its own bound (1 s)
    with DEADLINE_EXCEEDED naming server.call_timeout_s, and serves the next call once the
    lock is released."""
    config = replace(
        verifier_config(workdir, pki, endorsement_ca), server=ServerConfig(call_timeout_s=1.0)
    )
    request = query_pb2.CreateBootstrapTokenRequest(zone="lab", ttl_s=3600)

    async def scenario() -> float:
        async with running(config) as verifier:
            channel, stub = operator_stub(pki, verifier, workdir)
            lock = sqlite3.connect(config.database, isolation_level=None)
            try:
                lock.execute("BEGIN IMMEDIATE")
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as overran:
                    await stub.CreateBootstrapToken(request, timeout=30)
                elapsed = time.monotonic() - started
                assert overran.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "server.call_timeout_s" in (overran.value.details() or "")
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            token = await stub.CreateBootstrapToken(request, timeout=30)
            assert token.token
            await channel.close()
            return elapsed

    elapsed = asyncio.run(scenario())
    assert 0.9 <= elapsed < 3.0, elapsed


def test_a_stream_that_says_nothing_is_cut_off(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """A device opens its stream and never sends Hello: the verifier ends it after
    attestation.hello_timeout_s (1 s here), FAILED_PRECONDITION."""
    config = verifier_config(workdir, pki, endorsement_ca, hello_timeout_s=1.0)

    async def scenario() -> float:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
            stream_channel(pki, verifier, agent.enrollment) as channel,
        ):
            started = time.monotonic()
            call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=60)
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await call.read()
            assert cut.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "no Hello within 1.0s" in (cut.value.details() or "")
            return time.monotonic() - started

    assert asyncio.run(scenario()) < 5.0


class FreezingProxy:
    """A TCP relay to the verifier that can go silent: once frozen it forwards nothing either
    way and keeps both connections open, as a dead host or a dropped route does."""

    def __init__(self, target: int) -> None:
        self._target = target
        self.frozen = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                if self.frozen:
                    await asyncio.Event().wait()  # silent until closed
                dst.write(data)
                await dst.drain()
        dst.close()


def test_a_peer_gone_silent_under_an_idle_stream_is_dropped_by_keepalive(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """The device's stream goes through a relay; after one appraisal the stream is idle
    (its next challenge 30 s away) and the relay goes silent. The verifier's keepalive ping
    (after 1 s) gets no answer within 1 s: it drops the connection, and the stream with it,
    within a few seconds rather than at the next challenge."""
    config = replace(
        verifier_config(workdir, pki, endorsement_ca),
        server=ServerConfig(keepalive_s=1.0, keepalive_timeout_s=1.0),
    )

    async def scenario() -> float:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            proxy = FreezingProxy(verifier.attestation_port)
            port = await proxy.start()
            creds = channel_credentials(
                pki,
                key_pem=agent.enrollment.channel_key_pem,
                cert_pem=agent.enrollment.channel_cert_pem,
            )
            # The relay's address in the URL; the server certificate names 127.0.0.1.
            channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)
            try:
                call, challenge = await challenged(channel)
                await answered(call, agent, challenge)
                assert verifier.attestation.open_streams == 1
                proxy.frozen = True
                started = time.monotonic()
                while verifier.attestation.open_streams:
                    assert time.monotonic() - started < 15, "the silent peer's stream stays"
                    await asyncio.sleep(0.1)
                elapsed = time.monotonic() - started
                call.cancel()
            finally:
                await channel.close(grace=None)
                await proxy.close()
            return elapsed

    assert asyncio.run(scenario()) < 8.0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("drain_s", 0, "drain_s: give 0.5 to 600 seconds, got 0.0"),
        ("call_timeout_s", -1, "call_timeout_s: give 1 to 3600 seconds, got -1.0"),
        ("keepalive_s", 0.5, "keepalive_s: give 1 to 7200 seconds, got 0.5"),
        ("keepalive_timeout_s", ".nan", "keepalive_timeout_s: give 1 to 600 seconds, got nan"),
        ("store_probe_s", 1e9, "store_probe_s: give 0.1 to 600 seconds, got 1000000000.0"),
        ("drain_s", "ten", "expected float, got 'ten'"),
    ],
)
def test_the_servers_timing_keys_are_checked(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    """A bad bound is refused at load with one line naming the key, never a traceback at
    the first drain or call."""
    path = tmp_path / "verifier.yaml"
    path.write_text(f"server:\n  {key}: {value}\n")
    with pytest.raises(ConfigError) as refused:
        VerifierConfig.load(path)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)
