"""The soft TPM's PCRs, event log, clock and reboots (devtrust.swtpm.soft) as the verifier's
measured-boot and appraisal code sees them, and the same boot on a real swtpm."""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from devtrust.agent.tpm import TpmBackend
from devtrust.core.binding import qualifying_data
from devtrust.core.ids import DeviceId, Nonce
from devtrust.swtpm import bootlog
from devtrust.swtpm.simroot import SimulationRoot
from devtrust.swtpm.soft import SoftTpm
from devtrust.verifier import measured_boot
from devtrust.verifier.appraisal import Appraisal, EventLogPart, Evidence, Expectation, appraise
from devtrust.verifier.enrollment import device_id_for, parse_ak
from devtrust.verifier.tpm.clock import ClockState
from devtrust.verifier.tpm.constants import Alg
from devtrust.verifier.tpm.eventlog import parse as parse_log
from devtrust.verifier.tpm.eventlog import replay_log
from devtrust.verifier.tpm.structures import PcrSelect, ak_qualified_names, parse_public
from tests.conftest import SwtpmFactory

SELECTION = [("sha256", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14])]
_ALGS = {"sha1": int(Alg.SHA1), "sha256": int(Alg.SHA256)}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> SimulationRoot:
    return SimulationRoot.create(tmp_path_factory.mktemp("sim-root"))


@pytest.fixture(scope="module")
def tpm(root: SimulationRoot) -> SoftTpm:
    return SoftTpm(root)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def _by_alg(values: Mapping[tuple[str, int], bytes]) -> dict[tuple[int, int], bytes]:
    return {(_ALGS[bank], index): value for (bank, index), value in values.items()}


def _requested(selection: list[tuple[str, list[int]]]) -> tuple[PcrSelect, ...]:
    return tuple(PcrSelect(_ALGS[bank], tuple(pcrs)) for bank, pcrs in selection)


# --- PCRs, the event log, measured boot --------------------------------------------------------


def test_event_log_replays_to_every_pcr(root: SimulationRoot) -> None:
    tpm = SoftTpm(root)
    tpm.extend(9, b"a kernel command line")
    log = parse_log(tpm.event_log())
    replayed = replay_log(log)
    everything = [(bank, list(range(24))) for bank in ("sha1", "sha256")]
    values = run(tpm.pcr_read(everything))
    for bank in ("sha1", "sha256"):
        for index in range(24):
            size = 20 if bank == "sha1" else 32
            initial = b"\xff" * size if 17 <= index <= 22 else bytes(size)
            assert values[(bank, index)] == replayed[bank].get(index, initial), (bank, index)
    assert values[("sha256", 9)] != bytes(32)


def _compare(tpm: SoftTpm) -> tuple[str, ...]:
    state = measured_boot.extend(None, 0, tpm.event_log(), max_bytes=1 << 20, max_events=1000)
    quoted = _by_alg(run(tpm.pcr_read(SELECTION)))
    return tuple(f.id + ":" + f.subject for f in measured_boot.compare(state, quoted, "dev"))


def test_unlogged_extend_is_pcr_tampering_the_log_does_not_explain(root: SimulationRoot) -> None:
    tpm = SoftTpm(root)
    assert _compare(tpm) == ()
    tpm.extend(4, b"a bootloader nobody logged", logged=False)
    assert _compare(tpm) == ("eventlog.replay_mismatch:pcr:sha256:4",)


def test_logged_extend_replays(root: SimulationRoot) -> None:
    tpm = SoftTpm(root)
    before = tpm.event_log()
    tpm.extend(4, b"a bootloader")
    assert tpm.event_log().startswith(before)
    assert tpm.event_log() != before
    assert _compare(tpm) == ()


def test_extend_of_a_pcr_the_tpm_lacks_is_refused(tpm: SoftTpm) -> None:
    with pytest.raises(ValueError, match="PCR index 24"):
        tpm.extend(24, b"x")


def test_reboot_starts_the_boot_over(root: SimulationRoot) -> None:
    tpm = SoftTpm(root)
    booted_log = tpm.event_log()
    booted = run(tpm.pcr_read(SELECTION))
    tpm.extend(4, b"x")
    tpm.extend(8, b"y", logged=False)
    tpm.reboot()
    assert tpm.reset_count == 1
    assert tpm.event_log() == booted_log
    assert run(tpm.pcr_read(SELECTION)) == booted
    # Devices share the boot: one device's extends never reach another's PCRs or log.
    assert SoftTpm(root).event_log() == booted_log


# --- appraisal by the verifier: quote, clock, measured boot ------------------------------------


class _Body:
    posture_digest = ""

    def plain(self) -> Mapping[str, Any]:
        return {}


