"""Measured boot: does the event log the agent sent explain the PCR values the TPM quoted, and
which boot facts may the verifier take from it? Pure.

The verifier keeps, per device, the replay state of the log received so far, never the log
itself: an agent sends only what is new since the last offset (after a reboot, the whole log),
and each part is parsed, replayed and scanned for facts once (``extend``). The store keeps the
parts append-only and replays them through ``extend`` when a stream opens.

PCRs compared: those the quote covers, in banks the log has, that the log measures, plus
PCRs 0-7 (the firmware's: a non-initial value there that the log does not explain means
something measured outside the log). PCRs above 7 that the log never touches are left to
others (IMA extends PCR 10, for instance).

Facts (issue 7): only from events on PCRs the quote covers and whose replay matched in every
quoted bank the log has (``verified_pcrs``), and only from events whose data hashes to their
digests where the PFP defines them so (``verifier.tpm.eventdata.data_mismatch``). No event
type, which the TPM never saw, exempts an event from a fact (``verifier.tpm.bootfacts``). The
appraisal calls, in order:

    state = extend(prior, offset, chunk, max_bytes=..., max_events=...)
    findings = compare(state, quoted, device_id)
    verified = verified_pcrs(state, quoted)
    facts = facts_of(state, verified)
    findings += digest_findings(state, device_id, verified)  # or every quoted PCR index
    findings += fact_findings(state, device_id, verified)

and hands ``LogPart(offset, chunk)`` to the store with the new state (``TpmState.log_part``).
"""

from __future__ import annotations

import hmac
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TypeVar

from devtrust.verifier.errors import LimitExceeded, MalformedInput
from devtrust.verifier.tpm import bootfacts, eventdata
from devtrust.verifier.tpm import eventlog as ev
from devtrust.verifier.tpm.constants import HASH_BY_NAME
from devtrust.verifier.trust import Claim, Finding, Severity

FIRMWARE_PCRS = frozenset(range(8))
PcrValues = Mapping[tuple[int, int], bytes]
# Data-digest findings listed one by one per appraisal; past this, one more says how many.
MAX_DIGEST_FINDINGS = 16
_T = TypeVar("_T")


@dataclass(frozen=True)
class LogPart:
    """A part of a device's event log as accepted: where it starts, and its bytes."""

    offset: int
    data: bytes


class _Shared(list[_T]):
    """An append-only list several LogStates share, each reading its first ``n`` items: a
    state extended twice (a retried part) copies instead of appending after its sibling."""


def _grow(items: _Shared[_T], used: int, new: list[_T]) -> _Shared[_T]:
    if not new:
        return items
    if len(items) != used:
        items = _Shared(items[:used])
    items.extend(new)
    return items


@dataclass
class LogState:
    """One device's log so far: its replay, size and event count, and what its events say
    (fact contributions tagged with their PCR, data-digest mismatches), in log order."""

    banks: dict[str, int] = field(default_factory=dict)
    replay: ev.ReplayState = field(default_factory=ev.ReplayState)
    offset: int = 0  # bytes received: where the next part starts
    event_count: int = 0  # records, the Spec ID header included
    scanner: bootfacts.Scanner = field(default_factory=bootfacts.Scanner, repr=False)
    _contributions: _Shared[bootfacts.Contribution] = field(
        default_factory=_Shared, repr=False, compare=False
    )
    _n_contributions: int = 0
    _mismatches: _Shared[eventdata.DataMismatch] = field(
        default_factory=_Shared, repr=False, compare=False
    )
    _n_mismatches: int = 0
    # Facts folded per verified PCR set; shared with the next state while it adds none.
    _folds: dict[frozenset[int], bootfacts.BootFacts] = field(
        default_factory=dict, repr=False, compare=False
    )

    def contributions(self) -> Iterator[bootfacts.Contribution]:
        return islice(self._contributions, self._n_contributions)

    def mismatches(self) -> Iterator[eventdata.DataMismatch]:
        return islice(self._mismatches, self._n_mismatches)


