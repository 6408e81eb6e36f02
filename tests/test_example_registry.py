"""The example relying party (issue 10, item 7): a model registry serving model files only to
devices of the zones and tier it allows, following the revocation feed.

End to end: real swtpm devices enrolled with bootstrap tokens that assign their zones, the real
verifier and agent, the registry over real mTLS. Then the command itself as a process, with
device certificates of a test CA, and the model folder's names that lead out of it.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.agent.enroll import enroll
from devtrust.agent.main import make_host, make_tpm
from devtrust.agent.messages import AttestationResult
from devtrust.agent.state import AgentFiles
from devtrust.core.ids import serial_of
from devtrust.core.tier import Tier
from devtrust.example import registry_pb2, registry_pb2_grpc
from devtrust.example.models import ModelNameError, ModelNotFound, ModelStore
from devtrust.example.registry import (
    FeedSettings,
    RegistryService,
    RegistrySettings,
    RunningRegistry,
    start_registry,
)
from devtrust.swtpm import EndorsementCA, Swtpm
from devtrust.verifier.ca import CertificateAuthority, pem, private_key_pem
from devtrust.verifier.config import CertificatesConfig, VerifierConfig
from devtrust.verifier.pki import PkiFiles, issue_operator
from devtrust.verifier.server import RunningVerifier
from tests.conftest import SwtpmFactory
from tests.env import Agent, agent_config, first_results, running, verifier_config
from tests.test_gate import DEVICE, NOW, device_cert
from tests.test_measured_boot_e2e import _extend

PROD = "production-inference"
DEV = "model-development"
MODEL = "llama/weights.bin"
CONTENT = bytes(range(256)) * 1000  # 256,000 bytes: several chunks


@dataclass(frozen=True)
class Identity:
    """A client's mTLS key and certificate (PEM)."""

    key_pem: bytes
    cert_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


@dataclass(frozen=True)
class RegistryPki:
    """The registry's own server identity, from a CA of its own (the devices trust it)."""

    ca_pem: bytes
    cert: Path
    key: Path


def registry_pki(directory: Path) -> RegistryPki:
    ca = CertificateAuthority.create(common_name="model registry CA", now=NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_server(
        hostnames=["127.0.0.1"],
        public_key=key.public_key(),
        now=NOW - datetime.timedelta(minutes=1),
        lifetime=datetime.timedelta(days=1),
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "registry.pem").write_bytes(pem(cert))
    (directory / "registry.key").write_bytes(private_key_pem(key))
    return RegistryPki(pem(ca.cert), directory / "registry.pem", directory / "registry.key")


def models_dir(directory: Path) -> Path:
    """A model, a hidden file, and a secret beside the folder."""
    (directory / "models" / "llama").mkdir(parents=True)
    (directory / "models" / MODEL).write_bytes(CONTENT)
    (directory / "models" / ".registry-state").write_bytes(b"hidden")
    (directory / "secret.txt").write_bytes(b"not a model")
    return directory / "models"


def registry_channel(port: int, pki: RegistryPki, who: Identity) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(pki.ca_pem, who.key_pem, who.cert_pem)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


async def fetch(port: int, pki: RegistryPki, who: Identity, name: str = MODEL) -> bytes:
    """The model's bytes, checked against the SHA-256 of its last chunk."""
    async with registry_channel(port, pki, who) as channel:
        chunks = [
            c
            async for c in registry_pb2_grpc.ModelRegistryStub(channel).FetchModel(
                registry_pb2.FetchModelRequest(name=name), timeout=10
            )
        ]
    offset = 0
    for chunk in chunks:
        assert chunk.offset == offset
        offset += len(chunk.data)
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).digest()
    return data


