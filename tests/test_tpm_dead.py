"""A TPM that stops answering (issue 12, C5), end to end: the protocol's rule for
TpmUnavailable, a hostile agent sending it, the agent's retries, and swtpm killed with
kill -9 under a running agent and started again on the same state.

Real parts: swtpm processes, a verifier on loopback with mTLS and its SQLite file (read here
read-only), the real attestation client; the agent-logic test drives the client with a TPM
double against a scripted verifier (tests/test_agent_client.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from devtrust.agent.attest import AttestationClient
from devtrust.agent.errors import TpmUnavailable
from devtrust.agent.interfaces import Quote, Selection
from devtrust.agent.messages import AttestationResult
from devtrust.agent.tpm_retry import TPM_SIGNAL
from devtrust.core.ids import DeviceId, Nonce
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA, Swtpm
from devtrust.swtpm import process as swtpm_process
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc, common_pb2
from devtrust.verifier.errors import LimitExceeded, MalformedInput
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.stream import (
    Appraise,
    Appraised,
    Close,
    EvidenceReceived,
    HelloReceived,
    Opened,
    SendChallenge,
    SendResult,
    StreamProtocol,
    StreamTiming,
    TpmUnavailableReceived,
    Wait,
)
from devtrust.verifier.tpm_unavailable import (
    FINDING_ID,
    MAX_DETAIL_BYTES,
    TpmUnavailableReport,
    tpm_unavailable_result,
)
from devtrust.verifier.trust import Claim, Severity
from tests.agent_parts import ATTEST_PREFIX, FakeTpm, pcr_value
from tests.conftest import SwtpmFactory
from tests.env import (
    AttestStream,
    enrolled_agent,
    read_message,
    running,
    stream_channel,
    verifier_config,
)
from tests.test_agent_client import Peer, attest, challenge

pytestmark = pytest.mark.swtpm

NONCE = Nonce(b"\x11" * 32)
TIMING = StreamTiming(interval_s=60.0, evidence_timeout_s=30.0, stream_challenge_gap_s=0.0)


# --- the protocol (pure) -----------------------------------------------------------------------


def _challenged() -> StreamProtocol:
    protocol = StreamProtocol(TIMING, "dev", nonces=lambda: NONCE)
    protocol.feed(Opened(0.0))
    [send, _] = protocol.feed(HelloReceived(0.1))
    assert send == SendChallenge(NONCE)
    return protocol


def test_tpm_unavailable_answers_the_outstanding_challenge_and_spends_its_nonce() -> None:
    protocol = _challenged()
    assert protocol.feed(TpmUnavailableReceived(1.0, NONCE)) == [Appraise(NONCE)]
    assert protocol.nonce is None
    # Answered like evidence: the Result, the next challenge after the interval.
    assert protocol.feed(Appraised(1.5, rebooted=False)) == [SendResult(60.0), Wait(61.5)]
    # The same nonce again: nothing is outstanding, the stream ends.
    [close] = protocol.feed(TpmUnavailableReceived(2.0, NONCE))
    assert isinstance(close, Close)
    assert isinstance(close.error, MalformedInput)
    assert "without an outstanding Challenge" in str(close.error)


@pytest.mark.parametrize(
    ("nonce", "message"),
    [
        pytest.param(b"\x22" * 32, "other than the outstanding", id="another nonce"),
        pytest.param(b"", "other than the outstanding", id="no nonce"),
        pytest.param(NONCE[:16], "other than the outstanding", id="a prefix of it"),
    ],
)
def test_tpm_unavailable_for_another_nonce_ends_the_stream(nonce: bytes, message: str) -> None:
    protocol = _challenged()
    [close] = protocol.feed(TpmUnavailableReceived(1.0, nonce))
    assert isinstance(close, Close)
    assert isinstance(close.error, MalformedInput)
    assert message in str(close.error)


def test_tpm_unavailable_before_hello_ends_the_stream() -> None:
    protocol = StreamProtocol(TIMING, "dev")
    protocol.feed(Opened(0.0))
    [close] = protocol.feed(TpmUnavailableReceived(0.1, NONCE))
    assert isinstance(close, Close)
    assert "must be Hello" in str(close.error)


def test_evidence_still_needs_a_challenge_after_a_tpm_unavailable() -> None:
    protocol = _challenged()
    protocol.feed(TpmUnavailableReceived(1.0, NONCE))
    protocol.feed(Appraised(1.5, rebooted=False))
    [close] = protocol.feed(EvidenceReceived(2.0))
    assert isinstance(close, Close)


def test_the_result_asserts_nothing_and_names_the_finding() -> None:
    now = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
    result = tpm_unavailable_result(
        DeviceId("ab" * 32),
        TpmUnavailableReport.of("tcti:IO failure"),
        now=now,
        staleness=datetime.timedelta(minutes=5),
    )
    assert result.tier is Tier.NONE
    assert result.score == 0
    assert result.claims == {}
    [finding] = result.findings
    assert (finding.id, finding.severity, finding.claim) == (
        FINDING_ID,
        Severity.CONTRAINDICATED,
        Claim.HARDWARE,
    )
    assert finding.found == "tcti:IO failure"
    assert result.expires_at == now + datetime.timedelta(minutes=5)


def test_the_detail_is_bounded() -> None:
    TpmUnavailableReport.of("é" * (MAX_DETAIL_BYTES // 2))
    with pytest.raises(LimitExceeded, match=r"TpmUnavailable\.detail: 1025 bytes"):
        TpmUnavailableReport.of("x" * (MAX_DETAIL_BYTES + 1))


# --- the agent's side, without swtpm -------------------------------------------------------------


class DyingTpm(FakeTpm):
    """A TPM double that stops answering after ``answers`` quotes and comes back when
    ``back`` is set; every call it gets is counted."""

    def __init__(self, answers: int) -> None:
        super().__init__()
        self.answers = answers
        self.back = False
        self.calls: list[str] = []

    def _alive(self, what: str) -> None:
        self.calls.append(what)
        if self.calls.count("quote") > self.answers and not self.back:
            raise TpmUnavailable(f"TPM {what} failed: tcti:IO failure")

    async def pcr_read(self, selection: Selection) -> dict[tuple[str, int], bytes]:
        self._alive("pcr_read")
        return dict(await super().pcr_read(selection))

    async def quote(self, qualifying_data: bytes, selection: Selection) -> Quote:
        self._alive("quote")
        self.quoted.append(qualifying_data)
        values = {(bank, i): pcr_value(bank, i) for bank, pcrs in selection for i in pcrs}
        return Quote(ATTEST_PREFIX + qualifying_data, b"fake-signature", values)


def test_the_agent_reports_a_dead_tpm_retries_it_and_says_when_it_is_back(
    pki: PkiFiles, tmp_path: Path
) -> None:
    tpm = DyingTpm(answers=1)
    seen: list[str] = []

    async def script(peer: Peer) -> None:
        first = os.urandom(32)
        assert (await peer.evidence(challenge(first))).nonce == first
        # The TPM dies: this challenge is answered with TpmUnavailable for its nonce.
        second = os.urandom(32)
        await peer.write(attestation_pb2.VerifierMessage(challenge=challenge(second)))
        msg = await peer.read()
        assert msg.WhichOneof("kind") == "tpm_unavailable"
        assert msg.tpm_unavailable.nonce == second
        assert "tcti:IO failure" in msg.tpm_unavailable.detail
        assert len(msg.tpm_unavailable.detail) <= 240
        # Still down: answered at once, without a quote (the TPM is retried at its own pace).
        quotes = tpm.calls.count("quote")
        third = os.urandom(32)
        await peer.write(attestation_pb2.VerifierMessage(challenge=challenge(third)))
        msg = await peer.read()
        assert msg.tpm_unavailable.nonce == third
        assert tpm.calls.count("quote") == quotes
        # Retries go on, with backoff; once the TPM answers, PostureChanged asks for a
        # challenge at once, and evidence follows.
        await asyncio.sleep(0.3)
        assert tpm.calls.count("pcr_read") >= 2
        tpm.back = True
        note = await peer.read()
        assert note.WhichOneof("kind") == "posture_changed"
        assert list(note.posture_changed.signals) == [TPM_SIGNAL]
        fourth = os.urandom(32)
        assert (await peer.evidence(challenge(fourth))).nonce == fourth
        seen.append("recovered")

    verifier, _ = asyncio.run(attest(pki, [script], tmp_path=tmp_path, tpm=tpm))
    assert seen == ["recovered"]
    assert verifier.streams == 1  # the stream lived through it: the agent never gave up


# --- swtpm killed under a running agent, with a real verifier ---------------------------------


def _db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _stored(database: Path, device_id: str) -> tuple[str, list[str], str | None]:
    """The device's stored tier, its findings' ids, and its TPM state's update time."""
    with contextlib.closing(_db(database)) as db:
        tier, result = db.execute(
            "SELECT tier, result FROM trust WHERE device_id = ?", (device_id,)
        ).fetchone()
        row = db.execute(
            "SELECT updated_at FROM tpm_state WHERE device_id = ?", (device_id,)
        ).fetchone()
    findings = [f["id"] for f in json.loads(result)["findings"]]
    return tier, findings, row[0] if row else None


