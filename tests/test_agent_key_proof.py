"""The agent proves possession of the key it asks the verifier to certify (issue 7, item 6).

The body built for a challenge carries a signature by the key to certify over the challenge's
nonce and the device id, inside the bytes the quote binds.
"""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from devtrust.agent.attest import AttestationClient
from devtrust.agent.config import AgentConfig
from devtrust.agent.evidence import evidence_body, host_facts
from devtrust.agent.main import make_host
from devtrust.agent.messages import Evidence
from devtrust.agent.state import AgentFiles, Enrollment, new_key, spki
from devtrust.agent.wire import challenge_from_wire
from devtrust.core.binding import PublicKey, possession_proven, qualifying_data
from devtrust.swtpm.hosttree import write_host_tree
from devtrust.v1 import attestation_pb2, common_pb2
from tests.agent_parts import FakeTpm

DEVICE = "ab" * 32
OTHER_DEVICE = "cd" * 32
NONCE = bytes(range(32))


def _client(tmp_path: Path) -> tuple[AttestationClient, FakeTpm]:
    cfg = AgentConfig(
        state_dir=tmp_path / "state",
        runtime_dir=tmp_path / "run",  # no device certificate yet: renewal is due
        event_log=None,
        gpu_source="none",
        posture_root=write_host_tree(tmp_path / "host"),
    )
    tpm = FakeTpm()
    client = AttestationClient(
        cfg,
        tpm=tpm,
        host=make_host(cfg),
        files=AgentFiles(cfg.state_dir, cfg.runtime_dir),
        enrollment=Enrollment(DEVICE, b"", b"", b""),
    )
    return client, tpm


def _public(der: bytes) -> PublicKey:
    key = serialization.load_der_public_key(der)
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return key


def _challenge(nonce: bytes) -> attestation_pb2.Challenge:
    return attestation_pb2.Challenge(
        nonce=nonce, pcr_selection=[common_pb2.PcrSelection(hash_alg="sha256", pcrs=[0])]
    )


def test_body_for_a_challenge_proves_possession_of_the_key_to_certify(tmp_path: Path) -> None:
    client, tpm = _client(tmp_path)
    evidence = asyncio.run(client._answer(challenge_from_wire(_challenge(NONCE))))
    assert isinstance(evidence, Evidence)
    body = attestation_pb2.EvidenceBody.FromString(evidence.body)
    assert body.certify_key_spki
    assert body.certify_key_proof
    key = _public(body.certify_key_spki)
    assert possession_proven(key, body.certify_key_proof, NONCE, DEVICE)
    # Worth nothing for another challenge or another device.
    other_nonce = bytes(32)
    assert not possession_proven(key, body.certify_key_proof, other_nonce, DEVICE)
    assert not possession_proven(key, body.certify_key_proof, NONCE, OTHER_DEVICE)
    # The quote binds the body with the proof in it.
    assert tpm.quoted == [qualifying_data(NONCE, evidence.body)]


def test_each_challenge_gets_its_own_proof(tmp_path: Path) -> None:
    """The pending key is kept until certified, but its proof is made for every nonce."""
    client, _ = _client(tmp_path)
    second_nonce = bytes(reversed(NONCE))

    async def both() -> list[Evidence]:
        answers = [
            await client._answer(challenge_from_wire(_challenge(n))) for n in (NONCE, second_nonce)
        ]
        assert all(isinstance(a, Evidence) for a in answers)
        return [a for a in answers if isinstance(a, Evidence)]

    first, second = (attestation_pb2.EvidenceBody.FromString(e.body) for e in asyncio.run(both()))
    assert first.certify_key_spki == second.certify_key_spki
    key = _public(second.certify_key_spki)
    assert possession_proven(key, second.certify_key_proof, second_nonce, DEVICE)
    assert not possession_proven(key, first.certify_key_proof, second_nonce, DEVICE)


def test_no_key_to_certify_no_proof() -> None:
    now = datetime.datetime.now(datetime.UTC)
    body = attestation_pb2.EvidenceBody.FromString(
        evidence_body(host=host_facts(), certify_key_spki=b"", now=now)
    )
    assert not body.certify_key_spki
    assert not body.certify_key_proof


def test_evidence_body_carries_the_proof_it_is_given() -> None:
    now = datetime.datetime.now(datetime.UTC)
    key = new_key()
    body = attestation_pb2.EvidenceBody.FromString(
        evidence_body(
            host=host_facts(), certify_key_spki=spki(key), certify_key_proof=b"proof", now=now
        )
    )
    assert body.certify_key_proof == b"proof"
