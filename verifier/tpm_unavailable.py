"""An agent's report that its TPM does not answer (issue 12, C5), as a trust result. Pure.

The agent answers the outstanding challenge with TpmUnavailable instead of Evidence when its
TPM stopped answering (swtpm or the resource manager gone, the device lost). Without a quote
nothing about the host can be vouched for, so the result asserts no claim at all (tier
none: no certificate, and the device's live ones are revoked by the zone-minimum rule, as
for any result below it) and carries the finding ``tpm.unavailable``: contraindicated, on
the hardware claim, with the agent's detail as what was found. What the verifier remembers
of the TPM (clock, event log, PCRs) is left as it was: nothing new was proven about it.

A hostile agent gains nothing by sending it: the protocol accepts it only as the answer to
the outstanding challenge (verifier/stream.py; the nonce is then spent), the detail is
bounded here, and the result can only lower the sender's own trust.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from devtrust.core.ids import DeviceId
from devtrust.verifier.appraisal import Evidence
from devtrust.verifier.errors import LimitExceeded
from devtrust.verifier.trust import Claim, Finding, Severity, TrustResult

FINDING_ID = "tpm.unavailable"
# The detail is the agent's text, stored with the result and shown to operators: a TSS error
# line is well under this.
MAX_DETAIL_BYTES = 1024


@dataclass(frozen=True)
class TpmUnavailableReport:
    """The agent could not quote for the outstanding challenge: its TPM does not answer."""

    detail: str

    @classmethod
    def of(cls, detail: str) -> TpmUnavailableReport:
        """The report, its detail checked against ``MAX_DETAIL_BYTES`` (LimitExceeded)."""
        size = len(detail.encode())
        if size > MAX_DETAIL_BYTES:
            raise LimitExceeded(
                f"TpmUnavailable.detail: {size} bytes, more than the limit of {MAX_DETAIL_BYTES}"
            )
        return cls(detail)


Answer = Evidence | TpmUnavailableReport
"""What answers a challenge: the evidence, or the agent's word that its TPM does not answer."""


def tpm_unavailable_result(
    device_id: DeviceId,
    report: TpmUnavailableReport,
    *,
    now: datetime.datetime,
    staleness: datetime.timedelta,
) -> TrustResult:
    """The result for a device whose TPM does not answer: no claim asserted (tier none,
    score 0), one contraindicated finding on the hardware claim."""
    finding = Finding(
        id=FINDING_ID,
        severity=Severity.CONTRAINDICATED,
        claim=Claim.HARDWARE,
        message=(
            f"device {device_id}: the agent reports that its TPM does not answer; without a "
            "quote no claim about the host holds"
        ),
        expected="a quote for the challenge",
        found=report.detail or "(no detail)",
    )
    return TrustResult(
        device_id=device_id,
        claims={},
        findings=(finding,),
        appraised_at=now,
        expires_at=now + staleness,
    )
