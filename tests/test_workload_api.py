"""The agent's SPIFFE Workload API (issue 10, item 2): py-spiffe, a client nobody here wrote,
fetches the device SVID and bundle from the agent's socket and receives renewals; access
follows the caller's Unix credentials; a revoked or expired certificate leaves neither an
identity on the socket nor key files on disk.

py-spiffe runs in a process of its own (tests/spiffe_client.py): its generated protobuf code
and devtrust's define the same root-level messages, which one process cannot load together.
Under root, the tests that need another caller run it through setpriv as nobody.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.agent.attest import AttestationClient
from devtrust.agent.config import AgentConfig, WorkloadApiConfig
from devtrust.agent.main import make_host
from devtrust.agent.state import AgentFiles, DeviceIdentity, MemoryFiles, spki
from devtrust.agent.workload import (
    Access,
    PeerCredentials,
    WorkloadApi,
    key_group_id,
    peer_credentials,
    socket_path,
)
from devtrust.core.claims import DeviceClaims
from devtrust.core.errors import ConfigError
from devtrust.core.tier import Tier
from devtrust.spiffe import workload_pb2, workload_pb2_grpc
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import attestation_pb2
from devtrust.verifier.pki import PkiFiles
from tests.conftest import SwtpmFactory
from tests.env import enrolled_agent, running, verifier_config
from tests.svids import CA, CA_SUBJECT, DEVICE, SPIFFE_ID, TRUST_DOMAIN, identity
from tests.test_agent_client import Peer, affirming, attest, ca_of, challenge
from tests.test_agent_client import body_of as body_of_evidence
from tests.test_agent_client import certify as certify_by_verifier

CLIENT = Path(__file__).with_name("spiffe_client.py")
HEADER = (("workload.spiffe.io", "true"),)
Metadata = tuple[tuple[str, str], ...]
NOBODY = 65534
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="runs the client as another user")


# --- the API and its callers -----------------------------------------------------------------


@pytest.fixture
def rundir() -> Iterator[Path]:
    """A runtime directory any user may search (the pytest temporary tree is root's only),
    on a path short enough for a unix socket."""
    path = Path(tempfile.mkdtemp(prefix="dt-wl-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def serving(
    folder: Path, *, access: Access | None = None, first: DeviceIdentity | None = None
) -> AsyncIterator[WorkloadApi]:
    api = WorkloadApi(folder / "workload_api.socket", access or Access(frozenset({os.getuid()})))
    if first is not None:
        api.update(first)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


class SpiffeClient:
    """tests/spiffe_client.py (py-spiffe) in a process of its own, as ``user`` (setpriv
    arguments) when given."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, *args: str, user: tuple[str, ...] = ()) -> SpiffeClient:
        setpriv = ["setpriv", *user] if user else []
        process = await asyncio.create_subprocess_exec(
            *setpriv,
            sys.executable,
            str(CLIENT),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd="/",
            env={"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1"},
        )
        return cls(process)

    async def line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), 30.0)
        if not raw:
            assert self.process.stderr is not None
            raise AssertionError(
                f"the client printed nothing: {await self.process.stderr.read()!r}"
            )
        line: dict[str, Any] = json.loads(raw)
        return line

    async def finish(self) -> int:
        return await asyncio.wait_for(self.process.wait(), 30.0)


async def fetch(path: Path, *, user: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
    client = await SpiffeClient.start("fetch", str(path), user=user)
    line = await client.line()
    return await client.finish(), line


@asynccontextmanager
async def stub(path: Path) -> AsyncIterator[workload_pb2_grpc.SpiffeWorkloadAPIAsyncStub]:
    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        yield workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)


def user(uid: int, gid: int, *groups: int) -> tuple[str, ...]:
    extra = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return (f"--reuid={uid}", f"--regid={gid}", extra)


# --- py-spiffe -------------------------------------------------------------------------------