def _last_seen(database: Path, device_id: str) -> str | None:
    with contextlib.closing(_db(database)) as db:
        row = db.execute("SELECT last_seen FROM devices WHERE device_id = ?", (device_id,))
        found: str | None = row.fetchone()[0]
    return found


def _live_certificates(database: Path, device_id: str) -> list[str]:
    with contextlib.closing(_db(database)) as db:
        rows = db.execute(
            "SELECT serial FROM certificates WHERE device_id = ? AND kind = 'device' "
            "AND revoked_at IS NULL",
            (device_id,),
        ).fetchall()
    return [r[0] for r in rows]


def kill_swtpm(tpm: Swtpm) -> None:
    """kill -9: no shutdown command, no state saved beyond what it already wrote."""
    assert tpm.pid is not None
    os.kill(tpm.pid, signal.SIGKILL)
    tpm.stop()  # reaps it


@contextlib.contextmanager
def same_port(port: int) -> Iterator[None]:
    """Swtpm.start picks a free port pair; a restart must come back where the agent's TCTI
    points."""
    real = swtpm_process._free_port_pair
    swtpm_process._free_port_pair = lambda: port
    try:
        yield
    finally:
        swtpm_process._free_port_pair = real


async def _wait_for(
    results: list[AttestationResult],
    check: Callable[[AttestationResult], bool],
    limit_s: float,
    *,
    start: int = 0,
) -> None:
    """Until a result from ``start`` on passes ``check``."""
    deadline = time.monotonic() + limit_s
    while not any(check(r) for r in results[start:]):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no such result within {limit_s} s: "
                f"{[(r.trust.tier.label, [f.id for f in r.trust.findings]) for r in results]}"
            )
        await asyncio.sleep(0.05)


