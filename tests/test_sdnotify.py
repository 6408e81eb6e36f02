"""sd_notify (protos/devtrust/core/sdnotify.py) as systemd sees it: the real programs run as
processes with a NOTIFY_SOCKET the test binds, a short watchdog, under the seccomp rules of
their units, and every message is read with the sender's pid (SCM_CREDENTIALS, which systemd
checks for NotifyAccess=main).

- `devtrust-verifier serve`: READY=1 with a STATUS= naming the policy and the store,
  WATCHDOG=1 repeatedly, RELOADING=1 then READY=1 on SIGHUP with the policy loaded or
  refused, STOPPING=1 on SIGTERM; with `--workers 2` the parent alone speaks, READY=1 once.
- `devtrust-agent run`: READY=1 before enrollment (a verifier out of reach must not fail the
  unit's start timeout), STATUS= as it enrolls and attests, WATCHDOG=1, STOPPING=1.

The sandbox (``sandboxed``): the units' ``SystemCallFilter=@system-service`` less
``@privileged @resources`` (the lists read from this host's ``systemd-analyze
syscall-filter``), EPERM for the rest (``SystemCallErrorNumber=EPERM``), and
``MemoryDenyWriteExecute=yes`` as systemd writes it (seccomp: no mmap both writable and
executable, no mprotect or pkey_mprotect adding PROT_EXEC, no shmat with SHM_EXEC), loaded
through libseccomp before the program is executed, as systemd does. To run a command under
a unit's rules: ``python -m tests.test_sdnotify --sandbox UNIT [--watchdog-pid] -- ARGV``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import errno
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from devtrust.agent.messages import AttestationResult, Finding, Verdict
from devtrust.agent.service_status import result_line
from devtrust.core import sdnotify
from devtrust.core.sdnotify import Notifier, socket_address, watchdog_interval
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.swtpm.bootlog import header_only_log
from devtrust.swtpm.pgserver import PgServer
from devtrust.verifier.config import DEFAULT_POLICY
from devtrust.verifier.main import EXIT_CONFIG, EXIT_TEMPFAIL
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.policy import Policy
from devtrust.verifier.running import ServingState, status_line
from devtrust.verifier.service_state import SILENT_FLOOR_S
from tests.verifier_process import verifier_process, write_config

pytest_plugins = ["tests.pg"]

ROOT = Path(__file__).resolve().parent.parent
VERIFIER_UNIT = ROOT / "packaging/systemd/devtrust-verifier.service"
AGENT_UNIT = ROOT / "packaging/systemd/devtrust-agent.service"
# 0.4 s: a ping every 0.2 s, several within any wait below.
WATCHDOG_USEC = "400000"
# How long a wait for a message may last before the test fails (not a timing assertion: a
# bound on a hang).
LIMIT_S = 90.0


# --- the sandbox: the units' seccomp rules --------------------------------------------------


def syscall_groups() -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter``: each @group's members (names and @groups)."""
    tool = shutil.which("systemd-analyze")
    assert tool is not None, "systemd-analyze (package systemd) is needed"
    text = subprocess.run(
        [tool, "syscall-filter", "--no-pager"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.split()[0], [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(name: str, groups: dict[str, list[str]]) -> set[str]:
    if not name.startswith("@"):
        return {name}
    return set().union(*(expand(member, groups) for member in groups[name]))


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """The [Service] keys of ``unit``, each with its values in order."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def unit_syscalls(unit: Path) -> set[str]:
    """What ``unit``'s SystemCallFilter= lines allow: the first lists (an allow list), the
    ``~`` ones removed (systemd keeps @default in every allow list)."""
    groups = syscall_groups()
    allowed: set[str] = set()
    for value in unit_settings(unit)["SystemCallFilter"]:
        names = set().union(*(expand(n, groups) for n in value.lstrip("~").split()))
        allowed = allowed - names if value.startswith("~") else allowed | names
    return allowed | expand("@default", groups)


def unit_families(unit: Path) -> set[int]:
    """The address families ``unit``'s RestrictAddressFamilies= allows (numbers)."""
    (value,) = unit_settings(unit)["RestrictAddressFamilies"]
    return {int(getattr(socket, name)) for name in value.split()}


class _ArgCmp(ctypes.Structure):
    _fields_ = (  # struct scmp_arg_cmp (seccomp.h)
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
_EPERM = _ERRNO | errno.EPERM
_EQ, _GE, _MASKED_EQ = 4, 5, 7  # enum scmp_compare
# Past every address family (AF_MAX is 46 in Linux 6.x).
_AF_MAX = 64
_PROT_WRITE, _PROT_EXEC, _SHM_EXEC = 0x2, 0x4, 0o100000


def _libseccomp() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    )
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_load.argtypes = (ctypes.c_void_p,)
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    return lib


def _load(lib: ctypes.CDLL, default: int, rules: list[tuple[int, str, list[_ArgCmp]]]) -> None:
    ctx = lib.seccomp_init(default)
    assert ctx, "seccomp_init failed"
    try:
        for action, name, conditions in rules:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number == -1:  # __NR_SCMP_ERROR: not a call libseccomp knows (systemd skips)
                continue
            array = (_ArgCmp * max(1, len(conditions)))(*conditions)
            lib.seccomp_rule_add_array(ctx, action, number, len(conditions), array)
        assert lib.seccomp_load(ctx) == 0, "seccomp_load failed"
    finally:
        lib.seccomp_release(ctx)


def enter_sandbox(unit: Path) -> None:
    """Load ``unit``'s seccomp rules into this process (inherited by what it executes):
    MemoryDenyWriteExecute=, RestrictAddressFamilies= (socket() of another family fails
    with EAFNOSUPPORT), then SystemCallFilter= with SystemCallErrorNumber=EPERM."""
    lib = _libseccomp()
    settings = unit_settings(unit)
    both = _PROT_WRITE | _PROT_EXEC
    if settings.get("MemoryDenyWriteExecute") == ["yes"]:
        _load(
            lib,
            _ALLOW,
            [
                (_EPERM, "mmap", [_ArgCmp(2, _MASKED_EQ, both, both)]),
                (_EPERM, "mmap2", [_ArgCmp(2, _MASKED_EQ, both, both)]),
                (_EPERM, "mprotect", [_ArgCmp(2, _MASKED_EQ, _PROT_EXEC, _PROT_EXEC)]),
                (_EPERM, "pkey_mprotect", [_ArgCmp(2, _MASKED_EQ, _PROT_EXEC, _PROT_EXEC)]),
                (_EPERM, "shmat", [_ArgCmp(2, _MASKED_EQ, _SHM_EXEC, _SHM_EXEC)]),
            ],
        )
    families = unit_families(unit)
    refused = _ERRNO | errno.EAFNOSUPPORT
    _load(
        lib,
        _ALLOW,
        [(refused, "socket", [_ArgCmp(0, _EQ, f, 0)]) for f in range(_AF_MAX) if f not in families]
        + [(refused, "socket", [_ArgCmp(0, _GE, _AF_MAX, 0)])],
    )
    # Last: it refuses seccomp() itself (@privileged), as systemd's does.
    _load(lib, _EPERM, [(_ALLOW, name, []) for name in sorted(unit_syscalls(unit))])


def sandboxed(argv: list[str], unit: Path, *, watchdog_pid: bool = False) -> list[str]:
    """``argv`` run under ``unit``'s seccomp rules; ``watchdog_pid``: with WATCHDOG_PID set
    to its own pid, as systemd sets it."""
    flags = ["--watchdog-pid"] if watchdog_pid else []
    return [
        sys.executable,
        "-m",
        "tests.test_sdnotify",  # run from ROOT
        "--sandbox",
        str(unit),
        *flags,
        "--",
        *argv,
    ]


def _sandbox_main(args: list[str]) -> None:
    split = args.index("--")
    command = args[split + 1 :]
    if "--watchdog-pid" in args[:split]:
        os.environ["WATCHDOG_PID"] = str(os.getpid())
    enter_sandbox(Path(args[1]))
    os.execv(command[0], command)  # noqa: S606 (a test's own argv)


def test_sandbox_refuses_writable_executable_memory() -> None:
    """The sandbox is on: a mapping both writable and executable fails in it (EPERM), a
    call outside @system-service (reboot, in @privileged) is refused, and so is a netlink
    socket under the verifier's RestrictAddressFamilies=."""
    probe = (
        "import mmap, ctypes, os\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "    print('wx mapped')\n"
        "except OSError as e:\n"
        "    print('wx', e.errno)\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.reboot(0)\n"
        "print('reboot', ctypes.get_errno())\n"
        "import socket\n"
        "try:\n"
        "    socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM)\n"
        "    print('netlink opened')\n"
        "except OSError as e:\n"
        "    print('netlink', e.errno)\n"
    )
    out = subprocess.run(
        sandboxed([sys.executable, "-c", probe], VERIFIER_UNIT),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split("\n")[:3] == [
        f"wx {errno.EPERM}",
        f"reboot {errno.EPERM}",
        f"netlink {errno.EAFNOSUPPORT}",
    ]


# --- reading what a program tells systemd ---------------------------------------------------


@dataclass(frozen=True)
class Message:
    pid: int
    fields: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str | None:
        return next((v for k, v in self.fields if k == key), None)


@dataclass
class NotifySocket:
    """A NOTIFY_SOCKET of the test's own: every datagram with its sender's pid."""

    sock: socket.socket
    name: str
    messages: list[Message] = field(default_factory=list)

    @classmethod
    @contextmanager
    def bound(cls, path: Path | None = None) -> Iterator[NotifySocket]:
        """On ``path``, or on an abstract name (``@...``) when None."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if path is None:
            name = f"@devtrust-test-{os.getpid()}-{time.monotonic_ns()}"
            sock.bind(b"\0" + name[1:].encode())
        else:
            name = str(path)
            sock.bind(name)
        try:
            yield cls(sock, name)
        finally:
            sock.close()

    def _receive(self, timeout_s: float) -> Message | None:
        self.sock.settimeout(timeout_s)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = 0
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                pid = struct.unpack("iII", payload[:12])[0]
        lines = data.decode().split("\n")
        fields = tuple((k, v) for k, _, v in (line.partition("=") for line in lines))
        message = Message(pid, fields)
        self.messages.append(message)
        return message

    def wait_for(
        self,
        wanted: Callable[[Message], bool],
        process: subprocess.Popen[bytes],
        log: Path,
        what: str,
    ) -> Message:
        """The next message that is ``wanted``; fails when the process exits first or nothing
        comes within LIMIT_S."""
        deadline = time.monotonic() + LIMIT_S
        while time.monotonic() < deadline:
            message = self._receive(0.2)
            if message is not None and wanted(message):
                return message
            if message is None and process.poll() is not None:
                break
        raise AssertionError(
            f"no {what} (exit {process.poll()}); got {self.messages[-10:]}\n"
            f"{log.read_text(errors='replace')[-4000:]}"
        )

    def count(self, key: str, value: str = "1") -> int:
        return sum(1 for m in self.messages if m.get(key) == value)


def _has(key: str, value: str = "1") -> Callable[[Message], bool]:
    return lambda m: m.get(key) == value


def _env(notify: NotifySocket) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "NOTIFY_SOCKET")}
    return {**env, "NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": WATCHDOG_USEC}


@contextmanager
def started(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=out, env=env, cwd=ROOT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def _stop(process: subprocess.Popen[bytes], log: Path) -> int:
    try:
        return process.wait(LIMIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(log.read_text(errors="replace")[-4000:]) from None


# --- the verifier ---------------------------------------------------------------------------


def verifier_yaml(
    tmp_path: Path, pki: PkiFiles, ek_ca: EndorsementCA, database: str | None = None
) -> tuple[Path, Path]:
    """A configuration on free ports, ``database`` (default: a SQLite file) and a copy of
    the default policy (the reload tests change it); the CA key left out: --ca-key gives
    it, as under systemd."""
    shutil.copytree(DEFAULT_POLICY.parent, tmp_path / "policy")  # with its data files
    policy = tmp_path / "policy" / DEFAULT_POLICY.name
    config = {
        "database": database or str(tmp_path / "verifier.db"),
        "listen": {"enrollment": "127.0.0.1:0", "attestation": "127.0.0.1:0"},
        "tls": {"server_cert": str(pki.server_cert), "server_key": str(pki.server_key)},
        "ca": {"cert": str(pki.ca_cert), "key": str(tmp_path / "no-such-ca.key")},
        "endorsement": {"roots": [], "trust_swtpm_local_ca": str(ek_ca.cert_path)},
        "attestation": {"interval_s": 2, "stream_challenge_gap_s": 0},
        "policy": str(policy),
        "server": {"drain_s": 2, "store_probe_s": 0.2},
    }
    path = tmp_path / "verifier.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, policy


def serve_argv(config: Path, pki: PkiFiles, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "devtrust.verifier.main",
        "--log-format",
        "json",
        "serve",
        "--config",
        str(config),
        "--ca-key",
        str(pki.ca_key),
        *extra,
    ]


def _json_lines(log: Path) -> list[dict[str, object]]:
    """The log: one JSON object per line, every line (what a shipper reads)."""
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_verifier_notifies(tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA) -> None:
    config, policy = verifier_yaml(tmp_path, pki, endorsement_ca)
    log = tmp_path / "verifier.log"
    with (
        NotifySocket.bound(tmp_path / "notify") as notify,
        started(sandboxed(serve_argv(config, pki), VERIFIER_UNIT), _env(notify), log) as proc,
    ):
        ready = notify.wait_for(_has("READY"), proc, log, "READY=1")
        assert ready.pid == proc.pid
        status = ready.get("STATUS") or ""
        assert status.startswith("serving: 0 attestation streams, policy ")
        assert status.endswith("devtrust-default-gpu-hosts-1, store ok")
        for n in range(3):
            notify.wait_for(_has("WATCHDOG"), proc, log, f"WATCHDOG=1 #{n + 1}")
        # SIGHUP: a policy that loads...
        policy.write_text(policy.read_text().replace("gpu-hosts-1", "gpu-hosts-2"))
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for(_has("RELOADING"), proc, log, "RELOADING=1")
        assert int(reloading.get("MONOTONIC_USEC") or 0) > 0
        again = notify.wait_for(_has("READY"), proc, log, "READY=1 after the reload")
        assert again.get("STATUS") == (
            "reload: policy devtrust-default-gpu-hosts-2 loaded ("
            + _rules(policy)
            + " rules); GPU attestation data reloaded"
        )
        notify.wait_for(
            lambda m: (m.get("STATUS") or "").endswith(
                "policy devtrust-default-gpu-hosts-2, store ok"
            ),
            proc,
            log,
            "STATUS with the new policy",
        )
        # ...and one that does not.
        policy.write_text("policy_id: [\n")
        proc.send_signal(signal.SIGHUP)
        notify.wait_for(_has("RELOADING"), proc, log, "RELOADING=1 (bad policy)")
        refused = notify.wait_for(_has("READY"), proc, log, "READY=1 after the refusal")
        assert (refused.get("STATUS") or "").startswith(
            "reload: policy refused, policy devtrust-default-gpu-hosts-2 stays: "
        )
        proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for(_has("STOPPING"), proc, log, "STOPPING=1")
        assert (stopping.get("STATUS") or "").startswith("stopping: draining 0 attestation")
        assert _stop(proc, log) == 0
    assert {m.pid for m in notify.messages} == {proc.pid}
    lines = _json_lines(log)
    assert any(line["message"] == "stopped" or "drained" in str(line["message"]) for line in lines)


def test_verifier_on_postgresql_tells_the_store_state(
    tmp_path: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    pg_server: PgServer,
    pg_url: str,
) -> None:
    """On PostgreSQL (psycopg's libpq, under the unit's rules too): STATUS= says when the
    database stops answering and when it answers again."""
    config, _ = verifier_yaml(tmp_path, pki, endorsement_ca, database=pg_url)
    log = tmp_path / "verifier.log"
    with (
        NotifySocket.bound(tmp_path / "notify") as notify,
        started(sandboxed(serve_argv(config, pki), VERIFIER_UNIT), _env(notify), log) as proc,
    ):
        ready = notify.wait_for(_has("READY"), proc, log, "READY=1")
        assert (ready.get("STATUS") or "").endswith(", store ok")
        pg_server.stop()
        try:
            notify.wait_for(
                lambda m: (m.get("STATUS") or "").endswith(
                    ", store UNAVAILABLE (health NOT_SERVING)"
                ),
                proc,
                log,
                "STATUS with the database down",
            )
        finally:
            pg_server.start()
        notify.wait_for(
            lambda m: (m.get("STATUS") or "").endswith(", store ok"),
            proc,
            log,
            "STATUS with the database back",
        )
        proc.send_signal(signal.SIGTERM)
        notify.wait_for(_has("STOPPING"), proc, log, "STOPPING=1")
        assert _stop(proc, log) == 0


def test_verifier_exits_75_when_the_database_does_not_answer(
    tmp_path: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    pg_server: PgServer,
    pg_url: str,
) -> None:
    """EX_TEMPFAIL, not 2: the unit restarts it (RestartPreventExitStatus=2 lists only
    what a person must fix)."""
    config, _ = verifier_yaml(tmp_path, pki, endorsement_ca, database=pg_url)
    pg_server.stop()
    try:
        done = subprocess.run(
            serve_argv(config, pki)[:3] + serve_argv(config, pki)[5:],  # text logs
            capture_output=True,
            text=True,
            check=False,
            timeout=LIMIT_S * 2,
        )
    finally:
        pg_server.start()
    assert done.returncode == EXIT_TEMPFAIL, done.stderr
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("devtrust-verifier: ")]
    assert line.endswith("(the database did not answer: try again once it does)")


def test_verifier_exits_2_when_postgresql_refuses_its_credentials(
    tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, pg_url: str
) -> None:
    """A server that answered and refused is the configuration's to fix: 2, no restart."""
    parts = urllib.parse.urlsplit(pg_url)
    wrong = parts._replace(netloc=f"{parts.username}:wrong@{parts.hostname}:{parts.port}")
    config, _ = verifier_yaml(tmp_path, pki, endorsement_ca, database=wrong.geturl())
    done = subprocess.run(
        serve_argv(config, pki)[:3] + serve_argv(config, pki)[5:],
        capture_output=True,
        text=True,
        check=False,
        timeout=LIMIT_S * 2,
    )
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert "PostgreSQL refused the credentials" in done.stderr


def _worker_pid(log: Path, name: str) -> int:
    """A worker's pid, as its JSON log lines carry it."""
    for line in _json_lines(log):
        if line.get("worker") == name:
            return int(str(line["pid"]))
    raise AssertionError(log.read_text())


def _wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    """Until a log line's message holds ``text`` (at most LIMIT_S)."""
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline and process.poll() is None:
        if any(text in str(line.get("message")) for line in _json_lines(log)):
            return
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in the log:\n{log.read_text()[-4000:]}")


def _rules(policy: Path) -> str:
    return str(len(Policy.load(policy).rules))


def test_verifier_workers_parent_speaks_once(
    tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    config, policy = verifier_yaml(tmp_path, pki, endorsement_ca)
    log = tmp_path / "verifier.log"
    argv = sandboxed(serve_argv(config, pki, "--workers", "2"), VERIFIER_UNIT, watchdog_pid=True)
    with (
        NotifySocket.bound() as notify,  # an abstract socket this time
        # 2 s: the workers report every second; one silent for 10 s (SILENT_FLOOR_S, the
        # least however short the watchdog) is stuck.
        started(argv, {**_env(notify), "WATCHDOG_USEC": "2000000"}, log) as proc,
    ):
        notify.wait_for(_has("READY"), proc, log, "READY=1")
        notify.wait_for(
            lambda m: (m.get("STATUS") or "").startswith(
                "serving with 2 workers: 0 attestation streams, policy "
            ),
            proc,
            log,
            "STATUS with both workers' state",
        )
        for n in range(3):
            notify.wait_for(_has("WATCHDOG"), proc, log, f"WATCHDOG=1 #{n + 1}")
        assert notify.count("READY") == 1
        policy.write_text(policy.read_text().replace("gpu-hosts-1", "gpu-hosts-3"))
        proc.send_signal(signal.SIGHUP)
        notify.wait_for(_has("RELOADING"), proc, log, "RELOADING=1")
        again = notify.wait_for(_has("READY"), proc, log, "READY=1 after the reload")
        assert (again.get("STATUS") or "").startswith(
            "reload: policy devtrust-default-gpu-hosts-3 loaded"
        )
        # A worker whose loop stops (SIGSTOP) falls silent: the parent, whose own pings say
        # only that its loop turns, kills it after max(watchdog, SILENT_FLOOR_S) and starts
        # it again.
        stuck = _worker_pid(log, "worker1")
        os.kill(stuck, signal.SIGSTOP)
        try:
            _wait_for_line(
                log,
                f"worker1 (pid {stuck}) sent nothing for {SILENT_FLOOR_S:g} s: its event loop is "
                "stuck, killed",
                proc,
            )
        finally:  # never left stopped (it ends once its parent is gone)
            with contextlib.suppress(ProcessLookupError):
                os.kill(stuck, signal.SIGCONT)
        _wait_for_line(log, "worker1 started again (pid ", proc)
        proc.send_signal(signal.SIGTERM)
        notify.wait_for(_has("STOPPING"), proc, log, "STOPPING=1")
        assert _stop(proc, log) == 0
    # Only the main process spoke (NotifyAccess=main would drop the workers' messages).
    assert {m.pid for m in notify.messages} == {proc.pid}
    assert notify.count("READY") == 2
    workers = {line.get("worker") for line in _json_lines(log)}
    assert {"worker0", "worker1"} <= workers


# --- the agent ------------------------------------------------------------------------------


def agent_yaml(
    tmp_path: Path, pki: PkiFiles, tcti: str, *, enrollment: str, attestation: str
) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "verifier": {
                    "enrollment": enrollment,
                    "attestation": attestation,
                    "ca_bundle": str(pki.ca_cert),
                },
                "tpm": {"tcti": tcti},
                "state_dir": str(tmp_path / "state"),
                "runtime_dir": str(tmp_path / "run"),
                "event_log": str(header_only_log(tmp_path / "event-log.bin")),
                "gpu_source": "none",
                "rpc_timeout_s": 10.0,
                "reconnect_max_s": 1.0,
            }
        )
    )
    return path


def agent_argv(config: Path) -> list[str]:
    return sandboxed(
        [
            sys.executable,
            "-m",
            "devtrust.agent.main",
            "--log-format",
            "json",
            "run",
            "--config",
            str(config),
        ],
        AGENT_UNIT,
        watchdog_pid=True,
    )


@pytest.mark.swtpm
def test_agent_notifies(
    tmp_path: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: Callable[..., object],
) -> None:
    tpm = swtpm_factory()
    config = write_config(
        tmp_path / "verifier.yaml",
        pki,
        endorsement_ca,
        database=str(tmp_path / "verifier.db"),
        attestation={"interval_s": 2, "stream_challenge_gap_s": 0},
    )
    log = tmp_path / "agent.log"
    with verifier_process(tmp_path, config) as verifier:
        enroll = f"127.0.0.1:{verifier.enrollment_port}"
        attest = f"127.0.0.1:{verifier.attestation_port}"
        path = agent_yaml(tmp_path, pki, tpm.tcti, enrollment=enroll, attestation=attest)  # type: ignore[attr-defined]
        with (
            NotifySocket.bound(tmp_path / "notify") as notify,
            started(agent_argv(path), _env(notify), log) as proc,
        ):
            ready = notify.wait_for(_has("READY"), proc, log, "READY=1")
            assert ready.get("STATUS") == f"enrolling at {enroll}: waiting for the verifier"
            notify.wait_for(
                lambda m: (m.get("STATUS") or "").startswith("enrolled as device "),
                proc,
                log,
                "STATUS enrolled",
            )
            result = notify.wait_for(
                lambda m: (m.get("STATUS") or "").startswith(f"attesting to {attest}: "),
                proc,
                log,
                "STATUS with a result",
            )
            status = result.get("STATUS") or ""
            assert " (score " in status
            assert "certificate valid until " in status or "no device certificate" in status
            for n in range(3):
                notify.wait_for(_has("WATCHDOG"), proc, log, f"WATCHDOG=1 #{n + 1}")
            proc.send_signal(signal.SIGTERM)
            notify.wait_for(_has("STOPPING"), proc, log, "STOPPING=1")
            assert _stop(proc, log) == 0
        assert {m.pid for m in notify.messages} == {proc.pid}
        assert notify.count("READY") == 1
        _json_lines(log)


@pytest.mark.swtpm
def test_agent_ready_while_the_verifier_is_out_of_reach(
    tmp_path: Path, pki: PkiFiles, swtpm_factory: Callable[..., object]
) -> None:
    """An agent that cannot enroll yet is started (READY=1), says so, and pings."""
    tpm = swtpm_factory()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    path = agent_yaml(tmp_path, pki, tpm.tcti, enrollment=dead, attestation=dead)  # type: ignore[attr-defined]
    log = tmp_path / "agent.log"
    with (
        NotifySocket.bound() as notify,
        started(agent_argv(path), _env(notify), log) as proc,
    ):
        ready = notify.wait_for(_has("READY"), proc, log, "READY=1")
        assert ready.get("STATUS") == f"enrolling at {dead}: waiting for the verifier"
        for n in range(3):
            notify.wait_for(_has("WATCHDOG"), proc, log, f"WATCHDOG=1 #{n + 1}")
        proc.send_signal(signal.SIGTERM)
        notify.wait_for(_has("STOPPING"), proc, log, "STOPPING=1")
        _stop(proc, log)


# --- the pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@abstract/name", b"\0abstract/name"),
        ("", None),
        (None, None),
        ("vsock:2:1234", None),
        ("relative/path", None),
    ],
    ids=["path", "abstract", "empty", "unset", "vsock", "relative"],
)
def test_socket_address(value: str | None, address: str | bytes | None) -> None:
    assert socket_address(value) == address


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "400000"}, 0.4),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "4242"}, 0.4),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
    ids=["ours", "our-pid", "another-pid", "zero", "negative", "junk", "unset"],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    assert watchdog_interval(environ, 4242) == interval


