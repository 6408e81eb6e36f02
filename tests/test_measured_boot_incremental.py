"""measured_boot.extend (issue 7, item 7): a log in parts gives what the whole log gives,
each part is read once, the log's size and event count are bounded, a prior state is never
changed. Pure."""

from __future__ import annotations

import dataclasses
import json

import pytest

from devtrust.verifier import measured_boot
from devtrust.verifier.errors import LimitExceeded, MalformedInput
from devtrust.verifier.tpm import eventlog as ev
from tests import eventlogs
from tests.corpus import corpus_root
from tests.eventlogs import agile_event

BANKS = ("sha1", "sha256")
BIG = {"max_bytes": 1 << 24, "max_events": 100_000}
CORPUS = corpus_root()
EXPECTED = json.loads((CORPUS / "expected.json").read_text())["eventlogs"]
PARSED = sorted(name for name, want in EXPECTED.items() if want["parse"] != "error")


def _sample() -> bytes:
    return eventlogs.agile_log(eventlogs.SAMPLE)


def _in_parts(data: bytes, cuts: list[int]) -> measured_boot.LogState:
    state = None
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        state = measured_boot.extend(state, start, data[start:end], **BIG)
    assert state is not None
    return state


def _summary(state: measured_boot.LogState) -> dict[str, object]:
    every = frozenset(range(24))
    return {
        "banks": state.banks,
        "pcrs": state.replay.pcrs,
        "measured": state.replay.measured,
        "offset": state.offset,
        "events": state.event_count,
        "facts": dataclasses.asdict(measured_boot.facts_of(state, every)),
        "contributions": list(state.contributions()),
        "mismatches": list(state.mismatches()),
        "scanner": dataclasses.astuple(state.scanner),
    }


def _check_split_equals_whole(data: bytes, step: int) -> None:
    boundaries = [e.offset for e in ev.parse(data).events[1:]]
    whole = _summary(measured_boot.extend(None, 0, data, **BIG))
    splits = [
        boundaries,  # one event per part
        boundaries[step % 5 :: 7],
        [boundaries[0]] if boundaries else [],  # the header alone, then the rest
    ]
    for cuts in splits:
        assert _summary(_in_parts(data, cuts)) == whole, cuts


def test_parts_give_what_the_whole_log_gives() -> None:
    _check_split_equals_whole(_sample(), 0)


@pytest.mark.parametrize("name", PARSED)
def test_corpus_logs_in_parts_give_what_the_whole_log_gives(name: str) -> None:
    _check_split_equals_whole((CORPUS / name).read_bytes(), len(name))


def test_whole_log_state_matches_replay_log() -> None:
    data = _sample()
    state = measured_boot.extend(None, 0, data, **BIG)
    replayed = ev.replay_log(ev.parse(data))
    for bank, values in replayed.items():
        assert {i: state.replay.pcrs[bank][i] for i in values} == values
    assert state.offset == len(data)
    assert state.event_count == len(eventlogs.SAMPLE) + 1


def test_event_numbers_and_offsets_are_the_whole_logs() -> None:
    records = [
        agile_event(0, ev.EV_SEPARATOR, b"\x00\x00\x00\x00", BANKS),
        agile_event(7, ev.EV_EFI_ACTION, b"real", BANKS, measured=b"other"),
    ]
    head = eventlogs.spec_id_header(BANKS) + records[0]
    state = measured_boot.extend(None, 0, head, **BIG)
    state = measured_boot.extend(state, len(head), records[1], **BIG)
    [m] = state.mismatches()
    assert (m.number, m.offset, m.pcr) == (2, len(head), 7)
    [finding] = measured_boot.digest_findings(state, "dev", frozenset({7}))
    assert f"event 2 at byte {len(head)} (EV_EFI_ACTION, PCR 7, sha1)" in finding.message


def test_a_prior_state_is_never_changed() -> None:
    data = _sample()
    cut = ev.parse(data).events[4].offset
    prior = measured_boot.extend(None, 0, data[:cut], **BIG)
    before = _summary(prior)
    one = measured_boot.extend(prior, cut, data[cut:], **BIG)
    # The same prior extended again with another part (a retried evidence) shares nothing
    # with the first extension.
    other = agile_event(8, ev.EV_IPL, b"kernel_cmdline: other\x00", BANKS, measured=b"other")
    two = measured_boot.extend(prior, cut, other, **BIG)
    assert _summary(prior) == before
    assert measured_boot.facts_of(two, frozenset(range(24))).kernel_cmdlines == ["other"]
    assert _summary(one) == _summary(measured_boot.extend(None, 0, data, **BIG))
    with pytest.raises(MalformedInput):
        measured_boot.extend(prior, cut, b"\x01\x02\x03", **BIG)
    assert _summary(prior) == before


