"""TPM clock, reset and restart counters, firmware version across quotes (TPM 2.0 Part 2,
10.11.1 TPMS_CLOCK_INFO; Part 1, 36 "Timing Components"). Pure.

- ``resetCount`` counts TPM Resets (reboots): it never decreases; an increase means the host
  rebooted, so the measured-boot log starts over and must be read whole again.
- ``restartCount`` counts TPM Restarts/Resumes since the last Reset: it never decreases
  while resetCount stays the same.
- ``clock`` advances monotonically (it is non-volatile and only ever set forward), unless
  ``safe`` is NO: then the TPM lost an unsaved advance and may report less than before.
- ``safe`` NO means the clock may have been rolled back (an unorderly shutdown).
- ``firmwareVersion`` lower than seen before is a downgrade.
"""

from __future__ import annotations

from dataclasses import dataclass

from devtrust.verifier.tpm.structures import Attest


@dataclass(frozen=True)
class ClockState:
    clock: int
    reset_count: int
    restart_count: int
    firmware_version: int

    @classmethod
    def of(cls, attest: Attest) -> ClockState:
        return cls(attest.clock, attest.reset_count, attest.restart_count, attest.firmware_version)


@dataclass(frozen=True)
class ClockVerdict:
    rebooted: bool
    # (finding id, message, expected, found); a rollback is a hard failure, the others not.
    rollback: tuple[str, str, str, str] | None = None
    unsafe: bool = False
    downgrade: tuple[int, int] | None = None


def check_clock(attest: Attest, previous: ClockState | None) -> ClockVerdict:
    now = ClockState.of(attest)
    if previous is None:
        return ClockVerdict(rebooted=False, unsafe=not attest.safe)
    rollback = None
    if now.reset_count < previous.reset_count:
        rollback = (
            "tpm.clock.reset_count_backwards",
            "TPM resetCount moved backwards",
            f">= {previous.reset_count}",
            str(now.reset_count),
        )
    elif now.reset_count == previous.reset_count and now.restart_count < previous.restart_count:
        rollback = (
            "tpm.clock.restart_count_backwards",
            "TPM restartCount moved backwards",
            f">= {previous.restart_count}",
            str(now.restart_count),
        )
    elif now.clock < previous.clock and attest.safe:
        # With safe NO the TPM itself says an earlier Clock value may have been lost (an
        # unorderly shutdown): reported as unsafe below, not as a rollback.
        rollback = (
            "tpm.clock.backwards",
            "TPM clock moved backwards",
            f">= {previous.clock}",
            str(now.clock),
        )
    downgrade = None
    if now.firmware_version < previous.firmware_version:
        downgrade = (previous.firmware_version, now.firmware_version)
    return ClockVerdict(
        rebooted=now.reset_count > previous.reset_count,
        rollback=rollback,
        unsafe=not attest.safe,
        downgrade=downgrade,
    )