def test_unset_sends_nothing_and_keeps_no_watchdog() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "400000"})
    assert not notifier.enabled
    assert notifier.watchdog_s is None
    assert notifier.ready("x") is False


def test_from_environ_unset_removes_the_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the verifier's parent does before starting workers: they inherit nothing."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_environ(unset=True)
    assert (notifier.address, notifier.watchdog_s) == (str(tmp_path / "n"), 0.4)
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)


def test_abstract_socket_one_datagram_per_message() -> None:
    with NotifySocket.bound() as notify:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify.name})
        assert notifier.ready("line one\nSTOPPING=1")
        assert notifier.reloading()
        got = [notify._receive(5.0), notify._receive(5.0)]
    first, second = (m for m in got if m is not None)
    # A newline in a value cannot add an assignment.
    assert first.fields == (("READY", "1"), ("STATUS", "line one STOPPING=1"))
    assert [k for k, _ in second.fields] == ["RELOADING", "MONOTONIC_USEC"]
    assert first.pid == os.getpid()


def test_failed_send_never_raises_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.DEBUG, logger=sdnotify.__name__):
        assert notifier.watchdog() is False
        assert notifier.status("x") is False
    lines = [r for r in caplog.records if r.name == sdnotify.__name__]
    assert len(lines) == 1
    assert "nobody-listens" in lines[0].getMessage()