def _appraise(
    tpm: SoftTpm, *, previous: Appraisal | None = None, log_from: int | None = 0
) -> Appraisal:
    ak, ek = parse_ak(run(tpm.ak_public())), parse_public(run(tpm.ek_public()))
    nonce = Nonce(os.urandom(32))
    body = b"evidence body"
    quote = run(tpm.quote(qualifying_data(nonce, body), SELECTION))
    log = tpm.event_log()
    evidence = Evidence(
        nonce=nonce,
        attest=quote.attest,
        signature=quote.signature,
        pcrs=_by_alg(quote.pcrs),
        body=body,
        body_doc=_Body(),
        certify_key=None,
        event_log=None if log_from is None else EventLogPart(log_from, log[log_from:]),
    )
    expect = Expectation(
        device_id=DeviceId(device_id_for(ek.public_key())),
        nonce=nonce,
        selection=_requested(SELECTION),
        ak_key=ak.public_key(),
        staleness=datetime.timedelta(minutes=3),
        qualified_signers=ak_qualified_names(ak, ek),
        clock=previous.clock if previous else None,
        log=previous.log if previous else None,
    )
    return appraise(evidence, expect, now=datetime.datetime.now(datetime.UTC))


def _ids(appraisal: Appraisal) -> list[str]:
    return [f.id for f in appraisal.result.findings]


def test_appraisal_accepts_a_booted_soft_tpm(root: SimulationRoot) -> None:
    tpm = SoftTpm(root)
    first = _appraise(tpm)
    assert first.passed
    assert _ids(first) == []
    assert first.facts is not None
    assert first.facts.secure_boot is True
    second = _appraise(tpm, previous=first, log_from=len(tpm.event_log()))
    assert second.passed
    assert _ids(second) == []


def _wait_for_clock(tpm: SoftTpm) -> None:
    """Until the TPM's clock left 0, so that it can be rolled back."""
    while tpm.clock_ms() == 0:
        pass


def test_clock_rolled_back_is_a_hard_failure(root: SimulationRoot) -> None:
    tpm = SoftTpm(root)
    _wait_for_clock(tpm)
    first = _appraise(tpm)
    assert first.clock is not None
    assert first.clock.clock > 0
    tpm.roll_back_clock(first.clock.clock + 60_000)
    second = _appraise(tpm, previous=first, log_from=len(tpm.event_log()))
    assert not second.passed
    assert _ids(second) == ["tpm.clock.backwards"]
    # Restored, the clock is ahead of the last one the verifier accepted again.
    tpm.restore_clock()
    third = _appraise(tpm, previous=first, log_from=len(tpm.event_log()))
    assert third.passed
    assert _ids(third) == []


def test_roll_back_clock_refuses_a_negative_amount(tpm: SoftTpm) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        tpm.roll_back_clock(-1)


def test_reboot_is_seen_as_a_reboot(root: SimulationRoot) -> None:
    tpm = SoftTpm(root)
    first = _appraise(tpm)
    tpm.reboot()
    second = _appraise(tpm, previous=first)
    assert second.passed
    assert second.rebooted
    assert _ids(second) == []
    assert second.clock is not None
    assert second.clock == ClockState(second.clock.clock, 1, 0, second.clock.firmware_version)


def test_unlogged_extend_is_a_finding_in_appraisal(root: SimulationRoot) -> None:
    tpm = SoftTpm(root)
    tpm.extend(7, b"secure boot policy nobody logged", logged=False)
    appraisal = _appraise(tpm)
    assert appraisal.passed  # the quote itself is genuine
    assert "eventlog.replay_mismatch" in _ids(appraisal)


# --- the same boot as a real swtpm ---------------------------------------------------------


@pytest.mark.swtpm
def test_same_pcrs_log_and_ek_template_as_swtpm(
    root: SimulationRoot, swtpm_factory: SwtpmFactory, tmp_path: Path
) -> None:
    swtpm = swtpm_factory()
    backend = TpmBackend(swtpm.tcti, ek_type="EK-ECC256")
    try:
        bootlog.simulate_boot(backend.esapi, tmp_path / "log.bin")
        everything = [(bank, list(range(24))) for bank in ("sha1", "sha256")]
        real = backend.pcr_read(everything)
        real_ek = backend.ek_public()
    finally:
        backend.close()
    soft = SoftTpm(root)
    assert run(soft.pcr_read(everything)) == real
    assert soft.event_log() == (tmp_path / "log.bin").read_bytes()
    # The EK public areas differ only in the key (unique.ecc: the last 68 bytes).
    assert len(run(soft.ek_public())) == len(real_ek)
    assert run(soft.ek_public())[:-68] == real_ek[:-68]
