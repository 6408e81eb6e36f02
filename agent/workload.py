"""The SPIFFE Workload API, served by the agent to the workloads of its host (issue 10, item 2).

Software that speaks SPIFFE (py-spiffe, go-spiffe, Envoy through an SDS bridge) takes the
device identity unmodified: ``FetchX509SVID`` streams the device certificate with its key
(PKCS#8 DER) and its trust domain's bundle, a new message on every renewal, and ends with
PermissionDenied (the specification's "no identity issued") once the device holds none:
never certified yet, revoked, or expired unrenewed. ``FetchX509Bundles`` streams the bundle,
which stays when the identity goes (workloads still verify their peers). The JWT-SVID methods
answer UNIMPLEMENTED: devtrust issues no JWT-SVIDs. Every call must carry the metadata
``workload.spiffe.io: true`` (SPIFFE Workload Endpoint, section 6: InvalidArgument without
it), checked in one interceptor for every method. Wire definition:
protos/devtrust/spiffe/workload.proto.

Who may call. The specification forbids asking a workload to authenticate; access follows the
caller's Unix credentials instead, as the kernel recorded them when it connected. gRPC does
not expose SO_PEERCRED, so the agent accepts connections on the public socket itself, reads
the peer's pid, uid and gid (SO_PEERCRED) and its supplementary groups (SO_PEERGROUPS: the
groups the process held, not what the group database says of its user), and splices an
allowed connection to the gRPC server, which listens on a private socket in a 0700 directory
of its own. A refused connection is closed and logged. Allowed: the agent's own user (it can
read the key files anyway), the uids of ``workload_api.users``, and any process whose primary
or supplementary group is among ``workload_api.groups``.

The attestation client tells the API each change of identity (``WorkloadApi.update``, its
``on_identity``); the API also never serves a certificate past its expiry on its own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import grp
import logging
import os
import pwd
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devtrust.agent.config import AgentConfig, WorkloadApiConfig
from devtrust.agent.state import DeviceIdentity
from devtrust.core.errors import ConfigError
from devtrust.core.spiffe import spiffe_ids
from devtrust.spiffe import workload_pb2, workload_pb2_grpc

logger = logging.getLogger(__name__)
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

# The security header every Workload API call carries (SPIFFE Workload Endpoint, section 4).
HEADER = "workload.spiffe.io"
SOCKET_NAME = "workload_api.socket"
# Linux's sockaddr_un.sun_path holds 108 bytes, the last a NUL.
_MAX_SOCKET_PATH = 107
_UCRED = struct.Struct("iII")  # struct ucred: pid_t, uid_t, gid_t
# Not in Python's socket module; Linux 4.13 and later.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GROUPS_READ_MAX = 256  # socket.getsockopt reads at most 1024 bytes
_CHUNK = 65536


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# --- who may connect -------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerCredentials:
    """The connecting process as the kernel recorded it at connect (SO_PEERCRED,
    SO_PEERGROUPS)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def peer_credentials(sock: Any) -> PeerCredentials:
    """The credentials of the process at the other end of the unix socket ``sock`` (a
    ``socket.socket`` or asyncio's wrapper of one)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid, groups=_peer_groups(sock))


def _peer_groups(sock: Any) -> tuple[int, ...]:
    """The peer's supplementary groups; none where the kernel cannot tell (before 4.13) or
    where they are more than Python's getsockopt can read (1024 bytes: 256 groups): then
    only the peer's uid and primary gid count, which refuses rather than admits."""
    size = 64
    while True:
        try:
            raw: bytes = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size * 4)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < _GROUPS_READ_MAX:
                size = _GROUPS_READ_MAX
                continue
            if exc.errno in (errno.ENOPROTOOPT, errno.ERANGE):
                return ()
            raise
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


@dataclass(frozen=True)
class Access:
    """The uids and gids that may use the Workload API."""

    uids: frozenset[int]
    gids: frozenset[int] = frozenset()

    def allows(self, peer: PeerCredentials) -> bool:
        if peer.uid in self.uids:
            return True
        return any(g in self.gids for g in (peer.gid, *peer.groups))

    @classmethod
    def from_config(cls, cfg: WorkloadApiConfig, *, own_uid: int | None = None) -> Access:
        """``users`` and ``groups`` as ids (names looked up now: a name that does not exist
        is a configuration error, not a silent denial), plus the agent's own uid."""
        uids = {os.getuid() if own_uid is None else own_uid}
        uids.update(user_id(u) for u in cfg.users)
        return cls(frozenset(uids), frozenset(group_id(g, key="groups") for g in cfg.groups))


