"""The attestation stream's protocol (verifier/stream.py), table-driven, without sockets.

Each case feeds a named sequence of events, each with the actions it must answer with. Nonces
come from a counter (N1, N2, ...), times are plain numbers, and an error is shown as its type
and message, the texts the servicer sends to the agent (tests/test_e2e*.py and
tests/test_attacks_*.py check the same texts over the wire).
"""

from __future__ import annotations

import datetime
import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

import pytest

from devtrust.core.ids import DeviceId, Nonce, Serial
from devtrust.core.tier import Tier
from devtrust.verifier.decision import Decision
from devtrust.verifier.records import CertificateRecord
from devtrust.verifier.stream import (
    Action,
    Appraise,
    Appraised,
    Close,
    EmptyMessage,
    Event,
    EvidenceReceived,
    HelloReceived,
    Opened,
    Phase,
    PostureChanged,
    RecentChallenges,
    SendChallenge,
    SendResult,
    StreamEnded,
    StreamProtocol,
    StreamTiming,
    Tick,
    Wait,
)
from devtrust.verifier.trust import Claim, TrustResult

DEVICE = DeviceId("d" * 64)
# interval 60, evidence 30, hello 10, posture every 10 at most, 5 notes a minute, gap 5.
TIMING = StreamTiming(
    interval_s=60.0,
    evidence_timeout_s=30.0,
    hello_timeout_s=10.0,
    posture_min_interval_s=10.0,
    posture_notes_per_minute=5,
    stream_challenge_gap_s=5.0,
)


def N(n: int) -> Nonce:
    return Nonce(bytes([n]) * 32)


def error(kind: str, text: str) -> tuple[str, str, str]:
    return ("close", kind, text)


NOT_HELLO = error("MalformedInput", "the first message on an attestation stream must be Hello")
HELLO_TWICE = error("MalformedInput", "Hello sent twice on one stream")
EMPTY = error("MalformedInput", "empty AgentMessage")
UNASKED = error("MalformedInput", "Evidence sent without an outstanding Challenge")
NO_HELLO = error("FailedPrecondition", "no Hello within 10.0s")
NO_EVIDENCE = error(
    "FailedPrecondition", f"device {DEVICE}: no evidence within 30.0s of the challenge"
)
FLOOD = error(
    "ResourceExhausted",
    "6 PostureChanged notes within a minute, more than the 5 allowed "
    "(attestation.posture_notes_per_minute)",
)
ENDED = ("close", None, None)
# While an appraisal is in flight, the protocol waits for it with no deadline.
APPRAISING = Wait(math.inf)


def shown(action: Action) -> object:
    """An action as the tables write it: errors by type and text (exceptions do not
    compare equal)."""
    if isinstance(action, Close):
        if action.error is None:
            return ENDED
        return error(type(action.error).__name__, str(action.error))
    return action


# An event, and the actions it must answer with (as ``shown`` writes them).
Step = tuple[Event, list[object]]


@dataclass(frozen=True)
class Case:
    name: str
    steps: list[Step]
    timing: StreamTiming = TIMING

    def __str__(self) -> str:
        return self.name


def opened(at: float = 0.0) -> Step:
    return Opened(at), [Wait(at + 10.0)]


# A stream with its first challenge (N1) out at t=0, due back by 30.
GREETED: list[Step] = [
    (Opened(0.0), [Wait(10.0)]),
    (HelloReceived(0.0), [SendChallenge(N(1)), Wait(30.0)]),
]
# ... and that evidence appraised at t=2, the next challenge at 62.
ANSWERED: list[Step] = [
    *GREETED,
    (EvidenceReceived(1.0), [Appraise(N(1))]),
    (Appraised(2.0, rebooted=False), [SendResult(60.0), Wait(62.0)]),
]


def waiting_notes() -> list[Step]:
    """Four more notes at 6..9 while challenge N2 (due by 35) is out."""
    return [(PostureChanged(5.0 + i), [Wait(35.0)]) for i in range(1, 5)]