def test_swtpm_killed_under_a_running_agent_then_restarted(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca, interval_s=1.0)
    database = Path(str(config.database))
    results: list[AttestationResult] = []
    marks: dict[str, float] = {}
    tpm_before: list[str | None] = []

    def unavailable(r: AttestationResult) -> bool:
        return FINDING_ID in [f.id for f in r.trust.findings]

    async def scenario() -> None:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            device = agent.enrollment.device_id
            client: AttestationClient = agent.client(on_result=results.append)
            stop = asyncio.Event()
            task = asyncio.create_task(client.run(stop))
            try:
                await _wait_for(results, lambda r: r.certificate is not None, 20)
                cert_file = agent.cfg.runtime_dir / "device.pem"
                assert cert_file.exists()
                tpm_before.append(_stored(database, device)[2])
                assert _live_certificates(database, device)

                kill_swtpm(tpm)
                killed_at = time.monotonic()
                await _wait_for(results, unavailable, 20)
                marks["reported_s"] = time.monotonic() - killed_at
                tier, findings, tpm_state = _stored(database, device)
                assert (tier, findings) == ("none", [FINDING_ID])
                # The TPM state the verifier remembers is untouched: nothing new was proven.
                assert tpm_state == tpm_before[0]
                # Nor is the device seen since its last evidence (review L6).
                assert _last_seen(database, device) == tpm_before[0]
                # Tier none is below the zone's minimum: revoked in the store, and the agent
                # deleted its key and certificate when the Result named the serial.
                assert _live_certificates(database, device) == []
                assert not cert_file.exists()
                assert client.certificate is None
                assert not task.done()  # the agent did not exit

                with same_port(tpm.port):
                    tpm.start()
                restarted_at = time.monotonic()
                after = len(results)
                await _wait_for(results, lambda r: not unavailable(r), 30, start=after)
                marks["evidence_s"] = time.monotonic() - restarted_at
                # The first result after the restart is appraised evidence again. A kill -9 is
                # no orderly shutdown, so the TPM itself reports its clock unsafe for a few
                # seconds (TPMS_CLOCK_INFO.safe NO, TPM 2.0 Part 2), and the restart is a reboot:
                # warnings, which the verifier reports as such, then affirming.
                first = next(r for r in results[after:] if not unavailable(r))
                assert {f.id for f in first.trust.findings} <= {
                    "tpm.clock.unsafe",
                    "eventlog.reboot",
                }
                await _wait_for(results, lambda r: r.trust.tier is Tier.AFFIRMING, 30, start=after)
                marks["recovered_s"] = time.monotonic() - restarted_at
                await _wait_for(results, lambda r: r.certificate is not None, 20, start=after)
                assert cert_file.exists()
                tier, findings, tpm_state = _stored(database, device)
                assert tier == "affirming"
                assert tpm_state != tpm_before[0]
            finally:
                stop.set()
                await task

    asyncio.run(scenario())
    print(
        f"tpm.unavailable stored {marks['reported_s']:.2f} s after kill -9; evidence again "
        f"{marks['evidence_s']:.2f} s and affirming {marks['recovered_s']:.2f} s after the restart"
    )
    # Within one challenge interval (1 s), and the agent's TPM backoff (reconnect_max_s 1 s)
    # plus the PostureChanged that brings a challenge at once.
    assert marks["reported_s"] < 5
    assert marks["evidence_s"] < 5
    assert marks["recovered_s"] < 20


