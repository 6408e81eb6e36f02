"""Enrollment refusals, driven by hand against a real verifier with real swtpm TPMs."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

from devtrust.agent.enroll import EnrollmentPending, enroll
from devtrust.agent.evidence import host_facts
from devtrust.agent.main import make_host, make_tpm
from devtrust.agent.state import AgentFiles, new_key, spki
from devtrust.agent.tpm import AK_ATTRIBUTES, TpmBackend, ak_template
from devtrust.core.binding import proof_for
from devtrust.core.ids import DeviceId
from devtrust.swtpm import EndorsementCA, Swtpm
from devtrust.v1 import enrollment_pb2, enrollment_pb2_grpc
from devtrust.verifier.config import EndorsementConfig, EnrollmentConfig, VerifierConfig
from devtrust.verifier.enrollment import device_id_for
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.records import DeviceRecord, DeviceState
from devtrust.verifier.storage import DeviceQuery, SqliteRepositories
from devtrust.verifier.tpm.structures import parse_public
from tests.conftest import SwtpmFactory
from tests.db import sqlite_file, with_repos
from tests.env import agent_config, channel_credentials, running, verifier_config

pytestmark = pytest.mark.swtpm


def _signing_key_public(backend: TpmBackend, attributes: int) -> bytes:
    """A primary ECC signing key with the given attributes, made in the real TPM."""
    template = ak_template()
    template.publicArea.objectAttributes = attributes
    handle, public, _, _, _ = backend.esapi.create_primary(
        TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
    )
    backend.esapi.flush_context(handle)
    return bytes(public.marshal())


def _request(
    backend: TpmBackend, *, ak_public: bytes | None = None, ek_certificate: bytes | None = None
) -> enrollment_pb2.EnrollRequest:
    if ek_certificate is None:
        ek_certificate = backend.ek_certificate() or b""
    return enrollment_pb2.EnrollRequest(
        ek_certificate=ek_certificate,
        ek_public=backend.ek_public(),
        ak_public=backend.ak_public() if ak_public is None else ak_public,
        host=host_facts(),
        channel_key_spki=spki(new_key()),
    )


Call = Callable[[enrollment_pb2_grpc.EnrollmentStub], object]


def _enroll(
    workdir: Path,
    pki: PkiFiles,
    trusted: EndorsementCA,
    tpm: Swtpm,
    make_request: Callable[[TpmBackend], enrollment_pb2.EnrollRequest],
    config: VerifierConfig | None = None,
) -> tuple[grpc.aio.AioRpcError | None, dict[str, int]]:
    config = config or verifier_config(workdir, pki, trusted)
    backend = TpmBackend(tpm.tcti)
    request = make_request(backend)

    async def scenario() -> tuple[grpc.aio.AioRpcError | None, dict[str, int]]:
        async with running(config) as verifier:
            async with grpc.aio.secure_channel(
                f"127.0.0.1:{verifier.enrollment_port}", channel_credentials(pki)
            ) as channel:
                stub = enrollment_pb2_grpc.EnrollmentStub(channel)
                try:
                    await stub.Enroll(request, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    return exc, (await verifier.repos.counts())
            return None, (await verifier.repos.counts())

    try:
        return asyncio.run(scenario())
    finally:
        backend.close()


def test_ek_certificate_from_an_untrusted_ca_is_rejected(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    other_endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
) -> None:
    foreign_tpm = swtpm_factory(other_endorsement_ca)
    err, counts = _enroll(workdir, pki, endorsement_ca, foreign_tpm, _request)
    assert err is not None
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "does not chain to a trusted endorsement root" in (err.details() or "")
    assert counts["enrollments"] == 0


def test_trusted_ek_is_challenged(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """The control for the refusals here: the same request from a trusted TPM passes."""
    err, counts = _enroll(workdir, pki, endorsement_ca, swtpm_factory(), _request)
    assert err is None
    assert counts["enrollments"] == 1


@pytest.mark.parametrize(
    ("name", "attributes", "message"),
    [
        (
            "not restricted",
            AK_ATTRIBUTES & ~TPMA_OBJECT.RESTRICTED,
            "AK lacks required attributes: restricted",
        ),
        (
            "not fixedTPM",
            AK_ATTRIBUTES & ~TPMA_OBJECT.FIXEDTPM & ~TPMA_OBJECT.FIXEDPARENT,
            "AK lacks required attributes: fixed_tpm,fixed_parent",
        ),
    ],
)
def test_ak_without_required_attributes_is_refused(
    name: str,
    attributes: int,
    message: str,
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    shared_swtpm: Swtpm,
) -> None:
    def make(backend: TpmBackend) -> enrollment_pb2.EnrollRequest:
        return _request(backend, ak_public=_signing_key_public(backend, attributes))

    err, counts = _enroll(workdir, pki, endorsement_ca, shared_swtpm, make)
    assert err is not None, name
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert message in (err.details() or "")
    assert counts["enrollments"] == 0


@pytest.mark.parametrize(
    ("name", "ek_certificate", "message"),
    [
        ("garbage", b"\x30\x03garbage", "EK certificate is not DER X.509"),
        ("truncated DER", b"\x30\x82\x01\x00\x30", "EK certificate is not DER X.509"),
    ],
)
def test_garbage_ek_certificate_is_invalid_argument(
    name: str,
    ek_certificate: bytes,
    message: str,
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    shared_swtpm: Swtpm,
) -> None:
    err, counts = _enroll(
        workdir,
        pki,
        endorsement_ca,
        shared_swtpm,
        lambda b: _request(b, ek_certificate=ek_certificate),
    )
    assert err is not None, name
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.details() or "")
    assert set(counts.values()) == {0}


def test_garbage_ak_public_is_invalid_argument(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, shared_swtpm: Swtpm
) -> None:
    err, _ = _enroll(
        workdir,
        pki,
        endorsement_ca,
        shared_swtpm,
        lambda b: _request(b, ak_public=b"\x00\x10\x00\x23\x00\x0b"),
    )
    assert err is not None
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "TPM2B_PUBLIC: truncated" in (err.details() or "")


def test_activation_proof_is_checked_and_used_once(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """A wrong answer is refused and leaves the challenge answerable (issue 7, item 8:
    anyone who learns an enrollment id must not be able to void it); the right answer
    enrolls; the challenge is then spent."""
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)
    backend = TpmBackend(tpm.tcti)
    request = _request(backend)

    async def scenario() -> tuple[
        grpc.aio.AioRpcError, dict[str, int], grpc.aio.AioRpcError, dict[str, int]
    ]:
        async with (
            running(config) as verifier,
            grpc.aio.secure_channel(
                f"127.0.0.1:{verifier.enrollment_port}", channel_credentials(pki)
            ) as channel,
        ):
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            challenge = await stub.Enroll(request, timeout=10)
            # A proof made with a guessed secret is refused ...
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await stub.Activate(
                    enrollment_pb2.ActivateRequest(
                        enrollment_id=challenge.enrollment_id,
                        proof=proof_for(
                            bytes(32), challenge.enrollment_id, request.channel_key_spki
                        ),
                    ),
                    timeout=10,
                )
            after_wrong = await verifier.repos.counts()
            # ... and the challenge survives it: the real secret still enrolls, once.
            secret = backend.activate_credential(
                challenge.credential_blob, challenge.encrypted_secret
            )
            right = enrollment_pb2.ActivateRequest(
                enrollment_id=challenge.enrollment_id,
                proof=proof_for(secret, challenge.enrollment_id, request.channel_key_spki),
            )
            response = await stub.Activate(right, timeout=10)
            assert response.channel_certificate
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await stub.Activate(right, timeout=10)
            return wrong.value, after_wrong, again.value, (await verifier.repos.counts())

    try:
        wrong, after_wrong, again, counts = asyncio.run(scenario())
    finally:
        backend.close()
    assert wrong.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "credential activation proof is wrong" in (wrong.details() or "")
    assert after_wrong["enrollments"] == 1
    assert after_wrong["devices"] == 0
    assert again.code() == grpc.StatusCode.NOT_FOUND
    assert counts["devices"] == 1
    assert counts["enrollments"] == 0
    assert counts["certificates"] == 1  # one channel certificate, not two


def test_credential_for_another_ak_cannot_be_activated(swtpm_factory: SwtpmFactory) -> None:
    """MakeCredential binds the AK name: a challenge made for this EK but another AK name is
    refused by the TPM itself (an attacker cannot enroll a software AK with a real EK)."""
    from devtrust.agent.errors import TpmError
    from devtrust.verifier.enrollment import make_challenge

    backend = TpmBackend(swtpm_factory().tcti)
    try:
        other_name = b"\x00\x0b" + bytes(32)
        challenge = make_challenge(backend.ek_public(), other_name)
        backend.ak_public()
        with pytest.raises(TpmError, match="ActivateCredential failed"):
            backend.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    finally:
        backend.close()


# --- bootstrap tokens, operator approval, EK allowlist -----------------------------------


def _enroll_with(
    workdir: Path, pki: PkiFiles, config: VerifierConfig, tpms: list[Swtpm], tokens: list[str]
) -> list[str]:
    """Enroll one agent per TPM with the given tokens; the outcome of each, in order."""

    async def scenario() -> list[str]:
        outcomes = []
        async with running(config) as verifier:
            for n, (tpm, token) in enumerate(zip(tpms, tokens, strict=True)):
                cfg = replace(
                    agent_config(workdir, pki, verifier, tpm, f"a{n}"), bootstrap_token=token
                )
                atpm = make_tpm(cfg)
                try:
                    files = AgentFiles(cfg.state_dir, cfg.runtime_dir)
                    e = await enroll(cfg, atpm, files, host=make_host(cfg))
                    outcomes.append(f"enrolled {e.device_id[:8]}")
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(f"{exc.code().name}: {exc.details()}")
                except EnrollmentPending as exc:
                    outcomes.append(f"pending: {exc}")
                finally:
                    atpm.close()
        return outcomes

    return asyncio.run(scenario())


def test_bootstrap_tokens_are_required_hashed_and_single_use(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    config = replace(
        verifier_config(workdir, pki, endorsement_ca),
        enrollment=EnrollmentConfig(require_token=True),
    )
    now = datetime.datetime.now(datetime.UTC)
    good, old = "tok-" + "a" * 40, "tok-" + "b" * 40

    async def add_tokens(store: SqliteRepositories) -> None:
        await store.tokens.add(
            hashlib.sha256(good.encode()).hexdigest(),
            now=now,
            expires_at=now + datetime.timedelta(hours=1),
        )
        await store.tokens.add(
            hashlib.sha256(old.encode()).hexdigest(),
            now=now,
            expires_at=now - datetime.timedelta(seconds=1),
        )

    with_repos(config.database, add_tokens)
    tpms = [swtpm_factory() for _ in range(3)]
    outcomes = _enroll_with(
        workdir, pki, config, [tpms[0], tpms[0], tpms[1], tpms[2]], ["", good, good, old]
    )
    assert outcomes[0].startswith("PERMISSION_DENIED")
    assert (
        "requires a bootstrap token (enrollment.require_token) and none was given" in (outcomes[0])
    )
    assert outcomes[1].startswith("enrolled")
    assert "bootstrap token already used" in outcomes[2]
    assert "bootstrap token expired" in outcomes[3]
    assert good.encode() not in sqlite_file(config.database).read_bytes()


def test_operator_approval(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    config = replace(
        verifier_config(workdir, pki, endorsement_ca),
        enrollment=EnrollmentConfig(require_approval=True),
    )
    tpm = swtpm_factory()
    [first] = _enroll_with(workdir, pki, config, [tpm], [""])
    assert first.startswith("pending: device ")

    async def approve(store: SqliteRepositories) -> DeviceRecord:
        [device] = await store.devices.list(DeviceQuery())
        assert device.state is DeviceState.PENDING_APPROVAL
        assert (await store.counts())["certificates"] == 0  # no channel certificate while pending
        await store.devices.set_state(
            device.device_id,
            DeviceState.ENROLLED,
            now=datetime.datetime.now(datetime.UTC),
            event="approved",
        )
        return device

    device = with_repos(config.database, approve)
    [second] = _enroll_with(workdir, pki, config, [tpm], [""])
    assert second == f"enrolled {device.device_id[:8]}"


def test_tpm_without_ek_certificate_enrolls_only_when_allowlisted(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, shared_swtpm: Swtpm
) -> None:
    backend = TpmBackend(shared_swtpm.tcti)
    try:
        ek_key = parse_public(backend.ek_public()).public_key()
    finally:
        backend.close()
    device_id = device_id_for(ek_key)

    def without_cert(b: TpmBackend) -> enrollment_pb2.EnrollRequest:
        return _request(b, ek_certificate=b"")

    refused, _ = _enroll(workdir, pki, endorsement_ca, shared_swtpm, without_cert)
    assert refused is not None
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"EK public key (sha256 {device_id}) is not in" in (refused.details() or "")
    allow = replace(
        verifier_config(workdir, pki, endorsement_ca),
        endorsement=EndorsementConfig(
            roots=[],
            trust_swtpm_local_ca=endorsement_ca.cert_path,
            allowed_ek_sha256=[device_id.upper()],
        ),
    )
    err, counts = _enroll(workdir, pki, endorsement_ca, shared_swtpm, without_cert, allow)
    assert err is None
    assert counts["enrollments"] == 1


def test_ak_with_a_sha1_scheme_is_refused(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, shared_swtpm: Swtpm
) -> None:
    from tpm2_pytss.constants import TPM2_ALG
    from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_PUBLIC

    def make(backend: TpmBackend) -> enrollment_pb2.EnrollRequest:
        public = TPMT_PUBLIC.parse("ecc256:ecdsa-sha1", objectAttributes=AK_ATTRIBUTES)
        public.parameters.eccDetail.symmetric.algorithm = TPM2_ALG.NULL
        handle, out, _, _, _ = backend.esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=public), ESYS_TR.ENDORSEMENT
        )
        backend.esapi.flush_context(handle)
        return _request(backend, ak_public=bytes(out.marshal()))

    err, _ = _enroll(workdir, pki, endorsement_ca, shared_swtpm, make)
    assert err is not None
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "AK signing scheme 0x0018/hash 0x0004 is not allowed" in (err.details() or "")


@pytest.mark.parametrize("case", ["another TPM's EK", "a signing key as EK"])
def test_ek_public_area_must_be_the_certified_restricted_decryption_key(
    case: str,
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    shared_swtpm: Swtpm,
    swtpm_factory: SwtpmFactory,
) -> None:
    other = TpmBackend(swtpm_factory().tcti)
    try:
        foreign_ek = other.ek_public()
    finally:
        other.close()

    def make(backend: TpmBackend) -> enrollment_pb2.EnrollRequest:
        request = _request(backend)
        request.ek_public = foreign_ek if case == "another TPM's EK" else request.ak_public
        return request

    err, counts = _enroll(workdir, pki, endorsement_ca, shared_swtpm, make)
    assert err is not None
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    expected = (
        "EK public area does not hold the key of the EK certificate"
        if case == "another TPM's EK"
        else "EK public area lacks decrypt"
    )
    assert expected in (err.details() or "")
    assert counts["enrollments"] == 0


def test_a_device_revoked_while_challenged_stays_revoked(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """Revocation between Enroll and Activate is not undone by the right answer."""
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)
    [first] = _enroll_with(workdir, pki, config, [tpm], [""])
    assert first.startswith("enrolled")
    backend = TpmBackend(tpm.tcti)
    request = _request(backend)

    async def scenario() -> grpc.aio.AioRpcError:
        async with (
            running(config) as verifier,
            grpc.aio.secure_channel(
                f"127.0.0.1:{verifier.enrollment_port}", channel_credentials(pki)
            ) as channel,
        ):
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            challenge = await stub.Enroll(request, timeout=10)
            await verifier.repos.devices.set_state(
                DeviceId(challenge.device_id),
                DeviceState.REVOKED,
                now=datetime.datetime.now(datetime.UTC),
                event="revoked",
            )
            secret = backend.activate_credential(
                challenge.credential_blob, challenge.encrypted_secret
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Activate(
                    enrollment_pb2.ActivateRequest(
                        enrollment_id=challenge.enrollment_id,
                        proof=proof_for(secret, challenge.enrollment_id, request.channel_key_spki),
                    ),
                    timeout=10,
                )
            record = await verifier.repos.devices.get(DeviceId(challenge.device_id))
            assert record is not None
            assert record.state is DeviceState.REVOKED
            return refused.value

    try:
        refused = asyncio.run(scenario())
    finally:
        backend.close()
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "is revoked" in (refused.details() or "")
