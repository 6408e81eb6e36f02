"""Issue 11, item 2: the verifier's per-attestation shortcuts, each with the attack it must not
let through.

- The policy cache: an unchanged posture reuses the device's last policy outcome; a change
  to anything policy reads (host, os, gpu, which parts were sent, the zone and labels of
  the verifier's record, the policy's rules and bulletins) is evaluated again. One case per
  input: a key that left one out would let a device keep an old verdict after its evidence
  changed. What the device changes at every evidence and policy never reads (collected_at,
  the key to certify) keeps the cache. An abandoned evaluation (past its budget) is not
  cached. The quote, nonce and clock checks run on every evidence, cached or not.
- The converter of the evidence body to plain values, planned once per message type, gives
  the same values as converting field by field.
- ``attestation.interval_s: 0``: the next Challenge travels in the same message as each
  Result (one message per round), over the real stream.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.agent.evidence import host_facts
from devtrust.agent.gpu.smi_xml import parse_smi_xml
from devtrust.agent.posture import collect_posture
from devtrust.core.binding import qualifying_data
from devtrust.core.ids import DeviceId, Nonce
from devtrust.swtpm import EndorsementCA
from devtrust.swtpm.hosttree import write_host_tree
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc
from devtrust.verifier.appraisal import Appraisal, Evidence, Expectation, appraise, policy_key
from devtrust.verifier.config import DEFAULT_POLICY, LimitsConfig
from devtrust.verifier.document import Bulletins, Document
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.policy import Policy, PolicyOutcome
from devtrust.verifier.policy_pool import budget_exceeded
from devtrust.verifier.tpm.constants import Alg
from devtrust.verifier.tpm.structures import PcrSelect
from devtrust.verifier.wire_body import WireBody, body_from_wire, plain, raw_parts
from tests import quotes
from tests.conftest import SwtpmFactory
from tests.corpus import IN_REPO
from tests.env import enrolled_agent, quote_evidence, read_message, running, stream_channel
from tests.env import verifier_config as base_config

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)
DEVICE = DeviceId("e" * 64)
SELECTION = (PcrSelect(Alg.SHA256, (0, 7)),)
PCRS: dict[tuple[int, int], bytes] = {(Alg.SHA256, 0): bytes(32), (Alg.SHA256, 7): bytes(32)}
AK = ec.generate_private_key(ec.SECP256R1())
H100 = IN_REPO / "gpu" / "nvidia_k8s-test-infra" / "qx-h100.xml"
POLICY = Policy.load(DEFAULT_POLICY)


class Counting:
    """The real policy, counting its evaluations."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.calls = 0

    @property
    def policy_id(self) -> str:
        return self.policy.policy_id

    @property
    def bulletins(self) -> Bulletins:
        return self.policy.bulletins

    @property
    def digest(self) -> str:
        return self.policy.digest

    def evaluate(self, doc: Document, **kwargs: Any) -> PolicyOutcome:
        self.calls += 1
        return self.policy.evaluate(doc, **kwargs)


def _body_message(tmp: Path) -> attestation_pb2.EvidenceBody:
    """An 8x H100 host as the agent reports it: the recorded capture, a simulated host."""
    root = write_host_tree(tmp / "host")
    return attestation_pb2.EvidenceBody(
        host=host_facts(root=root),
        os=collect_posture(root, mounts=["/"]),
        gpu=parse_smi_xml(H100.read_bytes()),
    )


def _evidence(body: attestation_pb2.EvidenceBody, nonce: Nonce, clock: int) -> Evidence:
    data = body.SerializeToString(deterministic=True)
    message = quotes.attest(
        extra=qualifying_data(nonce, data),
        selection=SELECTION,
        digest=quotes.digest_of([PCRS[(Alg.SHA256, 0)], PCRS[(Alg.SHA256, 7)]]),
        clock=clock,
    )
    return Evidence(
        nonce=nonce,
        attest=message,
        signature=quotes.ecdsa_signature(AK, message),
        pcrs=PCRS,
        body=data,
        body_doc=WireBody(body_from_wire(data, LimitsConfig()), raw=data),
        certify_key=None,
    )


def _expect(nonce: Nonce, policy: Any, **overrides: Any) -> Expectation:
    return replace(
        Expectation(
            device_id=DEVICE,
            nonce=nonce,
            selection=SELECTION,
            ak_key=AK.public_key(),
            staleness=datetime.timedelta(minutes=3),
            policy=policy,
        ),
        **overrides,
    )


