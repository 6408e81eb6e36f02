"""The client side of bench/verifier_cpu.py: devices that enroll with the verifier through
the agent's own enrollment and then attest back to back over real mTLS streams, and the same
client work against the echo (bench/echo.py).

Each round a device quotes the verifier's nonce over the evidence body and sends the
Evidence: 8x H100 GPU state (the agent's nvidia-smi parser over the recorded capture
tests/data/corpus/gpu/nvidia_k8s-test-infra/qx-h100.xml), the OS posture of the simulated host
tree (swtpm/hosttree.py), collected_at set anew, and a key to certify in 1% of rounds (and
on the first of each stream). ``changed``: ``os.pending_security_updates`` counts up every
round, so every appraisal is the first after a posture change.
"""

from __future__ import annotations

import contextlib
import datetime
import random
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from devtrust.agent.collect import RecordedHost
from devtrust.agent.config import AgentConfig, TpmConfig, VerifierEndpoint
from devtrust.agent.enroll import enroll
from devtrust.agent.evidence import host_facts
from devtrust.agent.gpu.smi_xml import parse_smi_xml
from devtrust.agent.interfaces import Tpm
from devtrust.agent.main import make_tpm
from devtrust.agent.posture import collect_posture
from devtrust.agent.state import AgentFiles, Enrollment, new_key, spki
from devtrust.core.binding import qualifying_data, sign_possession
from devtrust.swtpm import EndorsementCA, Swtpm, provision
from devtrust.swtpm.bootlog import simulate_boot
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc, common_pb2
from devtrust.verifier.pki import PkiFiles

ROOT = Path(__file__).resolve().parent.parent
H100 = ROOT / "tests/data/corpus/gpu/nvidia_k8s-test-infra/qx-h100.xml"
CERTIFY_RATE = 0.01
CASES = ("unchanged", "changed")


@dataclass
class Device:
    name: str
    tpm: Tpm
    event_log: bytes
    enrollment: Enrollment
    creds: grpc.ChannelCredentials
    rounds: int = 0


@dataclass
class Counter:
    """What the clients saw: results (echo replies), reply bytes, errors."""

    results: int = 0
    reply_bytes: int = 0
    errors: list[str] = field(default_factory=list)


# --- the evidence -----------------------------------------------------------------------------


class Bodies:
    """Evidence bodies as the agent makes them, from one recorded host."""

    def __init__(self, host_root: Path) -> None:
        gpu = parse_smi_xml(H100.read_bytes())
        if len(gpu.gpus) != 8:
            raise RuntimeError(f"{H100}: expected 8 GPUs, parsed {len(gpu.gpus)}")
        self._base = attestation_pb2.EvidenceBody(
            host=host_facts(root=host_root),
            os=collect_posture(host_root, mounts=["/"]),
            gpu=gpu,
        )

    def body(self, dev: Device, nonce: bytes, *, changed: bool, certify: bool) -> bytes:
        body = attestation_pb2.EvidenceBody()
        body.CopyFrom(self._base)
        stamp = Timestamp()
        stamp.FromDatetime(datetime.datetime.now(datetime.UTC))
        body.collected_at.CopyFrom(stamp)
        if changed:
            body.os.pending_security_updates = dev.rounds
        if certify:
            key = new_key()
            body.certify_key_spki = spki(key)
            body.certify_key_proof = sign_possession(key, nonce, dev.enrollment.device_id)
        dev.rounds += 1
        return body.SerializeToString(deterministic=True)


async def evidence(
    dev: Device,
    bodies: Bodies,
    challenge: attestation_pb2.Challenge,
    *,
    changed: bool,
    certify: bool,
) -> attestation_pb2.Evidence:
    body = bodies.body(dev, challenge.nonce, changed=changed, certify=certify)
    selection = [(s.hash_alg, list(s.pcrs)) for s in challenge.pcr_selection]
    quote = await dev.tpm.quote(qualifying_data(challenge.nonce, body), selection)
    banks: dict[str, common_pb2.PcrBank] = {}
    for (bank, index), value in quote.pcrs.items():
        banks.setdefault(bank, common_pb2.PcrBank(hash_alg=bank)).values[index] = value
    msg = attestation_pb2.Evidence(
        nonce=challenge.nonce,
        quote_attest=quote.attest,
        quote_signature=quote.signature,
        pcrs=list(banks.values()),
        body=body,
    )
    if challenge.event_log.wanted:
        start = challenge.event_log.from_offset
        msg.event_log.CopyFrom(
            attestation_pb2.EventLogChunk(
                offset=start, data=dev.event_log[start:], total_size=len(dev.event_log)
            )
        )
    return msg


# --- the clients ------------------------------------------------------------------------------