def test_py_spiffe_fetches_the_svid_and_the_bundle(rundir: Path) -> None:
    first = identity(serial=0x1001)

    async def run() -> tuple[int, dict[str, Any]]:
        async with serving(rundir, first=first) as api:
            return await fetch(api.socket_path)

    rc, line = asyncio.run(run())
    assert rc == 0, line
    assert line == {
        "spiffe_id": SPIFFE_ID,
        "serial": "1001",
        "key_matches": True,
        "bundle": [CA_SUBJECT],
        "bundles": [CA_SUBJECT],
    }


def test_py_spiffe_receives_a_renewal_and_then_the_loss_of_the_identity(rundir: Path) -> None:
    async def run() -> list[dict[str, Any]]:
        async with serving(rundir, first=identity(serial=0x2001)) as api:
            client = await SpiffeClient.start("watch", str(api.socket_path), "3")
            lines = [await client.line()]
            api.update(identity(serial=0x2002))  # a renewal
            lines.append(await client.line())
            api.update(None)  # revoked
            lines.append(await client.line())
            assert await client.finish() == 0
            return lines

    first, renewed, lost = asyncio.run(run())
    assert (first["serial"], first["spiffe_id"], first["key_matches"]) == ("2001", SPIFFE_ID, True)
    assert (renewed["serial"], renewed["key_matches"]) == ("2002", True)
    assert renewed["bundle"] == [CA_SUBJECT]
    assert "PERMISSION_DENIED" in lost["error"]


# --- the protocol, with devtrust's own stub ---------------------------------------------------


def test_every_call_needs_the_security_header(rundir: Path) -> None:
    async def run() -> list[object]:
        seen: list[object] = []
        async with (
            serving(rundir, first=identity(serial=0x3001)) as api,
            stub(api.socket_path) as workload,
        ):
            calls: list[Callable[[Metadata], Awaitable[object]]] = [
                lambda md: workload.FetchX509SVID(
                    workload_pb2.X509SVIDRequest(), metadata=md
                ).read(),
                lambda md: workload.FetchX509Bundles(
                    workload_pb2.X509BundlesRequest(), metadata=md
                ).read(),
                lambda md: workload.FetchJWTSVID(
                    workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=md
                ),
                lambda md: workload.FetchJWTBundles(
                    workload_pb2.JWTBundlesRequest(), metadata=md
                ).read(),
                lambda md: workload.ValidateJWTSVID(
                    workload_pb2.ValidateJWTSVIDRequest(audience="x", svid="y"), metadata=md
                ),
            ]
            for call in calls:
                metadatas: list[Metadata] = [(), (("workload.spiffe.io", "false"),), HEADER]
                for metadata in metadatas:
                    try:
                        seen.append(type(await call(metadata)).__name__)
                    except grpc.aio.AioRpcError as exc:
                        seen.append(exc.code())
        return seen

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    unimplemented = grpc.StatusCode.UNIMPLEMENTED
    assert asyncio.run(run()) == [
        invalid, invalid, "X509SVIDResponse",
        invalid, invalid, "X509BundlesResponse",
        invalid, invalid, unimplemented,
        invalid, invalid, unimplemented,
        invalid, invalid, unimplemented,
    ]  # fmt: skip


