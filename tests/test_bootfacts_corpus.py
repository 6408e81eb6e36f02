"""The data-digest check and the verified facts over every real log in the conformance corpus
(tests/data/corpus): the quirks accepted keep real firmware clean, and the facts an honest log
gives are the same as before the check, except where the corpus itself shows a bad event."""

from __future__ import annotations

import dataclasses
import json

import pytest

from devtrust.verifier import measured_boot
from devtrust.verifier.tpm import bootfacts, eventdata
from devtrust.verifier.tpm import eventlog as ev
from devtrust.verifier.tpm.constants import HASH_BY_NAME
from tests.corpus import corpus_root

CORPUS = corpus_root()
EXPECTED = json.loads((CORPUS / "expected.json").read_text())["eventlogs"]
PARSED = sorted(name for name, want in EXPECTED.items() if want["parse"] != "error")

# Events whose data is not what their digests are over, per corpus log; every other log: none.
MISMATCHES = {
    # EV_S_CRTM_VERSION "2.3.5" (Boot Guard): tpm2_eventlog and go-tpm-tools flag it too.
    "eventlogs/go-tpm-tools/gdc-host.bin": [(3, "EV_S_CRTM_VERSION", 0, ("sha256",))],
    # tpm2-tools test fixtures: one event carries sha1 and sha256 digests in a log of four banks.
    "eventlogs/fixtures-synthetic/tpm2-tools-event-uefiaction.bin": [
        (1, "EV_EFI_ACTION", 4, ("sha384", "sha512"))
    ],
    "eventlogs/fixtures-synthetic/tpm2-tools-event-uefivar.bin": [
        (1, "EV_EFI_VARIABLE_DRIVER_CONFIG", 7, ("sha384", "sha512"))
    ],
}
# Facts the unchecked reading of a log has and the verified one must not (those events).
DROPPED = {
    "eventlogs/go-tpm-tools/gdc-host.bin": {"scrtm_version"},
    "eventlogs/fixtures-synthetic/tpm2-tools-event-uefivar.bin": {
        "secure_boot",
        "secureboot_variable",
    },
}


def _state(name: str) -> measured_boot.LogState:
    data = (CORPUS / name).read_bytes()
    return measured_boot.extend(None, 0, data, max_bytes=1 << 24, max_events=100_000)


@pytest.mark.parametrize("name", PARSED)
def test_corpus_data_digest_mismatches(name: str) -> None:
    state = _state(name)
    found = [(m.number, m.type_name, m.pcr, m.banks) for m in state.mismatches()]
    assert found == MISMATCHES.get(name, [])


@pytest.mark.parametrize("name", PARSED)
def test_corpus_verified_facts_are_the_logs_own(name: str) -> None:
    """Quoted as the log replays (an honest TPM, all 24 PCRs), every PCR verifies, and the
    facts equal the unchecked reading of the log but for the events that fail their digests."""
    state = _state(name)
    data = (CORPUS / name).read_bytes()
    quoted = {
        (HASH_BY_NAME[bank], i): state.replay.pcrs.get(bank, {}).get(i, bytes(size))
        for bank, size in state.banks.items()
        if bank in HASH_BY_NAME
        for i in range(24)
    }
    verified = measured_boot.verified_pcrs(state, quoted)
    assert verified == set(range(24))
    checked = dataclasses.asdict(measured_boot.facts_of(state, verified))
    claimed = dataclasses.asdict(bootfacts.boot_facts(ev.parse(data)))
    differ = {k for k in claimed if claimed[k] != checked[k]}
    assert differ == DROPPED.get(name, set())
    for key in differ:
        assert checked[key] is None
    want = EXPECTED[name]
    if "scrtm_version" not in differ:
        assert checked["scrtm_version"] == want["scrtm_version"]
    if "secureboot_variable" not in differ:
        assert checked["secureboot_variable"] == want["secureboot_variable"]
    assert checked["startup_locality"] == want["startup_locality"]
    assert checked["hcrtm"] == want["hcrtm"]