CASES = [
    # --- Hello --------------------------------------------------------------------------
    Case("hello: challenged at once", GREETED),
    Case(
        "hello: agent version is carried, not judged",
        [opened(), (HelloReceived(3.0, "x\n"), [SendChallenge(N(1)), Wait(33.0)])],
    ),
    Case("hello: a tick before its deadline waits on", [opened(), (Tick(4.0), [Wait(10.0)])]),
    Case("hello: none within hello_timeout_s", [opened(), (Tick(10.0), [NO_HELLO])]),
    Case("hello: stream ends before it", [opened(), (StreamEnded(1.0), [ENDED])]),
    Case("hello: evidence first", [opened(), (EvidenceReceived(1.0), [NOT_HELLO])]),
    Case("hello: posture note first", [opened(), (PostureChanged(1.0), [NOT_HELLO])]),
    Case("hello: empty message first", [opened(), (EmptyMessage(1.0), [NOT_HELLO])]),
    Case("hello: twice", [*GREETED, (HelloReceived(1.0), [HELLO_TWICE])]),
    Case("hello: twice while idle", [*ANSWERED, (HelloReceived(3.0), [HELLO_TWICE])]),
    Case("empty message after hello", [*GREETED, (EmptyMessage(1.0), [EMPTY])]),
    # --- one outstanding challenge ----------------------------------------------------
    Case("evidence: appraised against the outstanding nonce", ANSWERED[:3]),
    Case("evidence: without a challenge", [*ANSWERED, (EvidenceReceived(3.0), [UNASKED])]),
    Case(
        "evidence: the nonce is spent on arrival",
        [*GREETED, (EvidenceReceived(1.0), [Appraise(N(1))]), (EvidenceReceived(1.5), [UNASKED])],
    ),
    Case(
        "evidence: a tick before its deadline waits on",
        [*GREETED, (Tick(29.0), [Wait(30.0)])],
    ),
    Case("evidence: none within evidence_timeout_s", [*GREETED, (Tick(30.0), [NO_EVIDENCE])]),
    Case(
        "evidence: the timeout counts from the challenge, not from later notes",
        [*GREETED, (PostureChanged(20.0), [Wait(30.0)]), (Tick(30.0), [NO_EVIDENCE])],
    ),
    Case("stream ends with a challenge out", [*GREETED, (StreamEnded(5.0), [ENDED])]),
    Case(
        "a tick while appraising waits for the appraisal, with no deadline",
        [*ANSWERED[:3], (Tick(5.0), [APPRAISING])],
    ),
    Case(
        "appraising: what a reading servicer feeds meanwhile waits on, the result follows",
        [
            *ANSWERED[:3],
            (PostureChanged(40.0), [APPRAISING]),
            (Tick(41.0), [APPRAISING]),
            (Appraised(42.0, rebooted=False), [SendResult(0.0, N(2)), Wait(72.0)]),
        ],
    ),
    Case("stream ends while appraising", [*ANSWERED[:3], (StreamEnded(5.0), [ENDED])]),
    # --- results and the next challenge -------------------------------------------------
    Case("result: next challenge interval_s later, separately", ANSWERED),
    Case(
        "result: a tick before the next challenge waits on",
        [*ANSWERED, (Tick(30.0), [Wait(62.0)])],
    ),
    Case(
        "result: the next challenge when it is due",
        [*ANSWERED, (Tick(62.0), [SendChallenge(N(2)), Wait(92.0)])],
    ),
    Case(
        "result: after a reboot the next challenge is in the same message",
        [
            *GREETED,
            (EvidenceReceived(1.0), [Appraise(N(1))]),
            (Appraised(2.0, rebooted=True), [SendResult(0.0, N(2)), Wait(32.0)]),
            (EvidenceReceived(3.0), [Appraise(N(2))]),
            (Appraised(4.0, rebooted=False), [SendResult(60.0), Wait(64.0)]),
        ],
    ),
    Case("stream ends while idle", [*ANSWERED, (StreamEnded(9.0), [ENDED])]),
    Case(
        "result: interval_s 0 (load tests): every result carries the next challenge",
        [
            *GREETED,
            (EvidenceReceived(1.0), [Appraise(N(1))]),
            (Appraised(2.0, rebooted=False), [SendResult(0.0, N(2)), Wait(32.0)]),
            (EvidenceReceived(3.0), [Appraise(N(2))]),
            (Appraised(4.0, rebooted=False), [SendResult(0.0, N(3)), Wait(34.0)]),
        ],
        timing=replace(TIMING, interval_s=0.0),
    ),
    # --- posture notes ------------------------------------------------------------------
    Case(
        "posture: the first note is challenged at once",
        [*ANSWERED, (PostureChanged(5.0), [SendChallenge(N(2)), Wait(35.0)])],
    ),
    Case(
        "posture: later notes coalesce to one challenge per posture_min_interval_s",
        [
            *ANSWERED,
            (PostureChanged(5.0), [SendChallenge(N(2)), Wait(35.0)]),
            (EvidenceReceived(6.0), [Appraise(N(2))]),
            (Appraised(7.0, rebooted=False), [SendResult(60.0), Wait(67.0)]),
            (PostureChanged(8.0), [Wait(15.0)]),
            (PostureChanged(9.0), [Wait(15.0)]),
            (Tick(15.0), [SendChallenge(N(3)), Wait(45.0)]),
        ],
    ),
    Case(
        "posture: a note never delays a challenge due sooner",
        [
            *GREETED,
            (EvidenceReceived(1.0), [Appraise(N(1))]),
            (Appraised(2.0, rebooted=False), [SendResult(7.0), Wait(9.0)]),
            (PostureChanged(3.0), [SendChallenge(N(2)), Wait(33.0)]),
            (EvidenceReceived(4.0), [Appraise(N(2))]),
            (Appraised(5.0, rebooted=False), [SendResult(7.0), Wait(12.0)]),
            (PostureChanged(6.0), [Wait(12.0)]),
            (Tick(12.0), [SendChallenge(N(3)), Wait(42.0)]),
        ],
        timing=replace(TIMING, interval_s=7.0),
    ),
    Case(
        "posture: a note during a challenge is answered after that evidence, in its result",
        [
            *GREETED,
            (PostureChanged(1.0), [Wait(30.0)]),
            (EvidenceReceived(2.0), [Appraise(N(1))]),
            (Appraised(3.0, rebooted=False), [SendResult(0.0, N(2)), Wait(33.0)]),
        ],
    ),
    Case(
        "posture: a note during a challenge, not yet due after it, comes separately",
        [
            *ANSWERED,
            (PostureChanged(5.0), [SendChallenge(N(2)), Wait(35.0)]),
            (PostureChanged(6.0), [Wait(35.0)]),
            (EvidenceReceived(7.0), [Appraise(N(2))]),
            (Appraised(8.0, rebooted=False), [SendResult(7.0), Wait(15.0)]),
            (Tick(15.0), [SendChallenge(N(3)), Wait(45.0)]),
        ],
    ),
    Case(
        "posture: a note while appraising is answered after it",
        [
            *GREETED,
            (EvidenceReceived(1.0), [Appraise(N(1))]),
            (PostureChanged(1.5), [APPRAISING]),
            (Appraised(2.0, rebooted=False), [SendResult(0.0, N(2)), Wait(32.0)]),
        ],
    ),
    Case(
        "posture: more than posture_notes_per_minute end the stream",
        [
            *ANSWERED,
            (PostureChanged(5.0), [SendChallenge(N(2)), Wait(35.0)]),
            *waiting_notes(),
            (PostureChanged(10.0), [FLOOD]),
        ],
    ),
    Case(
        "posture: notes older than a minute no longer count",
        [
            *ANSWERED,
            (PostureChanged(5.0), [SendChallenge(N(2)), Wait(35.0)]),
            *waiting_notes(),
            (EvidenceReceived(10.0), [Appraise(N(2))]),
            (Appraised(11.0, rebooted=False), [SendResult(4.0), Wait(15.0)]),
            (PostureChanged(65.5), [SendChallenge(N(3)), Wait(95.5)]),
        ],
    ),
    Case(
        "posture: notes within the minute still count after a challenge",
        [
            *ANSWERED,
            (PostureChanged(5.0), [SendChallenge(N(2)), Wait(35.0)]),
            *waiting_notes(),
            (EvidenceReceived(10.0), [Appraise(N(2))]),
            (Appraised(11.0, rebooted=False), [SendResult(4.0), Wait(15.0)]),
            (PostureChanged(64.0), [FLOOD]),
        ],
    ),
    # --- reconnecting -------------------------------------------------------------------
    Case(
        "reconnect: the first challenge waits out the gap since the last one",
        [
            (Opened(100.0, last_challenge=98.0), [Wait(110.0)]),
            (HelloReceived(100.0), [Wait(103.0)]),
            (Tick(103.0), [SendChallenge(N(1)), Wait(133.0)]),
        ],
    ),
    Case(
        "reconnect: a posture note does not jump the gap",
        [
            (Opened(100.0, last_challenge=98.0), [Wait(110.0)]),
            (HelloReceived(100.0), [Wait(103.0)]),
            (PostureChanged(101.0), [Wait(103.0)]),
            (Tick(103.0), [SendChallenge(N(1)), Wait(133.0)]),
        ],
    ),
    Case(
        "reconnect: a gap already past challenges at once",
        [
            (Opened(100.0, last_challenge=90.0), [Wait(110.0)]),
            (HelloReceived(100.0), [SendChallenge(N(1)), Wait(130.0)]),
        ],
    ),
]


