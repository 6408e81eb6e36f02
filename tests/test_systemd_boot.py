"""The packaged units under a real systemd (issue 13 item 2): a Debian 12 container booted with
systemd-nspawn runs Debian's systemd 252 as its PID 1, the three packages built here are
installed in it with apt, and a oneshot unit (packaging/nspawn/, never shipped) starts and
stops the verifier and the agent as an admin would, on a swtpm. What systemd and the kernel
then say is asserted: Type=notify readiness and STATUS=, reload, the watchdog armed, the
sandbox as the kernel applies it (User=, seccomp, NoNewPrivileges, no capabilities, UMask=,
ProtectSystem=strict, LoadCredential=), the files' modes, clean stops, and journals free of
exits, seccomp and permission denials.

Needs root and the host tools systemd-nspawn (systemd-container), debootstrap and script
(bsdutils); network to deb.debian.org the first time (debootstrap, cached in
.cache/nspawn-root-HASH) and for apt at each run (the packages' dependencies). The PID 1 of
the host does not matter: nspawn boots the container's own systemd.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtrust.swtpm.localca import EndorsementCA
from devtrust.swtpm.process import provision

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
CHECK = ROOT / "packaging" / "nspawn"
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# The container's own packages (debootstrap --include); the devtrust packages' dependencies
# come from the mirror when they are installed.
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "ca-certificates",
    "swtpm",
    "swtpm-tools",
    "python3",
    "procps",
    "iproute2",
)
PACKAGES = ("devtrust-agent", "devtrust-verifier", "devtrust-gate")
UNITS = ("devtrust-verifier.service", "devtrust-agent.service")
BOOT_TIMEOUT_S = 400
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
TIER = re.compile(r"attesting to [^:]+:\d+: (\w+) \(score \d+\)")
# Lines in the units' journals that mean the sandbox or the program failed.
DENIED = re.compile(
    r"code=exited, status=|code=killed|code=dumped|SIGSYS|seccomp|Operation not permitted"
    r"|Permission denied|Read-only file system|Traceback|watchdog timeout",
    re.IGNORECASE,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="boots a container with systemd-nspawn and installs packages in it: needs "
        "root (CI runs as root)",
    ),
]


def _tools() -> None:
    missing = [t for t in ("systemd-nspawn", "debootstrap", "script") if not shutil.which(t)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: `apt-get install systemd-container debootstrap` "
            "(Makefile APT_PACKAGES on CI)"
        )


def _run(argv: list[str], *, timeout: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


def base_rootfs() -> Path:
    """The debootstrapped Debian 12 tree, made once per package list and kept in .cache
    (about 250 MB); a lock keeps two test runs from making it at once."""
    key = hashlib.sha256(f"{SUITE} {MIRROR} {','.join(BASE_PACKAGES)}".encode()).hexdigest()
    base = CACHE / f"nspawn-root-{key[:12]}"
    CACHE.mkdir(exist_ok=True)
    with (CACHE / "nspawn-root.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "etc" / "os-release").exists():
            partial = base.with_suffix(".tmp")
            shutil.rmtree(partial, ignore_errors=True)
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    SUITE,
                    str(partial),
                    MIRROR,
                ],
                timeout=1800,
            )
            partial.rename(base)
    return base


def nspawn(root: Path, *command: str, timeout: float = 600) -> str:
    """A command in the tree, not booted (a chroot with its own namespaces), on the host's
    network for apt."""
    return _run(
        ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit", *command],
        timeout=timeout,
        env=APT_ENV,
    )


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Path]]:
    """The three packages, built as `make deb` builds them (tests/test_deb_install.py)."""
    base = tmp_path_factory.mktemp("nspawn-deb")
    build = [sys.executable, str(ROOT / "packaging" / "build_deb.py")]
    _run([*build, "--out", str(base / "dist"), "--work", str(base / "work")], timeout=1200)
    yield sorted((base / "dist").glob("*.deb"))
    shutil.rmtree(base, ignore_errors=True)


def prepare(root: Path, debs: list[Path]) -> dict[str, bool]:
    """As an admin would: the packages installed with apt (dependencies from the mirror);
    then, for the check, the swtpm's state (provisioned here with an EK certificate from a
    CA of this run) and the check's units. The packaged units are enabled by the packages;
    they are disabled here so that the check starts them itself, after `init` (enabled,
    they would start at boot and fail, exit 2, before there is a PKI). What the packages
    enabled is returned."""
    incoming = root / "var" / "tmp" / "devtrust-debs"
    incoming.mkdir(parents=True)
    for deb in debs:
        shutil.copy2(deb, incoming)
    nspawn(root, "apt-get", "-q", "update")
    nspawn(
        root,
        "sh",
        "-c",
        "apt-get install -y -q --no-install-recommends tpm-udev /var/tmp/devtrust-debs/*.deb",
    )
    shutil.rmtree(incoming)
    # debootstrap writes no /etc/hosts (the installer does): without it "localhost", the
    # verifier's address in the agent's configuration, goes to DNS and is not found.
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    enabled = {unit: (wants / unit).is_symlink() for unit in UNITS}
    nspawn(root, "systemctl", "disable", *UNITS)

    check = root / "var" / "lib" / "devtrust-check"
    ca = EndorsementCA.create(Path(tempfile.mkdtemp(prefix="devtrust-ekca-")))
    try:
        provision(check / "tpm", ca)
        etc = root / "etc" / "devtrust-check"
        etc.mkdir(parents=True)
        shutil.copyfile(ca.cert_path, etc / "ek-ca.pem")
        (etc / "ek-ca.pem").chmod(0o644)
    finally:
        shutil.rmtree(ca.directory, ignore_errors=True)
    lib = root / "usr" / "local" / "lib" / "devtrust-check"
    lib.mkdir(parents=True)
    shutil.copyfile(CHECK / "devtrust-check.py", lib / "devtrust-check.py")
    units = root / "etc" / "systemd" / "system"
    for unit in ("devtrust-check.service", "devtrust-check-swtpm.service"):
        shutil.copyfile(CHECK / unit, units / unit)
    (wants / "devtrust-check.service").symlink_to("/etc/systemd/system/devtrust-check.service")
    return enabled


def boot(root: Path, console: Path) -> int | None:
    """Boots the tree to its end: the check powers it off. nspawn wants a terminal for the
    container's console (with a pipe systemd prints nothing and the boot stalls), so it runs
    under script(1). Its own network namespace: only loopback, where the units' ports are.
    None when it did not end within BOOT_TIMEOUT_S (the whole process group is killed)."""
    command = (
        f"systemd-nspawn -q -b -D {root} --register=no --keep-unit --private-network "
        f"-M devtrust-check-{os.getpid()}"
    )
    with console.open("wb") as out:
        proc = subprocess.Popen(
            ["script", "-qec", command, "/dev/null"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=BOOT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def checked(debs: list[Path]) -> Iterator[dict[str, Any]]:
    """The check's JSON from one boot, with what the packages enabled and the console."""
    _tools()
    base = base_rootfs()
    work = Path(tempfile.mkdtemp(prefix="nspawn-run-", dir=CACHE))
    root = work / "root"
    try:
        _run(["cp", "-a", "--reflink=auto", str(base), str(root)], timeout=600)
        enabled = prepare(root, debs)
        console = work / "console.log"
        rc = boot(root, console)
        text = console.read_text(errors="replace")
        result = root / "var" / "tmp" / "devtrust-check.json"
        if not result.exists():
            pytest.fail(
                f"the container wrote no {result.name} (nspawn: {rc}); console:\n{text[-6000:]}"
            )
        data = json.loads(result.read_text())
        data["enabled_by_package"] = enabled
        data["nspawn_rc"] = rc
        data["console"] = text
        keep = os.environ.get("DEVTRUST_NSPAWN_KEEP")
        if keep:
            Path(keep).write_text(json.dumps(data, indent=1))
        yield data
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _context(data: dict[str, Any]) -> str:
    """What a failure shows: both units' journals and the steps that did not exit 0."""
    failed = [
        f"{s['name']}: rc={s['rc']} {s['err'].strip()[-800:]}"
        for s in data["steps"]
        if s["rc"] != 0
    ]
    parts = [
        "errors:\n" + "\n".join(data["errors"]),
        "failed steps:\n" + "\n".join(failed),
    ]
    for key in ("verifier", "agent"):
        parts.append(f"journal of devtrust-{key}:\n{data.get(key, {}).get('journal', '')}")
    return "\n\n".join(parts)


