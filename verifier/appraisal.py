"""Appraisal of one piece of attestation evidence (DESIGN.md flow 2). Pure (STYLE 1-2):
parsed evidence, what the verifier knows about the device, and ``now`` in; a ``TrustResult``
and the device's next TPM state out. No gRPC, database or TPM here.

Order (DESIGN.md): nonce; quote (signature, magic, type, qualifying data, selection, PCR
digest); clock, resetCount, restartCount, firmware; event log replay against the quoted PCRs;
reference values. The first three end the appraisal at once when they fail (STYLE 8); later
findings are collected.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from devtrust.core.binding import PublicKey, possession_proven, qualifying_data
from devtrust.core.ids import DeviceId, Nonce
from devtrust.core.tier import Tier
from devtrust.verifier import document, measured_boot
from devtrust.verifier.errors import LimitExceeded, MalformedInput
from devtrust.verifier.gpu.appraise import GpuAnchors, GpuVerdict, HostGpu, appraise_gpus
from devtrust.verifier.gpu.types import GpuEvidence
from devtrust.verifier.policy import PolicyEvaluator, PolicyOutcome, gpu_name
from devtrust.verifier.refs import RefGroup, appraise_refs
from devtrust.verifier.tpm.bootfacts import BootFacts
from devtrust.verifier.tpm.clock import ClockState, check_clock
from devtrust.verifier.tpm.constants import hash_name
from devtrust.verifier.tpm.quote import AkKey, QuoteRejected, check_quote
from devtrust.verifier.tpm.structures import Attest, PcrSelect
from devtrust.verifier.trust import (
    CRYPTO_VALIDATION_FAILED,
    HARDWARE_GENUINE,
    IDENTITY_RECOGNIZED,
    Claim,
    Finding,
    Severity,
    SubResult,
    TrustResult,
    tier_of,
)

_SEVERITY_VALUE = {Severity.WARNING: 32, Severity.CONTRAINDICATED: 96}


@dataclass(frozen=True)
class EventLogPart:
    offset: int
    data: bytes


class BodyDocument(Protocol):
    """The evidence body as policy reads it (verifier/document.py builds the document from
    it); implemented at the gRPC edge over the received message (verifier/wire_body.py).

    Converting a body to plain values costs ~0.3 ms for 8 GPUs, wasted while a device's
    cached policy outcome holds: ``plain`` converts at its first call only, and the cache is
    keyed by ``posture_digest``, which needs no conversion."""

    @property
    def posture_digest(self) -> str:
        """A digest of the body's host, os and gpu parts and of which of them were sent:
        equal for bodies that policy cannot tell apart (collected_at and the certify key,
        which change at every evidence, are not part of it)."""
        ...

    def plain(self) -> Mapping[str, Any]:
        """host, os and gpu as plain values (verifier/document.py says how), a part the
        body did not carry None; converted once, then the same values (read-only)."""
        ...


@dataclass(frozen=True)
class Evidence:
    """Validated evidence from one agent message (converted at the gRPC edge)."""

    # The nonce the agent answers (32 bytes, checked at the edge); whether it is the one
    # this stream sent is the appraisal's first check.
    nonce: Nonce
    attest: bytes
    signature: bytes
    pcrs: Mapping[tuple[int, int], bytes]
    # The serialized evidence body, as quoted (core.binding.qualifying_data), and what
    # policy reads of it: required, so that no evidence reaches policy with an empty body.
    body: bytes
    body_doc: BodyDocument
    certify_key: PublicKey | None
    event_log: EventLogPart | None = None
    # A signature by the certify key over the nonce and the device id (core.binding).
    certify_key_proof: bytes = b""
    # Each GPU's own attestation (EvidenceBody.gpu_reports), within its limits.
    gpu_reports: tuple[GpuEvidence, ...] = ()

    @property
    def body_digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


@dataclass(frozen=True)
class Expectation:
    """What the verifier knows before looking at the evidence."""

    device_id: DeviceId
    nonce: Nonce
    selection: tuple[PcrSelect, ...]
    ak_key: AkKey
    staleness: datetime.timedelta
    qualified_signers: frozenset[bytes] | None = None
    clock: ClockState | None = None
    log: measured_boot.LogState | None = None
    max_log_bytes: int = 4 * 1024 * 1024
    max_log_events: int = 20_000
    refs: RefGroup | None = None
    policy: PolicyEvaluator | None = None
    zone: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    # The last policy outcome for this device and its key: re-evaluated only when the
    # posture, the policy or the device's zone and labels change (DESIGN.md "Costs").
    policy_cache: tuple[str, PolicyOutcome] | None = None
    # What GPU reports are checked against (roots, RIMs, revocation); None: GPU reports are
    # not appraised (a verifier without GPU attestation, unit tests of other steps).
    gpu: GpuAnchors | None = None
    # The policy requires every listed GPU's own verified report in this zone.
    gpu_required: bool = False


@dataclass(frozen=True)
class Appraisal:
    result: TrustResult
    attest: Attest | None
    clock: ClockState | None = None
    log: measured_boot.LogState | None = None
    facts: BootFacts | None = None
    rebooted: bool = False
    policy_cache: tuple[str, PolicyOutcome] | None = None
    # The evidence names a key to certify and proved that the device holds it.
    key_possessed: bool = False
    # The event-log part this appraisal accepted, for the store to append.
    log_part: measured_boot.LogPart | None = None

    @property
    def passed(self) -> bool:
        """The quote proved what it claims (a result may still carry findings)."""
        return self.attest is not None


def with_findings(claims: dict[Claim, int], findings: Iterable[Finding]) -> dict[Claim, int]:
    """Raise each finding's claim to at least its severity's AR4SI value."""
    out = dict(claims)
    for f in findings:
        value = _SEVERITY_VALUE.get(f.severity)
        if value is not None and abs(out.get(f.claim, 0)) < value:
            out[f.claim] = value
    return out


def appraise(evidence: Evidence, expect: Expectation, *, now: datetime.datetime) -> Appraisal:
    def result(
        claims: dict[Claim, int],
        findings: Iterable[Finding],
        policy: PolicyOutcome | None = None,
        submods: tuple[SubResult, ...] = (),
    ) -> TrustResult:
        return TrustResult(
            device_id=expect.device_id,
            claims=claims,
            findings=tuple(findings),
            appraised_at=now,
            expires_at=now + expect.staleness,
            evidence_digest=evidence.body_digest,
            policy_id=policy.policy_id if policy else "",
            submods=submods,
        )

    def hard_failure(finding_id: str, message: str, expected: str, found: str) -> Appraisal:
        finding = Finding(
            id=finding_id,
            severity=Severity.CONTRAINDICATED,
            claim=Claim.INSTANCE_IDENTITY,
            message=f"device {expect.device_id}: {message}",
            expected=expected,
            found=found,
        )
        claims = {Claim.INSTANCE_IDENTITY: CRYPTO_VALIDATION_FAILED}
        return Appraisal(result(claims, (finding,)), None, expect.clock, expect.log)

    # 0. Only what the quote covers counts: PCR values outside the challenge's selection are
    #    malformed evidence, refused before anything is appraised or stored (issue 7, item 2).
    _check_quoted_only(evidence.pcrs, expect.selection)
    # 1. The nonce is the one this stream sent and has not been used (the caller pops it).
    if not hmac.compare_digest(evidence.nonce, expect.nonce):
        return hard_failure(
            "tpm.challenge.nonce_mismatch",
            "evidence answers a nonce this stream did not send",
            expect.nonce.hex(),
            evidence.nonce.hex(),
        )
    # 2-7. Quote: AK signature, magic, type, qualifying data, selection, PCR digest.
    try:
        attest = check_quote(
            attest_bytes=evidence.attest,
            signature_bytes=evidence.signature,
            ak_key=expect.ak_key,
            expected_qualifying_data=qualifying_data(expect.nonce, evidence.body),
            requested=expect.selection,
            pcr_values=evidence.pcrs,
            qualified_signers=expect.qualified_signers,
        )
    except QuoteRejected as rej:
        return hard_failure(rej.finding_id, rej.message, rej.expected, rej.found)
    # 8. Clock and counters never move backwards; a new resetCount is a reboot.
    clock = check_clock(attest, expect.clock)
    if clock.rollback is not None:
        return hard_failure(*clock.rollback)
    findings: list[Finding] = []
    if clock.unsafe:
        findings.append(
            Finding(
                "tpm.clock.unsafe",
                Severity.WARNING,
                Claim.INSTANCE_IDENTITY,
                f"device {expect.device_id}: TPM clockInfo.safe is NO: the clock may have been "
                "rolled back by an unorderly shutdown",
            )
        )
    if clock.downgrade is not None:
        before, after = clock.downgrade
        findings.append(
            Finding(
                "tpm.firmware.downgrade",
                Severity.WARNING,
                Claim.HARDWARE,
                f"device {expect.device_id}: TPM firmware went from {before:016x} to {after:016x}",
                f">= {before:016x}",
                f"{after:016x}",
            )
        )
    # 8b. A key to certify must be held by the device: its proof of possession signs this
    #     nonce and this device id (issue 7, item 6). The body, proof included, is quoted.
    key_possessed = False
    if evidence.certify_key is not None:
        key_possessed = possession_proven(
            evidence.certify_key, evidence.certify_key_proof, expect.nonce, expect.device_id
        )
        if not key_possessed:
            findings.append(
                Finding(
                    "certificate.key_not_possessed",
                    Severity.CONTRAINDICATED,
                    Claim.INSTANCE_IDENTITY,
                    f"device {expect.device_id}: the evidence asks to certify a key without "
                    "proof that the device holds it (certify_key_proof "
                    + ("missing" if not evidence.certify_key_proof else "does not verify")
                    + " for this nonce and device id); no certificate is issued",
                    "a signature by the key over the nonce and the device id",
                    "missing" if not evidence.certify_key_proof else "invalid",
                )
            )
    # 9. The event log replays to the quoted PCRs; facts only from what the quote vouches for.
    log, facts, log_findings = _event_log(evidence, expect, rebooted=clock.rebooted)
    part = evidence.event_log
    accepted = (
        measured_boot.LogPart(part.offset, part.data)
        if part is not None and part.data and log is not None and log is not expect.log
        else None
    )
    findings.extend(log_findings)
    # 10. Reference values of the device's group.
    claims: dict[Claim, int] = {
        Claim.INSTANCE_IDENTITY: IDENTITY_RECOGNIZED,
        Claim.HARDWARE: HARDWARE_GENUINE,
    }
    if expect.refs is not None:
        ref_claims, ref_findings = appraise_refs(
            expect.refs, device_id=expect.device_id, pcrs=evidence.pcrs, facts=facts
        )
        claims.update(ref_claims)
        findings.extend(ref_findings)
    # 11. Posture and GPU policy (CEL rules over the evidence document).
    outcome, cache = _policy(evidence, expect)
    submods: tuple[SubResult, ...] = ()
    if outcome is not None:
        for claim, value in outcome.claims.items():
            if abs(value) > abs(claims.get(claim, 0)):
                claims[claim] = value
        findings.extend(outcome.findings)
        submods = outcome.submods
    # 12. Each GPU's own signed report (verifier/gpu/appraise.py), bound to this challenge:
    #     per-GPU claims into the GPU's submod, the host as trustworthy as its worst GPU.
    verdicts, gpu_findings = _gpu_step(evidence, expect, now)
    submods = _with_gpu_verdicts(submods, verdicts)
    for claim, value in _worst_of(verdicts).items():
        if abs(value) > abs(claims.get(claim, 0)):
            claims[claim] = value
    findings.extend(gpu_findings)
    return Appraisal(
        result(with_findings(claims, findings), findings, outcome, submods),
        attest,
        ClockState.of(attest),
        log,
        facts,
        clock.rebooted,
        cache,
        key_possessed,
        accepted,
    )


def _check_quoted_only(
    pcrs: Mapping[tuple[int, int], bytes], selection: Iterable[PcrSelect]
) -> None:
    quoted = {(s.hash_alg, i) for s in selection for i in s.pcrs}
    extra = sorted(set(pcrs) - quoted)
    if extra:
        raise MalformedInput(
            "Evidence.pcrs: values for PCRs the challenge did not select ("
            + ", ".join(f"{hash_name(alg)}:{index}" for alg, index in extra)
            + "); only quoted PCR values may be sent"
        )


def policy_key(
    policy: PolicyEvaluator, body: BodyDocument, zone: str, labels: Mapping[str, str]
) -> str:
    """The policy cache's key: exactly what a policy outcome depends on besides the device
    (a session's cache is its device's): the policy's rules and data (``digest``, not the
    policy_id a reload may keep), the body's host, os and gpu parts as received (the
    document is built from nothing else), and the zone and labels of the verifier's record.
    Each part is length-prefixed, so no two different inputs make the same key."""
    parts = (policy.digest, body.posture_digest, zone, json.dumps(sorted(labels.items())))
    return "".join(f"{len(p)}:{p};" for p in parts)


def _policy(
    evidence: Evidence, expect: Expectation
) -> tuple[PolicyOutcome | None, tuple[str, PolicyOutcome] | None]:
    policy = expect.policy
    if policy is None:
        return None, None
    labels = dict(expect.labels)
    body = evidence.body_doc
    key = policy_key(policy, body, expect.zone, labels)
    if expect.policy_cache is not None and expect.policy_cache[0] == key:
        return expect.policy_cache[1], expect.policy_cache
    doc = document.build(body.plain(), bulletins=policy.bulletins, zone=expect.zone, labels=labels)
    outcome = policy.evaluate(doc, device_id=expect.device_id, zone=expect.zone, labels=labels)
    if any(f.id in UNCACHED_FINDINGS for f in outcome.findings):
        # Not a verdict on this posture (the evaluation was abandoned): the next
        # appraisal evaluates again.
        return outcome, None
    return outcome, (key, outcome)


def _gpu_step(
    evidence: Evidence, expect: Expectation, now: datetime.datetime
) -> tuple[tuple[GpuVerdict, ...], list[Finding]]:
    """Step 12: the GPUs' verdicts and findings (none when the body has no GPU reports and
    the zone requires none)."""
    if expect.gpu is not None and (evidence.gpu_reports or expect.gpu_required):
        verdicts = _gpus(evidence, expect, now)
        return verdicts, _gpu_findings(verdicts, expect)
    if not expect.gpu_required:
        return (), []
    # A verifier that cannot check GPU reports passes none where they are required.
    required = Finding(
        "gpu.attestation.required",
        Severity.CONTRAINDICATED,
        Claim.HARDWARE,
        f"device {expect.device_id} in zone {expect.zone or '(none)'!r}: the policy requires "
        "each GPU's own verified attestation report, and this verifier has no GPU anchors to "
        "verify one with",
        "GPU reports verified",
        "no GPU anchors",
    )
    return (), [required]


def _gpus(
    evidence: Evidence, expect: Expectation, now: datetime.datetime
) -> tuple[GpuVerdict, ...]:
    """The GPU reports appraised against NVML's view of the same GPUs in the same body."""
    assert expect.gpu is not None
    state = evidence.body_doc.plain().get("gpu") or {}
    # A version NVML did not report is "" (compared, so a mismatch): a host must not skip
    # the check that its GPUs' signed versions are the ones it reports by leaving them out.
    gpus = [
        HostGpu(
            index=int(g["index"]),
            name=gpu_name(g),
            vbios_version=str(g.get("vbios_version") or ""),
        )
        for g in state.get("gpus") or ()
    ]
    return appraise_gpus(
        evidence.gpu_reports,
        gpus,
        driver_version=str(state.get("driver_version") or ""),
        challenge_nonce=expect.nonce,
        anchors=expect.gpu,
        now=now,
        device_id=expect.device_id,
        required=expect.gpu_required,
    )


