"""Boot facts a device cannot forge (issue 7, item 1): facts only from quoted PCRs that replay,
only from events whose data hashes to their digests, Secure Boot policy only from PCR 7
before its separator. Pure: logs built in memory, quotes taken as the TPM would report them."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence

from devtrust.verifier import measured_boot
from devtrust.verifier.config import AttestationConfig
from devtrust.verifier.refs import RefGroup, appraise_refs
from devtrust.verifier.tpm import bootfacts, eventdata
from devtrust.verifier.tpm import eventlog as ev
from devtrust.verifier.tpm.constants import HASH_BY_NAME
from devtrust.verifier.trust import Claim, Severity
from tests import eventlogs
from tests.eventlogs import agile_event, sha256_list, variable

BANKS = ("sha1", "sha256")
DEFAULT_PCRS = tuple(AttestationConfig().pcrs["sha256"])
REVOKED = hashlib.sha256(b"a revoked boot loader").digest()
SEPARATOR = b"\x00\x00\x00\x00"


def event(
    pcr: int,
    type_: int,
    data: bytes,
    *,
    measured: bytes | None = None,
    digests: Mapping[str, bytes] | None = None,
) -> bytes:
    return agile_event(pcr, type_, data, BANKS, measured=measured, digests=digests)


def secure_boot(value: bytes) -> bytes:
    return variable("SecureBoot", value)


def dbx(*hashes: bytes) -> bytes:
    return variable("dbx", sha256_list(*hashes), eventlogs.EFI_IMAGE_SECURITY_DATABASE)


def boot(*, sb: bytes = b"\x00", forged_sb: bytes | None = None) -> list[bytes]:
    """Records of a plain UEFI + GRUB boot. ``forged_sb``: the SecureBoot event's data
    rewritten to it, the digests of ``sb`` kept (PCR 7 still replays)."""
    sb_event = (
        event(7, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, secure_boot(sb))
        if forged_sb is None
        else event(
            7,
            ev.EV_EFI_VARIABLE_DRIVER_CONFIG,
            secure_boot(forged_sb),
            digests={b: hashlib.new(b, secure_boot(sb)).digest() for b in BANKS},
        )
    )
    return [
        event(0, ev.EV_S_CRTM_VERSION, "fw 1.0\x00".encode("utf-16-le")),
        sb_event,
        event(7, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, dbx(REVOKED)),
        *(event(p, ev.EV_SEPARATOR, SEPARATOR) for p in range(8)),
        event(4, ev.EV_EFI_BOOT_SERVICES_APPLICATION, b"image load event of shimx64.efi"),
        event(8, ev.EV_IPL, b"grub_cmd: linux /vmlinuz\x00", measured=b"linux /vmlinuz"),
        event(8, ev.EV_IPL, b"kernel_cmdline: /vmlinuz ro\x00", measured=b"/vmlinuz ro"),
    ]


def log(records: Iterable[bytes]) -> bytes:
    return eventlogs.spec_id_header(BANKS) + b"".join(records)


def quote(
    tpm_log: bytes, pcrs: Sequence[int] = DEFAULT_PCRS, bank: str = "sha256"
) -> dict[tuple[int, int], bytes]:
    """The PCR values a TPM that measured ``tpm_log`` quotes (unmeasured PCRs: zero)."""
    replayed = ev.replay_log(ev.parse(tpm_log))[bank]
    size = eventlogs.SIZES[bank][1]
    return {(HASH_BY_NAME[bank], i): replayed.get(i, bytes(size)) for i in pcrs}


def appraise(
    sent: bytes, tpm_log: bytes | None = None, pcrs: Sequence[int] = DEFAULT_PCRS
) -> tuple[measured_boot.LogState, frozenset[int], bootfacts.BootFacts]:
    state = measured_boot.extend(None, 0, sent, max_bytes=1 << 24, max_events=10_000)
    verified = measured_boot.verified_pcrs(state, quote(tpm_log or sent, pcrs))
    return state, verified, measured_boot.facts_of(state, verified)


def test_the_default_challenge_quotes_the_pcrs_the_reference_rules_read() -> None:
    assert {4, 7} == bootfacts.RULE_PCRS
    assert set(AttestationConfig().pcrs["sha256"]) >= bootfacts.RULE_PCRS


def test_an_honest_boot_gives_its_facts_and_no_finding() -> None:
    state, verified, facts = appraise(log(boot()))
    assert verified == set(DEFAULT_PCRS)
    assert facts.secure_boot is False
    assert [e.sha256 for e in facts.databases["dbx"]] == [REVOKED.hex()]
    assert facts.grub_commands == ["linux /vmlinuz"]
    assert facts.kernel_cmdlines == ["/vmlinuz ro"]
    assert [a.pcr for a in facts.boot_applications] == [4]
    assert measured_boot.digest_findings(state, "dev", verified) == ()


def test_secure_boot_data_rewritten_with_its_digest_kept_is_caught() -> None:
    genuine = log(boot(sb=b"\x00"))
    forged = log(boot(sb=b"\x00", forged_sb=b"\x01"))
    state, verified, facts = appraise(forged, genuine)
    assert measured_boot.compare(state, quote(genuine), "dev") == ()  # PCR 7 still replays
    assert 7 in verified
    assert facts.secure_boot is None  # not True: read as "not measured"
    assert facts.secureboot_variable is None
    [finding] = measured_boot.digest_findings(state, "dev", verified)
    offset = ev.parse(forged).events[2].offset
    assert finding.id == "eventlog.data_digest_mismatch"
    assert finding.severity is Severity.WARNING
    assert finding.claim is Claim.EXECUTABLES
    assert finding.subject == "pcr:sha1:7"
    for part in ("event 2", f"byte {offset}", "EV_EFI_VARIABLE_DRIVER_CONFIG", "PCR 7", "sha1"):
        assert part in finding.message
    sha1 = "sha1"  # the log's first bank (TCG's, not a choice of ours)
    assert finding.expected == hashlib.new(sha1, secure_boot(b"\x00")).hexdigest()
    assert finding.found == hashlib.new(sha1, secure_boot(b"\x01")).hexdigest()


def test_dbx_rewritten_with_its_digest_kept_gives_no_dbx() -> None:
    genuine = log(boot())
    records = boot()
    records[2] = event(
        7,
        ev.EV_EFI_VARIABLE_DRIVER_CONFIG,
        dbx(REVOKED, hashlib.sha256(b"another").digest()),
        digests={b: hashlib.new(b, dbx(REVOKED)).digest() for b in BANKS},
    )
    state, verified, facts = appraise(log(records), genuine)
    assert "dbx" not in facts.databases
    assert len(measured_boot.digest_findings(state, "dev", verified)) == 1


def test_fake_secure_boot_on_an_unquoted_pcr_is_ignored() -> None:
    for pcr in (23, 15):
        fake = event(pcr, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, secure_boot(b"\x01"))
        _, verified, facts = appraise(log([*boot(sb=b"\x00"), fake]))
        assert pcr not in verified
        assert facts.secure_boot is False


def test_facts_come_only_from_quoted_pcrs() -> None:
    # A boot application and a command line on PCR 15, which the default challenge leaves out.
    extra = [
        event(15, ev.EV_EFI_BOOT_SERVICES_APPLICATION, b"an application on PCR 15"),
        event(15, ev.EV_IPL, b"kernel_cmdline: init=/bin/sh\x00", measured=b"init=/bin/sh"),
    ]
    state, verified, facts = appraise(log([*boot(), *extra]))
    assert 15 not in verified
    assert [a.pcr for a in facts.boot_applications] == [4]
    assert facts.kernel_cmdlines == ["/vmlinuz ro"]
    everything = bootfacts.fold(state.contributions())  # what the log claims on every PCR
    assert [a.pcr for a in everything.boot_applications] == [4, 15]


def test_a_pcr_whose_replay_mismatches_gives_no_facts() -> None:
    sent = log(boot(sb=b"\x01"))
    tpm = log([*boot(sb=b"\x01"), event(7, ev.EV_EFI_ACTION, b"measured, not logged")])
    state, verified, facts = appraise(sent, tpm)
    assert [f.subject for f in measured_boot.compare(state, quote(tpm), "dev")] == ["pcr:sha256:7"]
    assert 7 not in verified
    assert 4 in verified
    assert facts.secure_boot is None
    assert "dbx" not in facts.databases
    assert [a.pcr for a in facts.boot_applications] == [4]


def test_a_pcr_must_replay_in_every_quoted_bank() -> None:
    sent = log(boot(sb=b"\x01"))
    state = measured_boot.extend(None, 0, sent, max_bytes=1 << 24, max_events=10_000)
    quoted = {**quote(sent, bank="sha1"), **quote(sent, bank="sha256")}
    assert 7 in measured_boot.verified_pcrs(state, quoted)
    quoted[(HASH_BY_NAME["sha256"], 7)] = bytes(32)
    assert 7 not in measured_boot.verified_pcrs(state, quoted)


def test_secure_boot_appended_after_the_pcr7_separator_is_ignored() -> None:
    # Root on the host extends PCR 7 with a well-formed "SecureBoot = 1" and logs it: PCR 7
    # replays and the data hashes correctly, but firmware measures Secure Boot before the
    # separator (PFP 3.3.4.8).
    late = event(7, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, secure_boot(b"\x01"))
    _, verified, facts = appraise(log([*boot(sb=b"\x00"), late]))
    assert 7 in verified
    assert facts.secure_boot is False
    assert any("after its separator" in p for p in facts.problems)
    # And on PCR 14, which the default challenge quotes and the OS may extend.
    on14 = event(14, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, secure_boot(b"\x01"))
    _, verified, facts = appraise(log([*boot(sb=b"\x00"), on14]))
    assert 14 in verified
    assert facts.secure_boot is False


def test_grub_strings_are_measured_without_prefix_and_nul() -> None:
    forged = boot()
    forged[-1] = event(
        8, ev.EV_IPL, b"kernel_cmdline: /vmlinuz init=/bin/sh\x00", measured=b"/vmlinuz ro"
    )
    module = event(8, ev.EV_IPL, b"module_cmdline: evil\x00", measured=b"good")
    genuine = log([*boot(), event(8, ev.EV_IPL, b"module_cmdline: good\x00", measured=b"good")])
    state, verified, facts = appraise(log([*forged, module]), genuine)
    assert facts.grub_commands == ["linux /vmlinuz"]  # the honest one, prefix rule accepted
    assert facts.kernel_cmdlines == []
    findings = measured_boot.digest_findings(state, "dev", verified)
    assert [f.subject for f in findings] == ["pcr:sha1:8", "pcr:sha1:8"]
    assert ["event 14" in findings[0].message, "event 15" in findings[1].message] == [True, True]
    # Hashing the whole string, prefix and NUL included, is not how GRUB measures.
    whole = event(8, ev.EV_IPL, b"grub_cmd: linux /vmlinuz\x00")
    state, verified, facts = appraise(log([*boot()[:-2], whole]))
    assert facts.grub_commands == []
    assert len(measured_boot.digest_findings(state, "dev", verified)) == 1


def test_systemd_boot_command_line_is_measured_as_logged() -> None:
    cmdline = "initrd=\\initrd.img root=/dev/sda2\x00".encode("utf-16-le")
    ok = event(12, ev.EV_IPL, cmdline)
    _, verified, facts = appraise(log([*boot()[:-2], ok]), pcrs=(*DEFAULT_PCRS, 12))
    assert facts.kernel_cmdlines == ["initrd=\\initrd.img root=/dev/sda2"]
    forged = event(
        12,
        ev.EV_IPL,
        "init=/bin/sh\x00".encode("utf-16-le"),
        digests={b: hashlib.new(b, cmdline).digest() for b in BANKS},
    )
    genuine = log([*boot()[:-2], ok])
    state, verified, facts = appraise(log([*boot()[:-2], forged]), genuine, (*DEFAULT_PCRS, 12))
    assert facts.kernel_cmdlines == []
    assert len(measured_boot.digest_findings(state, "dev", verified)) == 1


def test_systemd_boot_one_byte_short_quirk_is_narrow() -> None:
    full = "root=/dev/sda2\x00".encode("utf-16-le")
    short = event(8, ev.EV_IPL, full[:-1], measured=full)  # arch-linux-workstation.bin #24
    assert eventdata.data_mismatch(ev.parse(log([short])).events[1], BANKS) is None
    even = event(8, ev.EV_IPL, full, measured=full + b"\x00")  # an even length: no quirk
    assert eventdata.data_mismatch(ev.parse(log([even])).events[1], BANKS) is not None


def test_boot_variable_quirk_covers_boot_options_only() -> None:
    option = variable("Boot0001", b"\x01\x00\x00\x00 load option")
    value_only = option[32 + 2 * len("Boot0001") :]
    cases = {
        "Boot0001 as VariableData": (ev.EV_EFI_VARIABLE_BOOT, option, value_only, True),
        "BootOrder as VariableData": (
            ev.EV_EFI_VARIABLE_BOOT,
            variable("BootOrder", b"\x01\x00"),
            b"\x01\x00",
            True,
        ),
        "SecureBoot as VariableData": (
            ev.EV_EFI_VARIABLE_BOOT,
            secure_boot(b"\x01"),
            b"\x01",
            False,
        ),
        "driver config as VariableData": (
            ev.EV_EFI_VARIABLE_DRIVER_CONFIG,
            secure_boot(b"\x01"),
            b"\x01",
            False,
        ),
        "Boot0001 in EV_EFI_VARIABLE_BOOT2": (ev.EV_EFI_VARIABLE_BOOT2, option, value_only, False),
    }
    for name, (type_, data, measured, accepted) in cases.items():
        parsed = ev.parse(log([event(1, type_, data, measured=measured)])).events[1]
        assert (eventdata.data_mismatch(parsed, BANKS) is None) is accepted, name


def test_shim_authority_padding_quirk_is_narrow() -> None:
    cert = variable("Shim", b"certificate der")
    padded = cert + b"\x00" * 6  # go-attestation/sb_cert_eventlog events 12, 14
    ok = event(7, ev.EV_EFI_VARIABLE_AUTHORITY, padded, measured=padded[:-1])
    assert eventdata.data_mismatch(ev.parse(log([ok])).events[1], BANKS) is None
    other = cert + b"\x00" * 5
    bad = event(7, ev.EV_EFI_VARIABLE_AUTHORITY, other, measured=other[:-1])
    assert eventdata.data_mismatch(ev.parse(log([bad])).events[1], BANKS) is not None


def test_an_event_without_a_digest_for_every_bank_gives_no_fact() -> None:
    # PCR 7 quoted in SHA-256 only; a SecureBoot event with a SHA-1 digest alone does not
    # change the SHA-256 replay, so only its own (matching) SHA-1 digest would vouch for it.
    sha1_only = agile_event(
        7,
        ev.EV_EFI_VARIABLE_DRIVER_CONFIG,
        secure_boot(b"\x01"),
        ("sha1",),
    )
    records = boot(sb=b"\x00")
    records[1] = sha1_only
    state, verified, facts = appraise(log(records))
    assert 7 in verified
    assert facts.secure_boot is None
    [finding] = measured_boot.digest_findings(state, "dev", verified)
    assert "no digest in sha256" in finding.message


def test_undefined_types_are_not_checked_and_still_give_facts() -> None:
    # A boot application's digest is of the PE image, not of the event data.
    facts = appraise(log(boot()))[2]
    [app] = facts.boot_applications
    assert app.digests["sha256"] == hashlib.sha256(b"image load event of shimx64.efi").hexdigest()
    raw = ev.parse(log([event(4, ev.EV_EFI_BOOT_SERVICES_APPLICATION, b"x", measured=b"pe")]))
    assert eventdata.measured_data(raw.events[1]) is None
    assert eventdata.data_mismatch(raw.events[1], BANKS) is None


# --- relabelled types (the type is not measured: only the digest is extended) ----------------

SHIM = b"the Authenticode bytes of shimx64.efi \x00\x00 PE\x00\x00"
FORBIDDEN = b"the Authenticode bytes of a revoked grubx64.efi \x00\x00 PE\x00\x00"


def digest(bank: str, data: bytes) -> bytes:
    return hashlib.new(bank, data).digest()


def image_load(path: str) -> bytes:
    """UEFI_IMAGE_LOAD_EVENT (PFP 10.4.3) with one file-path node."""
    node = (path + "\x00").encode("utf-16-le")
    device_path = (
        struct.pack("<BBH", 4, 4, 4 + len(node)) + node + struct.pack("<BBH", 0x7F, 0xFF, 4)
    )
    return struct.pack("<QQQQ", 0x1000, 0x2000, 0, len(device_path)) + device_path


def pcr4_boot(forbidden: bytes) -> list[bytes]:
    """boot() with shim and then ``forbidden`` (one record, event 5) on PCR 4 before its
    separator, in place of boot()'s application."""
    records = boot()
    shim = event(
        4, ev.EV_EFI_BOOT_SERVICES_APPLICATION, image_load("\\EFI\\shim.efi"), measured=SHIM
    )
    return [*records[:3], shim, forbidden, *records[3:11], *records[12:]]


