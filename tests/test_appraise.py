"""``appraise()`` itself, table-driven over quotes made in software (tests/quotes.py): the
paths that the wire-level tests cannot reach with a swtpm (a clock rollback, an unsafe clock,
a firmware downgrade, a reboot with a partial log) and the policy cache."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.agent.evidence import evidence_body, host_facts
from devtrust.agent.state import new_key, spki
from devtrust.core.binding import qualifying_data, sign_possession
from devtrust.core.ids import DeviceId, Nonce
from devtrust.core.tier import Tier
from devtrust.verifier import measured_boot
from devtrust.verifier.appraisal import EventLogPart, Evidence, Expectation, appraise
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.errors import MalformedInput
from devtrust.verifier.policy import PolicyOutcome
from devtrust.verifier.tpm.clock import ClockState
from devtrust.verifier.tpm.constants import Alg
from devtrust.verifier.tpm.structures import PcrSelect
from devtrust.verifier.wire import load_public_key
from devtrust.verifier.wire_body import WireBody, body_from_wire
from tests import eventlogs, quotes

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)
DEVICE = DeviceId("d" * 64)
NONCE = Nonce(b"\x05" * 32)
SELECTION = (PcrSelect(Alg.SHA256, (0, 7)),)
PCRS: dict[tuple[int, int], bytes] = {(Alg.SHA256, 0): bytes(32), (Alg.SHA256, 7): bytes(32)}
AK = ec.generate_private_key(ec.SECP256R1())
PRIOR = ClockState(clock=5000, reset_count=3, restart_count=1, firmware_version=0x2019_1023)


@dataclass(frozen=True)
class Case:
    name: str
    clock: int = 6000
    reset: int = 3
    restart: int = 1
    safe: bool = True
    firmware: int = 0x2019_1023
    log: EventLogPart | None = field(default_factory=lambda: EventLogPart(0, LOG))
    prior_log: bool = False
    findings: tuple[str, ...] = ()
    tier: Tier = Tier.AFFIRMING
    passed: bool = True
    rebooted: bool = False


LOG: bytes = eventlogs.spec_id_header(("sha256",))


def _evidence(case: Case, *, body: bytes | None = None) -> Evidence:
    key = new_key()
    body = body or evidence_body(
        host=host_facts(),
        certify_key_spki=spki(key),
        certify_key_proof=sign_possession(key, NONCE, DEVICE),
        now=NOW,
    )
    message = quotes.attest(
        extra=qualifying_data(NONCE, body),
        selection=SELECTION,
        digest=quotes.digest_of([PCRS[(Alg.SHA256, 0)], PCRS[(Alg.SHA256, 7)]]),
        clock=case.clock,
        reset=case.reset,
        restart=case.restart,
        safe=case.safe,
        firmware=case.firmware,
    )
    return Evidence(
        nonce=NONCE,
        attest=message,
        signature=quotes.ecdsa_signature(AK, message),
        pcrs=PCRS,
        body=body,
        body_doc=WireBody(body_from_wire(body, LimitsConfig())),
        certify_key=load_public_key(spki(key), field="test"),
        certify_key_proof=sign_possession(key, NONCE, DEVICE),
        event_log=case.log,
    )


def _expect(case: Case, **overrides: Any) -> Expectation:
    log = None
    if case.prior_log:
        log = measured_boot.extend(None, 0, LOG, max_bytes=1 << 20, max_events=1000)
    return replace(
        Expectation(
            device_id=DEVICE,
            nonce=NONCE,
            selection=SELECTION,
            ak_key=AK.public_key(),
            staleness=datetime.timedelta(minutes=3),
            clock=PRIOR,
            log=log,
        ),
        **overrides,
    )


CASES = [
    Case("honest"),
    Case("first evidence after a reboot, the whole log", reset=4, restart=0, rebooted=True),
    Case(
        "a reboot, and only part of the log",
        reset=4,
        restart=0,
        log=EventLogPart(len(LOG), b""),
        prior_log=True,
        findings=("eventlog.reboot",),
        tier=Tier.WARNING,
        rebooted=True,
    ),
    Case(
        "the clock went backwards",
        clock=10,
        findings=("tpm.clock.backwards",),
        tier=Tier.CONTRAINDICATED,
        passed=False,
    ),
    Case(
        "resetCount went backwards",
        reset=2,
        findings=("tpm.clock.reset_count_backwards",),
        tier=Tier.CONTRAINDICATED,
        passed=False,
    ),
    Case(
        "the clock behind, but the TPM says it lost time (safe NO)",
        clock=4000,
        safe=False,
        findings=("tpm.clock.unsafe",),
        tier=Tier.WARNING,
    ),
    Case(
        "firmware downgraded",
        firmware=0x2018_0000,
        findings=("tpm.firmware.downgrade",),
        tier=Tier.WARNING,
    ),
    Case("no event log", log=None, findings=("eventlog.missing",), tier=Tier.WARNING),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_appraise(case: Case) -> None:
    appraisal = appraise(_evidence(case), _expect(case), now=NOW)
    result = appraisal.result
    assert tuple(f.id for f in result.findings) == case.findings
    assert result.tier is case.tier
    assert appraisal.passed is case.passed
    assert appraisal.rebooted is case.rebooted
    if case.passed:
        assert appraisal.clock == ClockState(case.clock, case.reset, case.restart, case.firmware)
        assert appraisal.key_possessed
    else:
        assert appraisal.clock == PRIOR  # a hard failure keeps what the verifier knew


def test_values_outside_the_selection_are_malformed() -> None:
    evidence = replace(_evidence(Case("x")), pcrs={**PCRS, (Alg.SHA256, 9): bytes(32)})
    with pytest.raises(MalformedInput, match="sha256:9"):
        appraise(evidence, _expect(Case("x")), now=NOW)


class CountingPolicy:
    """A policy that counts its evaluations (the real one's cost is the point of caching)."""

    policy_id = "counting"
    digest = "counting-1"
    bulletins: Any = None

    def __init__(self) -> None:
        self.calls = 0

    def evaluate(self, doc: Any, **_: Any) -> PolicyOutcome:
        self.calls += 1
        return PolicyOutcome("counting", {}, (), ())


@dataclass
class FixedBody:
    """A body whose posture digest the test chooses; it counts its conversions."""

    posture_digest: str
    conversions: int = 0

    def plain(self) -> dict[str, Any]:
        self.conversions += 1
        return {}


def test_the_policy_runs_again_only_when_the_posture_changes() -> None:
    from devtrust.verifier.document import Bulletins

    policy = CountingPolicy()
    policy.bulletins = Bulletins(entries=())
    case = Case("cached")
    body = evidence_body(host=host_facts(), certify_key_spki=b"", now=NOW)
    posture = FixedBody("posture-1")
    evidence = replace(_evidence(case, body=body), certify_key=None, body_doc=posture)
    first = appraise(evidence, _expect(case, policy=policy), now=NOW)
    again = appraise(
        evidence, _expect(case, policy=policy, policy_cache=first.policy_cache), now=NOW
    )
    changed = appraise(
        replace(evidence, body_doc=FixedBody("posture-2")),
        _expect(case, policy=policy, policy_cache=again.policy_cache),
        now=NOW,
    )
    assert policy.calls == 2
    assert posture.conversions == 1  # the cache hit converted nothing
    assert again.policy_cache == first.policy_cache
    assert changed.policy_cache != first.policy_cache
    rezoned = appraise(
        evidence, _expect(case, policy=policy, policy_cache=first.policy_cache, zone="z"), now=NOW
    )
    assert policy.calls == 3  # the device's zone is part of the key
    assert rezoned.result.policy_id == "counting"


def test_gpu_attestation_required_without_gpu_anchors_is_contraindicated() -> None:
    """A verifier built without GPU anchors cannot check GPU reports; where the policy
    requires them it passes none (the zone's requirement is never met vacuously)."""
    case = CASES[0]
    required = appraise(_evidence(case), _expect(case, gpu_required=True), now=NOW).result
    assert [f.id for f in required.findings] == ["gpu.attestation.required"]
    assert required.tier is Tier.CONTRAINDICATED
    assert appraise(_evidence(case), _expect(case), now=NOW).result.findings == ()