def test_the_secure_boot_rules_hold_across_parts() -> None:
    """What a later part may say depends on the earlier parts: Secure Boot variables after
    PCR 7's separator, or a StartupLocality after PCR 0 was measured, give no fact."""
    sb = eventlogs.variable("SecureBoot", b"\x01")
    first = eventlogs.spec_id_header(BANKS) + b"".join(
        agile_event(p, ev.EV_SEPARATOR, b"\x00\x00\x00\x00", BANKS) for p in (0, 7)
    )
    state = measured_boot.extend(None, 0, first, **BIG)
    late = agile_event(7, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, sb, BANKS)
    late += agile_event(0, ev.EV_NO_ACTION, b"StartupLocality\x00\x03", BANKS)
    state = measured_boot.extend(state, state.offset, late, **BIG)
    facts = measured_boot.facts_of(state, frozenset(range(24)))
    assert facts.secure_boot is None
    assert facts.startup_locality is None


def test_an_empty_part_is_the_prior_state_and_a_gap_is_refused() -> None:
    data = _sample()
    state = measured_boot.extend(None, 0, data, **BIG)
    assert measured_boot.extend(state, len(data), b"", **BIG) is state
    with pytest.raises(MalformedInput, match=f"starts at byte 5, the verifier has {len(data)}"):
        measured_boot.extend(state, 5, b"more", **BIG)
    with pytest.raises(MalformedInput, match="starts at byte 10, the verifier has 0"):
        measured_boot.extend(None, 10, b"more", **BIG)


def test_a_part_at_offset_zero_starts_a_new_log() -> None:
    old = measured_boot.extend(None, 0, _sample(), **BIG)
    new_log = eventlogs.agile_log([(0, ev.EV_SEPARATOR, b"\x00\x00\x00\x00")])
    state = measured_boot.extend(old, 0, new_log, **BIG)
    assert state.offset == len(new_log)
    assert state.event_count == 2
    assert measured_boot.facts_of(state, frozenset(range(24))).grub_commands == []


def test_the_byte_limit_names_its_key() -> None:
    data = _sample()
    measured_boot.extend(None, 0, data, max_bytes=len(data), max_events=100)  # at the limit
    with pytest.raises(LimitExceeded, match=r"limits\.max_event_log_bytes") as exc:
        measured_boot.extend(None, 0, data, max_bytes=len(data) - 1, max_events=100)
    assert f"{len(data)} bytes" in str(exc.value)
    assert isinstance(exc.value, MalformedInput)
    cut = ev.parse(data).events[3].offset
    prior = measured_boot.extend(None, 0, data[:cut], max_bytes=len(data) - 1, max_events=100)
    with pytest.raises(LimitExceeded, match=r"limits\.max_event_log_bytes"):
        measured_boot.extend(prior, cut, data[cut:], max_bytes=len(data) - 1, max_events=100)


def test_the_event_limit_counts_every_part_and_names_its_key() -> None:
    data = _sample()
    count = len(eventlogs.SAMPLE) + 1
    measured_boot.extend(None, 0, data, max_bytes=1 << 20, max_events=count)  # at the limit
    with pytest.raises(LimitExceeded, match=r"limits\.max_event_log_events"):
        measured_boot.extend(None, 0, data, max_bytes=1 << 20, max_events=count - 1)
    cut = ev.parse(data).events[5].offset
    prior = measured_boot.extend(None, 0, data[:cut], max_bytes=1 << 20, max_events=count - 1)
    assert prior.event_count == 5
    with pytest.raises(LimitExceeded, match=f"limit of {count - 1} events"):
        measured_boot.extend(prior, cut, data[cut:], max_bytes=1 << 20, max_events=count - 1)