def test_units_under_systemd(checked: dict[str, Any]) -> None:
    data = checked
    why = _context(data)
    assert data["errors"] == [], why
    assert data["nspawn_rc"] == 0, why
    assert data["enabled_by_package"] == dict.fromkeys(UNITS, True)
    assert "systemd 252" in data["systemd"]

    v = data["verifier"]
    assert v["init"]["rc"] == 0, why
    # ca.key stays root's (the service gets it through LoadCredential=); the keys the
    # service reads are the devtrust group's.
    assert v["pki"]["ca.key"] == "0600 root:root", v["pki"]
    assert v["pki"]["server.key"] == "0640 root:devtrust", v["pki"]
    # Type=notify: `systemctl start` returns once READY=1 came, with STATUS=.
    assert v["start"]["rc"] == 0, why
    shown = v["after_start"]
    assert (shown["ActiveState"], shown["SubState"]) == ("active", "running"), why
    assert shown["StatusText"].startswith("serving"), shown
    assert shown["WatchdogUSec"] == "30s", shown
    assert shown["User"] == "devtrust", shown
    _sandboxed(v["proc"])
    assert "ca.key" in v["credentials"], v["credentials"]
    # ReadWritePaths=/var/lib/devtrust-crl (revocation.crl_path), made by ExecStartPre=+.
    for path in ("/var/lib/devtrust", "/var/lib/devtrust-crl"):
        assert v["writable"][path] == "writable", v["writable"]
    for path in ("/usr", "/etc/devtrust", "/opt"):
        assert "Read-only file system" in v["writable"][path], v["writable"]
    # Reload: the program's RELOADING=1, READY=1 and a STATUS= naming the policy.
    assert v["reload"]["rc"] == 0, why
    shown = v["after_reload"]
    assert (shown["ActiveState"], shown["SubState"]) == ("active", "running"), why
    assert re.match(r"reload: policy \S+ loaded", shown["StatusText"]), shown
    assert shown["NRestarts"] == "0", shown
    assert re.search(r"^devtrust_\w+", v["metrics"], re.MULTILINE), v["metrics"][:2000]

    a = data["agent"]
    assert a["swtpm_up"], why
    assert a["start"]["rc"] == 0, why
    shown = a["attesting"]
    assert TIER.search(shown["StatusText"]), f"{shown}\n\n{why}"
    assert (shown["ActiveState"], shown["SubState"]) == ("active", "running"), why
    assert shown["User"] == "devtrust-agent", shown
    assert shown["WatchdogUSec"] == "30s", shown
    assert shown["NRestarts"] == "0", shown
    _sandboxed(a["proc"])
    assert a["writable"]["/var/lib/devtrust-agent"] == "writable", a["writable"]
    for path in ("/usr", "/etc/devtrust"):
        assert "Read-only file system" in a["writable"][path], a["writable"]

    # DeviceAllow= (the agent's /dev/tpmrm0 and NVIDIA nodes) is NOT checked: systemd-nspawn
    # on a cgroup v1 host does not delegate the devices controller to the container, so
    # the agent's cgroup is the container's root one, "a *:* rwm" (recorded in
    # agent.devices_cgroup); the device ACL can only be seen on a booted host.
    # WatchdogSec=30s: both programs' WATCHDOG=1 reached systemd (the timestamp moved).
    for unit, pings in data["watchdog"].items():
        assert pings["later"] not in ("0", pings["at_start"]), (unit, pings)

    files = data["run_files"]
    expected = {
        "/run/devtrust": ("0711", "dir"),
        "/run/devtrust/device.pem": ("0644", "file"),
        "/run/devtrust/ca-bundle.pem": ("0644", "file"),
        "/run/devtrust/device.key": ("0600", "file"),
    }
    for path, (mode, kind) in expected.items():
        assert (files[path].get("mode"), files[path].get("type")) == (mode, kind), files
        assert files[path]["user"] == "devtrust-agent", files

    for key in ("agent", "verifier"):
        stopped = data[key]
        assert stopped["stop"]["rc"] == 0, why
        assert stopped["after_stop"]["ActiveState"] == "inactive", stopped["after_stop"]
        assert stopped["after_stop"]["Result"] == "success", stopped["after_stop"]
        bad = [line for line in stopped["journal"].splitlines() if DENIED.search(line)]
        assert bad == [], f"devtrust-{key}'s journal:\n" + "\n".join(bad) + f"\n\n{why}"


def _sandboxed(status: dict[str, str]) -> None:
    """The kernel's view of a service's main process (/proc/PID/status): not root, seccomp
    filter mode (SystemCallFilter=), no new privileges, no capabilities, UMask=0077."""
    assert status["Uid"].split()[0] != "0", status
    assert status["Seccomp"] == "2", status
    assert status["NoNewPrivs"] == "1", status
    assert int(status["CapEff"], 16) == 0, status
    assert int(status["CapBnd"], 16) == 0, status
    assert status["Umask"] == "0077", status