def user_id(entry: str) -> int:
    entry = entry.strip()
    if entry.isdigit():
        return int(entry)
    try:
        return pwd.getpwnam(entry).pw_uid
    except KeyError:
        raise ConfigError(
            f"workload_api.users: no user {entry!r} on this host: give a user name or a uid"
        ) from None


def group_id(entry: str, *, key: str) -> int:
    entry = entry.strip()
    if entry.isdigit():
        return int(entry)
    try:
        return grp.getgrnam(entry).gr_gid
    except KeyError:
        raise ConfigError(
            f"workload_api.{key}: no group {entry!r} on this host: give a group name or a gid"
        ) from None


def key_group_id(cfg: AgentConfig) -> int | None:
    """The group that may read device.key (``workload_api.key_group``), None for none."""
    group = cfg.workload_api.key_group
    return group_id(group, key="key_group") if group.strip() else None


def socket_path(cfg: AgentConfig) -> Path:
    return cfg.workload_api.socket or cfg.runtime_dir / SOCKET_NAME


# --- what is served --------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """A device identity as the Workload API sends it (DER, computed once per renewal)."""

    spiffe_id: str
    trust_domain_id: str
    certificate_der: bytes
    key_der: bytes
    bundle_der: bytes
    not_after: datetime.datetime

    @classmethod
    def of(cls, identity: DeviceIdentity) -> Served | None:
        """None for a certificate without a SPIFFE ID (no SVID: nothing to serve)."""
        ids = spiffe_ids(identity.certificate)
        if not ids:
            return None
        domain = ids[0].removeprefix("spiffe://").partition("/")[0]
        return cls(
            spiffe_id=ids[0],
            trust_domain_id=f"spiffe://{domain}",
            certificate_der=identity.certificate.public_bytes(serialization.Encoding.DER),
            key_der=identity.key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            bundle_der=bundle_der(identity.bundle),
            not_after=identity.certificate.not_valid_after_utc,
        )


def bundle_der(bundle: Iterable[x509.Certificate]) -> bytes:
    """An X.509 bundle as the Workload API carries it: the certificates' DER, concatenated."""
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in bundle)


def svid_response(served: Served) -> workload_pb2.X509SVIDResponse:
    return workload_pb2.X509SVIDResponse(
        svids=[
            workload_pb2.X509SVID(
                spiffe_id=served.spiffe_id,
                x509_svid=served.certificate_der,
                x509_svid_key=served.key_der,
                bundle=served.bundle_der,
            )
        ]
    )


def bundles_response(served: Served) -> workload_pb2.X509BundlesResponse:
    return workload_pb2.X509BundlesResponse(bundles={served.trust_domain_id: served.bundle_der})


class IdentityBoard:
    """What the API serves now: the identity (None: the device has none) and the last
    bundle, which stays when the identity goes. Streams wait on ``changed``, replaced by a
    fresh event at every update."""

    def __init__(self) -> None:
        self.identity: Served | None = None
        self.bundle: Served | None = None
        self.changed = asyncio.Event()

    def update(self, identity: DeviceIdentity | None) -> None:
        served = None if identity is None else Served.of(identity)
        if identity is not None and served is None:
            logger.error("workload API: the device certificate holds no SPIFFE ID; not served")
        self.identity = served
        if served is not None:
            self.bundle = served
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


# --- the gRPC service ------------------------------------------------------------------------

NO_IDENTITY = (
    "no identity issued: this device holds no valid device certificate (not certified yet, "
    "revoked, or expired unrenewed)"
)


class WorkloadApiServicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(
        self, board: IdentityBoard, *, clock: Callable[[], datetime.datetime] = utcnow
    ) -> None:
        self._board = board
        self._clock = clock

    async def FetchX509SVID(
        self, request: workload_pb2.X509SVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        last = None
        while True:
            changed, served, now = self._board.changed, self._board.identity, self._clock()
            if served is None or now > served.not_after:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
            response = svid_response(served)
            if response != last:
                yield response
                last = response
            # Until the next update, or the expiry: then PermissionDenied, whatever the
            # attestation client has not yet said.
            left = (served.not_after - now).total_seconds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left + 0.001)

    async def FetchX509Bundles(
        self,
        request: workload_pb2.X509BundlesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        last = None
        while True:
            changed, served = self._board.changed, self._board.bundle
            if served is None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no bundle yet")
            response = bundles_response(served)
            if response != last:
                yield response
                last = response
            await changed.wait()

    async def FetchJWTSVID(
        self, request: workload_pb2.JWTSVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> workload_pb2.JWTSVIDResponse:
        await _no_jwt(context)

    async def FetchJWTBundles(  # type: ignore[override]
        self,
        request: workload_pb2.JWTBundlesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> NoReturn:
        await _no_jwt(context)

    async def ValidateJWTSVID(
        self,
        request: workload_pb2.ValidateJWTSVIDRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        await _no_jwt(context)


async def _no_jwt(context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "devtrust issues no JWT-SVIDs")


class RequireSecurityHeader(grpc.aio.ServerInterceptor):
    """Every call without ``workload.spiffe.io: true`` ends InvalidArgument, before any
    servicer method runs: one check for every method, none to forget."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        if handler is None or any(k == HEADER and v == "true" for k, v in metadata):
            return handler
        return _refusing(handler)


def _refusing(handler: Handler) -> Handler:
    async def refuse(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the security header {HEADER}: true is missing (SPIFFE Workload Endpoint)",
        )

    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **codec)
    return grpc.unary_unary_rpc_method_handler(refuse, **codec)


# --- the sockets -----------------------------------------------------------------------------


class WorkloadApi:
    """The Workload API on ``socket_path``, open to the peers ``access`` allows.

    ``start`` listens (``ConfigError`` when the socket cannot be made), ``update`` is the
    attestation client's ``on_identity``, ``stop`` closes every connection and removes the
    sockets."""

    def __init__(
        self,
        socket_path: Path,
        access: Access,
        *,
        clock: Callable[[], datetime.datetime] = utcnow,
    ) -> None:
        self.socket_path = socket_path
        self.board = IdentityBoard()
        self._access = access
        self._clock = clock
        self._private_dir: Path | None = None
        self._grpc: grpc.aio.Server | None = None
        self._public: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(cls, cfg: AgentConfig) -> WorkloadApi:
        return cls(socket_path(cfg), Access.from_config(cfg.workload_api))

    def update(self, identity: DeviceIdentity | None) -> None:
        self.board.update(identity)

    async def start(self) -> None:
        path = self.socket_path
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"workload_api.socket {path}: longer than the {_MAX_SOCKET_PATH} bytes a unix "
                "socket path may have: choose a shorter path"
            )
        try:
            _searchable_dir(path.parent)
            self._private_dir = _private_dir(path.parent)
            private = self._private_dir / "grpc.sock"
            server = grpc.aio.server(interceptors=[RequireSecurityHeader()])
            servicer = WorkloadApiServicer(self.board, clock=self._clock)
            workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(servicer, server)
            server.add_insecure_port(f"unix:{private}")
            await server.start()
            self._grpc = server
            self._public = await asyncio.start_unix_server(self._connected, path=str(path))
            # Anyone may connect; the peer's credentials decide (``_connected``).
            path.chmod(0o666)
        except (OSError, RuntimeError) as exc:
            await self.stop()
            raise ConfigError(f"workload_api.socket {path}: cannot listen: {exc}") from exc
        logger.info("workload API listening on %s", path)

    async def stop(self) -> None:
        if self._public is not None:
            self._public.close()
            await self._public.wait_closed()
            self._public = None
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                    self.socket_path.unlink()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._grpc is not None:
            await self._grpc.stop(grace=None)
            self._grpc = None
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = peer_credentials(writer.get_extra_info("socket"))
        except OSError as exc:
            logger.warning("workload API: refused a connection: no peer credentials (%s)", exc)
            return
        if not self._access.allows(peer):
            logger.warning(
                "workload API: refused a connection from pid %d (uid %d, gid %d): neither "
                "among workload_api.users nor in workload_api.groups",
                peer.pid,
                peer.uid,
                peer.gid,
            )
            return
        assert self._private_dir is not None
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(
                str(self._private_dir / "grpc.sock")
            )
        except OSError as exc:
            logger.warning("workload API: cannot reach its gRPC server: %s", exc)
            return
        try:
            await splice(reader, writer, up_reader, up_writer)
        finally:
            up_writer.close()


async def splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until either side closes."""
    pumps = {
        asyncio.create_task(_pump(a_reader, b_writer)),
        asyncio.create_task(_pump(b_reader, a_writer)),
    }
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()


def _searchable_dir(folder: Path) -> None:
    """The socket's folder, made if missing; searchable by all (0711 at least: workloads reach
    the socket by name, cannot list) when it is the agent's own."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o711)
    st = folder.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o011 != 0o011:
        folder.chmod(stat.S_IMODE(st.st_mode) | 0o011)


def _private_dir(near: Path) -> Path:
    """A fresh 0700 folder for the gRPC server's socket: beside the public one, or in the
    temporary directory when that path would be too long for a socket."""
    folder = Path(tempfile.mkdtemp(prefix=".workload-", dir=near))
    if len(os.fsencode(folder / "grpc.sock")) <= _MAX_SOCKET_PATH:
        return folder
    folder.rmdir()
    return Path(tempfile.mkdtemp(prefix="devtrust-workload-"))