def test_a_flood_stops_at_the_event_limit_before_the_rest_is_read() -> None:
    no_action = agile_event(0, ev.EV_NO_ACTION, b"x" * 8, BANKS)
    flood = eventlogs.spec_id_header(BANKS) + no_action * 50 + b"\xff" * 7  # garbage after
    with pytest.raises(LimitExceeded, match=r"limits\.max_event_log_events"):
        measured_boot.extend(None, 0, flood, max_bytes=1 << 20, max_events=20)
    with pytest.raises(MalformedInput) as exc:
        measured_boot.extend(None, 0, flood, max_bytes=1 << 20, max_events=1000)
    assert not isinstance(exc.value, LimitExceeded)


def test_facts_are_folded_once_per_state_and_verified_set() -> None:
    data = _sample()
    state = measured_boot.extend(None, 0, data, **BIG)
    pcrs = frozenset({0, 4, 7, 8})
    facts = measured_boot.facts_of(state, pcrs)
    assert measured_boot.facts_of(state, pcrs) is facts
    assert measured_boot.facts_of(state, frozenset({0})) is not facts
    # A part that adds no fact (EV_NO_ACTION) keeps the fold.
    quiet = agile_event(0, ev.EV_NO_ACTION, b"vendor note", BANKS)
    later = measured_boot.extend(state, state.offset, quiet, **BIG)
    assert measured_boot.facts_of(later, pcrs) is facts
    noisy = agile_event(8, ev.EV_IPL, b"grub_cmd: ls\x00", BANKS, measured=b"ls")
    latest = measured_boot.extend(later, later.offset, noisy, **BIG)
    assert measured_boot.facts_of(latest, pcrs).grub_commands[-1] == "ls"
    assert "ls" not in facts.grub_commands


def test_digest_findings_are_bounded() -> None:
    bad = agile_event(9, ev.EV_EFI_ACTION, b"said", BANKS, measured=b"done")
    data = eventlogs.spec_id_header(BANKS) + bad * 40
    state = measured_boot.extend(None, 0, data, **BIG)
    findings = measured_boot.digest_findings(state, "dev", frozenset({9}))
    assert len(findings) == measured_boot.MAX_DIGEST_FINDINGS + 1
    assert "24 more events" in findings[-1].message
    assert measured_boot.digest_findings(state, "dev", frozenset({7})) == ()


def test_a_relabelled_separator_in_an_earlier_part_still_ends_pcr7() -> None:
    """The PCR 7 separator is found by its digest, whichever part it came in and whatever its
    type; a retried part does not leak the Secure Boot variables it saw into its sibling."""
    sb_off = eventlogs.variable("SecureBoot", b"\x00")
    sb_on = eventlogs.variable("SecureBoot", b"\x01")
    first = eventlogs.spec_id_header(BANKS) + agile_event(
        7, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, sb_off, BANKS
    )
    prior = measured_boot.extend(None, 0, first, **BIG)
    relabelled = agile_event(7, ev.EV_EFI_ACTION, b"\x00\x00\x00\x00", BANKS)
    separated = measured_boot.extend(prior, prior.offset, relabelled, **BIG)
    late = agile_event(7, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, sb_on, BANKS)
    state = measured_boot.extend(separated, separated.offset, late, **BIG)
    every = frozenset(range(24))
    assert measured_boot.facts_of(state, every).secure_boot is False
    [finding] = measured_boot.fact_findings(state, "dev", every)
    assert finding.id == "eventlog.late_secure_boot_variable"
    assert "event 3 " in finding.message
    # The same prior, extended with a second SecureBoot before any separator: a duplicate;
    # extended again (a retry) with a PK, nothing of the sibling's is seen.
    twice = measured_boot.extend(prior, prior.offset, late, **BIG)
    assert measured_boot.facts_of(twice, every).secure_boot is None
    assert [f.id for f in measured_boot.fact_findings(twice, "dev", every)] == [
        "eventlog.duplicate_secure_boot_variable"
    ]
    pk = agile_event(7, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, eventlogs.variable("PK", b""), BANKS)
    retry = measured_boot.extend(prior, prior.offset, pk, **BIG)
    assert prior.scanner.pcr7_variables == {"SecureBoot"}
    assert retry.scanner.pcr7_variables == {"SecureBoot", "PK"}
    assert measured_boot.facts_of(retry, every).secure_boot is False
    assert measured_boot.fact_findings(retry, "dev", every) == ()