def _counter() -> Any:
    numbers = itertools.count(1)
    return lambda: N(next(numbers))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_stream_protocol(case: Case) -> None:
    protocol = StreamProtocol(case.timing, DEVICE, nonces=_counter())
    for n, (event, expected) in enumerate(case.steps):
        got = [shown(a) for a in protocol.feed(event)]
        assert got == expected, f"step {n}: {event!r}"


def test_every_answer_ends_with_what_yields_the_next_event() -> None:
    """The rule StreamProtocol states and the servicer relies on (it asserts it): each list
    of actions ends with Wait, Appraise or Close, so the servicer always knows what to wait
    for. Checked on every step of every case; ``feed`` asserts it too."""
    for case in CASES:
        for n, (event, expected) in enumerate(case.steps):
            last = expected[-1] if expected else None
            assert isinstance(last, (Wait, Appraise)) or (
                isinstance(last, tuple) and last[0] == "close"
            ), f"{case.name}, step {n}: {event!r} answers {expected}"


@pytest.mark.parametrize(
    ("name", "events", "problem"),
    [
        ("before opened", [HelloReceived(0.0)], "is not opened"),
        ("opened twice", [Opened(0.0), Opened(1.0)], "opened twice"),
        ("appraised unasked", [*[e for e, _ in GREETED], Appraised(1.0, False)], "no appraisal"),
        ("after close", [Opened(0.0), StreamEnded(1.0), Tick(2.0)], "is closed"),
        ("after an error", [Opened(0.0), EmptyMessage(1.0), HelloReceived(2.0)], "is closed"),
    ],
)
def test_feeding_what_cannot_come_is_the_callers_mistake(
    name: str, events: list[Event], problem: str
) -> None:
    protocol = StreamProtocol(TIMING, DEVICE, nonces=_counter())
    *before, last = events
    for event in before:
        protocol.feed(event)
    with pytest.raises(ValueError, match=problem):
        protocol.feed(last)


