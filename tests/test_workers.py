"""Both cores (issue 11, item 3): `devtrust-verifier serve --workers 2` as a real process, a
parent and two workers sharing the ports (SO_REUSEPORT) and one SQLite file, serving
swtpm-backed devices over real mTLS.

Which worker a connection reached is asked of it: each worker answers gRPC health for
``devtrust.verifier.workerN``. A test that needs a given worker opens channels until one
reaches it (the kernel spreads connections; a few tries each)."""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import grpc
import pytest
import yaml
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtrust.swtpm import EndorsementCA
from devtrust.v1 import (
    attestation_pb2,
    attestation_pb2_grpc,
    common_pb2,
    query_pb2,
    query_pb2_grpc,
)
from devtrust.verifier.ca import CertificateAuthority
from devtrust.verifier.config import ServerConfig
from devtrust.verifier.pki import PkiFiles, issue_operator
from devtrust.verifier.server import WORKER_HEALTH
from devtrust.verifier.storage import open_sqlite
from tests.conftest import SwtpmFactory
from tests.env import (
    Agent,
    channel_credentials,
    enrolled_agent,
    first_results,
    quote_evidence,
    read_message,
)

if TYPE_CHECKING:
    from devtrust.verifier.server import RunningVerifier

WORKERS = 2
SERVE = (sys.executable, "-m", "devtrust.verifier.main", "serve")
Request = TypeVar("Request")
Reply = TypeVar("Reply")
_LISTENING = re.compile(
    r"verifier listening: enrollment \(TLS\) on (\d+), attestation\+query \(mTLS\) on (\d+), "
    r"database .*, (\d+) workers \(pids ([\d ]+)\)"
)
_APPRAISAL = re.compile(
    r"(worker\d+)\[(\d+)\] devtrust\.verifier\.decision: appraisal device=(\w+)"
)


@dataclass
class Fleet:
    """The verifier process: its ports (what tests.env's helpers read of a verifier), its
    workers' pids, its log."""

    process: subprocess.Popen[bytes]
    log: Path
    database: Path
    enrollment_port: int
    attestation_port: int
    pids: list[int]

    def text(self) -> str:
        return self.log.read_text()

    def appraisals(self) -> dict[str, list[tuple[int, str]]]:
        """Per worker name, the (pid, device) of each appraisal it logged."""
        found: dict[str, list[tuple[int, str]]] = {}
        for name, pid, device in _APPRAISAL.findall(self.text()):
            found.setdefault(name, []).append((int(pid), device))
        return found

    @property
    def verifier(self) -> RunningVerifier:
        """As tests.env's agent helpers take a verifier: they read its two ports only."""
        return cast("RunningVerifier", self)


async def next_of(call: grpc.aio.UnaryStreamCall[Request, Reply]) -> Reply:
    """The next message of a server stream; its end fails the test here."""
    message = await asyncio.wait_for(call.read(), 10)
    assert message is not grpc.aio.EOF, "the stream ended"
    return cast("Reply", message)


