"""The attestation stream's protocol (DESIGN.md flow 2) as a state machine without I/O.

The servicer feeds it what happens on one device's stream, each event with a monotonic
``now``: the stream opened, a message arrived (by kind), the stream ended, a timer fired, an
appraisal finished. It answers with actions for the servicer to carry out, in order: send a
challenge, appraise the evidence just received against this nonce, send the result (with the
next challenge in the same message when that one is due at once), wait until a time, close.
No socket, clock, thread or task here, so that every rule below is tested table by table
without a verifier (tests/test_stream_protocol.py).

The rules:

1. Hello comes first, within ``hello_timeout_s`` of the stream opening, and only once.
2. One challenge is outstanding at a time; Evidence without one is refused, and the nonce
   is spent when Evidence arrives, whatever it says (used at most once). Evidence is due
   within ``evidence_timeout_s`` of its challenge. TpmUnavailable (the agent's TPM does not
   answer, issue 12) answers the outstanding challenge like Evidence, and is appraised
   (into finding ``tpm.unavailable``) and answered like it; it must name that challenge's
   nonce, or the stream ends: it is the one message whose content the protocol reads, as
   its nonce is all that ties it to a challenge (Evidence's nonce is checked by appraisal).
3. After a result, the next challenge comes ``interval_s`` later; at once after a reboot
   (for the whole event log), in the same message as the result.
4. The first PostureChanged note is answered with a challenge at once; later notes coalesce
   into at most one challenge per ``posture_min_interval_s`` (issue 7, item 8). A note that
   arrives while a challenge is out is answered after that evidence (it may predate the
   change). More than ``posture_notes_per_minute`` notes within a minute end the stream.
5. Reconnecting does not buy appraisals: a new stream's first challenge waits out
   ``stream_challenge_gap_s`` since the device's last challenge on any stream, PostureChanged
   or not.

The protocol judges a message by its kind and its time (and a TpmUnavailable by its nonce,
rule 2); the servicer converts its
content (``verifier.wire``) once the protocol has accepted it, so a message that breaks the
protocol is refused for that, before anything of it is parsed.
"""

from __future__ import annotations

import collections
import enum
import hmac
import math
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from devtrust.core.errors import DevtrustError
from devtrust.core.ids import NONCE_SIZE, Nonce
from devtrust.verifier.errors import FailedPrecondition, MalformedInput, ResourceExhausted

_NOTE_WINDOW_S = 60.0


@dataclass(frozen=True)
class StreamTiming:
    """The stream's deadlines and pacing, in seconds (``attestation:`` in the configuration)."""

    interval_s: float = 60.0
    evidence_timeout_s: float = 30.0
    hello_timeout_s: float = 10.0
    posture_min_interval_s: float = 10.0
    posture_notes_per_minute: int = 120
    stream_challenge_gap_s: float = 5.0


# --- events: what happened, fed in order ------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    """The stream is open (its peer authorized). ``last_challenge``: the monotonic time of the
    device's last challenge on any stream of this verifier, None when it had none."""

    now: float
    last_challenge: float | None = None


@dataclass(frozen=True)
class HelloReceived:
    now: float
    agent_version: str = ""


@dataclass(frozen=True)
class EvidenceReceived:
    now: float


@dataclass(frozen=True)
class TpmUnavailableReceived:
    """The agent answered the outstanding challenge with TpmUnavailable for ``nonce``."""

    now: float
    nonce: bytes


@dataclass(frozen=True)
class PostureChanged:
    now: float


@dataclass(frozen=True)
class EmptyMessage:
    """An AgentMessage with none of its kinds set."""

    now: float


@dataclass(frozen=True)
class StreamEnded:
    """The agent closed its side of the stream."""

    now: float


@dataclass(frozen=True)
class Tick:
    """The time a ``Wait`` named has come, and nothing arrived before it."""

    now: float


@dataclass(frozen=True)
class Appraised:
    """The appraisal an ``Appraise`` asked for is decided and published."""

    now: float
    rebooted: bool


