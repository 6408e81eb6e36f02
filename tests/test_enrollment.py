"""Enrollment refusals, driven by hand against a real verifier with real swtpm TPMs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

from agent.enrollment_proof import proof_for
from agent.evidence import host_facts
from agent.state import new_key, spki
from agent.tpm import AK_ATTRIBUTES, TpmBackend, ak_template
from protos.devtrust.v1 import enrollment_pb2, enrollment_pb2_grpc
from swtpm import EndorsementCA, Swtpm
from tests.conftest import SwtpmFactory
from tests.env import channel_credentials, running, verifier_config
from verifier.pki import PkiFiles

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
    return enrollment_pb2.EnrollRequest(
        ek_certificate=backend.ek_certificate() if ek_certificate is None else ek_certificate,
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
) -> tuple[grpc.aio.AioRpcError | None, dict[str, int]]:
    config = verifier_config(workdir, pki, trusted)
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
                    return exc, verifier.store.counts()
            return None, verifier.store.counts()

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
        ("empty", b"", "EK certificate is empty"),
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
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)
    backend = TpmBackend(tpm.tcti)
    request = _request(backend)

    async def scenario() -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError, dict[str, int]]:
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
            # ... and the challenge is spent: the real secret no longer helps.
            secret = backend.activate_credential(
                challenge.credential_blob, challenge.encrypted_secret
            )
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await stub.Activate(
                    enrollment_pb2.ActivateRequest(
                        enrollment_id=challenge.enrollment_id,
                        proof=proof_for(secret, challenge.enrollment_id, request.channel_key_spki),
                    ),
                    timeout=10,
                )
            return wrong.value, again.value, verifier.store.counts()

    try:
        wrong, again, counts = asyncio.run(scenario())
    finally:
        backend.close()
    assert wrong.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "credential activation proof is wrong" in (wrong.details() or "")
    assert again.code() == grpc.StatusCode.NOT_FOUND
    assert counts["devices"] == 0


def test_credential_for_another_ak_cannot_be_activated(swtpm_factory: SwtpmFactory) -> None:
    """MakeCredential binds the AK name: a challenge made for this EK but another AK name is
    refused by the TPM itself (an attacker cannot enroll a software AK with a real EK)."""
    from agent.errors import TpmError
    from verifier.enrollment import make_challenge

    backend = TpmBackend(swtpm_factory().tcti)
    try:
        other_name = b"\x00\x0b" + bytes(32)
        challenge = make_challenge(backend.ek_public(), other_name)
        backend.ak_public()
        with pytest.raises(TpmError, match="ActivateCredential failed"):
            backend.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    finally:
        backend.close()