def test_a_full_socket_does_not_block(tmp_path: Path) -> None:
    """systemd not reading (its queue full): the send fails at once, it does not wait."""
    with NotifySocket.bound(tmp_path / "full") as notify:
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with filler, contextlib.suppress(BlockingIOError):
            for _ in range(100_000):
                filler.sendto(b"X" * 1024, socket.MSG_DONTWAIT, notify.name)
        sent: list[bool] = []
        sender = threading.Thread(
            target=lambda: sent.append(Notifier(notify.name).watchdog()), daemon=True
        )
        sender.start()
        sender.join(LIMIT_S)
        assert not sender.is_alive(), "Notifier.send blocked on a full socket"
        assert sent == [False]


def test_status_is_cut_to_one_short_line() -> None:
    text = sdnotify.one_line("a\tb\n" + "x" * 1000)
    assert text.startswith("a b x")
    assert len(text) == sdnotify.STATUS_MAX
    assert text.endswith("...")


@pytest.mark.parametrize(
    ("states", "workers", "line"),
    [
        (
            [ServingState(1, "p1", store_up=True)],
            None,
            "serving: 1 attestation stream, policy p1, store ok",
        ),
        (
            [ServingState(0, None, store_up=False)],
            None,
            "serving: 0 attestation streams, policy none, store UNAVAILABLE (health NOT_SERVING)",
        ),
        (
            [ServingState(3, "p1", store_up=True), ServingState(4, "p2", store_up=False)],
            2,
            "serving with 2 workers: 7 attestation streams, policies p1, p2, store "
            "UNAVAILABLE in 1 of 2 workers (health NOT_SERVING)",
        ),
        ([], 2, "serving with 2 workers: waiting for the workers' state"),
    ],
    ids=["one", "store-down", "workers-differ", "no-state-yet"],
)
def test_status_line(states: list[ServingState], workers: int | None, line: str) -> None:
    assert status_line(states, workers=workers) == line


def test_a_new_stream_count_waits_for_the_refresh() -> None:
    """Policy or store changes are told at once; a count alone waits."""
    before = ServingState(1, "p1", store_up=True)
    assert ServingState(9, "p1", store_up=True).same_kind(before)
    assert not ServingState(1, "p2", store_up=True).same_kind(before)
    assert not ServingState(1, "p1", store_up=False).same_kind(before)
    assert not before.same_kind(None)


def test_agent_result_line() -> None:
    verdict = Verdict(
        device_id="d1",
        tier=Tier.WARNING,
        score=60,
        findings=(Finding(id="tpm.unavailable", severity="warning", claim="", message=""),),
    )
    at = datetime.datetime(2026, 12, 2, 1, 2, 3, tzinfo=datetime.UTC)
    line = result_line("v:8443", AttestationResult(trust=verdict), at=at, certificate=None)
    assert line == (
        "attesting to v:8443: warning (score 60) at 2026-12-02T01:02:03Z, TPM unavailable "
        "(retrying it), no device certificate"
    )


if __name__ == "__main__":
    _sandbox_main(sys.argv[1:])