def test_a_closed_stream_forgets_its_nonce() -> None:
    protocol = StreamProtocol(TIMING, DEVICE, nonces=_counter())
    for event, _ in GREETED:
        protocol.feed(event)
    assert (protocol.phase, protocol.nonce) == (Phase.CHALLENGED, N(1))
    protocol.feed(StreamEnded(1.0))
    assert (protocol.phase, protocol.nonce) == (Phase.CLOSED, None)


def test_nonces_are_fresh_by_default() -> None:
    protocol = StreamProtocol(TIMING, DEVICE)
    protocol.feed(Opened(0.0))
    [first, _] = protocol.feed(HelloReceived(0.0))
    protocol.feed(EvidenceReceived(1.0))
    [second, _] = protocol.feed(Appraised(2.0, rebooted=True))
    assert isinstance(first, SendChallenge)
    assert isinstance(second, SendResult)
    assert len(first.nonce) == 32
    assert second.challenge is not None
    assert first.nonce != second.challenge


def test_recent_challenges_forget_what_no_longer_delays_a_stream() -> None:
    """Rule 5's memory (the servicer's, across streams) holds a device only while its last
    challenge is within the gap: bounded by recent devices, not every device ever seen."""
    recent = RecentChallenges(gap_s=5.0)
    for i in range(1000):
        recent.note(f"dev{i}", now=float(i) / 100)  # 1000 devices within 10 s
    assert len(recent) == 500  # those of the last 5 s
    assert recent.last("dev999", now=9.99) == 9.99
    assert recent.last("dev0", now=9.99) is None
    # Noted again: its new time counts, and it is now the youngest.
    recent.note("dev600", now=10.0)
    assert recent.last("dev600", now=14.995) == 10.0
    assert len(recent) == 1  # the rest, dev999 (9.99) included, is over 5 s old
    # Exactly the gap later, it delays nothing (max(now, last + gap) == now): forgotten.
    assert recent.last("dev600", now=15.0) is None
    assert len(recent) == 0
    # What it remembers is what the protocol needs: the same first challenge as unbounded.
    recent.note(DEVICE, now=98.0)
    protocol = StreamProtocol(TIMING, DEVICE, nonces=_counter())
    assert protocol.feed(Opened(100.0, recent.last(DEVICE, now=100.0))) == [Wait(110.0)]
    assert protocol.feed(HelloReceived(100.0)) == [Wait(103.0)]


