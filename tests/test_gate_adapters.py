"""The gate where servers meet their peers (issue 10, item 6): grpc.aio and grpc servers over
real mTLS on loopback, an asyncio TLS server, and the revocation follower against a small
Revocations servicer on loopback that sends a snapshot, live revocations and drops its stream.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.core.tier import Tier
from devtrust.gate import (
    CURRENT_DECISION,
    AioGateInterceptor,
    Bundle,
    Gate,
    GateInterceptor,
    GatePolicy,
    Reason,
)
from devtrust.gate.follower import Backoff, FeedEntry, RevocationFollower, entry_from_wire
from devtrust.v1 import query_pb2, query_pb2_grpc
from devtrust.verifier.ca import CertificateAuthority, pem, private_key_pem
from tests.test_gate import DEVICE, NOW, TD, device_cert

ZONE = "production-inference"


@dataclass(frozen=True)
class Peer:
    key_pem: bytes
    cert_pem: bytes
    cert: x509.Certificate


@dataclass(frozen=True)
class Tls:
    server_ca: CertificateAuthority
    device_ca: CertificateAuthority
    server: Peer
    good: Peer  # a device of the allowed zone
    elsewhere: Peer  # a device of another zone

    @property
    def gate(self) -> Gate:
        policy = GatePolicy(
            bundle=Bundle((self.device_ca.cert,)),
            min_tier=Tier.WARNING,
            zones=frozenset({ZONE}),
            trust_domain=TD,
        )
        return Gate(policy)


def _device(ca: CertificateAuthority, zone: str) -> Peer:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = device_cert(ca, zone=zone, key=key)
    return Peer(private_key_pem(key), pem(cert), cert)


@pytest.fixture(scope="module")
def tls() -> Tls:
    server_ca = CertificateAuthority.create(common_name="devtrust verifier CA", now=NOW)
    device_ca = CertificateAuthority.create(common_name="devtrust device CA", now=NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = server_ca.issue_server(
        hostnames=["127.0.0.1"],
        public_key=key.public_key(),
        now=NOW,
        lifetime=datetime.timedelta(1),
    )
    return Tls(
        server_ca=server_ca,
        device_ca=device_ca,
        server=Peer(private_key_pem(key), pem(cert), cert),
        good=_device(device_ca, ZONE),
        elsewhere=_device(device_ca, "model-development"),
    )


def _server_credentials(tls: Tls) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(tls.server.key_pem, tls.server.cert_pem)],
        root_certificates=pem(tls.device_ca.cert),
        require_client_auth=True,
    )


def _client_credentials(tls: Tls, peer: Peer) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(pem(tls.server_ca.cert), peer.key_pem, peer.cert_pem)


def _served() -> bytes:
    decision = CURRENT_DECISION.get()
    assert decision is not None
    assert decision.allow
    return f"served {decision.device_id}".encode()


# --- grpc.aio -----------------------------------------------------------------------------

OPEN = "/test.Gated/Open"


async def _unary(request: bytes, context: Any) -> bytes:
    return _served()


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(2):
        yield _served()


def _sync_unary(request: bytes, context: Any) -> bytes:
    return _served()


def _sync_stream(request: bytes, context: Any) -> Iterator[bytes]:
    yield _served()
    yield _served()


async def _open(request: bytes, context: Any) -> bytes:
    return b"open"


AIO_METHODS: dict[str, Callable[..., Any]] = {
    "Unary": _unary,
    "Stream": _stream,
    "SyncUnary": _sync_unary,
    "SyncStream": _sync_stream,
    "Open": _open,
}


def _handlers(methods: dict[str, Callable[..., Any]]) -> grpc.GenericRpcHandler:
    # Raw bytes in and out: no serializers.
    return grpc.method_handlers_generic_handler(
        "test.Gated",
        {
            name: (
                grpc.unary_stream_rpc_method_handler(fn)
                if "Stream" in name
                else grpc.unary_unary_rpc_method_handler(fn)
            )
            for name, fn in methods.items()
        },
    )


async def _call(channel: grpc.aio.Channel, name: str) -> list[bytes]:
    method = f"/test.Gated/{name}"
    if "Stream" in name:
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(method)
        return [r async for r in stream(b"", timeout=10)]
    unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
    return [await unary(b"", timeout=10)]


def test_the_grpc_aio_interceptor_gates_every_kind_of_handler(tls: Tls) -> None:
    asyncio.run(_aio_interceptor(tls))


async def _aio_interceptor(tls: Tls) -> None:
    server = grpc.aio.server(interceptors=[AioGateInterceptor(tls.gate, exempt={OPEN})])
    server.add_generic_rpc_handlers([_handlers(AIO_METHODS)])
    port = server.add_secure_port("127.0.0.1:0", _server_credentials(tls))
    await server.start()
    try:
        target = f"127.0.0.1:{port}"
        async with grpc.aio.secure_channel(target, _client_credentials(tls, tls.good)) as ok:
            for name in ("Unary", "Stream", "SyncUnary", "SyncStream"):
                expected = 2 if "Stream" in name else 1
                assert await _call(ok, name) == [f"served {DEVICE}".encode()] * expected, name
        async with grpc.aio.secure_channel(target, _client_credentials(tls, tls.elsewhere)) as no:
            for name in ("Unary", "Stream", "SyncUnary", "SyncStream"):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _call(no, name)
                assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED, name
                details = refused.value.details() or ""
                assert details.startswith("gate.zone: "), (name, details)
                assert DEVICE in details
                assert "'model-development'" in details
            assert await _call(no, "Open") == [b"open"]  # exempt
    finally:
        await server.stop(None)


# --- grpc (synchronous) -------------------------------------------------------------------


def test_the_grpc_interceptor_gates_a_synchronous_server(tls: Tls) -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[GateInterceptor(tls.gate)]
    )
    server.add_generic_rpc_handlers([_handlers({"Unary": _sync_unary, "Stream": _sync_stream})])
    port = server.add_secure_port("127.0.0.1:0", _server_credentials(tls))
    server.start()
    try:
        target = f"127.0.0.1:{port}"

        channels: list[grpc.Channel] = []

        def calls(peer: Peer) -> list[Callable[[], object]]:
            channel = grpc.secure_channel(target, _client_credentials(tls, peer))
            channels.append(channel)
            unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/test.Gated/Unary"
            )
            stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
                "/test.Gated/Stream"
            )
            return [lambda: unary(b"", timeout=10), lambda: list(stream(b"", timeout=10))]

        unary, stream = calls(tls.good)
        assert unary() == f"served {DEVICE}".encode()
        assert stream() == [f"served {DEVICE}".encode()] * 2
        for call in calls(tls.elsewhere):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            error: Any = refused.value
            assert error.code() is grpc.StatusCode.PERMISSION_DENIED
            assert error.details().startswith("gate.zone: ")
        for channel in channels:
            channel.close()
    finally:
        server.stop(None)


# --- any Python TLS server ----------------------------------------------------------------


def test_the_tls_adapter_gates_an_asyncio_server(tls: Tls, tmp_path: Path) -> None:
    asyncio.run(_tls_server(tls, tmp_path))


async def _tls_server(tls: Tls, tmp_path: Path) -> None:
    def write(name: str, data: bytes) -> str:
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(
        write("server.pem", tls.server.cert_pem), write("server.key", tls.server.key_pem)
    )
    server_context.load_verify_locations(write("devices.pem", pem(tls.device_ca.cert)))
    server_context.verify_mode = ssl.CERT_REQUIRED
    gate = tls.gate

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{gate.check_tls(writer.get_extra_info('ssl_object'))}\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]

    async def ask(peer: Peer, name: str) -> str:
        client = ssl.create_default_context(cafile=write("server-ca.pem", pem(tls.server_ca.cert)))
        client.load_cert_chain(
            write(f"{name}.pem", peer.cert_pem), write(f"{name}.key", peer.key_pem)
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        line = (await reader.readline()).decode()
        writer.close()
        return line

    async with server:
        assert (await ask(tls.good, "good")).startswith(f"gate.allowed: device {DEVICE}")
        assert (await ask(tls.elsewhere, "elsewhere")).startswith("gate.zone: ")


# --- the revocation follower --------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime.datetime:
        return self.now


def _event(serial: int | str, *, snapshot: bool = False) -> query_pb2.RevocationEvent:
    event = query_pb2.RevocationEvent(
        serial_hex=serial if isinstance(serial, str) else f"{serial:x}",
        device_id=DEVICE,
        reason="test",
        snapshot=snapshot,
    )
    event.not_after.FromDatetime(NOW + datetime.timedelta(hours=1))
    return event


class FakeFeed(query_pb2_grpc.RevocationsServicer):
    """The verifier's feed as the proto describes it: snapshot, its end, then live events;
    None on ``live`` drops the stream (UNAVAILABLE)."""

    def __init__(self, snapshot: list[int]) -> None:
        self.snapshot = snapshot
        self.live: asyncio.Queue[query_pb2.RevocationEvent | None] = asyncio.Queue()
        self.calls = 0

    async def WatchRevocations(
        self, request: query_pb2.WatchRevocationsRequest, context: Any
    ) -> AsyncIterator[query_pb2.RevocationEvent]:
        self.calls += 1
        for serial in self.snapshot:
            yield _event(serial, snapshot=True)
        yield query_pb2.RevocationEvent(end_of_snapshot=True)
        while (event := await self.live.get()) is not None:
            yield event
        await context.abort(grpc.StatusCode.UNAVAILABLE, "verifier restarting")

    async def GetCrl(self, request: query_pb2.GetCrlRequest, context: Any) -> query_pb2.Crl:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")
        raise AssertionError("abort raises")


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_follower_keeps_the_feed_and_the_gate_refuses_what_it_says(tls: Tls) -> None:
    asyncio.run(_follow(tls))


async def _follow(tls: Tls) -> None:
    feed = FakeFeed(snapshot=[0x1234])
    server = grpc.aio.server()
    query_pb2_grpc.add_RevocationsServicer_to_server(feed, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    clock = Clock()
    follower = RevocationFollower(
        lambda: grpc.aio.insecure_channel(f"127.0.0.1:{port}"),
        clock=clock,
        backoff=Backoff(initial=0.01, maximum=0.05),
        max_gap=datetime.timedelta(seconds=60),
    )
    gate = Gate(tls.gate.policy, revocations=follower.revocations, clock=clock)
    good = [tls.good.cert]
    # Before the first snapshot the gate cannot know what is revoked: it denies.
    assert "no complete snapshot" in follower.revocations(clock.now).feed_problem
    assert gate.check(good).reason is Reason.FEED_STALE
    task = asyncio.create_task(follower.run())
    try:
        await asyncio.wait_for(follower.synced.wait(), 10)
        assert follower.revocations(clock.now).serials == {0x1234}
        assert gate.check(good).allow

        # A live revocation of the device's serial: refused at once.
        await feed.live.put(_event(tls.good.cert.serial_number))
        await _until(lambda: not gate.check(good).allow, "the revocation")
        decision = gate.check(good)
        assert (decision.reason, decision.message.endswith("(revocation feed)")) == (
            Reason.REVOKED,
            True,
        )

        # The stream drops: the follower reconnects, and what it knew stays known.
        await feed.live.put(None)
        await _until(lambda: feed.calls == 2 and follower.in_sync, "the reconnection")
        assert follower.revocations(clock.now).serials == {0x1234, tls.good.cert.serial_number}

        # A serial that is not hex: the stream is dropped rather than the entry skipped.
        await feed.live.put(_event("zz-not-hex"))
        await _until(lambda: feed.calls == 3 and follower.in_sync, "the next reconnection")

        # The verifier goes away: tolerated for max_gap, then every decision denies.
        await server.stop(None)
        await _until(lambda: not follower.in_sync, "the loss of the stream")
        clock.now += datetime.timedelta(seconds=59)
        assert follower.revocations(clock.now).feed_problem == ""
        clock.now += datetime.timedelta(seconds=2)
        problem = follower.revocations(clock.now).feed_problem
        assert problem.startswith("disconnected since"), problem
        assert gate.check([tls.elsewhere.cert]).reason is Reason.FEED_STALE
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(None)


def test_a_serial_leaves_the_set_once_its_certificate_has_expired() -> None:
    clock = Clock()
    follower = RevocationFollower(lambda: grpc.aio.insecure_channel("127.0.0.1:1"), clock=clock)
    soon = NOW + datetime.timedelta(minutes=5)
    follower.apply(FeedEntry(serial=1, not_after=soon, end_of_snapshot=False))
    follower.apply(FeedEntry(serial=2, not_after=None, end_of_snapshot=False))
    follower.apply(FeedEntry(serial=None, not_after=None, end_of_snapshot=True))
    assert follower.revocations(clock.now).serials == {1, 2}
    clock.now = soon + datetime.timedelta(seconds=1)
    follower.apply(FeedEntry(serial=3, not_after=None, end_of_snapshot=False))
    assert follower.revocations(clock.now).serials == {2, 3}


def test_feed_entries_and_backoff() -> None:
    entry = entry_from_wire(_event(0xABC))
    assert (entry.serial, entry.not_after, entry.end_of_snapshot) == (
        0xABC,
        NOW + datetime.timedelta(hours=1),
        False,
    )
    assert entry_from_wire(query_pb2.RevocationEvent(end_of_snapshot=True)).end_of_snapshot
    with pytest.raises(ValueError, match="is not hex"):
        entry_from_wire(_event("nope"))
    backoff = Backoff(initial=1, maximum=8, jitter=0)
    assert [backoff.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert 1 <= Backoff(initial=1, maximum=8, jitter=0.5).delay(1) <= 1.5