async def refusal(
    port: int, pki: RegistryPki, who: Identity, name: str = MODEL
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await fetch(port, pki, who, name)
    return refused.value


async def list_models(
    port: int, pki: RegistryPki, who: Identity
) -> registry_pb2.ListModelsResponse:
    async with registry_channel(port, pki, who) as channel:
        return await registry_pb2_grpc.ModelRegistryStub(channel).ListModels(
            registry_pb2.ListModelsRequest(), timeout=10
        )


async def until(condition: Callable[[], bool], what: str, limit_s: float = 20.0) -> None:
    for _ in range(int(limit_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --- end to end: swtpm devices, the verifier, the feed ---------------------------------------


class Clock:
    """Real time plus an offset: the registry that follows no feed, seen later."""

    def __init__(self) -> None:
        self.offset = datetime.timedelta(0)

    def __call__(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + self.offset


def _verifier_config(workdir: Path, pki: PkiFiles, ek_ca: EndorsementCA) -> VerifierConfig:
    """Zone production-inference needs affirming (below it, live certificates are revoked);
    any appraised device gets a certificate otherwise. The registry reads the feed as a
    relying party."""
    return replace(
        verifier_config(workdir, pki, ek_ca, interval_s=0.3),
        certificates=CertificatesConfig(
            min_tier="contraindicated", zone_min_tier={PROD: "affirming"}
        ),
        operators={"registry": "relying-party"},
    )


@asynccontextmanager
async def device_in_zone(
    workdir: Path, pki: PkiFiles, verifier: RunningVerifier, tpm: Swtpm, zone: str
) -> AsyncIterator[Agent]:
    """An agent enrolled with a bootstrap token that assigns ``zone``, as an operator's
    `devtrust token create --zone` makes it."""
    token = secrets.token_urlsafe(24)
    now = datetime.datetime.now(datetime.UTC)
    await verifier.repos.tokens.add(
        hashlib.sha256(token.encode()).hexdigest(),
        now=now,
        expires_at=now + datetime.timedelta(hours=1),
        note="example registry test",
        zone=zone,
    )
    cfg = replace(agent_config(workdir, pki, verifier, tpm, zone), bootstrap_token=token)
    tpm_client = make_tpm(cfg)
    files = AgentFiles(cfg.state_dir, cfg.runtime_dir)
    try:
        enrollment = await enroll(cfg, tpm_client, files, host=make_host(cfg))
        yield Agent(cfg, tpm_client, files, enrollment)
    finally:
        tpm_client.close()


def device_identity(agent: Agent) -> Identity:
    """What the agent wrote for its workloads: device.key and device.pem."""
    run = agent.cfg.runtime_dir
    return Identity((run / "device.key").read_bytes(), (run / "device.pem").read_bytes())


@pytest.mark.swtpm
def test_a_production_device_fetches_a_model_and_loses_it_with_its_trust(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """A production-inference device fetches; a model-development device (trusted, enrolled)
    is refused with the gate's reason. PCR 7 of the production device moves without an
    event: the verifier revokes its certificate, and the registry following the feed refuses
    it at once, while one following no feed serves it until the certificate expires."""
    config = _verifier_config(workdir, pki, endorsement_ca)
    served = registry_pki(workdir / "registry")
    models = models_dir(workdir)

    async def scenario() -> None:
        async with (
            running(config) as verifier,
            device_in_zone(workdir, pki, verifier, swtpm_factory(), PROD) as prod,
            device_in_zone(workdir, pki, verifier, swtpm_factory(), DEV) as dev,
        ):
            await first_results(dev)
            dev_identity = device_identity(dev)
            results: list[AttestationResult] = []
            stop = asyncio.Event()
            attesting = asyncio.create_task(prod.client(on_result=results.append).run(stop))
            registries: list[RunningRegistry] = []
            try:
                await until(lambda: any(r.certificate for r in results), "a device certificate")
                await until((prod.cfg.runtime_dir / "device.pem").exists, "its files")
                identity = device_identity(prod)
                serial = serial_of(identity.cert.serial_number)
                plain_clock = Clock()
                registries = await _registries(workdir, pki, verifier, served, models, plain_clock)
                following, plain = registries
                assert following.follower is not None
                await asyncio.wait_for(following.follower.synced.wait(), 10)

                # Trusted and in the zone: both serve it.
                for registry in registries:
                    assert await fetch(registry.port, served, identity) == CONTENT
                listed = await list_models(following.port, served, identity)
                assert [(m.name, m.size) for m in listed.models] == [(MODEL, len(CONTENT))]
                assert listed.device_id == prod.enrollment.device_id

                # Trusted, but of another zone: refused with the gate's reason.
                refused = await refusal(following.port, served, dev_identity)
                assert refused.code() is grpc.StatusCode.PERMISSION_DENIED
                details = refused.details() or ""
                assert details.startswith("gate.zone: "), details
                assert dev.enrollment.device_id in details
                assert f"zone '{DEV}' is not allowed" in details

                # Its boot state changes: the next appraisal revokes its certificate.
                await _extend(prod, 7, b"an unlogged driver")
                await until(lambda: any(serial in r.revoked_serials for r in results), "revoked")
                revoked = next(r for r in results if serial in r.revoked_serials)
                assert revoked.trust.tier is Tier.CONTRAINDICATED

                # Refused at once by the registry following the feed...
                first = await asyncio.wait_for(_first_refusal(following, served, identity), 2)
                assert first.code() is grpc.StatusCode.PERMISSION_DENIED
                details = first.details() or ""
                assert details.startswith(f"gate.revoked: device {listed.device_id}"), details
                assert details.endswith("(revocation feed)")
                again = await refusal(following.port, served, identity)
                assert (again.details() or "").startswith("gate.revoked: ")
                # ...served by one that follows none, until the certificate expires.
                assert await fetch(plain.port, served, identity) == CONTENT
                expiry = identity.cert.not_valid_after_utc
                plain_clock.offset = expiry - plain_clock() + datetime.timedelta(seconds=1)
                late = await refusal(plain.port, served, identity)
                assert (late.details() or "").startswith("gate.expired: "), late.details()

                # The agent no longer serves the revoked identity to its workloads.
                await until(
                    lambda: not (prod.cfg.runtime_dir / "device.pem").exists(), "files removed"
                )
                assert not (prod.cfg.runtime_dir / "device.key").exists()
            finally:
                stop.set()
                await attesting
                for registry in registries:
                    await registry.stop(None)

    asyncio.run(scenario())


async def _first_refusal(
    registry: RunningRegistry, served: RegistryPki, identity: Identity
) -> grpc.aio.AioRpcError:
    """The first refused fetch, trying again while the revocation is on its way."""
    while True:
        try:
            await fetch(registry.port, served, identity)
        except grpc.aio.AioRpcError as exc:
            return exc
        await asyncio.sleep(0.01)


async def _registries(
    workdir: Path,
    pki: PkiFiles,
    verifier: RunningVerifier,
    served: RegistryPki,
    models: Path,
    plain_clock: Clock,
) -> list[RunningRegistry]:
    """One registry following the verifier's feed, one following none (its clock movable)."""
    ca = CertificateAuthority.load(pki.ca_cert, pki.ca_key)
    cert, key = issue_operator(
        ca,
        workdir,
        name="registry",
        trust_domain="devtrust.local",
        now=datetime.datetime.now(datetime.UTC),
    )
    settings = RegistrySettings(
        models=models,
        listen="127.0.0.1:0",
        cert=served.cert,
        key=served.key,
        ca_bundle=pki.device_bundle,
        min_tier=Tier.AFFIRMING,
        zones=frozenset({PROD}),
        trust_domain="devtrust.local",
    )
    feed = FeedSettings(
        address=f"127.0.0.1:{verifier.attestation_port}",
        client_cert=cert,
        client_key=key,
        verifier_ca=pki.ca_cert,
    )
    following = await start_registry(replace(settings, revocations=feed))
    plain = await start_registry(settings, clock=plain_clock)
    return [following, plain]


# --- the command, with device certificates of a test CA ---------------------------------------


@dataclass(frozen=True)
class Devices:
    ca: CertificateAuthority
    bundle: Path

    def identity(self, *, zone: str = PROD, tier: Tier = Tier.AFFIRMING) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = device_cert(self.ca, zone=zone, tier=tier, key=key)
        return Identity(private_key_pem(key), pem(cert))


def device_ca(directory: Path) -> Devices:
    ca = CertificateAuthority.create(common_name="devtrust device CA", now=NOW)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "device-bundle.pem").write_bytes(pem(ca.cert))
    return Devices(ca, directory / "device-bundle.pem")


def _command(models: Path, served: RegistryPki, bundle: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "devtrust.example.registry",
        *("--models", str(models), "--listen", "127.0.0.1:0"),
        *("--cert", str(served.cert), "--key", str(served.key), "--ca-bundle", str(bundle)),
        *("--min-tier", "warning", "--zone", PROD, "--zone", "staging"),
        *extra,
    ]


def test_the_command_serves_the_zones_and_tier_it_allows_and_nothing_outside_its_folder(
    tmp_path: Path,
) -> None:
    served = registry_pki(tmp_path / "registry")
    devices = device_ca(tmp_path / "devices")
    models = models_dir(tmp_path)
    (models / "escape").symlink_to(tmp_path / "secret.txt")

    async def scenario() -> None:
        process = await asyncio.create_subprocess_exec(
            *_command(models, served, devices.bundle),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
            assert line.startswith("model registry listening on 127.0.0.1:"), line
            assert "zones production-inference, staging, minimum tier warning" in line
            assert line.rstrip().endswith("revocation feed none")
            port = int(line.split("127.0.0.1:", 1)[1].split(":", 1)[0])

            good = devices.identity(tier=Tier.WARNING)
            assert await fetch(port, served, good) == CONTENT
            assert await fetch(port, served, devices.identity(zone="staging")) == CONTENT
            listed = await list_models(port, served, good)
            assert [m.name for m in listed.models] == [MODEL]  # not hidden, not leading out
            assert listed.device_id == DEVICE

            for who, reason in (
                (devices.identity(zone=DEV), "gate.zone: "),
                (devices.identity(tier=Tier.CONTRAINDICATED), "gate.tier: "),
            ):
                refused = await refusal(port, served, who)
                assert refused.code() is grpc.StatusCode.PERMISSION_DENIED
                assert (refused.details() or "").startswith(reason), refused.details()
                with pytest.raises(grpc.aio.AioRpcError) as listing:
                    await list_models(port, served, who)
                assert listing.value.code() is grpc.StatusCode.PERMISSION_DENIED

            # A device of another CA does not get past the TLS handshake.
            stranger = device_ca(tmp_path / "stranger").identity()
            assert (await refusal(port, served, stranger)).code() is grpc.StatusCode.UNAVAILABLE

            for name, code in (
                ("../secret.txt", grpc.StatusCode.INVALID_ARGUMENT),
                (str(tmp_path / "secret.txt"), grpc.StatusCode.INVALID_ARGUMENT),
                ("escape", grpc.StatusCode.INVALID_ARGUMENT),
                (".registry-state", grpc.StatusCode.INVALID_ARGUMENT),
                ("llama/missing.bin", grpc.StatusCode.NOT_FOUND),
                ("llama", grpc.StatusCode.NOT_FOUND),
            ):
                refused = await refusal(port, served, good, name)
                assert refused.code() is code, (name, refused.details())
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(process.wait(), 30)
        assert rc == 0

    asyncio.run(scenario())


def _edited(argv: list[str], edit: tuple[str, ...]) -> list[str]:
    """``("-", OPTION)``: every OPTION removed with its value; ``("=", OPTION, VALUE)``: the
    first one's value replaced; ``("+", ...)``: arguments added."""
    kind, option, *value = edit
    if kind == "+":
        return [*argv, option, *value]
    edited = list(argv)
    while option in edited:
        i = edited.index(option)
        if kind == "=":
            edited[i + 1] = value[0]
            break
        del edited[i : i + 2]
    return edited


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (("-", "--zone"), "the following arguments are required: --zone"),
        (("-", "--min-tier"), "the following arguments are required: --min-tier"),
        (("=", "--min-tier", "best"), "unknown tier 'best'"),
        (("=", "--min-tier", "none"), "none would admit devices nobody appraised"),
        (("=", "--zone", " "), "--zone: a zone name is not empty"),
        (("+", "--revocations", "127.0.0.1:1"), "--revocations needs --client-cert"),
        (("+", "--client-cert", "rp.pem"), "are for --revocations"),
        (("=", "--ca-bundle", "missing.pem"), "cannot read --ca-bundle missing.pem"),
        (("=", "--ca-bundle", "registry.pem"), "not a CA certificate"),
        (("=", "--models", "registry.pem"), "--models registry.pem: not a folder"),
        (("=", "--key", "missing.key"), "cannot read --key missing.key"),
        (("=", "--listen", "256.0.0.1:1"), "--listen 256.0.0.1:1: cannot listen there"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else v,
)
def test_the_command_refuses_bad_settings_in_one_line(
    tmp_path: Path, edit: tuple[str, ...], problem: str
) -> None:
    served = registry_pki(tmp_path)
    devices = device_ca(tmp_path / "devices")
    (tmp_path / "models").mkdir()
    argv = _edited(_command(tmp_path / "models", served, devices.bundle), edit)
    run = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
    )
    assert run.returncode == 2, run.stderr
    assert not run.stdout
    # The error is one line, the last (argparse puts its usage before it).
    assert problem in run.stderr.strip().splitlines()[-1], run.stderr


# --- the model folder ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("../secret.txt", ModelNameError),
        ("llama/../../secret.txt", ModelNameError),
        ("llama/../llama/weights.bin", ModelNameError),
        ("/etc/passwd", ModelNameError),
        ("", ModelNameError),
        ("llama//weights.bin", ModelNameError),
        ("./llama/weights.bin", ModelNameError),
        (".registry-state", ModelNameError),
        ("llama\\weights.bin", ModelNameError),
        ("llama/weights.bin\x00", ModelNameError),
        ("x" * 1025, ModelNameError),
        ("escape", ModelNameError),  # a link out of the folder
        ("inside/escape", ModelNameError),  # a link to a folder outside
        ("loop", ModelNameError),
        ("llama/missing.bin", ModelNotFound),
        ("llama", ModelNotFound),
        ("llama/weights.bin/x", ModelNotFound),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, str) else v.__name__,
)
def test_no_model_name_leads_out_of_the_folder(
    tmp_path: Path, name: str, error: type[Exception]
) -> None:
    store = _store(tmp_path)
    with pytest.raises(error):
        store.model_path(name)
    with pytest.raises(error):
        store.open(name).close()


def _store(tmp_path: Path) -> ModelStore:
    models = models_dir(tmp_path)
    (models / "escape").symlink_to(tmp_path / "secret.txt")
    (models / "inside").mkdir()
    (models / "inside" / "escape").symlink_to(tmp_path, target_is_directory=True)
    (models / "loop").symlink_to(models / "loop")
    (models / "same.bin").symlink_to(models / MODEL)  # a link within: followed
    return ModelStore(models)


def test_the_folder_lists_and_opens_what_may_be_served(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert [(m.name, m.size) for m in store.list()] == [
        (MODEL, len(CONTENT)),
        ("same.bin", len(CONTENT)),
    ]
    for name in (MODEL, "same.bin"):
        with store.open(name) as file:
            assert file.read() == CONTENT


def test_a_handler_reached_without_the_gate_refuses(tmp_path: Path) -> None:
    """The service asks for the gate's decision itself: a server built without the
    interceptor serves nobody."""
    served = registry_pki(tmp_path / "registry")
    devices = device_ca(tmp_path / "devices")
    store = ModelStore(models_dir(tmp_path))

    async def scenario() -> None:
        server = grpc.aio.server()
        registry_pb2_grpc.add_ModelRegistryServicer_to_server(RegistryService(store), server)
        credentials = grpc.ssl_server_credentials(
            [(served.key.read_bytes(), served.cert.read_bytes())],
            root_certificates=devices.bundle.read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        try:
            who = devices.identity()
            refused = await refusal(port, served, who)
            assert refused.code() is grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as listing:
                await list_models(port, served, who)
            assert listing.value.code() is grpc.StatusCode.PERMISSION_DENIED
        finally:
            await server.stop(None)

    asyncio.run(scenario())
