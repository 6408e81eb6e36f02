"""The evidence body at the gRPC edge (verifier/wire_body.py): what policy reads of it is
converted lazily and once, and its posture digest, the policy's cache key, changes exactly
when what policy can read changes."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from devtrust.agent.evidence import evidence_body
from devtrust.core.ids import Nonce
from devtrust.v1 import attestation_pb2, common_pb2
from devtrust.verifier import wire_body
from devtrust.verifier.appraisal import Evidence
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.errors import MalformedInput
from devtrust.verifier.wire import evidence_from_wire
from devtrust.verifier.wire_body import WireBody, body_from_json, body_from_wire

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)
HOST = common_pb2.HostFacts(hostname="gpu-07", kernel="6.8.0")
GPU = attestation_pb2.GpuState(
    driver_version="580.65.06", gpus=[attestation_pb2.Gpu(index=0, ecc_enabled=True)]
)


def _body(**fields: Any) -> WireBody:
    args: dict[str, Any] = {"host": HOST, "certify_key_spki": b"", "now": NOW, "gpu": GPU}
    args.update(fields)
    return WireBody(body_from_wire(evidence_body(**args), LimitsConfig()))


def test_the_body_is_converted_at_the_first_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    convert = wire_body.plain

    def counting(msg: Any) -> dict[str, Any]:
        if isinstance(msg, attestation_pb2.EvidenceBody):  # not its parts, converted within
            calls.append(msg)
        return convert(msg)

    monkeypatch.setattr(wire_body, "plain", counting)
    body = _body()
    assert body.posture_digest  # the cache key needs no conversion
    assert calls == []
    first = body.plain()
    assert body.plain() is first
    assert len(calls) == 1
    assert first["gpu"]["gpus"][0]["ecc_enabled"] is True
    assert first["os"] is None  # not sent: None, so that no rule over it passes vacuously


@pytest.mark.parametrize(
    ("name", "fields", "same"),
    [
        ("another collection time", {"now": NOW + datetime.timedelta(seconds=30)}, True),
        ("another key to certify", {"certify_key_spki": b"spki", "certify_key_proof": b"p"}, True),
        ("another hostname", {"host": common_pb2.HostFacts(hostname="gpu-08")}, False),
        ("another driver", {"gpu": attestation_pb2.GpuState(driver_version="580.1")}, False),
        ("no GPU part", {"gpu": None}, False),
        ("an empty GPU part", {"gpu": attestation_pb2.GpuState()}, False),
        ("an OS part", {"os": attestation_pb2.OsPosture()}, False),
    ],
)
def test_the_posture_digest_follows_what_policy_reads(
    name: str, fields: dict[str, Any], same: bool
) -> None:
    assert (_body(**fields).posture_digest == _body().posture_digest) is same, name


def test_no_and_empty_gpu_parts_differ() -> None:
    """required_evidence tells an absent part from an empty one; so must the cache key."""
    assert _body(gpu=None).posture_digest != _body(gpu=attestation_pb2.GpuState()).posture_digest


def test_evidence_from_the_wire_carries_its_body() -> None:
    data = evidence_body(host=HOST, certify_key_spki=b"", now=NOW, gpu=GPU)
    msg = attestation_pb2.Evidence(
        nonce=b"n" * 32, quote_attest=b"a", quote_signature=b"s", body=data
    )
    evidence = evidence_from_wire(msg, LimitsConfig())
    assert evidence.body == data
    assert evidence.body_doc.posture_digest == _body().posture_digest
    assert evidence.body_doc.plain()["host"]["hostname"] == "gpu-07"


def test_evidence_without_a_body_document_cannot_be_made() -> None:
    """No default: evidence that reached policy with an empty document would be judged on
    nothing (the closure this replaced defaulted to ``dict``)."""
    with pytest.raises(TypeError, match="body_doc"):
        # The missing argument mypy reports is what this test makes sure fails at run time too.
        Evidence(  # type: ignore[call-arg]
            nonce=Nonce(b"n" * 32),
            attest=b"a",
            signature=b"s",
            pcrs={},
            body=b"",
            certify_key=None,
        )


def test_a_policy_dry_run_reads_json_bodies() -> None:
    from google.protobuf import json_format

    text = json_format.MessageToJson(attestation_pb2.EvidenceBody(host=HOST, gpu=GPU))
    assert body_from_json(text.encode()).plain()["gpu"]["driver_version"] == "580.65.06"
    with pytest.raises(MalformedInput, match="not an EvidenceBody in JSON"):
        body_from_json(b'{"gpu": 3}')
    with pytest.raises(MalformedInput, match="not an EvidenceBody in JSON"):
        body_from_json(b"\xff")