def allowlist(facts: bootfacts.BootFacts) -> list[str]:
    group = RefGroup(name="g", boot_applications=[hashlib.sha256(SHIM).hexdigest()])
    return [f.id for f in appraise_refs(group, device_id="dev", pcrs={}, facts=facts)[1]]


def test_a_boot_application_relabelled_is_still_a_boot_application() -> None:
    # Review finding 1: a forbidden EV_EFI_BOOT_SERVICES_APPLICATION relabelled as a type
    # with no data check, or with a data check it fails, still extended PCR 4 with its image.
    cases = {
        "as a driver": (
            ev.EV_EFI_BOOT_SERVICES_DRIVER,
            image_load("\\EFI\\grub.efi"),
            "\\EFI\\grub.efi",
        ),
        "as a runtime driver": (ev.EV_EFI_RUNTIME_SERVICES_DRIVER, b"x", None),
        "as a POST code": (ev.EV_POST_CODE, b"POST CODE", None),
        "as EV_COMPACT_HASH": (ev.EV_COMPACT_HASH, b"\x01\x02\x03\x04", None),
        "as EV_IPL": (ev.EV_IPL, b"grub_cmd: ls\x00", None),
        "as an action text": (ev.EV_EFI_ACTION, b"Calling EFI Application from Boot Option", None),
        "as a separator": (ev.EV_SEPARATOR, SEPARATOR, None),
        "as an event tag": (ev.EV_EVENT_TAG, b"tag", None),
    }
    genuine = log(
        pcr4_boot(
            event(
                4,
                ev.EV_EFI_BOOT_SERVICES_APPLICATION,
                image_load("\\EFI\\grub.efi"),
                measured=FORBIDDEN,
            )
        )
    )
    for name, (type_, data, path) in cases.items():
        forged = log(pcr4_boot(event(4, type_, data, measured=FORBIDDEN)))
        state, verified, facts = appraise(forged, genuine)
        assert measured_boot.compare(state, quote(genuine), "dev") == (), name  # replays
        assert 4 in verified, name
        apps = [(a.digests["sha256"], a.path) for a in facts.boot_applications]
        number = ev.parse(forged).events[5].number
        shown = path if path is not None else f"<{ev.EVENT_NAMES[type_]} event {number}>"
        assert apps == [
            (hashlib.sha256(SHIM).hexdigest(), "\\EFI\\shim.efi"),
            (hashlib.sha256(FORBIDDEN).hexdigest(), shown),
        ], name
        assert allowlist(facts) == ["refs.boot_application_not_allowed"], name