# --- the messages the actions become (verifier/wire_attest.py) -------------------------------


def _decision(*, certified: bool) -> Decision:
    now = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    cert = CertificateRecord(
        serial=Serial("1f"),
        device_id=DEVICE,
        kind="device",
        not_before=now,
        not_after=now + datetime.timedelta(minutes=15),
        der=b"0\x00",
    )
    return Decision(
        device_id=DEVICE,
        zone="",
        result=TrustResult(
            device_id=DEVICE,
            claims={Claim.HARDWARE: 2},
            findings=(),
            appraised_at=now,
            expires_at=now + datetime.timedelta(minutes=3),
        ),
        previous_tier=None,
        certificate=cert if certified else None,
        withheld="" if certified else "none asked for",
        tpm=None,
        rebooted=False,
    )


def test_a_result_and_an_immediate_challenge_travel_in_one_message() -> None:
    from devtrust.v1 import common_pb2
    from devtrust.verifier import wire_attest
    from devtrust.verifier.config import AttestationConfig

    selection = AttestationConfig().selection
    message = wire_attest.verifier_message(
        result=wire_attest.decision_to_wire(_decision(certified=True), next_challenge_in=0.0),
        challenge=wire_attest.challenge_to_wire(N(2), selection=selection, log_offset=0),
    )
    assert message.HasField("result")
    assert message.HasField("challenge")
    assert message.challenge.nonce == N(2)
    assert message.challenge.event_log.wanted
    assert message.challenge.event_log.from_offset == 0
    assert [s.hash_alg for s in message.challenge.pcr_selection] == ["sha256"]
    assert message.result.trust.tier == common_pb2.TIER_AFFIRMING
    assert message.result.certificate.serial_hex == "1f"
    assert message.result.next_challenge_in.ToTimedelta() == datetime.timedelta(0)


def test_a_result_alone_says_when_the_next_challenge_comes() -> None:
    from devtrust.verifier import wire_attest

    message = wire_attest.verifier_message(
        result=wire_attest.decision_to_wire(_decision(certified=False), next_challenge_in=59.5)
    )
    assert not message.HasField("challenge")
    assert not message.result.HasField("certificate")
    assert message.result.next_challenge_in.ToTimedelta() == datetime.timedelta(seconds=59.5)
    with pytest.raises(ValueError, match="a Result, a Challenge or both"):
        wire_attest.verifier_message()


def test_settings_are_made_once_from_the_configuration() -> None:
    from devtrust.verifier.config import AttestationConfig, CertificatesConfig, VerifierConfig
    from devtrust.verifier.settings import Settings

    config = VerifierConfig(
        trust_domain="example.test",
        attestation=AttestationConfig(interval_s=7, posture_notes_per_minute=9),
        certificates=CertificatesConfig(device_lifetime_s=120, min_tier="warning"),
    )
    settings = Settings.from_config(config)
    assert settings.attestation.stream == replace(
        StreamTiming(), interval_s=7, posture_notes_per_minute=9
    )
    assert settings.attestation.trust_domain == "example.test"
    assert settings.certificates.device_lifetime == datetime.timedelta(seconds=120)
    assert settings.certificates.min_tier is Tier.WARNING
    assert settings.limits is config.limits


def test_a_tick_ends_the_stream_only_while_a_deadline_runs() -> None:
    """``tick_closes``: the servicer abandons the read in flight on a Tick only when the Tick
    ends the stream (Hello's and the evidence's deadlines); a Tick for the next challenge
    leaves the stream reading, and no message may be lost then."""
    protocol = StreamProtocol(TIMING, DEVICE, nonces=_counter())
    seen = []
    for event in (
        Opened(0.0),
        HelloReceived(0.0),
        EvidenceReceived(1.0),
        Appraised(2.0, rebooted=False),
        Tick(62.0),
    ):
        protocol.feed(event)
        seen.append((protocol.phase, protocol.tick_closes))
    assert seen == [
        (Phase.HELLO, True),
        (Phase.CHALLENGED, True),
        (Phase.APPRAISING, False),
        (Phase.IDLE, False),
        (Phase.CHALLENGED, True),
    ]
    assert [shown(a) for a in protocol.feed(Tick(92.0))] == [NO_EVIDENCE]