def _wait(check: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def fleet_verifier(
    tmp_path: Path, pki: PkiFiles, ek_ca: EndorsementCA, *, workers: int = WORKERS
) -> Iterator[Fleet]:
    """`devtrust-verifier serve --workers N` on ports 0 (the parent picks them); stopped
    with SIGTERM at the end, which must end it cleanly."""
    config = tmp_path / "verifier.yaml"
    database = tmp_path / "verifier.db"
    config.write_text(
        yaml.safe_dump(
            {
                "database": str(database),
                "listen": {"enrollment": "127.0.0.1:0", "attestation": "127.0.0.1:0"},
                "tls": {"server_cert": str(pki.server_cert), "server_key": str(pki.server_key)},
                "ca": {"cert": str(pki.ca_cert), "key": str(pki.ca_key)},
                "endorsement": {"roots": [], "trust_swtpm_local_ca": str(ek_ca.cert_path)},
                "attestation": {"interval_s": 30, "stream_challenge_gap_s": 0},
                "policy": None,
                "operators": {"alice": "admin"},
            }
        )
    )
    log = tmp_path / "verifier.log"
    argv = [*SERVE, "--config", str(config)]
    with log.open("wb") as out:
        process = subprocess.Popen([*argv, "--workers", str(workers)], stdout=out, stderr=out)
    try:
        _wait(
            lambda: bool(_LISTENING.search(log.read_text())) or process.poll() is not None, "start"
        )
        match = _LISTENING.search(log.read_text())
        assert match is not None, log.read_text()
        enroll_port, attest_port, count, pids = match.groups()
        assert int(count) == workers
        yield Fleet(
            process,
            log,
            database,
            int(enroll_port),
            int(attest_port),
            [int(p) for p in pids.split()],
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


# --- which worker a connection reached --------------------------------------------------------


async def worker_of(channel: grpc.aio.Channel, workers: int = WORKERS) -> int:
    """The worker this channel's connection reached: the one that answers SERVING for its
    own name (the others know no such service)."""
    stub = health_pb2_grpc.HealthStub(channel)
    for n in range(workers):
        request = health_pb2.HealthCheckRequest(service=f"{WORKER_HEALTH}worker{n}")
        try:
            reply = await stub.Check(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            continue
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return n
    raise AssertionError("no worker answered for itself")


async def channel_to(worker: int, port: int, creds: grpc.ChannelCredentials) -> grpc.aio.Channel:
    """A channel whose connection reached ``worker``: the kernel picks one per connection,
    so channels are opened until one does (each try has one chance in two)."""
    for _ in range(64):
        channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)
        if await worker_of(channel) == worker:
            return channel
        await channel.close()
    raise AssertionError(f"64 connections and none reached worker {worker}")


def agent_creds(pki: PkiFiles, agent: Agent) -> grpc.ChannelCredentials:
    """The agent's channel identity, as its attestation client connects."""
    enrollment = agent.enrollment
    return channel_credentials(
        pki, key_pem=enrollment.channel_key_pem, cert_pem=enrollment.channel_cert_pem
    )


def operator_creds(pki: PkiFiles, workdir: Path) -> grpc.ChannelCredentials:
    ca = CertificateAuthority.load(pki.ca_cert, pki.ca_key)
    cert, key = issue_operator(
        ca,
        workdir,
        name="alice",
        trust_domain="devtrust.local",
        now=datetime.datetime.now(datetime.UTC),
    )
    return channel_credentials(pki, key_pem=key.read_bytes(), cert_pem=cert.read_bytes())


async def attest_on(channel: grpc.aio.Channel, agent: Agent) -> attestation_pb2.Result:
    """One appraisal of the agent's real TPM evidence on this channel's worker."""
    call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=30)
    try:
        await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
        first = await read_message(call)
        evidence = await quote_evidence(agent, first.challenge)
        await call.write(attestation_pb2.AgentMessage(evidence=evidence))
        reply = await read_message(call)
        assert reply.HasField("result"), reply
        return reply.result
    finally:
        call.cancel()


@asynccontextmanager
async def agents(
    tmp_path: Path, pki: PkiFiles, fleet: Fleet, swtpm_factory: SwtpmFactory, count: int
) -> AsyncIterator[list[Agent]]:
    """``count`` agents, each on a swtpm of its own, enrolled (on whichever worker)."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                enrolled_agent(tmp_path, pki, fleet.verifier, swtpm_factory(), name=f"agent{n}")
            )
            for n in range(count)
        ]


def stored_appraisals(database: Path) -> dict[str, int]:
    """Appraisals stored per device (the audit trail: one entry per stored decision)."""

    async def read() -> dict[str, int]:
        repos = await open_sqlite(database, read_only=True)
        try:
            with_trust = await repos.counts()
            assert with_trust["trust"] >= 0
            found: dict[str, int] = {}
            for row in await repos.engine.read(
                lambda db: db.execute(
                    "SELECT device_id, COUNT(*) FROM audit WHERE event = 'appraisal' "
                    "GROUP BY device_id"
                ).fetchall()
            ):
                found[str(row[0])] = int(row[1])
            return found
        finally:
            await repos.close()

    return asyncio.run(read())


# --- the tests --------------------------------------------------------------------------------


def test_two_workers_serve_one_fleet(
    tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """Four devices enroll through whichever worker their connection reaches; each is then
    appraised twice on worker 0 or 1 (by its number), then once by its real attestation
    client on whichever worker. Both worker processes logged appraisals; the store holds
    every result an agent received once: none lost, none twice."""
    with fleet_verifier(tmp_path, pki, endorsement_ca) as fleet:
        received: dict[str, int] = {}

        async def scenario() -> None:
            async with agents(tmp_path, pki, fleet, swtpm_factory, 4) as fleet_agents:
                for n, agent in enumerate(fleet_agents):
                    channel = await channel_to(
                        n % 2, fleet.attestation_port, agent_creds(pki, agent)
                    )
                    async with channel:
                        for _ in range(2):
                            result = await attest_on(channel, agent)
                            assert result.trust.tier == common_pb2.TIER_AFFIRMING, result
                            assert result.certificate.serial_hex
                    received[agent.enrollment.device_id] = 2
                for agent in fleet_agents:
                    results = await first_results(agent, 1)
                    received[agent.enrollment.device_id] += len(results)

        asyncio.run(scenario())
        by_worker = fleet.appraisals()
        assert sorted(by_worker) == ["worker0", "worker1"], by_worker
        for n, name in enumerate(("worker0", "worker1")):
            pids = {pid for pid, _ in by_worker[name]}
            assert pids == {fleet.pids[n]}
        assert stored_appraisals(fleet.database) == received
        assert len(received) == 4


def test_a_revocation_through_one_worker_is_enforced_by_the_other(
    tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """The device holds a certificate from worker 1. A relying party follows worker 1's
    revocation feed; an operator revokes the device through worker 0. Worker 1's feed sends
    the serial, its CRL lists it, and worker 1 refuses the device's next stream."""
    with fleet_verifier(tmp_path, pki, endorsement_ca) as fleet:

        async def scenario() -> None:
            async with agents(tmp_path, pki, fleet, swtpm_factory, 1) as (agent,):
                device = agent.enrollment.device_id
                port, creds = fleet.attestation_port, operator_creds(pki, tmp_path)
                to_one = await channel_to(1, port, agent_creds(pki, agent))
                async with to_one:
                    serial = (await attest_on(to_one, agent)).certificate.serial_hex
                    assert serial
                    async with (
                        await channel_to(1, port, creds) as one,
                        await channel_to(0, port, creds) as zero,
                    ):
                        feed = query_pb2_grpc.RevocationsStub(one).WatchRevocations(
                            query_pb2.WatchRevocationsRequest(), timeout=60
                        )
                        while not (await next_of(feed)).end_of_snapshot:
                            pass
                        revoked = await query_pb2_grpc.QueryStub(zero).Revoke(
                            query_pb2.RevokeRequest(device_id=device, reason="stolen"),
                            timeout=30,
                        )
                        assert list(revoked.revoked_serials) == [serial]
                        event = await next_of(feed)
                        assert (event.serial_hex, event.device_id) == (serial, device)
                        feed.cancel()
                        crls = query_pb2_grpc.RevocationsStub(one)
                        while True:  # signed again just after the feed's event
                            crl = x509.load_der_x509_crl(
                                (await crls.GetCrl(query_pb2.GetCrlRequest(), timeout=10)).crl_der
                            )
                            if crl.get_revoked_certificate_by_serial_number(int(serial, 16)):
                                break
                            await asyncio.sleep(0.05)
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await attest_on(to_one, agent)
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

        asyncio.run(scenario())
    assert "device revoked device=" in fleet.text()


def test_a_watch_on_one_worker_sees_a_decision_made_on_the_other(
    tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """An operator watches through worker 0; the device's first appraisal is made on
    worker 1: the watch sends it."""
    with fleet_verifier(tmp_path, pki, endorsement_ca) as fleet:

        async def scenario() -> None:
            async with agents(tmp_path, pki, fleet, swtpm_factory, 1) as (agent,):
                device = agent.enrollment.device_id
                port = fleet.attestation_port
                async with await channel_to(0, port, operator_creds(pki, tmp_path)) as zero:
                    watch = query_pb2_grpc.QueryStub(zero).WatchTrust(
                        query_pb2.WatchTrustRequest(initial=True), timeout=60
                    )
                    first = await next_of(watch)
                    assert first.end_of_initial
                    assert first.device_id == device  # enrolled, never appraised
                    async with await channel_to(1, port, agent_creds(pki, agent)) as one:
                        result = await attest_on(one, agent)
                    change = await next_of(watch)
                    assert change.device_id == device
                    assert change.trust.tier == result.trust.tier == common_pb2.TIER_AFFIRMING
                    watch.cancel()

        asyncio.run(scenario())
    (_, device_line), *_ = fleet.appraisals()["worker1"]
    assert device_line


def test_a_killed_worker_is_started_again_and_its_agents_reconnect(
    tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """Two real attestation clients; the worker serving the first is killed (SIGKILL). The
    parent starts it again (a new pid answering for it), and the agent's client reconnects
    and is appraised again; the verifier still stops cleanly."""
    with fleet_verifier(tmp_path, pki, endorsement_ca) as fleet:

        async def scenario() -> None:
            async with agents(tmp_path, pki, fleet, swtpm_factory, 2) as fleet_agents:
                results: dict[int, int] = {0: 0, 1: 0}
                got = asyncio.Event()

                def counter(n: int) -> Callable[[object], None]:
                    def on_result(_: object) -> None:
                        results[n] += 1
                        got.set()

                    return on_result

                stop = asyncio.Event()
                clients = [
                    asyncio.create_task(agent.client(on_result=counter(n)).run(stop))
                    for n, agent in enumerate(fleet_agents)
                ]
                try:
                    while min(results.values()) < 1:
                        await asyncio.wait_for(got.wait(), 30)
                        got.clear()
                    first = fleet_agents[0].enrollment.device_id
                    name, pid = next(
                        (name, pid)
                        for name, seen in fleet.appraisals().items()
                        for pid, device in seen
                        if device == first
                    )
                    before = results[0]
                    os.kill(pid, signal.SIGKILL)
                    again = re.compile(rf"{name} started again \(pid (\d+)\)")
                    while not again.search(fleet.text()):
                        await asyncio.sleep(0.05)
                    while results[0] == before:
                        await asyncio.wait_for(got.wait(), 30)
                        got.clear()
                    match = again.search(fleet.text())
                    assert match is not None
                    assert int(match[1]) != pid
                    index = int(name.removeprefix("worker"))
                    creds = operator_creds(pki, tmp_path)
                    async with await channel_to(index, fleet.attestation_port, creds):
                        pass  # the new process answers for the worker
                finally:
                    stop.set()
                    await asyncio.gather(*clients)

        asyncio.run(scenario())
    assert "exited (killed by SIGKILL): started again in" in fleet.text()


def test_a_second_verifier_cannot_join_the_workers_ports(
    tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """The workers bind with SO_REUSEPORT, which would let any process of the same user
    join their port and take a share of the connections (issue 8): another verifier, one
    process or several, is refused with the address named instead."""
    first = tmp_path / "first"
    first.mkdir()
    with fleet_verifier(first, pki, endorsement_ca) as fleet:
        config = yaml.safe_load((first / "verifier.yaml").read_text())
        config["database"] = str(tmp_path / "second.db")
        config["listen"]["attestation"] = f"127.0.0.1:{fleet.attestation_port}"
        second = tmp_path / "second.yaml"
        second.write_text(yaml.safe_dump(config))
        for workers in ("1", "2"):
            run = subprocess.run(
                [*SERVE, "--config", str(second), "--workers", workers],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert run.returncode == 2, run.stderr
            assert f"cannot listen on 127.0.0.1:{fleet.attestation_port}" in run.stderr
            assert "address already in use" in run.stderr


def test_the_worker_count_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers: give 1 to 64 processes, got 0"):
        ServerConfig(workers=0)
    run = subprocess.run(
        [*SERVE, "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert "--workers: give 1 to 64 processes, got '0'" in run.stderr