def test_only_separators_and_action_texts_on_pcr4_are_no_boot_application() -> None:
    text = b"Calling EFI Application from Boot Option"
    cases = {
        # name: (record, is a boot application)
        "action text": (event(4, ev.EV_EFI_ACTION, text), False),
        "EV_ACTION text": (event(4, ev.EV_ACTION, b"Calling INT 19h"), False),
        "omit boot device": (event(4, ev.EV_OMIT_BOOT_DEVICE_EVENTS, b"Omitted"), False),
        "separator labelled a driver": (event(4, ev.EV_EFI_BOOT_SERVICES_DRIVER, SEPARATOR), False),
        "error separator": (event(4, ev.EV_SEPARATOR, b"\xff\xff\xff\xff"), False),
        # A code image whose Authenticode bytes are logged as an action "text": its digest is
        # the hash of its data in every bank, but it is no text.
        "image logged as action data": (event(4, ev.EV_EFI_ACTION, FORBIDDEN), True),
        "long text": (event(4, ev.EV_EFI_ACTION, b"A" * 257), True),
        "text in sha1 only": (
            event(
                4,
                ev.EV_EFI_ACTION,
                text,
                digests={
                    "sha1": digest("sha1", text),
                    "sha256": hashlib.sha256(FORBIDDEN).digest(),
                },
            ),
            True,
        ),
        # A separator's digest in the unquoted bank only: the quoted bank extended an image.
        "separator in sha1 only": (
            event(
                4,
                ev.EV_SEPARATOR,
                SEPARATOR,
                digests={
                    "sha1": digest("sha1", SEPARATOR),
                    "sha256": hashlib.sha256(FORBIDDEN).digest(),
                },
            ),
            True,
        ),
        "separator 00000000 in sha1, FFFFFFFF in sha256": (
            event(
                4,
                ev.EV_SEPARATOR,
                SEPARATOR,
                digests={
                    "sha1": digest("sha1", SEPARATOR),
                    "sha256": hashlib.sha256(b"\xff" * 4).digest(),
                },
            ),
            True,
        ),
    }
    for name, (record, counted) in cases.items():
        _, verified, facts = appraise(log(pcr4_boot(record)))
        assert 4 in verified, name
        assert len(facts.boot_applications) == (2 if counted else 1), name  # and shim