def test_no_identity_is_permission_denied_and_the_bundle_stays(rundir: Path) -> None:
    async def run() -> list[object]:
        seen: list[object] = []

        async def svid() -> None:
            try:
                response = await workload.FetchX509SVID(
                    workload_pb2.X509SVIDRequest(), metadata=HEADER
                ).read()
                assert isinstance(response, workload_pb2.X509SVIDResponse)
                seen.append(len(response.svids))
            except grpc.aio.AioRpcError as exc:
                seen.append(exc.code())

        async def bundles() -> None:
            try:
                response = await workload.FetchX509Bundles(
                    workload_pb2.X509BundlesRequest(), metadata=HEADER
                ).read()
                assert isinstance(response, workload_pb2.X509BundlesResponse)
                seen.append(sorted(response.bundles))
                [der] = response.bundles.values()
                assert der == CA[1].public_bytes(serialization.Encoding.DER)
            except grpc.aio.AioRpcError as exc:
                seen.append(exc.code())

        async with serving(rundir) as api, stub(api.socket_path) as workload:
            await svid()  # never certified
            await bundles()
            api.update(identity(serial=0x4001))
            await svid()
            api.update(None)  # revoked
            await svid()
            await bundles()
        return seen

    denied = grpc.StatusCode.PERMISSION_DENIED
    assert asyncio.run(run()) == [denied, denied, 1, denied, [f"spiffe://{TRUST_DOMAIN}"]]


def test_an_expired_certificate_is_never_served(rundir: Path) -> None:
    """The stream ends PermissionDenied at the certificate's expiry, whether or not the
    attestation client said anything; an expired one is refused from the start."""

    async def run() -> list[object]:
        seen: list[object] = []
        short = identity(serial=0x5001, lifetime=datetime.timedelta(seconds=2))
        async with serving(rundir, first=short) as api, stub(api.socket_path) as workload:
            call = workload.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
            first = await call.read()
            assert isinstance(first, workload_pb2.X509SVIDResponse)
            seen.append(len(first.svids))
            try:
                seen.append(await asyncio.wait_for(call.read(), 10))
            except grpc.aio.AioRpcError as exc:
                seen.append(exc.code())
            api.update(identity(serial=0x5002, lifetime=-datetime.timedelta(seconds=1)))
            try:
                await workload.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER).read()
            except grpc.aio.AioRpcError as exc:
                seen.append(exc.code())
        return seen

    denied = grpc.StatusCode.PERMISSION_DENIED
    assert asyncio.run(run()) == [1, denied, denied]


# --- who may connect -------------------------------------------------------------------------