def extend(
    prior: LogState | None, offset: int, chunk: bytes, *, max_bytes: int, max_events: int
) -> LogState:
    """Append a part at ``offset`` (0 = a whole new log) and replay and scan what is new.

    Raises ``LimitExceeded`` when the log would pass ``max_bytes`` bytes or ``max_events``
    records, ``MalformedInput`` for a part that does not parse or does not continue the log.
    ``prior`` is never changed.
    """
    if offset != 0 and (prior is None or offset != prior.offset):
        have = prior.offset if prior else 0
        raise MalformedInput(f"event log part starts at byte {offset}, the verifier has {have}")
    if offset != 0 and not chunk:
        assert prior is not None
        return prior  # nothing new: the usual case between reboots
    if offset + len(chunk) > max_bytes:
        raise LimitExceeded(
            f"event log of {offset + len(chunk)} bytes passes the limit of {max_bytes} bytes "
            "(limits.max_event_log_bytes)"
        )
    base = prior if offset != 0 and prior is not None else None
    had = base.event_count if base else 0
    try:
        if base is None:
            log = ev.parse(chunk, max_events=max_events)
        else:
            log = ev.parse(
                chunk, banks=base.banks, base=offset, first=had, max_events=max_events - had
            )
    except LimitExceeded as exc:
        raise LimitExceeded(
            f"event log passes the limit of {max_events} events (limits.max_event_log_events): "
            f"{exc}"
        ) from None
    banks = dict(log.banks)
    if base is None:
        replay, scanner = ev.ReplayState(), bootfacts.Scanner()
    else:
        replay = ev.ReplayState(
            pcrs={b: dict(v) for b, v in base.replay.pcrs.items()},
            seen_pcr0=base.replay.seen_pcr0,
            measured=set(base.replay.measured),
        )
        scanner = base.scanner.copy()
    try:
        ev.replay(log.events, banks, replay)
    except (ValueError, IndexError) as exc:  # backstop: parse should have refused it
        raise MalformedInput(f"event log does not replay: {exc}") from exc
    contributions: list[bootfacts.Contribution] = []
    mismatches: list[eventdata.DataMismatch] = []
    for event in log.events:
        facts, mismatch = scanner.scan(event, banks)
        contributions.extend(facts)
        if mismatch is not None:
            mismatches.append(mismatch)
    if base is None:
        return LogState(
            banks=banks,
            replay=replay,
            offset=len(chunk),
            event_count=len(log.events),
            scanner=scanner,
            _contributions=_Shared(contributions),
            _n_contributions=len(contributions),
            _mismatches=_Shared(mismatches),
            _n_mismatches=len(mismatches),
        )
    return LogState(
        banks=base.banks,
        replay=replay,
        offset=offset + len(chunk),
        event_count=had + len(log.events),
        scanner=scanner,
        _contributions=_grow(base._contributions, base._n_contributions, contributions),
        _n_contributions=base._n_contributions + len(contributions),
        _mismatches=_grow(base._mismatches, base._n_mismatches, mismatches),
        _n_mismatches=base._n_mismatches + len(mismatches),
        _folds=base._folds if not contributions else {},
    )


def _replayed(state: LogState) -> Iterator[tuple[str, int, int, Mapping[int, bytes]]]:
    """(bank, size, TPM_ALG_ID, replayed PCRs) for the banks of the log a quote can carry."""
    for bank, size in state.banks.items():
        alg = HASH_BY_NAME.get(bank)
        if alg is not None:
            yield bank, size, alg, state.replay.pcrs.get(bank, {})


def compare(state: LogState, quoted: PcrValues, device_id: str) -> tuple[Finding, ...]:
    """Findings for quoted PCRs the log does not explain."""
    findings = []
    for bank, size, alg, replayed in _replayed(state):
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


def verified_pcrs(state: LogState, quoted: PcrValues) -> frozenset[int]:
    """PCRs the quote covers in at least one bank the log has, whose replay equals the quoted
    value in every such bank: the only PCRs facts are taken from."""
    matched: set[int] = set()
    failed: set[int] = set()
    for _, size, alg, replayed in _replayed(state):
        for (qalg, index), value in quoted.items():
            if qalg == alg:
                expected = replayed.get(index, bytes(size))
                (matched if hmac.compare_digest(expected, value) else failed).add(index)
    return frozenset(matched - failed)


def facts_of(state: LogState, verified: frozenset[int]) -> bootfacts.BootFacts:
    """Boot facts from events on ``verified`` PCRs whose data passed its digest check; folded
    once per state and PCR set. The result is shared: do not change it."""
    facts = state._folds.get(verified)
    if facts is None:
        facts = bootfacts.fold(state.contributions(), verified)
        state._folds[verified] = facts
    return facts


def _capped(
    items: Sequence[_T],
    one: Callable[[_T], Finding],
    more: Callable[[_T, int], Finding],
) -> tuple[Finding, ...]:
    """A finding for each of the first MAX_DIGEST_FINDINGS items, then one for the rest."""
    findings = [one(item) for item in items[:MAX_DIGEST_FINDINGS]]
    if len(items) > MAX_DIGEST_FINDINGS:
        findings.append(more(items[MAX_DIGEST_FINDINGS], len(items) - MAX_DIGEST_FINDINGS))
    return tuple(findings)