def test_a_relabelled_pcr7_separator_still_ends_the_secure_boot_policy() -> None:
    # Review finding 2: with root at runtime, the PCR 7 separator is logged as EV_EFI_ACTION
    # (its data 00000000 still hashes to its digest) and PCR 7 extended with "SecureBoot = 1"
    # and a dbx of the device's choosing, both logged as firmware would.
    late = [
        event(7, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, secure_boot(b"\x01")),
        event(7, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, dbx(REVOKED, hashlib.sha256(b"x").digest())),
    ]
    genuine = log([*boot(sb=b"\x00"), *late])
    separator = {
        "as an action": event(7, ev.EV_EFI_ACTION, SEPARATOR),
        "as a driver": event(7, ev.EV_EFI_BOOT_SERVICES_DRIVER, b"x", measured=SEPARATOR),
        "as a POST code": event(7, ev.EV_POST_CODE, SEPARATOR),
        # The quote is of SHA-256; the device writes what it likes into the SHA-1 digest.
        "with a SHA-1 digest of its choosing": event(
            7,
            ev.EV_EFI_BOOT_SERVICES_DRIVER,
            SEPARATOR,
            digests={
                "sha1": digest("sha1", b"x"),
                "sha256": hashlib.sha256(SEPARATOR).digest(),
            },
        ),
    }
    for name, relabelled in separator.items():
        records = boot(sb=b"\x00")
        records[10] = relabelled  # PCR 7's separator
        forged = log([*records, *late])
        state, verified, facts = appraise(forged, genuine)
        assert measured_boot.compare(state, quote(genuine), "dev") == (), name
        assert 7 in verified, name
        assert facts.secure_boot is False, name
        assert [e.sha256 for e in facts.databases["dbx"]] == [REVOKED.hex()], name
        findings = measured_boot.fact_findings(state, "dev", verified)
        assert [f.id for f in findings] == ["eventlog.late_secure_boot_variable"] * 2, name
        events = ev.parse(forged).events
        for finding, number, name_ in zip(findings, (15, 16), ("SecureBoot", "dbx"), strict=True):
            assert finding.severity is Severity.CONTRAINDICATED
            assert finding.claim is Claim.CONFIGURATION
            assert finding.subject == "pcr:sha1:7"  # the log's first bank
            for part in (
                f"event {number}",
                f"byte {events[number].offset}",
                name_,
                "PCR 7",
                "after its separator",
            ):
                assert part in finding.message, (name, part)