def test_peer_credentials_are_the_kernels() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = peer_credentials(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert set(peer.groups) == set(os.getgroups())


def test_access_by_uid_primary_or_supplementary_group() -> None:
    access = Access(uids=frozenset({1000}), gids=frozenset({4242}))
    assert access.allows(PeerCredentials(pid=1, uid=1000, gid=1000))
    assert access.allows(PeerCredentials(pid=1, uid=1001, gid=4242))
    assert access.allows(PeerCredentials(pid=1, uid=1001, gid=1001, groups=(27, 4242)))
    assert not access.allows(PeerCredentials(pid=1, uid=1001, gid=1001, groups=(27,)))
    assert not access.allows(PeerCredentials(pid=1, uid=0, gid=0))


@AS_ROOT
def test_a_caller_not_allowed_is_refused_and_an_allowed_one_served(
    rundir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = identity(serial=0x6001)

    async def run(access: Access, caller: tuple[str, ...]) -> tuple[int, dict[str, Any]]:
        async with serving(rundir, access=access, first=first) as api:
            return await fetch(api.socket_path, user=caller)

    root_only = Access(uids=frozenset({0}))
    with caplog.at_level(logging.WARNING, logger="devtrust.agent.workload"):
        rc, line = asyncio.run(run(root_only, user(NOBODY, NOBODY)))
    assert rc == 1
    assert "error" in line
    assert f"(uid {NOBODY}, gid {NOBODY}): neither among workload_api.users" in caplog.text
    # Allowed by uid; by primary group; by a supplementary group (SO_PEERGROUPS).
    assert asyncio.run(run(Access(uids=frozenset({0, NOBODY})), user(NOBODY, NOBODY)))[0] == 0
    by_group = Access(uids=frozenset({0}), gids=frozenset({4242}))
    assert asyncio.run(run(by_group, user(NOBODY, 4242)))[0] == 0
    rc, line = asyncio.run(run(by_group, user(NOBODY, NOBODY, 4242)))
    assert (rc, line.get("serial")) == (0, "6001")
    assert asyncio.run(run(by_group, user(NOBODY, NOBODY, 4243)))[0] == 1


def test_the_socket_and_its_folder_are_reachable_and_the_grpc_socket_is_not(
    rundir: Path,
) -> None:
    (rundir / "run").mkdir(mode=0o700)  # as an agent before the Workload API left it

    async def run() -> tuple[int, int, list[int]]:
        async with serving(rundir / "run") as api:
            folder = api.socket_path.parent
            [private] = [p for p in folder.iterdir() if p.is_dir()]
            return (
                api.socket_path.stat().st_mode & 0o777,
                folder.stat().st_mode & 0o777,
                [private.stat().st_mode & 0o777],
            )

    assert asyncio.run(run()) == (0o666, 0o711, [0o700])
    assert list((rundir / "run").iterdir()) == []  # stop removes both sockets


# --- the attestation client's side -----------------------------------------------------------


def test_a_revoked_serial_removes_the_identity_and_the_key_files(
    pki: PkiFiles, tmp_path: Path, rundir: Path
) -> None:
    """The verifier issues a certificate with its trust bundle: it is written (the key
    readable by the key group) and served; a later Result revoking its serial deletes both
    files and the Workload API answers PermissionDenied."""
    files = AgentFiles(tmp_path / "state", rundir / "run", key_gid=4242)
    run_dir = rundir / "run"
    told: list[DeviceIdentity | None] = []
    seen: list[object] = []
    device_ca_der = CA[1].public_bytes(serialization.Encoding.DER)

    async def main() -> None:
        async with serving(rundir) as api, stub(api.socket_path) as workload:

            def on_identity(new: DeviceIdentity | None) -> None:
                told.append(new)
                api.update(new)

            async def svid() -> object:
                try:
                    response = await workload.FetchX509SVID(
                        workload_pb2.X509SVIDRequest(), metadata=HEADER
                    ).read()
                    assert isinstance(response, workload_pb2.X509SVIDResponse)
                    return x509.load_der_x509_certificate(response.svids[0].x509_svid).serial_number
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

            async def script(peer: Peer) -> None:
                first = await peer.evidence(challenge(os.urandom(32)))
                issued = certify_by_verifier(pki, body_of_evidence(first).certify_key_spki)
                issued.trust_bundle_der.append(device_ca_der)
                await peer.write(
                    attestation_pb2.VerifierMessage(
                        result=affirming(issued), challenge=challenge(os.urandom(32))
                    )
                )
                second = body_of_evidence((await peer.read()).evidence)
                key_file = (run_dir / "device.key").stat()
                seen.extend([key_file.st_mode & 0o777, key_file.st_gid, await svid()])
                seen.append((run_dir / "ca-bundle.pem").read_bytes())
                revoked = affirming()
                revoked.revoked_serials.append(issued.serial_hex.upper())
                await peer.write(
                    attestation_pb2.VerifierMessage(
                        result=revoked, challenge=challenge(os.urandom(32))
                    )
                )
                third = body_of_evidence((await peer.read()).evidence)
                seen.extend([int(issued.serial_hex, 16), second.certify_key_spki])
                seen.extend([third.certify_key_spki != b"", await svid()])
                seen.append(sorted(p.name for p in run_dir.iterdir()))

            await attest(pki, [script], tmp_path=tmp_path, files=files, on_identity=on_identity)

    asyncio.run(main())
    mode, gid, served, bundle, serial, asked_then, asks_again, after, left = seen
    assert (mode, gid) == (0o640, 4242)
    assert served == serial
    assert bundle == CA[1].public_bytes(serialization.Encoding.PEM)  # the trust bundle
    assert asked_then == b""  # certified: nothing more to ask for
    assert asks_again  # revoked: a new key to certify
    assert after == grpc.StatusCode.PERMISSION_DENIED
    assert left == ["ca-bundle.pem"]
    assert [None if t is None else t.certificate.serial_number for t in told] == [serial, None]


def test_a_certificate_expiring_unrenewed_is_deleted(pki: PkiFiles, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    expiring = ca_of(pki).issue_device(
        trust_domain=TRUST_DOMAIN,
        device_id=DEVICE,
        public_key=key.public_key(),
        claims=DeviceClaims(tier=Tier.AFFIRMING, zone=""),
        now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=58),
        lifetime=datetime.timedelta(minutes=1),
    )
    files = MemoryFiles(certificate=expiring, key=key, ca_pem=pki.ca_cert.read_bytes())
    told: list[DeviceIdentity | None] = []

    async def script(peer: Peer) -> None:
        body = body_of_evidence(await peer.evidence(challenge(os.urandom(32))))
        assert body.certify_key_spki  # due, but the verifier certifies nothing
        assert body.certify_key_spki != spki(key)
        await asyncio.sleep(3.5)

    asyncio.run(attest(pki, [script], tmp_path=tmp_path, files=files, on_identity=told.append))
    assert [None if t is None else t.certificate for t in told] == [expiring, None]
    assert (files.deleted, files.certificate, files.key) == (1, None, None)


@pytest.mark.swtpm
def test_py_spiffe_fetches_what_the_verifier_issued(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    rundir: Path,
) -> None:
    """A real verifier certifies a real swtpm agent: py-spiffe takes that certificate, as
    the verifier issued it, from the agent's Workload API."""
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> tuple[str, int, dict[str, Any]]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
            serving(rundir) as api,
        ):
            certified = asyncio.Event()

            def on_identity(new: DeviceIdentity | None) -> None:
                api.update(new)
                if new is not None:
                    certified.set()

            client = AttestationClient(
                agent.cfg,
                tpm=agent.tpm,
                host=make_host(agent.cfg),
                files=agent.files,
                enrollment=agent.enrollment,
                on_identity=on_identity,
            )
            stop = asyncio.Event()
            task = asyncio.create_task(client.run(stop))
            try:
                await asyncio.wait_for(certified.wait(), 30)
                return (agent.enrollment.device_id, *await fetch(api.socket_path))
            finally:
                stop.set()
                await task

    device_id, rc, line = asyncio.run(scenario())
    assert rc == 0, line
    assert line["spiffe_id"] == f"spiffe://{TRUST_DOMAIN}/device/{device_id}"
    assert line["key_matches"] is True
    assert line["bundle"]
    assert line["bundles"] == line["bundle"]


# --- configuration ---------------------------------------------------------------------------


def test_configuration(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "runtime_dir: /run/dt\n"
        "workload_api:\n  users: [nobody, '1234']\n  groups: [nogroup]\n  key_group: '4242'\n"
    )
    cfg = AgentConfig.load(path)
    assert socket_path(cfg) == Path("/run/dt/workload_api.socket")
    assert key_group_id(cfg) == 4242
    access = Access.from_config(cfg.workload_api, own_uid=0)
    assert access == Access(uids=frozenset({0, NOBODY, 1234}), gids=frozenset({NOBODY}))
    assert key_group_id(AgentConfig()) is None
    with pytest.raises(ConfigError, match=r"workload_api\.users: no user 'no-such-user'"):
        Access.from_config(WorkloadApiConfig(users=["no-such-user"]))
    with pytest.raises(ConfigError, match=r"workload_api\.groups: no group 'no-such-group'"):
        Access.from_config(WorkloadApiConfig(groups=["no-such-group"]))


def test_a_socket_path_too_long_is_a_configuration_error(tmp_path: Path) -> None:
    api = WorkloadApi(tmp_path / ("x" * 120) / "s", Access(frozenset()))
    with pytest.raises(ConfigError, match="longer than the 107 bytes"):
        asyncio.run(api.start())
