"""What one appraisal decided, as a value, and the sinks that act on it.

The attestor returns a ``Decision``; the attestation servicer publishes it to every sink in
order (the store first: a Result reaches the agent only after its Decision is stored). The
issues that follow add sinks, not branches in the servicer: metrics, the trust watch,
revocation on a tier drop, the audit trail. A sink may return the decision with what it did
added (the revocation sink: the serials the device must stop using); the sinks after it, and
the Result, get that one.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from devtrust.core.ids import DeviceId, Serial
from devtrust.core.tier import Tier
from devtrust.verifier.logtext import printable
from devtrust.verifier.records import (
    CertificateRecord,
    DeviceRecord,
    RevokedCertificate,
    TpmState,
)
from devtrust.verifier.stream import RecentChallenges
from devtrust.verifier.trust import TrustResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """One appraisal of one device's evidence, and what the verifier did about it."""

    device_id: DeviceId
    zone: str
    result: TrustResult
    # The device's tier before this appraisal (None: its first on this verifier).
    previous_tier: Tier | None
    # The device certificate issued for this evidence, or None with ``withheld`` saying why.
    certificate: CertificateRecord | None
    withheld: str
    # What the verifier now knows of the device's TPM (None: the quote did not verify, so
    # nothing it said is remembered).
    tpm: TpmState | None
    # The TPM rebooted since the last evidence: the next challenge is at once, for the
    # whole event log.
    rebooted: bool
    # The device's certificates revoked by this decision (its tier fell below its zone's
    # minimum) or earlier, and not yet expired: the agent deletes them. Added by the
    # revocation sink (verifier/revocation.py).
    revoked_serials: tuple[Serial, ...] = ()
    # With a certificate: the device issuing CAs a relying party trusts for it (DER), the
    # one that signed it first (verifier/ca.py DeviceIssuers).
    trust_bundle: tuple[bytes, ...] = ()
    # The lease of the stream that made it (DeviceSession.lease): the store refuses it
    # (Superseded) when a newer stream of the device claimed the device's lease since.
    lease: int | None = None
    # Its tier is below its zone's minimum: the reason the store revokes the device's live
    # certificates with, in the transaction that stores this decision ("": none revoked).
    revoke_reason: str = ""
    # What the store revoked with it (set by the store sink; None: the store was not asked
    # to): the revocation sink publishes them (live set, feed, CRL) without a read of its own.
    revoked_now: tuple[RevokedCertificate, ...] | None = None
    # The device as the decision assumed it (its stream's record): the store keeps the
    # decision only while the device's state, AK, zone and labels are still these, checked
    # in the transaction that stores it (DeviceChanged otherwise). None: not checked.
    assumed: DeviceRecord | None = None
    # The device answered with evidence (a quote, good or bad): the store moves its
    # last_seen. False for an agent's word that its TPM does not answer: such a device stays
    # in the operators' stale-devices query (review L6).
    seen: bool = True
    # When its evidence arrived (time.monotonic(), set by the attestation service): the
    # metrics sink times evidence -> decision stored. None: not timed (tests, tools).
    received: float | None = None
    # When the PostureChanged note arrived whose answer is this decision, set only when the
    # decision is a detection (``Detections``: its verdict differs from the device's previous
    # one, and the device had none timed within the window): the metrics sink times note ->
    # verdict stored (devtrust_detection_seconds). None: not a detection, or not timed.
    posture_noted: float | None = None

    @property
    def at(self) -> datetime.datetime:
        return self.result.appraised_at


# What a result says of a device, for telling a detection from a re-appraisal that found
# what was known: its tier and the set of its finding ids.
Verdict = tuple[Tier, frozenset[str]]
# A device's detections timed at most once per this many seconds (per verifier process).
DETECTION_WINDOW_S = 600.0


def verdict_of(result: TrustResult) -> Verdict:
    return (result.tier, frozenset(f.id for f in result.findings))