def test_late_variables_on_an_unverified_pcr7_give_no_finding() -> None:
    late = event(7, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, secure_boot(b"\x01"))
    sent = log([*boot(), late])
    state, verified, _ = appraise(sent, log(boot()))  # the TPM never saw it: PCR 7 mismatches
    assert 7 not in verified
    assert measured_boot.fact_findings(state, "dev", verified) == ()
    assert measured_boot.fact_findings(state, "dev", frozenset({7})) != ()


def test_authority_events_after_the_separator_are_no_late_variable() -> None:
    # PFP 3.3.4.8: the db entry that verified each boot application, named "db", after the
    # separator (every Secure Boot log in the corpus, e.g. go-tpm-tools/debian-10.bin 23).
    authority = event(
        7,
        ev.EV_EFI_VARIABLE_AUTHORITY,
        variable("db", b"cert", eventlogs.EFI_IMAGE_SECURITY_DATABASE),
    )
    state, verified, facts = appraise(log([*boot(), authority]))
    assert measured_boot.fact_findings(state, "dev", verified) == ()
    assert facts.anomalies == []


def test_a_secure_boot_variable_measured_twice_reads_as_not_measured() -> None:
    # No corpus log measures a Secure Boot variable twice before the separator (tests/
    # test_bootfacts_corpus.py): which one firmware enforced is unknown.
    cases = {
        "SecureBoot twice": (
            event(7, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, secure_boot(b"\x01")),
            "SecureBoot",
        ),
        "dbx twice": (event(7, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, dbx()), "dbx"),
        # The duplicate relabelled as a type without a data check still counts.
        "SecureBoot again as a POST code": (
            event(7, ev.EV_POST_CODE, secure_boot(b"\x01")),
            "SecureBoot",
        ),
        "SecureBoot again as a boot variable": (
            event(7, ev.EV_EFI_VARIABLE_BOOT, secure_boot(b"\x01")),
            "SecureBoot",
        ),
    }
    for name, (again, variable_name) in cases.items():
        records = boot(sb=b"\x01")
        records.insert(3, again)  # before the separators
        state, verified, facts = appraise(log(records))
        assert 7 in verified, name
        if variable_name == "SecureBoot":
            assert facts.secure_boot is None, name
            assert facts.secureboot_variable is None, name
            assert [e.sha256 for e in facts.databases["dbx"]] == [REVOKED.hex()], name
        else:
            assert "dbx" not in facts.databases, name
            assert facts.secure_boot is True, name
        [finding] = measured_boot.fact_findings(state, "dev", verified)
        assert finding.id == "eventlog.duplicate_secure_boot_variable", name
        assert finding.severity is Severity.CONTRAINDICATED
        assert finding.claim is Claim.CONFIGURATION
        assert f"Secure Boot variable {variable_name} is measured again" in finding.message
        assert "event 4 " in finding.message, name


