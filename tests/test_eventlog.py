"""Event log parsing and replay (verifier.tpm.eventlog), and `devtrust eventlog replay`."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from devtrust.verifier.cli import main as cli
from devtrust.verifier.errors import MalformedInput
from devtrust.verifier.tpm import bootfacts
from devtrust.verifier.tpm import eventlog as ev
from tests import eventlogs
from tests.corpus import corpus_root


def test_replay_of_a_built_log() -> None:
    log = ev.parse(eventlogs.agile_log(eventlogs.SAMPLE))
    assert log.format == "crypto-agile"
    assert list(log.banks) == ["sha1", "sha256"]
    assert len(log.events) == len(eventlogs.SAMPLE) + 1
    replayed = ev.replay_log(log)
    for bank in ("sha1", "sha256"):
        assert replayed[bank] == eventlogs.expected_pcrs(eventlogs.SAMPLE, bank)
    facts = bootfacts.boot_facts(log)
    assert facts.grub_commands == ["linux /vmlinuz root=/dev/sda1"]
    assert facts.kernel_cmdlines == ["/vmlinuz root=/dev/sda1"]
    assert facts.separators == {0: "ok", 7: "ok"}


def test_every_truncation_is_an_error_naming_a_byte_offset() -> None:
    data = eventlogs.agile_log(eventlogs.SAMPLE)
    boundaries = {e.offset for e in ev.parse(data).events} | {len(data)}
    for cut in range(len(data)):
        if cut in boundaries and cut > 0:
            continue  # a cut between records is a shorter, valid log
        with pytest.raises(MalformedInput, match=r"at byte \d+"):
            ev.parse(data[:cut])


def test_garbage_is_an_error_not_a_crash() -> None:
    for blob in (b"\xff" * 64, b"\x00" * 7, os.urandom(300)):
        with contextlib.suppress(MalformedInput):
            ev.parse(blob)


def test_incremental_parse_replays_like_the_whole_log() -> None:
    data = eventlogs.agile_log(eventlogs.SAMPLE)
    whole = ev.parse(data)
    split = whole.events[5].offset
    first = ev.parse(data[:split])
    state = ev.replay(first.events, first.banks)
    rest = ev.parse(data, offset=split, banks=first.banks)
    assert rest.events[0].offset == split
    state = ev.replay(rest.events, rest.banks, state)
    assert dict(state.pcrs.items()) == ev.replay_log(whole)


def test_startup_locality_and_hcrtm_start_values() -> None:
    locality = [(0, 3, b"StartupLocality\x00\x03"), (0, 0x8, b"v")]
    replayed = ev.replay_log(ev.parse(eventlogs.agile_log(locality, ("sha256",))))
    import hashlib

    start = bytes(31) + b"\x03"
    assert replayed["sha256"][0] == hashlib.sha256(start + hashlib.sha256(b"v").digest()).digest()
    hcrtm = [(0, 0x80000010, b"HCRTM"), (0, 0x8, b"v")]
    replayed = ev.replay_log(ev.parse(eventlogs.agile_log(hcrtm, ("sha256",))))
    value = bytes(31) + b"\x04"
    for data in (b"HCRTM", b"v"):
        value = hashlib.sha256(value + hashlib.sha256(data).digest()).digest()
    assert replayed["sha256"][0] == value


def test_cli_replay_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "log.bin"
    path.write_bytes(eventlogs.agile_log(eventlogs.SAMPLE))
    assert cli(["eventlog", "replay", str(path), "--json", "--events"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (
        out["banks"]["sha256"]["8"] == eventlogs.expected_pcrs(eventlogs.SAMPLE, "sha256")[8].hex()
    )
    assert [e["type"] for e in out["events"]][:2] == ["EV_NO_ACTION", "EV_S_CRTM_VERSION"]


def test_cli_replay_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "log.bin"
    path.write_bytes(eventlogs.agile_log(eventlogs.SAMPLE)[:-3])
    assert cli(["eventlog", "replay", str(path)]) == 1
    assert "invalid: event log truncated at byte" in capsys.readouterr().out
    assert cli(["eventlog", "replay", str(tmp_path / "absent")]) == 2
    with pytest.raises(SystemExit) as usage:
        cli(["eventlog", "replay"])
    assert usage.value.code == 2


# --- conformance: real logs from real machines ------------------------------------------

CORPUS = corpus_root()
EXPECTED = json.loads((CORPUS / "expected.json").read_text())["eventlogs"]


def test_corpus_is_present() -> None:
    assert len(EXPECTED) >= 30


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_event_log(name: str) -> None:
    want = EXPECTED[name]
    data = (CORPUS / name).read_bytes()
    if want["parse"] == "error":
        with pytest.raises(MalformedInput):
            ev.parse(data)
        return
    log = ev.parse(data)
    assert log.format == want["log_format"]
    assert list(log.banks) == want["digest_banks"]
    assert len(log.events) == want["event_count"]
    assert log.type_counts() == want["event_type_counts"]
    replayed = {b: {str(i): v.hex() for i, v in p.items()} for b, p in ev.replay_log(log).items()}
    assert replayed == want["replayed_pcrs"]
    facts = bootfacts.boot_facts(log)
    assert facts.startup_locality == want["startup_locality"]
    assert facts.hcrtm == want["hcrtm"]
    assert facts.scrtm_version == want["scrtm_version"]
    assert facts.secureboot_variable == want["secureboot_variable"]