def _worst_of(verdicts: Iterable[GpuVerdict]) -> dict[Claim, int]:
    """Claim by claim, the least favourable value among the GPUs, where it is worse than
    affirming: a GPU can make its host's claim worse, never assert one the host did not
    earn (a GPU's approved firmware says nothing of the host's executables; it stays in the
    GPU's submod)."""
    worst: dict[Claim, int] = {}
    for verdict in verdicts:
        for claim, value in verdict.claims.items():
            if tier_of(value) > Tier.AFFIRMING and abs(value) > abs(worst.get(claim, 0)):
                worst[claim] = value
    return worst


def _gpu_findings(verdicts: tuple[GpuVerdict, ...], expect: Expectation) -> list[Finding]:
    """Every GPU's findings; and, where the zone requires GPU attestation, one for a host
    that lists no GPU at all: hiding the GPUs must not skip their attestation."""
    found = [f for verdict in verdicts for f in verdict.findings]
    if expect.gpu_required and not verdicts:
        found.append(
            Finding(
                "gpu.attestation.required",
                Severity.CONTRAINDICATED,
                Claim.HARDWARE,
                f"device {expect.device_id} in zone {expect.zone or '(none)'!r}: the policy "
                "requires each GPU's own verified attestation report; the evidence lists no GPU",
                "at least one GPU with a verified report",
                "no GPU listed",
            )
        )
    return found