Event = (
    Opened
    | HelloReceived
    | EvidenceReceived
    | TpmUnavailableReceived
    | PostureChanged
    | EmptyMessage
    | StreamEnded
    | Tick
    | Appraised
)


# --- actions: what the servicer does, in order -----------------------------------------------


@dataclass(frozen=True)
class SendChallenge:
    nonce: Nonce


@dataclass(frozen=True)
class Appraise:
    """Appraise the Evidence (or TpmUnavailable) just received against ``nonce``, publish the
    decision, then
    feed ``Appraised``. A servicer that reads on meanwhile may feed what arrives (a note, the
    stream's end); the protocol answers with a ``Wait`` without end: the appraisal is what
    it waits for."""

    nonce: Nonce
    # The PostureChanged this evidence answers arrived then (monotonic); None: none did. A
    # measurement, not part of what the protocol asks for: not compared. Timed only when the
    # verdict changes the device's result (verifier/decision.py Detections).
    posture_noted: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class SendResult:
    """The Result of the last appraisal, saying when the next challenge comes; with that
    challenge in the same message when it is due at once (``challenge`` is its nonce)."""

    next_challenge_in: float
    challenge: Nonce | None = None


@dataclass(frozen=True)
class Wait:
    """Wait for the next message until ``until``; feed ``Tick`` when none came by then.
    ``until`` is infinite while an appraisal is in flight: no deadline runs then."""

    until: float


@dataclass(frozen=True)
class Close:
    """End the stream: normally when ``error`` is None, with that error otherwise."""

    error: DevtrustError | None = None


Action = SendChallenge | Appraise | SendResult | Wait | Close


class Phase(enum.Enum):
    NEW = "new"  # not yet opened
    HELLO = "hello"  # waiting for Hello
    IDLE = "idle"  # no challenge out: waiting for the next one to be due
    CHALLENGED = "challenged"  # a challenge is out: waiting for its evidence
    APPRAISING = "appraising"  # evidence received: waiting for its appraisal
    CLOSED = "closed"


class _NonceSource:
    """Nonces from the operating system's CSPRNG, read 128 at a time: one getrandom call
    per 128 challenges instead of one each (the call cost ~50 us on a loaded host). The
    bytes are as unpredictable either way; each is handed out once."""

    _BATCH = 128

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0

    def __call__(self) -> Nonce:
        with self._lock:
            if self._at + NONCE_SIZE > len(self._pool):
                self._pool, self._at = secrets.token_bytes(NONCE_SIZE * self._BATCH), 0
            at = self._at
            self._at = at + NONCE_SIZE
            return Nonce(self._pool[at : at + NONCE_SIZE])


fresh_nonce = _NonceSource()