def _appraise(
    body: attestation_pb2.EvidenceBody, policy: Any, clock: int, **overrides: Any
) -> Appraisal:
    nonce = Nonce(clock.to_bytes(32, "big"))
    return appraise(_evidence(body, nonce, clock), _expect(nonce, policy, **overrides), now=NOW)


def _ids(appraisal: Appraisal) -> set[str]:
    return {f.id for f in appraisal.result.findings}


Edit = Callable[[attestation_pb2.EvidenceBody], None]


def _driver(body: attestation_pb2.EvidenceBody) -> None:
    body.gpu.driver_version = "999.1.1"  # past every bulletin: the bulletin finding goes


def _ecc(body: attestation_pb2.EvidenceBody) -> None:
    body.gpu.gpus[5].ecc_uncorrected_volatile = 3


def _root_login(body: attestation_pb2.EvidenceBody) -> None:
    body.os.sshd.permit_root_login = "yes"


def _hostname(body: attestation_pb2.EvidenceBody) -> None:
    body.host.hostname = "another-host"


def _gpu_unsent(body: attestation_pb2.EvidenceBody) -> None:
    body.ClearField("gpu")


def _gpu_empty(body: attestation_pb2.EvidenceBody) -> None:
    body.gpu.Clear()  # sent, listing nothing: policy tells it from not sent
    body.gpu.source = "none"


@dataclass(frozen=True)
class Change:
    name: str
    edit: Edit
    # A finding that must appear (+) or go (-) with the change: the verdict follows it.
    shows: str = ""


CHANGES = [
    Change("driver version only", _driver, "-gpu.driver.security_bulletins"),
    Change("one GPU's uncorrected ECC errors", _ecc, "+gpu.ecc_uncorrected"),
    Change("sshd PermitRootLogin", _root_login, "+ssh.root_login"),
    Change("the hostname", _hostname),
    Change("GPU state not sent", _gpu_unsent),
    Change("GPU state sent, empty", _gpu_empty),
]


@pytest.mark.parametrize("change", CHANGES, ids=[c.name for c in CHANGES])
def test_a_changed_posture_is_evaluated_again(tmp_path: Path, change: Change) -> None:
    base = _body_message(tmp_path)
    policy = Counting(POLICY)
    first = _appraise(base, policy, 6000)
    changed = attestation_pb2.EvidenceBody()
    changed.CopyFrom(base)
    change.edit(changed)
    again = _appraise(changed, policy, 6001, policy_cache=first.policy_cache)
    assert policy.calls == 2, f"{change.name}: the old verdict was reused"
    assert again.policy_cache is not None
    assert again.policy_cache != first.policy_cache
    if change.shows:
        sign, finding = change.shows[0], change.shows[1:]
        assert (finding in _ids(again)) == (sign == "+"), _ids(again)
        assert (finding in _ids(first)) == (sign == "-"), _ids(first)


def test_what_policy_never_reads_keeps_the_cache_and_the_quote_is_still_checked(
    tmp_path: Path,
) -> None:
    base = _body_message(tmp_path)
    policy = Counting(POLICY)
    first = _appraise(base, policy, 6000)
    later = attestation_pb2.EvidenceBody()
    later.CopyFrom(base)
    later.collected_at.FromDatetime(NOW)  # new at every evidence; policy never reads it
    later.certify_key_spki = b"\x01" * 8  # ditto (not parsed here: certify_key is None)
    again = _appraise(later, policy, 6001, policy_cache=first.policy_cache)
    assert policy.calls == 1
    assert again.policy_cache == first.policy_cache
    assert _ids(again) == _ids(first)
    # A cached verdict does not skip the checks of the quote: a bad signature still fails.
    nonce = Nonce((6002).to_bytes(32, "big"))
    evidence = _evidence(later, nonce, 6002)
    forged = replace(evidence, signature=quotes.ecdsa_signature(AK, b"something else"))
    refused = appraise(forged, _expect(nonce, policy, policy_cache=first.policy_cache), now=NOW)
    assert not refused.passed
    assert "tpm.quote.signature_invalid" in _ids(refused)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("zone", {"zone": "production-inference"}), ("labels", {"labels": {"rack": "7"}})],
)
def test_the_verifiers_zone_and_labels_are_part_of_the_key(
    tmp_path: Path, name: str, overrides: dict[str, Any]
) -> None:
    base = _body_message(tmp_path)
    policy = Counting(POLICY)
    first = _appraise(base, policy, 6000)
    _appraise(base, policy, 6001, policy_cache=first.policy_cache, **overrides)
    assert policy.calls == 2, name


