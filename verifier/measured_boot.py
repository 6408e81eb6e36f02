"""Measured boot: does the event log the agent sent explain the PCR values the TPM quoted?
Pure. The verifier keeps, per device, the log received so far and its replay state, so an
agent sends only what is new since the last offset; after a reboot it sends the whole log.

PCRs compared: those the quote covers, in banks the log has, that the log measures, plus
PCRs 0-7 (the firmware's: a non-initial value there that the log does not explain means
something measured outside the log). PCRs above 7 that the log never touches are left to
others (IMA extends PCR 10, for instance).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from verifier.errors import MalformedInput
from verifier.tpm import bootfacts
from verifier.tpm import eventlog as ev
from verifier.tpm.constants import HASH_BY_NAME
from verifier.trust import Claim, Finding, Severity

FIRMWARE_PCRS = frozenset(range(8))
PcrValues = Mapping[tuple[int, int], bytes]


@dataclass
class LogState:
    """The log received so far for one device and its replay."""

    data: bytes = b""
    banks: dict[str, int] = field(default_factory=dict)
    replay: ev.ReplayState = field(default_factory=ev.ReplayState)
    # Boot facts of ``data``, computed once (facts_of); not persisted.
    facts: bootfacts.BootFacts | None = field(default=None, compare=False, repr=False)

    @property
    def offset(self) -> int:
        return len(self.data)


def extend(prior: LogState | None, offset: int, chunk: bytes) -> LogState:
    """Append a chunk at ``offset`` (0 = a whole new log) and replay what is new.

    Raises ``MalformedInput`` for a chunk that does not parse or does not continue the log.
    """
    if offset == 0:
        log = ev.parse(chunk)
        return LogState(data=chunk, banks=dict(log.banks), replay=ev.replay(log.events, log.banks))
    if prior is None or offset != prior.offset:
        have = prior.offset if prior else 0
        raise MalformedInput(f"event log part starts at byte {offset}, the verifier has {have}")
    if not chunk:
        return prior  # nothing new: the usual case between reboots
    log = ev.parse(chunk, banks=prior.banks, base=offset)
    replay = ev.ReplayState(
        pcrs={b: dict(v) for b, v in prior.replay.pcrs.items()},
        seen_pcr0=prior.replay.seen_pcr0,
        measured=set(prior.replay.measured),
    )
    return LogState(
        data=prior.data + chunk,
        banks=prior.banks,
        replay=ev.replay(log.events, prior.banks, replay),
    )


def compare(state: LogState, quoted: PcrValues, device_id: str) -> tuple[Finding, ...]:
    """Findings for quoted PCRs the log does not explain."""
    findings = []
    for bank, size in state.banks.items():
        alg = HASH_BY_NAME.get(bank)
        if alg is None:
            continue
        replayed = state.replay.pcrs.get(bank, {})
        for (qalg, index), value in sorted(quoted.items()):
            if qalg != alg or (index not in state.replay.measured and index not in FIRMWARE_PCRS):
                continue
            expected = replayed.get(index, bytes(size))
            if not hmac.compare_digest(expected, value):
                findings.append(
                    Finding(
                        id="eventlog.replay_mismatch",
                        severity=Severity.CONTRAINDICATED,
                        claim=Claim.EXECUTABLES,
                        subject=f"pcr:{bank}:{index}",
                        message=f"PCR {index} ({bank}) of device {device_id}: the event log "
                        f"replays to {expected.hex()}, the TPM quoted {value.hex()}",
                        expected=expected.hex(),
                        found=value.hex(),
                    )
                )
    return tuple(findings)


def facts_of(state: LogState) -> bootfacts.BootFacts:
    """Boot facts of the whole log so far; parsed once per log state."""
    if state.facts is None:
        state.facts = bootfacts.boot_facts(ev.parse(state.data))
    return state.facts