def _with_gpu_verdicts(
    submods: tuple[SubResult, ...], verdicts: Iterable[GpuVerdict]
) -> tuple[SubResult, ...]:
    """Each GPU's attestation claims and findings joined to its policy submod (same name),
    claim by claim the less favourable; a GPU the policy had no submod for gets one."""
    out = {s.name: s for s in submods}
    for verdict in verdicts:
        sub = out.get(verdict.name)
        claims = dict(sub.claims) if sub else {}
        for claim, value in verdict.claims.items():
            if abs(value) > abs(claims.get(claim, 0)):
                claims[claim] = value
        found = (*(sub.findings if sub else ()), *verdict.findings)
        out[verdict.name] = SubResult(verdict.name, claims, found)
    return tuple(out.values())


# Findings that say the policy was not evaluated, not what it found: never cached.
UNCACHED_FINDINGS = frozenset({"policy.budget_exceeded"})


def _event_log(
    evidence: Evidence,
    expect: Expectation,
    *,
    rebooted: bool,
) -> tuple[measured_boot.LogState | None, BootFacts | None, list[Finding]]:
    """New log state, facts that the quote vouches for, and findings.

    Facts come only from events on quoted PCRs whose replay matched the quoted values, and
    not from events whose data does not hash to their logged digests (issue 7, item 1).
    A log past its limits raises ``LimitExceeded``: refused, nothing stored."""
    device = expect.device_id
    prior = None if rebooted else expect.log
    part = evidence.event_log
    state = prior
    if part is not None:
        if rebooted and part.offset != 0:
            return None, None, [_finding_reboot(device)]
        try:
            state = measured_boot.extend(
                prior,
                part.offset,
                part.data,
                max_bytes=expect.max_log_bytes,
                max_events=expect.max_log_events,
            )
        except LimitExceeded:
            raise
        except MalformedInput as exc:
            return (
                prior,
                None,
                [
                    Finding(
                        "eventlog.malformed",
                        Severity.CONTRAINDICATED,
                        Claim.EXECUTABLES,
                        f"device {device}: event log rejected: {exc}",
                    )
                ],
            )
    if state is None:
        return None, None, [_finding_missing(expect)]
    quoted_banks = {hash_name(alg) for alg, _ in evidence.pcrs}
    if not quoted_banks & set(state.banks):
        # A log in banks the quote does not cover explains nothing: as good as none.
        return state, None, [_finding_unverified(expect, sorted(state.banks), quoted_banks)]
    findings = list(measured_boot.compare(state, evidence.pcrs, device))
    verified = measured_boot.verified_pcrs(state, evidence.pcrs)
    findings.extend(measured_boot.digest_findings(state, device, verified))
    findings.extend(measured_boot.fact_findings(state, device, verified))
    return state, measured_boot.facts_of(state, verified), findings


