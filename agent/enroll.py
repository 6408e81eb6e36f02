"""Enrollment, the agent's side (DESIGN.md flow 1)."""

from __future__ import annotations

import logging

from agent.channel import enrollment_channel
from agent.config import AgentConfig
from agent.enrollment_proof import proof_for
from agent.errors import ConfigError
from agent.evidence import host_facts
from agent.state import AgentFiles, Enrollment, der_to_pem, key_pem, new_key, spki
from agent.tpm import AsyncTpm
from protos.devtrust.v1 import common_pb2, enrollment_pb2, enrollment_pb2_grpc

logger = logging.getLogger(__name__)


class EnrollmentPending(Exception):
    """The verifier enrolled the device but an operator must approve it first."""


def _verifier_ca(cfg: AgentConfig) -> bytes:
    try:
        return cfg.verifier.ca_bundle.read_bytes()
    except OSError as exc:
        raise ConfigError(f"verifier.ca_bundle {cfg.verifier.ca_bundle}: {exc.strerror}") from exc


async def enroll(cfg: AgentConfig, tpm: AsyncTpm, files: AgentFiles) -> Enrollment:
    """Enroll this host's TPM; return and save the attestation-channel identity."""
    backend = tpm.backend
    ek_cert = await tpm.run(backend.ek_certificate)
    ek_public = await tpm.run(backend.ek_public)
    ak_public = await tpm.run(backend.ak_public)
    channel_key = new_key()
    channel_spki = spki(channel_key)
    ca_pem = _verifier_ca(cfg)
    async with enrollment_channel(cfg, ca_pem) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)
        challenge = await stub.Enroll(
            enrollment_pb2.EnrollRequest(
                ek_certificate=ek_cert or b"",
                ek_public=ek_public,
                ak_public=ak_public,
                host=host_facts(),
                bootstrap_token=cfg.bootstrap_token,
                channel_key_spki=channel_spki,
            ),
            timeout=cfg.rpc_timeout_s,
        )
        secret = await tpm.run(
            backend.activate_credential, challenge.credential_blob, challenge.encrypted_secret
        )
        response = await stub.Activate(
            enrollment_pb2.ActivateRequest(
                enrollment_id=challenge.enrollment_id,
                proof=proof_for(secret, challenge.enrollment_id, channel_spki),
            ),
            timeout=cfg.rpc_timeout_s,
        )
    if response.state == common_pb2.DEVICE_STATE_PENDING_APPROVAL:
        raise EnrollmentPending(f"device {response.device_id} awaits operator approval")
    chain_pem = b"".join(der_to_pem(der) for der in response.ca_chain)
    enrollment = Enrollment(
        device_id=response.device_id,
        channel_key_pem=key_pem(channel_key),
        channel_cert_pem=der_to_pem(response.channel_certificate),
        ca_pem=chain_pem or ca_pem,
    )
    files.save_enrollment(enrollment)
    logger.info("enrolled as device %s", enrollment.device_id)
    return enrollment
