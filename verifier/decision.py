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
from devtrust.verifier.records import CertificateRecord, TpmState
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

    @property
    def at(self) -> datetime.datetime:
        return self.result.appraised_at


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
    issued or why none was, and the reasons."""

    async def publish(self, decision: Decision) -> None:
        result, cert = decision.result, decision.certificate
        logger.info(
            "appraisal device=%s tier=%s score=%d cert=%s reasons=%s",
            decision.device_id,
            result.tier.label,
            result.score,
            cert.serial if cert else f"- ({decision.withheld})",
            # Finding messages quote device-supplied values: escaped (issue 7, item 9).
            printable("; ".join(f"{f.id}: {f.message}" for f in result.findings) or "-", 2048),
        )