def test_a_secure_boot_variable_of_a_type_without_a_data_check_gives_no_fact() -> None:
    # Its data is not bound to its digest: relabelled, it is the device's word.
    records = boot(sb=b"\x01")
    records[1] = event(7, ev.EV_POST_CODE, secure_boot(b"\x01"))
    _, verified, facts = appraise(log(records))
    assert 7 in verified
    assert facts.secure_boot is None
    # The same data under any type whose digest is over the data is what was measured.
    records[1] = event(7, ev.EV_EFI_VARIABLE_BOOT, secure_boot(b"\x01"))
    assert appraise(log(records))[2].secure_boot is True


def test_option_rom_authority_before_the_separator_is_no_second_db() -> None:
    # Drivers and option ROMs verified before the separator log their authority there.
    records = boot()
    db = event(
        7,
        ev.EV_EFI_VARIABLE_DRIVER_CONFIG,
        variable("db", sha256_list(REVOKED), eventlogs.EFI_IMAGE_SECURITY_DATABASE),
    )
    authority = event(
        7,
        ev.EV_EFI_VARIABLE_AUTHORITY,
        variable("db", b"option ROM signer", eventlogs.EFI_IMAGE_SECURITY_DATABASE),
    )
    records[3:3] = [db, authority]
    state, verified, facts = appraise(log(records))
    assert [e.sha256 for e in facts.databases["db"]] == [REVOKED.hex()]
    assert measured_boot.fact_findings(state, "dev", verified) == ()


def test_fact_findings_are_bounded() -> None:
    late = [event(7, ev.EV_EFI_VARIABLE_DRIVER_CONFIG, secure_boot(b"\x01"))] * 40
    state, verified, _ = appraise(log([*boot(), *late]))
    findings = measured_boot.fact_findings(state, "dev", verified)
    assert len(findings) == measured_boot.MAX_DIGEST_FINDINGS + 1
    assert "24 more" in findings[-1].message