def test_a_reloaded_policy_under_the_same_id_is_evaluated_again(tmp_path: Path) -> None:
    """A policy edited without a new policy_id (SIGHUP, ReloadPolicy) is not the same policy:
    the key holds its digest, not its id."""
    base = _body_message(tmp_path)
    text = DEFAULT_POLICY.read_text()
    laxer = text.replace("size(gpu.missing_bulletins) == 0", "size(gpu.missing_bulletins) >= 0")
    assert laxer != text
    edited = Policy.parse(laxer, source="edited.yaml", base=DEFAULT_POLICY.parent)
    assert edited.policy_id == POLICY.policy_id
    assert edited.digest != POLICY.digest
    old, new = Counting(POLICY), Counting(edited)
    first = _appraise(base, old, 6000)
    again = _appraise(base, new, 6001, policy_cache=first.policy_cache)
    assert new.calls == 1
    assert again.policy_cache != first.policy_cache
    assert "gpu.driver.security_bulletins" in _ids(first)
    assert "gpu.driver.security_bulletins" not in _ids(again)  # the new rule's verdict


def test_the_key_separates_its_parts() -> None:
    @dataclass
    class Body:
        posture_digest: str

        def plain(self) -> dict[str, Any]:
            return {}

    @dataclass
    class Digest:
        digest: str
        policy_id: str = "p"
        bulletins: Any = None

        def evaluate(self, doc: Any, **_: Any) -> PolicyOutcome:
            raise AssertionError

    one = policy_key(Digest("a"), Body("b;c"), "", {})
    two = policy_key(Digest("a;b"), Body("c"), "", {})
    assert one != two
    assert policy_key(Digest("a"), Body("b"), "z", {}) != policy_key(
        Digest("a"), Body("b"), "", {"z": ""}
    )


def test_an_abandoned_evaluation_is_not_cached(tmp_path: Path) -> None:
    class OverBudget(Counting):
        def evaluate(self, doc: Document, **kwargs: Any) -> PolicyOutcome:
            self.calls += 1
            return budget_exceeded(self.policy_id, DEVICE, 2.0)

    base = _body_message(tmp_path)
    policy = OverBudget(POLICY)
    first = _appraise(base, policy, 6000)
    assert "policy.budget_exceeded" in _ids(first)
    assert first.policy_cache is None
    _appraise(base, policy, 6001, policy_cache=first.policy_cache)
    assert policy.calls == 2


def test_the_planned_converter_gives_what_field_by_field_gave(tmp_path: Path) -> None:
    """verifier/wire_body.py ``plain``: the 8-GPU body, and a body with every kind of field
    unset, against a straightforward conversion through the descriptors."""
    from google.protobuf.descriptor import FieldDescriptor
    from google.protobuf.message import Message

    def reference(msg: Message) -> dict[str, Any]:
        out: dict[str, Any] = {}
        u64 = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)
        for f in msg.DESCRIPTOR.fields:
            value = getattr(msg, f.name)
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                out[f.name] = dict(value)
            elif f.is_repeated:
                out[f.name] = [
                    reference(v)
                    if isinstance(v, Message)
                    else min(v, 2**63 - 1)
                    if f.type in u64
                    else v
                    for v in value
                ]
            elif f.has_presence and not msg.HasField(f.name):
                out[f.name] = None
            elif isinstance(value, Message):
                out[f.name] = reference(value)
            elif isinstance(value, bytes):
                out[f.name] = value.hex()
            elif f.type in u64:
                out[f.name] = min(value, 2**63 - 1)
            else:
                out[f.name] = value
        return out

    body = _body_message(tmp_path)
    body.certify_key_spki = b"\x00\xff"
    body.gpu.gpus[0].ecc_uncorrected_aggregate = 2**64 - 1
    for msg in (body, attestation_pb2.EvidenceBody()):
        assert plain(msg) == reference(msg)