def test_a_real_quote_verifies_its_logs_pcrs() -> None:
    """gce-cos85: a GCE Shielded VM's quote of all 24 PCRs with the log of that boot."""
    bundle = CORPUS / "quotes" / "gce-cos85-nonce9009"
    data = (bundle / "eventlog.bin").read_bytes()
    quoted = {
        (HASH_BY_NAME["sha256"], int(i)): bytes.fromhex(v)
        for i, v in json.loads((bundle / "pcrs-sha256.json").read_text()).items()
    }
    state = measured_boot.extend(None, 0, data, max_bytes=1 << 24, max_events=10_000)
    assert measured_boot.compare(state, quoted, "gce") == ()
    verified = measured_boot.verified_pcrs(state, quoted)
    assert verified >= bootfacts.RULE_PCRS
    facts = measured_boot.facts_of(state, verified)
    assert facts.secure_boot is True
    assert facts.boot_applications
    assert measured_boot.digest_findings(state, "gce", verified) == ()
    # One changed PCR 7 value: no Secure Boot fact any more.
    quoted[(HASH_BY_NAME["sha256"], 7)] = bytes(32)
    verified = measured_boot.verified_pcrs(state, quoted)
    assert 7 not in verified
    assert measured_boot.facts_of(state, verified).secure_boot is None


# PCR 4 events that count as boot applications but are not EV_EFI_BOOT_SERVICES_APPLICATION
# (every other PCR 4 event in the corpus is a separator, by digest, or an action text).
PCR4_NOT_TYPED_AS_APPLICATIONS = {
    # Its digests lack two of the log's four banks, so its data check fails: whatever was
    # extended in SHA-384 and SHA-512 is unknown, and may be code.
    "eventlogs/fixtures-synthetic/tpm2-tools-event-uefiaction.bin": [(1, "EV_EFI_ACTION")],
}


@pytest.mark.parametrize("name", PARSED)
def test_corpus_boot_applications_are_the_logs_own(name: str) -> None:
    """Every PCR 4 event counts as a boot application but separators and action texts: on
    real logs, that is exactly the EV_EFI_BOOT_SERVICES_APPLICATION events, with the paths
    their UEFI_IMAGE_LOAD_EVENT names."""
    state = _state(name)
    events = ev.parse((CORPUS / name).read_bytes()).events
    pcr4 = [
        e for e in events if e.pcr == bootfacts.BOOT_APPLICATION_PCR and e.type != ev.EV_NO_ACTION
    ]
    assert {e.type for e in pcr4} <= {
        ev.EV_EFI_BOOT_SERVICES_APPLICATION,
        ev.EV_SEPARATOR,
        ev.EV_EFI_ACTION,
    }
    typed = [e for e in pcr4 if e.type == ev.EV_EFI_BOOT_SERVICES_APPLICATION]
    other = [
        (e.number, e.type_name)
        for e in pcr4
        if e.type != ev.EV_EFI_BOOT_SERVICES_APPLICATION
        and not eventdata.measured_no_code(e, state.banks)
    ]
    assert other == PCR4_NOT_TYPED_AS_APPLICATIONS.get(name, [])
    facts = measured_boot.facts_of(state, frozenset(range(24)))
    by_number = {e.number: e for e in pcr4}
    want = sorted([e.number for e in typed] + [n for n, _ in other])
    assert [(a.pcr, a.digests) for a in facts.boot_applications] == [
        (4, {b: d.hex() for b, d in by_number[n].digests.items()}) for n in want
    ]
    described = [a.path for a in facts.boot_applications if a.path.startswith("<")]
    assert described == [f"<{type_name} event {n}>" for n, type_name in other]


@pytest.mark.parametrize("name", PARSED)
def test_corpus_separators_by_digest_and_secure_boot_variables(name: str) -> None:
    """On PCRs 4 and 7 the separator by digest is the EV_SEPARATOR; no real log measures a
    Secure Boot variable twice before PCR 7's separator, or one after it (EV_EFI_VARIABLE_
    AUTHORITY events name db there, and are no variable)."""
    events = ev.parse((CORPUS / name).read_bytes()).events
    for pcr in (4, 7):
        on_pcr = [e for e in events if e.pcr == pcr and e.type != ev.EV_NO_ACTION]
        by_type = [e.number for e in on_pcr if e.type == ev.EV_SEPARATOR]
        assert [e.number for e in on_pcr if eventdata.separator_in_any_bank(e)] == by_type
        assert [e.number for e in on_pcr if eventdata.separator_in_every_bank(e)] == by_type
    facts = measured_boot.facts_of(_state(name), frozenset(range(24)))
    assert facts.anomalies == []