def _finding_reboot(device: str) -> Finding:
    return Finding(
        "eventlog.reboot",
        Severity.WARNING,
        Claim.EXECUTABLES,
        f"device {device} rebooted: its event log must be read again from the start",
    )


def _finding_unverified(expect: Expectation, banks: list[str], quoted: set[str]) -> Finding:
    needed = expect.refs is not None and expect.refs.needs_event_log
    return Finding(
        "eventlog.unverified",
        Severity.CONTRAINDICATED if needed else Severity.WARNING,
        Claim.EXECUTABLES,
        f"device {expect.device_id}: the event log has banks {', '.join(banks) or 'none'}, "
        f"none of them quoted ({', '.join(sorted(quoted))}): it cannot be checked against "
        "the TPM and nothing is taken from it",
        "an event log in a quoted bank",
        ", ".join(banks),
    )


def _finding_missing(expect: Expectation) -> Finding:
    """No event log for this boot (issue 7, item 3). Contraindicated where the device's
    reference group has event rules, a warning otherwise: either way ``executables`` is
    not affirmed."""
    needed = expect.refs is not None and expect.refs.needs_event_log
    return Finding(
        "eventlog.missing",
        Severity.CONTRAINDICATED if needed else Severity.WARNING,
        Claim.EXECUTABLES,
        f"device {expect.device_id}: no event log was sent although the challenge asked for it"
        + (
            f"; reference group {expect.refs.name} has event rules"
            if needed and expect.refs is not None
            else ""
        ),
        "an event log that replays to the quoted PCRs",
        "none",
    )
