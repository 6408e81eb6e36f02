"""Pure appraisal rules: TPM clock and counters, reference values on boot facts."""

from __future__ import annotations

import pytest

from devtrust.verifier.refs import ReferenceValues, RefGroup, appraise_refs
from devtrust.verifier.tpm.bootfacts import BootApplication, BootFacts, SignatureEntry
from devtrust.verifier.tpm.clock import ClockState, check_clock
from devtrust.verifier.tpm.constants import Alg
from devtrust.verifier.tpm.structures import Attest
from devtrust.verifier.trust import Claim


def _attest(clock: int, reset: int, restart: int, fw: int = 10, *, safe: bool = True) -> Attest:
    return Attest(
        magic=0,
        type=0,
        qualified_signer=b"",
        extra_data=b"",
        clock=clock,
        reset_count=reset,
        restart_count=restart,
        safe=safe,
        firmware_version=fw,
        pcr_select=(),
        pcr_digest=b"",
    )


PREVIOUS = ClockState(clock=1000, reset_count=5, restart_count=2, firmware_version=10)


@pytest.mark.parametrize(
    ("name", "attest", "finding"),
    [
        ("reset count backwards", _attest(2000, 4, 9), "tpm.clock.reset_count_backwards"),
        ("restart count backwards", _attest(2000, 5, 1), "tpm.clock.restart_count_backwards"),
        ("clock backwards", _attest(999, 5, 2), "tpm.clock.backwards"),
    ],
)
def test_counters_moving_backwards_are_rollbacks(name: str, attest: Attest, finding: str) -> None:
    verdict = check_clock(attest, PREVIOUS)
    assert verdict.rollback is not None, name
    assert verdict.rollback[0] == finding


def test_reboot_downgrade_and_unsafe_clock() -> None:
    assert check_clock(_attest(1001, 5, 2), PREVIOUS).rollback is None
    reboot = check_clock(_attest(1500, 6, 0), PREVIOUS)  # restartCount starts over, clock not
    assert reboot.rebooted
    assert reboot.rollback is None
    behind = check_clock(_attest(10, 6, 0), PREVIOUS)
    assert behind.rollback is not None
    assert behind.rollback[0] == "tpm.clock.backwards"
    lost = check_clock(_attest(990, 6, 0, safe=False), PREVIOUS)  # the TPM says it lost time
    assert lost.rollback is None
    assert lost.unsafe
    assert check_clock(_attest(2000, 6, 0, fw=9), PREVIOUS).downgrade == (10, 9)
    assert check_clock(_attest(2000, 5, 2, safe=False), PREVIOUS).unsafe


FACTS = BootFacts(
    secure_boot=True,
    databases={"dbx": [SignatureEntry("sha256", "owner", "aa" * 32)]},
    boot_applications=[BootApplication(4, {"sha256": "bb" * 32}, "\\EFI\\BOOT\\BOOTX64.EFI")],
)
PCRS: dict[tuple[int, int], bytes] = {(Alg.SHA256, 7): b"\x07" * 32}


def _ids(group: RefGroup, facts: BootFacts | None = FACTS) -> list[str]:
    return [f.id for f in appraise_refs(group, device_id="d1", pcrs=PCRS, facts=facts)[1]]


def test_rules_that_hold() -> None:
    group = RefGroup(
        name="g",
        pcrs={"sha256": {7: "07" * 32}},
        secure_boot=True,
        boot_applications=["BB" * 32],
        dbx_contains=["aa" * 32],
    )
    claims, findings = appraise_refs(group, device_id="d1", pcrs=PCRS, facts=FACTS)
    assert findings == []
    assert claims == {Claim.EXECUTABLES: 3, Claim.CONFIGURATION: 2}


@pytest.mark.parametrize(
    ("name", "group", "finding"),
    [
        (
            "golden PCR differs",
            RefGroup(name="g", pcrs={"sha256": {7: "00" * 32}}),
            "refs.pcr_mismatch",
        ),
        (
            "golden PCR not quoted",
            RefGroup(name="g", pcrs={"sha256": {8: "00" * 32}}),
            "refs.pcr_not_quoted",
        ),
        ("secure boot off", RefGroup(name="g", secure_boot=False), "refs.secure_boot"),
        (
            "boot application not allowed",
            RefGroup(name="g", boot_applications=["cc" * 32]),
            "refs.boot_application_not_allowed",
        ),
        (
            "dbx lacks a revocation",
            RefGroup(name="g", dbx_contains=["dd" * 32]),
            "refs.dbx_missing_revocation",
        ),
    ],
)
def test_rules_that_fail(name: str, group: RefGroup, finding: str) -> None:
    assert _ids(group) == [finding], name


def test_event_rules_without_a_verified_log() -> None:
    assert _ids(RefGroup(name="g", secure_boot=True), facts=None) == ["refs.no_event_log"]


def test_group_selection() -> None:
    refs = ReferenceValues(
        groups=[
            RefGroup(name="h100", zone="model-development", labels={"sku": "h100"}),
            RefGroup(name="any"),
        ]
    )
    h100 = refs.for_device("model-development", {"sku": "h100"})
    assert h100 is not None
    assert h100.name == "h100"
    fallback = refs.for_device("production-inference", {})
    assert fallback is not None
    assert fallback.name == "any"


def test_an_allowlist_and_no_boot_application_is_a_finding() -> None:
    # A log that shows nothing on PCR 4 booted nothing the allowlist can check, or hid it.
    group = RefGroup(name="g", boot_applications=["bb" * 32])
    none = BootFacts(secure_boot=True)
    assert _ids(group, facts=none) == ["refs.no_boot_application"]
    [finding] = appraise_refs(group, device_id="d1", pcrs=PCRS, facts=none)[1]
    assert finding.claim is Claim.EXECUTABLES
    assert "no boot application on PCR 4" in finding.message
    assert finding.found == "none"
    # An allowlisted digest on another PCR (PCR 14: the OS extends and logs it) is no boot.
    elsewhere = BootFacts(boot_applications=[BootApplication(14, {"sha256": "bb" * 32}, "")])
    assert _ids(group, facts=elsewhere) == ["refs.no_boot_application"]
    # Without an allowlist, no boot application is no finding.
    assert _ids(RefGroup(name="g", secure_boot=True), facts=none) == []