@dataclass
class StreamProtocol:
    """One stream's protocol state. ``feed`` an event, carry out the actions it returns.

    Every list of actions ends with the one that yields the next event (``Wait`` or
    ``Appraise``) or with ``Close``; ``feed`` asserts it. Feeding an event the protocol
    cannot be waiting for (anything before ``Opened``, ``Appraised`` with no appraisal asked
    for, anything after ``Close``) is the caller's mistake: ValueError.
    """

    timing: StreamTiming
    device_id: str
    nonces: Callable[[], Nonce] = fresh_nonce
    phase: Phase = Phase.NEW
    # The outstanding challenge's nonce (CHALLENGED), and the time Hello or evidence is due.
    nonce: Nonce | None = None
    deadline: float = 0.0
    # When the next challenge is due (IDLE); nothing is challenged before not_before.
    next_at: float = 0.0
    not_before: float = float("-inf")
    last_challenge_for_posture: float = float("-inf")
    _last_challenge: float | None = None
    _pending: float | None = None  # a note arrived while a challenge was out
    _for_posture: bool = False  # the next challenge answers a note
    _notes: collections.deque[float] = field(default_factory=collections.deque)
    # The first PostureChanged not yet answered by a challenge, and the one the challenge out
    # answers: its Appraise carries it (the time to detection when the verdict changes,
    # verifier/decision.py Detections).
    _noted: float | None = None
    _answers: float | None = None

    @property
    def tick_closes(self) -> bool:
        """Whether the ``Wait`` just returned is for a deadline (Hello, or the outstanding
        challenge's evidence): its Tick ends the stream, so the servicer may abandon the read
        in flight then. Otherwise (the next challenge due) the stream lives on after the Tick
        and the read must not be lost."""
        return self.phase in (Phase.HELLO, Phase.CHALLENGED)

    def feed(self, event: Event) -> list[Action]:
        if self.phase is Phase.CLOSED:
            raise ValueError(f"stream of device {self.device_id} is closed: fed {event!r}")
        if self.phase is Phase.NEW and not isinstance(event, Opened):
            raise ValueError(f"stream of device {self.device_id} is not opened: fed {event!r}")
        match event:
            case Opened(now, last_challenge):
                actions = self._opened(now, last_challenge)
            case HelloReceived(now):
                actions = self._hello(now)
            case EvidenceReceived():
                actions = self._evidence()
            case TpmUnavailableReceived(_, nonce):
                actions = self._tpm_unavailable(nonce)
            case PostureChanged(now):
                actions = self._posture(now)
            case EmptyMessage():
                empty = MalformedInput("empty AgentMessage")
                actions = self._close(_not_hello() if self.phase is Phase.HELLO else empty)
            case StreamEnded():
                actions = self._close(None)
            case Tick(now):
                actions = self._tick(now)
            case Appraised(now, rebooted):
                actions = self._appraised(now, rebooted=rebooted)
        assert isinstance(next(reversed(actions), None), (Wait, Appraise, Close)), actions
        return actions

    def _opened(self, now: float, last_challenge: float | None) -> list[Action]:
        if self.phase is not Phase.NEW:
            raise ValueError(f"stream of device {self.device_id} opened twice")
        self.phase = Phase.HELLO
        self._last_challenge = last_challenge
        self.deadline = now + self.timing.hello_timeout_s
        return [Wait(self.deadline)]

    def _hello(self, now: float) -> list[Action]:
        if self.phase is not Phase.HELLO:
            return self._close(MalformedInput("Hello sent twice on one stream"))
        last = float("-inf") if self._last_challenge is None else self._last_challenge
        self.next_at = self.not_before = max(now, last + self.timing.stream_challenge_gap_s)
        self.phase = Phase.IDLE
        return self._due(now)

    def _evidence(self) -> list[Action]:
        if self.phase is Phase.HELLO:
            return self._close(_not_hello())
        if self.phase is not Phase.CHALLENGED or self.nonce is None:
            return self._close(MalformedInput("Evidence sent without an outstanding Challenge"))
        # The nonce is spent whatever the evidence says: used at most once.
        nonce, self.nonce = self.nonce, None
        self.phase = Phase.APPRAISING
        noted, self._answers = self._answers, None
        return [Appraise(nonce, posture_noted=noted)]

    def _tpm_unavailable(self, nonce: bytes) -> list[Action]:
        """TpmUnavailable answers the outstanding challenge as Evidence does, for its nonce
        only: one for another nonce, or with none outstanding, ends the stream."""
        if self.phase is Phase.HELLO:
            return self._close(_not_hello())
        if self.phase is not Phase.CHALLENGED or self.nonce is None:
            return self._close(
                MalformedInput("TpmUnavailable sent without an outstanding Challenge")
            )
        if not hmac.compare_digest(nonce, self.nonce):
            return self._close(
                MalformedInput(
                    "TpmUnavailable names a nonce other than the outstanding Challenge's"
                )
            )
        return self._evidence()

    def _posture(self, now: float) -> list[Action]:
        if self.phase is Phase.HELLO:
            return self._close(_not_hello())
        notes = self._notes
        notes.append(now)
        while notes and notes[0] <= now - _NOTE_WINDOW_S:
            notes.popleft()
        limit = self.timing.posture_notes_per_minute
        if len(notes) > limit:
            return self._close(
                ResourceExhausted(
                    f"{len(notes)} PostureChanged notes within a minute, more than the "
                    f"{limit} allowed (attestation.posture_notes_per_minute)"
                )
            )
        if self._noted is None:
            self._noted = now
        due = max(
            now,
            self.last_challenge_for_posture + self.timing.posture_min_interval_s,
            self.not_before,
        )
        if self.phase is Phase.IDLE:
            if due < self.next_at:
                self.next_at = due
                self._for_posture = True
            return self._due(now)
        # A challenge is out (or its evidence is being appraised): the note may predate the
        # change, so it is answered after that evidence.
        self._pending = due if self._pending is None else min(due, self._pending)
        return self._waiting()

    def _tick(self, now: float) -> list[Action]:
        if self.phase is Phase.HELLO and now >= self.deadline:
            return self._close(
                FailedPrecondition(f"no Hello within {self.timing.hello_timeout_s}s")
            )
        if self.phase is Phase.CHALLENGED and now >= self.deadline:
            return self._close(
                FailedPrecondition(
                    f"device {self.device_id}: no evidence within "
                    f"{self.timing.evidence_timeout_s}s of the challenge"
                )
            )
        if self.phase is Phase.IDLE:
            return self._due(now)
        return self._waiting()

    def _appraised(self, now: float, *, rebooted: bool) -> list[Action]:
        if self.phase is not Phase.APPRAISING:
            raise ValueError(f"stream of device {self.device_id}: no appraisal in flight")
        if rebooted:  # at once, for the whole event log
            self.next_at = now
        elif self._pending is not None:
            self.next_at = max(now, self._pending)
            self._for_posture = True
        else:
            self.next_at = now + self.timing.interval_s
        self._pending = None
        self.phase = Phase.IDLE
        if now >= self.next_at:
            return [SendResult(0.0, self._challenge(now)), Wait(self.deadline)]
        return [SendResult(self.next_at - now), Wait(self.next_at)]

    def _due(self, now: float) -> list[Action]:
        """In IDLE: the next challenge when it is due, and the wait that follows."""
        if now >= self.next_at:
            return [SendChallenge(self._challenge(now)), Wait(self.deadline)]
        return [Wait(self.next_at)]

    def _challenge(self, now: float) -> Nonce:
        if self._for_posture:
            self.last_challenge_for_posture = now
            self._for_posture = False
        # Sent after the note: its evidence shows the change.
        self._answers, self._noted = self._noted, None
        self.nonce = self.nonces()
        self.deadline = now + self.timing.evidence_timeout_s
        self.phase = Phase.CHALLENGED
        return self.nonce

    def _waiting(self) -> list[Action]:
        """What to wait for in HELLO or CHALLENGED (a deadline), or in APPRAISING (the
        appraisal, however long it takes: the evidence's deadline was met)."""
        if self.phase is Phase.APPRAISING:
            return [Wait(math.inf)]
        return [Wait(self.deadline)]

    def _close(self, error: DevtrustError | None) -> list[Action]:
        self.phase = Phase.CLOSED
        self.nonce = None
        return [Close(error)]


class RecentChallenges:
    """When each device was last challenged, on any of its streams, for rule 5 (the ``last_
    challenge`` of ``Opened``), kept only while it still counts: a challenge older than
    ``gap_s`` delays no stream, so it is forgotten, and the verifier holds one entry per
    device challenged within the last gap, not one per device it ever saw.

    Times are monotonic and noted in order, so the oldest entry is first; each call forgets
    from the front."""

    def __init__(self, gap_s: float) -> None:
        self._gap_s = gap_s
        self._at: dict[str, float] = {}  # oldest first (insertion order)

    def note(self, device_id: str, now: float) -> None:
        self._at.pop(device_id, None)
        self._at[device_id] = now
        self._forget(now)

    def last(self, device_id: str, now: float) -> float | None:
        """The device's last challenge, None when there was none within the gap."""
        self._forget(now)
        return self._at.get(device_id)

    def __len__(self) -> int:
        return len(self._at)

    def _forget(self, now: float) -> None:
        horizon = now - self._gap_s
        at = self._at
        while at:
            oldest = next(iter(at))
            if at[oldest] > horizon:
                return
            del at[oldest]


def _not_hello() -> MalformedInput:
    return MalformedInput("the first message on an attestation stream must be Hello")