async def attest_loop(
    dev: Device, target: str, bodies: Bodies, counter: Counter, *, changed: bool
) -> None:
    """One device attesting back to back until cancelled."""
    async with grpc.aio.secure_channel(target, dev.creds) as channel:
        call = attestation_pb2_grpc.AttestationStub(channel).Attest()
        await call.write(
            attestation_pb2.AgentMessage(hello=attestation_pb2.Hello(agent_version="bench"))
        )
        first = True
        while True:
            msg = await call.read()
            if not isinstance(msg, attestation_pb2.VerifierMessage):
                raise TypeError(f"device {dev.name}: the verifier ended the stream")
            if msg.HasField("result"):
                counter.results += 1
                counter.reply_bytes += msg.ByteSize()
            if msg.HasField("challenge"):
                certify = first or random.random() < CERTIFY_RATE  # noqa: S311 - a load mix
                first = False
                ev = await evidence(dev, bodies, msg.challenge, changed=changed, certify=certify)
                await call.write(attestation_pb2.AgentMessage(evidence=ev))


SELECTION = attestation_pb2.Challenge(
    pcr_selection=[
        common_pb2.PcrSelection(hash_alg="sha256", pcrs=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14])
    ]
)


async def echo_loop(
    dev: Device, target: str, bodies: Bodies, counter: Counter, *, changed: bool
) -> None:
    """The same client work against the echo: the same Evidence, its own nonce."""
    async with grpc.aio.secure_channel(target, dev.creds) as channel:
        call = channel.stream_stream(
            "/bench.Echo/Echo",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )()
        while True:
            challenge = attestation_pb2.Challenge()
            challenge.CopyFrom(SELECTION)
            challenge.nonce = secrets.token_bytes(32)
            certify = random.random() < CERTIFY_RATE  # noqa: S311 - a load mix
            ev = await evidence(dev, bodies, challenge, changed=changed, certify=certify)
            await call.write(attestation_pb2.AgentMessage(evidence=ev).SerializeToString())
            reply = await call.read()
            if not isinstance(reply, bytes):
                raise TypeError(f"device {dev.name}: the echo ended the stream")
            counter.results += 1
            counter.reply_bytes += len(reply)


# --- devices ----------------------------------------------------------------------------------


class Tpms:
    """The devices' TPMs: swtpm processes with EK certificates from a local CA, or in-process
    software TPMs (devtrust.swtpm.soft) under a simulation root."""

    def __init__(self, kind: str, work: Path, stack: contextlib.ExitStack) -> None:
        self.kind = kind
        self._work = work
        self._stack = stack
        if kind == "soft":
            from devtrust.swtpm.simroot import SimulationRoot  # noqa: PLC0415 (H1's, optional)

            self._root = SimulationRoot.create(work / "sim-root")
            self.trusted = {"trust_simulation_root": str(self._root.cert_path)}
        else:
            self._ca = EndorsementCA.create(work / "ek-ca")
            self.trusted = {"trust_swtpm_local_ca": str(self._ca.cert_path)}

    def make(self, i: int, event_log: Path) -> tuple[Tpm, str]:
        """A booted TPM and its TCTI ("" for a software TPM); its event log written."""
        if self.kind == "soft":
            from devtrust.swtpm.soft import SoftTpm  # noqa: PLC0415

            soft = SoftTpm(self._root, seed=f"bench-{i}".encode())
            event_log.write_bytes(soft.event_log())
            return soft, ""
        tpm_dir = self._work / f"tpm{i}"
        provision(tpm_dir, self._ca)
        swtpm = Swtpm(tpm_dir).start()
        self._stack.callback(swtpm.stop)
        tpm = make_tpm(AgentConfig(tpm=TpmConfig(tcti=swtpm.tcti)))
        self._stack.callback(tpm.close)
        simulate_boot(tpm.backend.esapi, event_log)
        return tpm, swtpm.tcti


async def make_devices(  # noqa: PLR0917
    work: Path,
    pki: PkiFiles,
    tpms: Tpms,
    count: int,
    enroll_port: int,
    attest_port: int,
) -> list[Device]:
    endpoint = VerifierEndpoint(
        enrollment=f"127.0.0.1:{enroll_port}",
        attestation=f"127.0.0.1:{attest_port}",
        ca_bundle=pki.ca_cert,
    )
    host_root = work / "host"
    devices = []
    for i in range(count):
        log = work / f"agent{i}" / "event-log.bin"
        log.parent.mkdir(parents=True, exist_ok=True)
        tpm, tcti = tpms.make(i, log)
        cfg = AgentConfig(
            verifier=endpoint,
            tpm=TpmConfig(tcti=tcti) if tcti else TpmConfig(),
            state_dir=work / f"agent{i}" / "state",
            runtime_dir=work / f"agent{i}" / "run",
            event_log=log,
            posture_root=host_root,
            gpu_source="none",
        )
        assert cfg.event_log is not None
        files = AgentFiles(cfg.state_dir, cfg.runtime_dir)
        host = RecordedHost(facts=host_facts(root=host_root), posture=attestation_pb2.OsPosture())
        enrollment = await enroll(cfg, tpm, files, host=host)
        creds = grpc.ssl_channel_credentials(
            pki.ca_cert.read_bytes(), enrollment.channel_key_pem, enrollment.channel_cert_pem
        )
        devices.append(Device(f"dev{i}", tpm, cfg.event_log.read_bytes(), enrollment, creds))
    return devices