# --- a hostile agent sending TpmUnavailable ------------------------------------------------------


async def _open(channel: grpc.aio.Channel) -> tuple[AttestStream, bytes]:
    call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=15)
    await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
    first = await read_message(call)
    return call, first.challenge.nonce


def _unavailable(nonce: bytes, detail: str = "tcti:IO failure") -> attestation_pb2.AgentMessage:
    return attestation_pb2.AgentMessage(
        tpm_unavailable=attestation_pb2.TpmUnavailable(nonce=nonce, detail=detail)
    )


async def _refused(call: AttestStream) -> grpc.aio.AioRpcError:
    """The error the stream ends with (a Result or challenge before it is skipped)."""
    while True:
        try:
            await read_message(call)
        except grpc.aio.AioRpcError as exc:
            return exc


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        pytest.param(
            "wrong nonce",
            grpc.StatusCode.INVALID_ARGUMENT,
            "other than the outstanding Challenge",
            id="another nonce",
        ),
        pytest.param(
            "replayed",
            grpc.StatusCode.INVALID_ARGUMENT,
            "without an outstanding Challenge",
            id="the spent nonce again",
        ),
        pytest.param(
            "long detail",
            grpc.StatusCode.INVALID_ARGUMENT,
            "TpmUnavailable.detail: 5000 bytes",
            id="a detail past the bound",
        ),
    ],
)
def test_a_hostile_tpm_unavailable_ends_the_stream_and_stores_nothing(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    case: str,
    code: grpc.StatusCode,
    message: str,
) -> None:
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> tuple[grpc.aio.AioRpcError, int]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
            stream_channel(pki, verifier, agent.enrollment) as channel,
        ):
            call, nonce = await _open(channel)
            stored = 0
            if case == "wrong nonce":
                await call.write(_unavailable(bytes(b ^ 1 for b in nonce)))
            elif case == "long detail":
                await call.write(_unavailable(nonce, "x" * 5000))
            else:  # a valid one, stored; then the same nonce again
                await call.write(_unavailable(nonce))
                reply = await read_message(call)
                assert reply.result.trust.tier == common_pb2.TIER_NONE
                assert [f.id for f in reply.result.trust.findings] == [FINDING_ID]
                stored = 1
                await call.write(_unavailable(nonce))
            error = await _refused(call)
            with contextlib.closing(_db(Path(str(config.database)))) as db:
                rows = db.execute(
                    "SELECT COUNT(*) FROM audit WHERE event = 'appraisal' AND device_id = ?",
                    (agent.enrollment.device_id,),
                ).fetchone()[0]
            return error, rows - stored

    error, extra = asyncio.run(scenario())
    assert error.code() is code
    assert message in (error.details() or "")
    assert extra == 0  # nothing stored for the refused message