# --- one message per round ---------------------------------------------------------------------


@pytest.mark.swtpm
def test_with_interval_zero_each_result_carries_the_next_challenge(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    tpm = swtpm_factory()
    config = base_config(workdir, pki, endorsement_ca, interval_s=0.0)

    async def scenario() -> list[attestation_pb2.VerifierMessage]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as a,
            stream_channel(pki, verifier, a.enrollment) as channel,
        ):
            call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=30)
            await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
            msg = await read_message(call)
            replies = []
            for _ in range(3):
                evidence = await quote_evidence(a, msg.challenge)
                await call.write(attestation_pb2.AgentMessage(evidence=evidence))
                msg = await read_message(call)
                replies.append(msg)
            call.cancel()
            return replies

    replies = asyncio.run(scenario())
    nonces = set()
    for reply in replies:
        assert reply.HasField("result")
        assert reply.HasField("challenge")
        assert reply.result.next_challenge_in.ToTimedelta() == datetime.timedelta(0)
        assert reply.result.trust.tier != 0
        nonces.add(reply.challenge.nonce)
    assert len(nonces) == 3  # a fresh nonce each round


def test_a_part_sent_empty_is_not_a_part_not_sent(tmp_path: Path) -> None:
    """The serialized bytes of an empty GpuState and of none are the same (nothing): the
    key tells them apart by presence, as required_evidence does."""
    unsent = _body_message(tmp_path)
    unsent.ClearField("gpu")
    empty = attestation_pb2.EvidenceBody()
    empty.CopyFrom(unsent)
    empty.gpu.SetInParent()
    assert empty.HasField("gpu")
    assert empty.gpu.SerializeToString() == b""
    policy = Counting(POLICY)
    zone = {"zone": "production-inference"}
    first = _appraise(unsent, policy, 6000, **zone)
    again = _appraise(empty, policy, 6001, policy_cache=first.policy_cache, **zone)
    assert policy.calls == 2

    def missing(a: Appraisal) -> list[str]:
        return [f.found for f in a.result.findings if f.id == "policy.evidence_missing"]

    assert missing(first) == ["no GPU state"]
    assert missing(again) == ["GPU state listing no GPU"]


def test_the_posture_digest_reads_exactly_host_os_and_gpu_of_the_received_bytes(
    tmp_path: Path,
) -> None:
    body = _body_message(tmp_path)

    def digest(msg: attestation_pb2.EvidenceBody, data: bytes | None = None) -> str:
        data = msg.SerializeToString() if data is None else data
        return WireBody(body_from_wire(data, LimitsConfig()), raw=data).posture_digest

    base = digest(body)
    other = attestation_pb2.EvidenceBody()
    other.CopyFrom(body)
    other.collected_at.FromDatetime(NOW)
    other.certify_key_spki = b"k"
    other.certify_key_proof = b"p"
    assert digest(other) == base  # what changes at every evidence, and policy never reads
    for edit in (_driver, _ecc, _root_login, _hostname, _gpu_unsent, _gpu_empty):
        changed = attestation_pb2.EvidenceBody()
        changed.CopyFrom(body)
        edit(changed)
        assert digest(changed) != base, edit.__name__
    # Protobuf merges a part sent twice: both occurrences count, in order.
    gpu = body.gpu.SerializeToString()
    twice = body.SerializeToString() + b"\x2a" + bytes([0]) + b""  # gpu, present, empty
    assert digest(body, twice) != base
    assert raw_parts(body.SerializeToString() + bytes([(9 << 3) | 3])) is None  # a group
    assert raw_parts(b"\x2a\x05ab") is None  # truncated
    assert len(gpu) > 0
    # Without the received bytes, the parts serialized again: the same discrimination.
    unsent = attestation_pb2.EvidenceBody()
    unsent.CopyFrom(body)
    unsent.ClearField("gpu")
    empty = attestation_pb2.EvidenceBody()
    empty.CopyFrom(unsent)
    empty.gpu.SetInParent()
    assert WireBody(unsent).posture_digest != WireBody(empty).posture_digest
    assert digest(unsent) != digest(empty)
    # Bytes serialized deterministically (as the agent does): both ways agree.
    data = body.SerializeToString(deterministic=True)
    assert digest(body, data) == WireBody(body_from_wire(data, LimitsConfig())).posture_digest