class Detections:
    """Which answers to a PostureChanged note time a detection (devtrust_detection_seconds,
    review 13a M1). The note is the agent's word: timing every answer to one would let a
    device steer the histogram (notes every posture_min_interval_s answered at once give
    near-zero times; evidence held to its deadline gives long ones), and would count
    re-appraisals that found nothing new. So an answer counts only when

    1. it is the device's evidence (not a TpmUnavailable: nothing was measured),
    2. its verdict (tier, finding ids) differs from the device's previous stored one (a
       device never appraised before has nothing to differ from), and
    3. no detection of the device was timed within ``window_s`` (here: a device alternating
       good and bad quotes after notes adds one observation per window, not six a minute).

    One entry per device timed within the window, forgotten after it (as RecentChallenges):
    bounded by the fleet, not by what a device sends. A compromised agent that hides never
    sends a note, so this measures how fast a change an agent reports reaches the verdict,
    not how fast compromises are found."""

    def __init__(self, window_s: float = DETECTION_WINDOW_S) -> None:
        self._timed = RecentChallenges(window_s)

    def detection(
        self,
        decision: Decision,
        *,
        noted: float | None,
        previous: Verdict | None,
        now: float,
    ) -> float | None:
        """``noted`` when ``decision`` (answering the note made then) is a detection to time,
        None otherwise. Call ``timed`` once it is stored and timed."""
        if noted is None or previous is None or not decision.seen:
            return None
        if verdict_of(decision.result) == previous:
            return None
        if self._timed.last(decision.device_id, now) is not None:
            return None
        return noted

    def timed(self, device_id: str, now: float) -> None:
        """A detection of ``device_id`` was stored and timed at ``now``: its window starts."""
        self._timed.note(device_id, now)

    def __len__(self) -> int:
        return len(self._timed)


class DeviceChanged(Exception):
    """The store refused a decision: the device is no longer as the decision assumed it
    (revoked, sent back to approval, enrolled again with another AK, deleted, moved to
    another zone or given other labels) since its stream last read it. Nothing of the
    decision is stored. ``record``: the device now (None: deleted)."""

    def __init__(self, record: DeviceRecord | None) -> None:
        super().__init__(f"device {record.device_id if record else '?'} changed meanwhile")
        self.record = record


def same_standing(
    assumed: DeviceRecord, state: str, ak_public: bytes, zone: str, labels: object
) -> bool:
    """Whether a device row (state, AK, zone, labels) is still what ``assumed`` says."""
    return (
        assumed.state.value == state
        and assumed.ak_public == ak_public
        and assumed.zone == zone
        and assumed.labels == labels
    )


def below_minimum(tier: Tier, minimum: Tier, zone: str) -> str:
    """Why a decision at ``tier`` revokes the device's live certificates in ``zone`` whose
    minimum is ``minimum``; "" when the tier meets it."""
    if tier.meets(minimum):
        return ""
    where = zone or "(unassigned)"
    return f"tier {tier.label} is below the minimum {minimum.label} of zone {where}"


class DecisionSink(Protocol):
    """Acts on decisions. ``publish`` is awaited before the Result is sent to the agent; a
    sink that raises ends the device's stream (the agent reconnects), so a sink that must
    not hold up attestation queues its work and returns. It returns None, or the decision
    with what it did added, which the next sinks and the Result get."""

    async def publish(self, decision: Decision) -> Decision | None: ...


class Sinks:
    """Every sink, in the order given; ``publish`` returns the decision as the last sink
    left it."""

    def __init__(self, sinks: Sequence[DecisionSink]) -> None:
        self._sinks = tuple(sinks)

    async def publish(self, decision: Decision) -> Decision:
        for sink in self._sinks:
            decision = await sink.publish(decision) or decision
        return decision


class LogSink:
    """One log line per decision (STYLE 21): the device, its tier and score, the certificate
    issued or why none was, and the reasons. The same as fields for the JSON log format
    (core/logsetup.py ``--log-format json``): device_id, zone, tier, findings (their ids),
    certificate (its serial, or None)."""

    async def publish(self, decision: Decision) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        result, cert = decision.result, decision.certificate
        logger.info(
            "appraisal device=%s tier=%s score=%d cert=%s reasons=%s",
            decision.device_id,
            result.tier.label,
            result.score,
            cert.serial if cert else f"- ({decision.withheld})",
            # Finding messages quote device-supplied values: escaped (issue 7, item 9).
            printable("; ".join(f"{f.id}: {f.message}" for f in result.findings) or "-", 2048),
            extra={
                "device_id": decision.device_id,
                "zone": decision.zone,
                "tier": result.tier.label,
                "findings": [f.id for f in result.findings],
                "certificate": cert.serial if cert else None,
            },
        )