def digest_findings(state: LogState, device_id: str, pcrs: frozenset[int]) -> tuple[Finding, ...]:
    """``eventlog.data_digest_mismatch`` for events on ``pcrs`` (the appraisal passes the
    verified PCRs) whose data is not what their digests are over. Events on other PCRs are left
    out: the TPM vouches for neither their data nor their digests, and no fact comes from them
    anyway. WARNING: the facts such an event carried read as not measured, which reference
    rules that need them contraindicate."""

    def one(m: eventdata.DataMismatch) -> Finding:
        bank = m.banks[0] if m.banks else "?"
        if m.logged:
            what = (
                f"its data hashes to {m.computed} in {bank}, its logged digest is {m.logged}"
                f" (banks that differ: {', '.join(m.banks)})"
            )
        else:
            what = f"it carries no digest in {', '.join(m.banks)}"
        return Finding(
            id="eventlog.data_digest_mismatch",
            severity=Severity.WARNING,
            claim=Claim.EXECUTABLES,
            subject=f"pcr:{bank}:{m.pcr}",
            message=f"device {device_id}: event {m.number} at byte {m.offset} "
            f"({m.type_name}, PCR {m.pcr}, {bank}): {what}; no fact is taken from it",
            expected=m.logged,
            found=m.computed,
        )

    def more(first: eventdata.DataMismatch, count: int) -> Finding:
        return Finding(
            id="eventlog.data_digest_mismatch",
            severity=Severity.WARNING,
            claim=Claim.EXECUTABLES,
            subject=f"pcr:{first.banks[0] if first.banks else '?'}:{first.pcr}",
            message=f"device {device_id}: {count} more events whose data is not what their "
            f"digests are over, from event {first.number} at byte {first.offset} on",
        )

    return _capped([m for m in state.mismatches() if m.pcr in pcrs], one, more)


_ANOMALIES = {
    # kind: (what happened, expected, found)
    bootfacts.LATE_SECURE_BOOT_VARIABLE: (
        "is measured in PCR 7 after its separator, where firmware has measured the Secure "
        "Boot policy already (PFP 3.3.4.8): PCR 7 was extended after boot; no fact is taken "
        "from it",
        "Secure Boot variables before the PCR 7 separator only",
        "after the separator",
    ),
    bootfacts.DUPLICATE_SECURE_BOOT_VARIABLE: (
        "is measured again before the PCR 7 separator: the variable reads as not measured",
        "each Secure Boot variable measured once",
        "measured again",
    ),
}


def fact_findings(state: LogState, device_id: str, verified: frozenset[int]) -> tuple[Finding, ...]:
    """``eventlog.late_secure_boot_variable`` and ``eventlog.duplicate_secure_boot_variable``
    (``bootfacts.Anomaly``) for events on ``verified`` PCRs: CONTRAINDICATED, configuration.
    A relabelled separator does not hide a late variable: the separator is found by its
    digest. At most MAX_DIGEST_FINDINGS, then one more that says how many."""
    bank = next((b for b in state.banks if b in HASH_BY_NAME), "?")

    def one(a: bootfacts.Anomaly) -> Finding:
        what, expected, found = _ANOMALIES[a.kind]
        return Finding(
            id=f"eventlog.{a.kind}",
            severity=Severity.CONTRAINDICATED,
            claim=Claim.CONFIGURATION,
            subject=f"pcr:{bank}:{a.pcr}",
            message=f"device {device_id}: event {a.number} at byte {a.offset} "
            f"({a.type_name}, PCR {a.pcr}): Secure Boot variable {a.variable} {what}",
            expected=expected,
            found=found,
        )

    def more(first: bootfacts.Anomaly, count: int) -> Finding:
        return Finding(
            id=f"eventlog.{first.kind}",
            severity=Severity.CONTRAINDICATED,
            claim=Claim.CONFIGURATION,
            subject=f"pcr:{bank}:{first.pcr}",
            message=f"device {device_id}: {count} more Secure Boot variables out of place in "
            f"PCR 7, from event {first.number} at byte {first.offset} on",
        )

    return _capped(facts_of(state, verified).anomalies, one, more)


def rebuild(parts: Iterable[LogPart], *, offset: int, event_count: int) -> LogState | None:
    """The state of a stored log: its parts, in order, through ``extend`` (without limits:
    each part passed them when it was accepted). None when they do not continue each other or
    do not come to the recorded size and event count (a part lost, or a log this parser no
    longer accepts): the verifier then asks for the whole log again."""
    state = None
    try:
        for part in parts:
            state = extend(
                state, part.offset, part.data, max_bytes=sys.maxsize, max_events=sys.maxsize
            )
    except MalformedInput:
        return None
    if state is None or (state.offset, state.event_count) != (offset, event_count):
        return None
    return state
