"""The agent's posture watch (issue 7, item 8): ephemeral listeners are not a change, and
changes are debounced so a churning host cannot turn every poll into an attestation, while
the first change still goes at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from devtrust.agent.attest import AttestationClient
from devtrust.agent.config import AgentConfig
from devtrust.agent.posture import (
    Debouncer,
    EphemeralPorts,
    collect_posture,
    ephemeral_ports,
    fingerprint,
)
from devtrust.agent.state import Enrollment, MemoryFiles
from devtrust.agent.watch import PostureWatcher
from devtrust.core.errors import ConfigError
from devtrust.swtpm.hosttree import write_host_tree
from devtrust.v1 import attestation_pb2
from tests.agent_parts import FakeTpm, recorded_host

# /proc/net/tcp rows (local_address is little-endian hex address : big-endian hex port).
_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode\n"
)


def _row(port: int, state: str = "0A", addr: str = "00000000") -> str:
    return (
        f"   1: {addr}:{port:04X} 00000000:0000 {state} 00000000:00000000 00:00000000 "
        "00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n"
    )


def _row6(port: int) -> str:
    return (
        f"   1: 00000000000000000000000000000000:{port:04X} "
        "00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 "
        "00000000     0        0 4343 1 0000000000000000 100 0 0 10 0\n"
    )


def _add_listener(root: Path, row: str, proto: str = "tcp") -> None:
    path = root / f"proc/net/{proto}"
    path.write_text(path.read_text() + row)


@pytest.fixture
def host(tmp_path: Path) -> Path:
    return write_host_tree(tmp_path / "host")


# --- ephemeral listeners -------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["tcp", "tcp6"])
@pytest.mark.parametrize("port", [32768, 41234, 60999])
def test_ephemeral_listener_leaves_the_fingerprint_unchanged(
    host: Path, proto: str, port: int
) -> None:
    before = fingerprint(host)
    _add_listener(host, _row(port) if proto == "tcp" else _row6(port), proto)
    assert fingerprint(host) == before
    # ... and it is still reported in the evidence body, for policy to judge.
    assert port in {s.port for s in collect_posture(host).listening}


@pytest.mark.parametrize("proto", ["tcp", "tcp6"])
@pytest.mark.parametrize("port", [22, 8080, 32767, 61000])
def test_service_listener_changes_the_fingerprint(host: Path, proto: str, port: int) -> None:
    before = fingerprint(host)
    _add_listener(host, _row(port) if proto == "tcp" else _row6(port), proto)
    after = fingerprint(host)
    assert [k for k in after if after[k] != before[k]] == ["listening_sockets"]


def test_ephemeral_listener_closing_is_not_a_change_either(host: Path) -> None:
    _add_listener(host, _row(45000))
    before = fingerprint(host)
    (host / "proc/net/tcp").write_text(_HEADER + _row(22))
    assert fingerprint(host) == before


def test_non_listening_rows_are_not_a_change(host: Path) -> None:
    before = fingerprint(host)
    _add_listener(host, _row(22, state="01", addr="0100007F"))  # ESTABLISHED
    assert fingerprint(host) == before


def test_custom_port_range_is_honoured(host: Path) -> None:
    sysctl = host / "proc/sys/net/ipv4"
    sysctl.mkdir(parents=True, exist_ok=True)
    (sysctl / "ip_local_port_range").write_text("1024\t9999\n")
    before = fingerprint(host)
    _add_listener(host, _row(8080))  # ephemeral on this host
    assert fingerprint(host) == before
    _add_listener(host, _row(41234))  # a service port on this host
    after = fingerprint(host)
    assert [k for k in after if after[k] != before[k]] == ["listening_sockets"]


def test_reserved_ports_in_the_range_count(host: Path) -> None:
    sysctl = host / "proc/sys/net/ipv4"
    sysctl.mkdir(parents=True, exist_ok=True)
    (sysctl / "ip_local_reserved_ports").write_text("40000,50000-50010\n")
    before = fingerprint(host)
    _add_listener(host, _row(50005))  # never handed out by the kernel: a service chose it
    assert fingerprint(host) != before


def test_changing_the_port_range_is_a_change(host: Path) -> None:
    """Widening the range to hide a service port is itself seen."""
    sysctl = host / "proc/sys/net/ipv4"
    sysctl.mkdir(parents=True, exist_ok=True)
    (sysctl / "ip_local_port_range").write_text("32768\t60999\n")
    before = fingerprint(host)
    (sysctl / "ip_local_port_range").write_text("1024\t60999\n")
    after = fingerprint(host)
    assert [k for k in after if after[k] != before[k]] == ["ephemeral_ports"]
    # With a service on 8080, the widened range also drops it from the listeners' digest.
    _add_listener(host, _row(8080))
    (sysctl / "ip_local_port_range").write_text("32768\t60999\n")
    before = fingerprint(host)
    (sysctl / "ip_local_port_range").write_text("1024\t60999\n")
    after = fingerprint(host)
    assert sorted(k for k in after if after[k] != before[k]) == [
        "ephemeral_ports",
        "listening_sockets",
    ]


@pytest.mark.parametrize(
    ("range_text", "reserved_text", "want"),
    [
        (None, None, EphemeralPorts(32768, 60999)),
        ("32768\t60999\n", None, EphemeralPorts(32768, 60999)),
        ("1024 65000\n", "", EphemeralPorts(1024, 65000)),
        ("garbage\n", None, EphemeralPorts(32768, 60999)),
        ("60999 32768\n", None, EphemeralPorts(32768, 60999)),  # inverted: kernel default
        ("0 65535\n", None, EphemeralPorts(32768, 60999)),
        ("1 2 3\n", None, EphemeralPorts(32768, 60999)),
        (
            None,
            "8080, 9000-9002,x,7-\n",
            EphemeralPorts(reserved=frozenset({8080, 9000, 9001, 9002})),
        ),
    ],
)
def test_ephemeral_ports_parsing(
    tmp_path: Path, range_text: str | None, reserved_text: str | None, want: EphemeralPorts
) -> None:
    sysctl = tmp_path / "proc/sys/net/ipv4"
    sysctl.mkdir(parents=True)
    if range_text is not None:
        (sysctl / "ip_local_port_range").write_text(range_text)
    if reserved_text is not None:
        (sysctl / "ip_local_reserved_ports").write_text(reserved_text)
    assert ephemeral_ports(tmp_path) == want


def test_ephemeral_ports_membership() -> None:
    ports = EphemeralPorts(1000, 2000, frozenset({1500}))
    assert [p for p in (999, 1000, 1500, 2000, 2001) if p in ports] == [1000, 2000]


# --- debouncing ----------------------------------------------------------------------------

# (call, signals, now, expected): "changed" feeds a change seen at now, "due" asks at now.
DebounceStep = tuple[str, list[str], float, list[str] | None]
DEBOUNCE_CASES: dict[str, list[DebounceStep]] = {
    "first change goes at once": [
        ("changed", ["sshd_config"], 0.0, ["sshd_config"]),
    ],
    "changes in the window are held, then sent as one union": [
        ("changed", ["sshd_config"], 0.0, ["sshd_config"]),
        ("changed", ["listening_sockets"], 0.25, None),
        ("changed", ["kernel_modules", "listening_sockets"], 1.0, None),
        ("due", [], 4.99, None),
        ("due", [], 5.0, ["kernel_modules", "listening_sockets"]),
        ("due", [], 5.25, None),
    ],
    "a lone change after a quiet window goes at once": [
        ("changed", ["sshd_config"], 0.0, ["sshd_config"]),
        ("due", [], 5.0, None),
        ("changed", ["kernel_modules"], 5.5, ["kernel_modules"]),
    ],
    "a change after the window without a due call goes at once, with what was held": [
        ("changed", ["sshd_config"], 0.0, ["sshd_config"]),
        ("changed", ["listening_sockets"], 1.0, None),
        ("changed", ["gpu_driver"], 7.0, ["gpu_driver", "listening_sockets"]),
        ("changed", ["lockdown"], 8.0, None),
        ("due", [], 12.0, ["lockdown"]),
    ],
    "sustained churn: at most one note per window": [
        ("changed", ["listening_sockets"], 0.0, ["listening_sockets"]),
        ("changed", ["listening_sockets"], 2.0, None),
        ("due", [], 5.0, ["listening_sockets"]),
        ("changed", ["listening_sockets"], 5.25, None),  # a new window opened at 5.0
        ("due", [], 9.99, None),
        ("due", [], 10.0, ["listening_sockets"]),
        ("due", [], 15.0, None),  # quiet: the window closes
        ("changed", ["listening_sockets"], 15.25, ["listening_sockets"]),
    ],
    "no change is nothing": [
        ("changed", [], 0.0, None),
        ("due", [], 100.0, None),
        ("changed", ["sshd_config"], 100.0, ["sshd_config"]),
        ("changed", [], 103.0, None),
        ("changed", [], 105.0, None),
    ],
    "duplicates are merged": [
        ("changed", ["a"], 0.0, ["a"]),
        *[("changed", ["b", "c"], 0.01 * n, None) for n in range(1, 100)],
        ("due", [], 5.0, ["b", "c"]),
    ],
}


@pytest.mark.parametrize("steps", DEBOUNCE_CASES.values(), ids=DEBOUNCE_CASES.keys())
def test_debouncer(steps: list[DebounceStep]) -> None:
    d = Debouncer(5.0)
    for n, (call, signals, now, expected) in enumerate(steps):
        got = d.changed(signals, now) if call == "changed" else d.due(now)
        assert got == expected, f"step {n}: {call}({signals}, {now})"
        assert len(d.held) <= 16  # held signals are merged, never queued


@pytest.mark.parametrize("window", [0.0, -1.0])
def test_debouncer_window_must_be_positive(window: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        Debouncer(window)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_posture_debounce_setting_is_validated(tmp_path: Path, value: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(f"posture_debounce_s: {value}\n")
    with pytest.raises(ConfigError, match="posture_debounce_s must be positive"):
        AgentConfig.load(path)


def test_posture_debounce_default() -> None:
    assert AgentConfig().posture_debounce_s == 5.0


# --- the watch loop ------------------------------------------------------------------------


class _FakeCall:
    def __init__(self, clock: Callable[[], float] = lambda: 0.0) -> None:
        self.clock = clock
        self.sent: list[tuple[list[str], float]] = []

    async def write(self, msg: attestation_pb2.AgentMessage) -> None:
        self.sent.append((list(msg.posture_changed.signals), self.clock()))


class _ChurningHost:
    """A fingerprint function over a fake clock. Poll n sees ``state(min(n, changes))``, so
    each of the polls 1..changes sees one change, 0.01 s apart: sshd_config first, then the
    listeners churn (and a module loads once); then the host is quiet and each poll moves the
    clock a second on, past the window."""

    def __init__(self, changes: int, quiet_polls: int) -> None:
        self.now = 0.0
        self.polls = 0
        self.changes = changes
        self.quiet_polls = quiet_polls
        self.done = asyncio.Event()

    def clock(self) -> float:
        return self.now

    @staticmethod
    def state(k: int) -> dict[str, bytes]:
        return {
            "sshd_config": b"edited" if k >= 1 else b"",
            "listening_sockets": str(k).encode() if k >= 2 else b"",
            "kernel_modules": b"loaded" if k >= 30 else b"",
        }

    def probe(self, root: Path) -> dict[str, bytes]:
        n, self.polls = self.polls, self.polls + 1
        if n > 0:
            self.now += 0.01 if n <= self.changes else 1.0
        if n >= self.changes + self.quiet_polls:
            self.done.set()
        return self.state(min(n, self.changes))


def _client(tmp_path: Path) -> AttestationClient:
    cfg = AgentConfig(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
    return AttestationClient(
        cfg,
        tpm=FakeTpm(),
        host=recorded_host(),
        files=MemoryFiles(),
        enrollment=Enrollment("ab" * 32, b"", b"", b""),
    )


async def _forwarding(client: AttestationClient, call: _FakeCall, until: asyncio.Event) -> None:
    forward = asyncio.create_task(client._forward_posture(cast(Any, call)))
    try:
        await asyncio.wait_for(until.wait(), 30)
        for _ in range(10):  # let the forwarder send what is ready
            await asyncio.sleep(0)
    finally:
        forward.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await forward


def test_fifty_rapid_changes_send_two_posture_changed_notes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = _client(tmp_path)
    host = _ChurningHost(changes=50, quiet_polls=10)
    call = _FakeCall(host.clock)
    watcher = PostureWatcher(
        tmp_path, interval_s=0.001, debounce_s=5.0, probe=host.probe, clock=host.clock
    )

    async def scenario() -> None:
        unsubscribe = watcher.subscribe(client.notify_posture_changed)
        try:
            await _forwarding(client, call, host.done)
        finally:
            unsubscribe()

    with caplog.at_level(logging.INFO, logger="devtrust.agent.watch"):
        asyncio.run(scenario())
    assert host.polls > 50
    assert [signals for signals, _ in call.sent] == [
        ["sshd_config"],  # at once
        ["kernel_modules", "listening_sockets"],  # the other 49 changes, coalesced
    ]
    first_at, coalesced_at = (at for _, at in call.sent)
    assert first_at == pytest.approx(0.01)  # on the poll that saw it, not after the window
    assert 5.0 <= coalesced_at <= 6.5  # when the window that the first opened closed
    infos = [r for r in caplog.records if r.getMessage().startswith("posture changed")]
    assert len(infos) == 2  # one INFO line per note sent, not per poll


def test_pending_notes_are_merged_not_queued(tmp_path: Path) -> None:
    """However many notes pile up before the stream can write, one PostureChanged goes."""
    client = _client(tmp_path)
    call = _FakeCall()

    async def scenario() -> None:
        for n in range(20_000):
            client.notify_posture_changed(["listening_sockets" if n % 2 else "kernel_modules"])
        ready = asyncio.Event()
        ready.set()
        await _forwarding(client, call, ready)

    asyncio.run(scenario())
    assert [signals for signals, _ in call.sent] == [["kernel_modules", "listening_sockets"]]


# --- one watch per process -----------------------------------------------------------------


class _CountingHost:
    """A fingerprint function that counts its polls; sshd_config changes at poll ``change_at``."""

    def __init__(self, change_at: int = 3) -> None:
        self.polls = 0
        self.change_at = change_at

    def probe(self, root: Path) -> dict[str, bytes]:
        self.polls += 1
        return {"sshd_config": b"edited" if self.polls > self.change_at else b""}


def test_a_thousand_clients_share_one_watch(tmp_path: Path) -> None:
    """A simulator's clients on one host probe: the host is polled once per interval, not
    once per client, and every client gets the note."""
    host = _CountingHost()
    watcher = PostureWatcher(tmp_path, interval_s=0.001, debounce_s=5.0, probe=host.probe)
    clients = [_client(tmp_path) for _ in range(1000)]

    async def scenario() -> int:
        unsubscribes = [watcher.subscribe(c.notify_posture_changed) for c in clients]
        try:
            for _ in range(2000):
                if all(c._outbox for c in clients):
                    break
                await asyncio.sleep(0.001)
            return host.polls
        finally:
            for unsubscribe in unsubscribes:
                unsubscribe()

    polls = asyncio.run(scenario())
    assert all(c._outbox == {"sshd_config"} for c in clients)
    assert host.change_at < polls < 100  # one poll per interval, whatever the client count


def test_the_watch_runs_while_someone_listens(tmp_path: Path) -> None:
    host = _CountingHost(change_at=10**9)
    watcher = PostureWatcher(tmp_path, interval_s=0.001, debounce_s=5.0, probe=host.probe)

    running: list[bool] = []

    async def scenario() -> tuple[int, int]:
        running.append(watcher.running)
        first = watcher.subscribe(lambda signals: None)
        second = watcher.subscribe(lambda signals: None)
        await asyncio.sleep(0.02)
        first()
        running.append(watcher.running)  # one listener left
        second()
        await asyncio.sleep(0.01)  # a poll already on its thread may finish
        running.append(watcher.running)
        stopped_at = host.polls
        await asyncio.sleep(0.02)
        return stopped_at, host.polls

    stopped_at, later = asyncio.run(scenario())
    assert running == [False, True, False]
    assert stopped_at > 0
    assert later == stopped_at  # no poll without a listener
