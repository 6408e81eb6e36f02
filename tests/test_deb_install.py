"""The Debian packages (issue 13), built as `make deb` builds them (packaging/build_deb.py),
checked in their contents, then installed on this machine with apt: the commands run from
/usr/bin, the system users exist, `devtrust-verifier init` writes the PKI with the packaged
directory's group, the verifier starts as its user devtrust on the shipped configuration
and serves, and purge leaves only what the admin made. An upgrade keeps an edited
configuration and an admin's disabling of the service.

Installing needs root (CI runs as root). The tests clean up after themselves, on failure
too: the packages purged, the files init wrote removed, the system users the installation
made deleted, so that the machine is left as it was. A machine that already has a devtrust
package installed, or another program on the shipped configuration's ports, fails the test
with what to do.
"""

from __future__ import annotations

import contextlib
import grp
import marshal
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtrust.v1 import enrollment_pb2

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("devtrust-agent", "devtrust-verifier", "devtrust-gate")
COMMANDS = {
    "devtrust-agent": "agent",
    "devtrust-verifier": "verifier",
    "devtrust": "verifier",
    "devtrust-gate": "gate",
}
USERS = ("devtrust", "devtrust-agent")
WANTS = Path("/etc/systemd/system/multi-user.target.wants")
UNITS = ("devtrust-agent.service", "devtrust-verifier.service")
# What the packages make outside their files, and purge removes.
STATE = (
    "/opt/devtrust",
    "/var/lib/devtrust",
    "/var/lib/devtrust-agent",
    "/run/devtrust",
    "/run/devtrust-agent",
)
DSH_STATE = (
    Path("/var/lib/systemd/deb-systemd-helper-enabled"),
    Path("/var/lib/systemd/deb-systemd-helper-masked"),
)
ETC = Path("/etc/devtrust")
PKI = ETC / "verifier"
# What tmpfiles.d/devtrust-agent.conf opens to group tss (the boot event log is copied by
# the unit at each start instead).
SECURITYFS = (Path("/sys/kernel/security/ima/runtime_measurements_count"),)
APT = ("apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300")
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
KEEP_EDITS = ("-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold")

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="installs the packages: needs root (CI runs as root); the build and content "
    "checks here run without",
)


def version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return f"{tomllib.load(f)['project']['version']}-1"


def run(
    argv: list[str | Path],
    *,
    check: bool = True,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
    if check and done.returncode != 0:
        command = " ".join(map(str, argv))
        pytest.fail(f"{command} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


@dataclass(frozen=True)
class Built:
    dist: Path
    work: Path  # the build directory: no file of a package may name it

    def deb(self, package: str) -> Path:
        return self.dist / f"{package}_{version()}_amd64.deb"

    def stage(self, package: str) -> Path:
        return self.work / "debian" / package


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """The three packages, built as `make deb` builds them (with this venv's pip and pins);
    the 200 MB of build tree removed afterwards."""
    base = tmp_path_factory.mktemp("deb")
    out = Built(base / "dist", base / "work")
    build: list[str | Path] = [sys.executable, ROOT / "packaging" / "build_deb.py"]
    run([*build, "--out", out.dist, "--work", out.work], timeout=1200)
    yield out
    shutil.rmtree(base, ignore_errors=True)


def control(deb: Path, field: str) -> str:
    return run(["dpkg-deb", "--field", deb, field]).stdout.strip()


def listing(deb: Path) -> dict[str, str]:
    """Path (absolute) -> link target ("" for anything not a link), from `dpkg-deb -c`."""
    found = {}
    for line in run(["dpkg-deb", "-c", deb]).stdout.splitlines():
        name = line.split(None, 5)[5]
        path, _, target = name.partition(" -> ")
        found["/" + path.removeprefix("./").rstrip("/")] = target
    return found


# --- what the packages hold (no root) ----------------------------------------------------------


def test_control_fields_say_what_a_debian_admin_expects(built: Built) -> None:
    for package in PACKAGES:
        deb = built.deb(package)
        assert deb.exists(), f"make deb made no {deb.name}: {sorted(built.dist.iterdir())}"
        assert control(deb, "Package") == package
        assert control(deb, "Version") == version()
        assert control(deb, "Architecture") == "amd64"  # compiled extensions
        depends = control(deb, "Depends")
        # The venv runs on Debian's python3 3.11: its site-packages is python3.11's.
        assert "python3 (>= 3.11)" in depends
        assert "python3 (<< 3.12)" in depends
        assert "libc6" in depends, "dpkg-shlibdeps found no library: " + depends
    for package in ("devtrust-agent", "devtrust-verifier"):
        depends = control(built.deb(package), "Depends")
        assert "systemd" in depends  # sysusers, tmpfiles
        assert "libtss2-esys" in depends, f"{package}: tpm2-pytss's libraries: {depends}"
    assert "tpm-udev" in control(built.deb("devtrust-agent"), "Recommends")
    assert "libtss2" not in control(built.deb("devtrust-gate"), "Depends")


def test_conffiles_are_the_shipped_configurations(built: Built) -> None:
    for role in ("agent", "verifier"):
        deb = built.deb(f"devtrust-{role}")
        conffiles = run(["dpkg-deb", "--info", deb, "conffiles"]).stdout.split()
        assert conffiles == [f"/etc/devtrust/{role}.yaml"]
        shipped = (ROOT / "packaging" / "config" / f"{role}.yaml").read_bytes()
        packed = built.stage(f"devtrust-{role}") / f"etc/devtrust/{role}.yaml"
        assert packed.read_bytes() == shipped
    gate_info = run(["dpkg-deb", "--info", built.deb("devtrust-gate")]).stdout
    assert "conffiles" not in gate_info


def test_each_package_holds_its_role_and_its_files(built: Built) -> None:
    files = {p: listing(built.deb(p)) for p in PACKAGES}
    for command, role in COMMANDS.items():
        assert files[f"devtrust-{role}"][f"/usr/bin/{command}"] == (
            f"/opt/devtrust/{role}/bin/{command}"
        )
    for package in PACKAGES:
        assert f"/usr/share/doc/{package}/copyright" in files[package]
        assert f"/usr/share/doc/{package}/README.Debian" in files[package]
        assert f"/usr/share/doc/{package}/changelog.Debian.gz" in files[package]
    for package in ("devtrust-agent", "devtrust-verifier"):
        for path in (
            f"/usr/lib/systemd/system/{package}.service",
            f"/usr/lib/sysusers.d/{package}.conf",
            f"/usr/lib/tmpfiles.d/{package}.conf",
        ):
            assert path in files[package], f"{package} lacks {path}"
    # What a unit names (ExecStart's program, Documentation=) is in its package.
    for package in ("devtrust-agent", "devtrust-verifier"):
        unit = (built.stage(package) / f"usr/lib/systemd/system/{package}.service").read_text()
        named = re.findall(r"^ExecStart=(/\S+)", unit, re.MULTILINE)
        named += re.findall(r"file://(/\S+)", unit)
        assert named, unit
        for path in named:
            assert path in files[package], f"{package}.service names {path}, not in {package}"
    site = "/opt/devtrust/{}/lib/python3.11/site-packages/devtrust/{}/__init__.py"
    present = {
        ("agent", "agent"),
        ("agent", "spiffe"),
        ("verifier", "verifier"),
        ("verifier", "gate"),
        ("gate", "gate"),
    }
    absent = {
        ("agent", "verifier"),
        ("agent", "swtpm"),
        ("agent", "gate"),
        ("verifier", "agent"),
        ("verifier", "swtpm"),
        ("gate", "verifier"),
        ("gate", "agent"),
        ("gate", "swtpm"),
    }
    for role, part in present:
        assert site.format(role, part) in files[f"devtrust-{role}"], (role, part)
    for role, part in absent:
        assert site.format(role, part) not in files[f"devtrust-{role}"], (role, part)
    # bin/: the interpreter links, activate scripts and the role's commands only.
    for role in ("agent", "verifier", "gate"):
        scripts = {
            Path(p).name
            for p in files[f"devtrust-{role}"]
            if p.startswith(f"/opt/devtrust/{role}/bin/")
        }
        commands = {c for c, r in COMMANDS.items() if r == role}
        extra = {s for s in scripts - commands if not s.startswith(("python", "activate"))}
        assert extra <= {"Activate.ps1"}, f"{role}: {sorted(extra)}"
        assert commands <= scripts


def test_every_module_ships_compiled_for_its_opt_path(built: Built) -> None:
    """Every .py has its .pyc in the package (nothing written at run time to stay behind on
    purge), compiled for the path it runs from (tracebacks name /opt/devtrust/...)."""
    for package in PACKAGES:
        files = listing(built.deb(package))
        sources = [p for p in files if p.endswith(".py")]
        assert len(sources) > 100, package
        uncompiled = [
            s
            for s in sources
            if f"{Path(s).parent}/__pycache__/{Path(s).stem}.cpython-311.pyc" not in files
        ]
        assert not uncompiled, f"{package}: no .pyc for {uncompiled[:5]}"
        role = package.removeprefix("devtrust-")
        pyc = (
            built.stage(package)
            / f"opt/devtrust/{role}/lib/python3.11/site-packages/devtrust/__pycache__"
            / "__init__.cpython-311.pyc"
        )
        code = marshal.loads(pyc.read_bytes()[16:])  # noqa: S302 - our own build's bytecode
        assert code.co_filename == (
            f"/opt/devtrust/{role}/lib/python3.11/site-packages/devtrust/__init__.py"
        )


def test_no_file_names_the_build_directory(built: Built) -> None:
    """Scripts' shebangs, pyvenv.cfg, activate scripts, .pyc paths: everything names /opt."""
    marker = str(built.work).encode()
    held = []
    for package in PACKAGES:
        for path in built.stage(package).rglob("*"):
            if path.is_symlink():
                if str(built.work) in os.readlink(path):
                    held.append(path)
            elif path.is_file() and marker in path.read_bytes():
                held.append(path)
    assert not held, f"files naming {built.work}: {held[:10]}"
    venv = built.stage("devtrust-verifier") / "opt/devtrust/verifier"
    assert (
        (venv / "bin/devtrust-verifier")
        .read_text()
        .startswith("#!/opt/devtrust/verifier/bin/python\n")
    )
    assert "command = /usr/bin/python3 -m venv --without-pip /opt/devtrust/verifier" in (
        (venv / "pyvenv.cfg").read_text()
    )
    assert os.readlink(venv / "bin/python3") == "/usr/bin/python3"


def test_maintainer_scripts_are_sound_shell() -> None:
    for script in sorted((ROOT / "packaging" / "deb").glob("*/p*")):
        assert script.read_text().startswith("#!/bin/sh\n"), script
        run(["sh", "-n", script])


# --- installed on this machine (root) ------------------------------------------------------


def installed(package: str) -> bool:
    done = run(["dpkg-query", "-W", "-f", "${Status}", package], check=False)
    return done.returncode == 0 and done.stdout.endswith(" installed")


def purge() -> subprocess.CompletedProcess[str]:
    present = [p for p in PACKAGES if run(["dpkg-query", "-W", p], check=False).returncode == 0]
    if not present:
        return run(["true"])
    done = run([*APT, "purge", *present], env=APT_ENV, check=False)
    if done.returncode != 0:  # a half-installed package (a failed postinst): dpkg itself
        run(["dpkg", "--purge", "--force-remove-reinstreq", *present], check=False)
    return done


@contextlib.contextmanager
def machine_restored() -> Iterator[None]:
    """Refuse a machine with devtrust installed or configured (an admin's CA is never
    touched); afterwards purge, and take away what the installation and the test made
    (init's PKI, the system users), on failure too."""
    present = [p for p in PACKAGES if installed(p)]
    if present or Path("/opt/devtrust").exists():
        pytest.fail(
            f"{', '.join(present) or '/opt/devtrust'} already on this machine: this test "
            f"installs and purges its own build; run `apt-get purge {' '.join(PACKAGES)}` first"
        )
    if ETC.exists():
        pytest.fail(f"{ETC} exists on this machine (an admin's CA?): this test makes its own")
    # tmpfiles.d/devtrust-agent.conf gives group tss IMA's count: put back after.
    modes = {p: p.stat() for p in SECURITYFS if p.exists()}
    users_before = {u for u in USERS if _exists(pwd.getpwnam, u)}
    groups_before = {g for g in USERS if _exists(grp.getgrnam, g)}
    # What the packages make and purge removes: taken away here too if purge did not.
    made = [Path(p) for p in STATE if not Path(p).exists()]
    made += [WANTS / unit for unit in UNITS if not (WANTS / unit).is_symlink()]
    try:
        yield
    finally:
        purge()
        shutil.rmtree(ETC, ignore_errors=True)
        for path in made:
            if path.is_symlink():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
        for user in set(USERS) - users_before:
            run(["userdel", user], check=False)
        for group in set(USERS) - groups_before:
            if _exists(grp.getgrnam, group):
                run(["groupdel", group], check=False)
        for path, before in modes.items():
            os.chown(path, before.st_uid, before.st_gid)
            path.chmod(stat.S_IMODE(before.st_mode))


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def apt_install(*debs: Path, options: tuple[str, ...] = ()) -> str:
    return run([*APT, *options, "install", *debs], env=APT_ENV).stdout


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def shipped_addresses() -> dict[str, tuple[str, int]]:
    """The addresses the shipped verifier.yaml listens on (7443, 7444, metrics 9471)."""
    config = yaml.safe_load((ROOT / "packaging" / "config" / "verifier.yaml").read_text())
    listen = {**config["listen"], "metrics": (config.get("metrics") or {}).get("listen")}
    found = {}
    for name, address in listen.items():
        if address:
            host, _, port = str(address).rpartition(":")
            found[name] = (host, int(port))
    return found


def stray_files() -> list[str]:
    """Files under /opt/devtrust that no package owns (what Python would have written)."""
    owned = set()
    for package in PACKAGES:
        owned.update(run(["dpkg", "-L", package]).stdout.splitlines())
    found = {str(p) for p in Path("/opt/devtrust").rglob("*")}
    return sorted(found - owned)


IMPORT_ALL = """
import importlib, pkgutil, devtrust
failed = []
for m in pkgutil.walk_packages(devtrust.__path__, "devtrust."):
    try:
        importlib.import_module(m.name)
    except Exception as exc:
        failed.append(f"{m.name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
"""


def check_pki_modes() -> None:
    """init into the packaged directory: ca.key root's alone, the keys the service reads
    group devtrust (the group owning the directory), 0640."""
    devtrust_gid = grp.getgrnam("devtrust").gr_gid
    ca = PKI / "ca.key"
    info = ca.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, 0, 0)
    others = sorted(p for p in PKI.glob("*.key") if p != ca)
    assert others, f"init wrote no key besides ca.key in {PKI}"
    for key in others:
        info = key.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o640, devtrust_gid), (
            f"{key}: mode {stat.S_IMODE(info.st_mode):o}, gid {info.st_gid}: the service "
            f"(group devtrust, gid {devtrust_gid}) reads it"
        )


@contextlib.contextmanager
def credentials(ca_key: Path) -> Iterator[Path]:
    """A copy of ca.key as systemd's LoadCredential= gives it: a directory of the service
    user's, read-only."""
    user = pwd.getpwnam("devtrust")
    directory = Path(tempfile.mkdtemp(prefix="devtrust-credentials-"))
    try:
        copy = directory / "ca.key"
        shutil.copyfile(ca_key, copy)
        for path, mode in ((copy, 0o400), (directory, 0o500)):
            os.chown(path, user.pw_uid, user.pw_gid)
            path.chmod(mode)
        yield directory
    finally:
        shutil.rmtree(directory)


def wait_for_line(proc: subprocess.Popen[bytes], log: Path, pattern: str) -> str:
    """The first log line matching ``pattern``; fails with the log if the process ends or
    two minutes pass first."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        match = re.search(pattern, text)
        if match:
            return match.group(0)
        if proc.poll() is not None:
            pytest.fail(f"the installed verifier exited {proc.returncode} before serving:\n{text}")
        time.sleep(0.2)
    pytest.fail(f"the installed verifier logged no {pattern!r} in 120 s:\n{log.read_text()}")


def serve_as_devtrust(tmp_path: Path) -> None:
    """The installed verifier on the shipped /etc/devtrust/verifier.yaml, as its unit runs it:
    user devtrust, the CA key from a credentials directory. It serves (gRPC health on the
    enrollment port, over TLS with init's CA), then drains and exits 0 on SIGTERM."""
    addresses = shipped_addresses()
    for name, (host, port) in addresses.items():
        if port_in_use(host, port):
            pytest.fail(
                f"{host}:{port} is in use on this machine: the shipped verifier.yaml listens "
                f"there ({name}); stop what holds it and run the test again"
            )
    config = yaml.safe_load(Path("/etc/devtrust/verifier.yaml").read_text())
    log = tmp_path / "verifier.log"
    with credentials(PKI / "ca.key") as creds, log.open("wb") as out:
        argv = [
            *("setpriv", "--reuid=devtrust", "--regid=devtrust", "--init-groups"),
            *("/usr/bin/devtrust-verifier", "serve", "--config", "/etc/devtrust/verifier.yaml"),
            *("--ca-key", str(creds / "ca.key")),
        ]
        env = {"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(creds)}
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd="/")
        try:
            wait_for_line(proc, log, r"verifier listening: [^\n]*")
            status = Path(f"/proc/{proc.pid}/status").read_text()
            uid = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
            assert uid is not None
            assert int(uid.group(1)) == pwd.getpwnam("devtrust").pw_uid
            tls = grpc.ssl_channel_credentials((PKI / "ca.pem").read_bytes())
            enrollment = f"localhost:{addresses['enrollment'][1]}"
            with grpc.secure_channel(enrollment, tls) as channel:
                service = enrollment_pb2.DESCRIPTOR.services_by_name["Enrollment"].full_name
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=30
                )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            if "metrics" in addresses:
                host, port = addresses["metrics"]
                url = f"http://{host}:{port}/metrics"
                with urllib.request.urlopen(url, timeout=30) as reply:
                    assert b"devtrust_" in reply.read()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    database = Path(config["database"])
    assert database.exists()
    assert database.stat().st_uid == pwd.getpwnam("devtrust").pw_uid


def check_purged(pki_files: set[str]) -> None:
    for package in PACKAGES:
        assert not installed(package)
        assert run(["dpkg-query", "-W", package], check=False).returncode != 0, (
            f"dpkg still knows {package} (its configuration files?)"
        )
    assert run(["dpkg", "-S", "devtrust"], check=False).returncode != 0
    for path in (
        *STATE,
        "/etc/devtrust/agent.yaml",
        "/etc/devtrust/verifier.yaml",
        "/etc/devtrust/agent",
    ):
        assert not Path(path).exists(), f"{path} is left after purge"
    # What the admin made (init's PKI) is all that is left in /etc/devtrust.
    assert {str(p) for p in ETC.rglob("*")} == pki_files | {str(PKI)}
    for unit in UNITS:
        assert not (WANTS / unit).is_symlink(), f"{WANTS / unit} is left after purge"
        for state in DSH_STATE:
            left = list(state.rglob(f"*{unit}*")) if state.exists() else []
            assert not left, f"deb-systemd-helper state left: {left}"
    # The system users stay (Debian leaves system users: files may still be theirs).
    for user in USERS:
        assert _exists(pwd.getpwnam, user)


@needs_root
def test_install_run_and_purge(built: Built, tmp_path: Path) -> None:
    with machine_restored():
        output = apt_install(*(built.deb(p) for p in PACKAGES))
        assert "devtrust-verifier init --dir /etc/devtrust/verifier" in output  # next steps
        for command, role in COMMANDS.items():
            done = run([f"/usr/bin/{command}", "--version"])
            assert re.fullmatch(r"[\w-]+ \d+\.\d+\.\d+\S*\n", done.stdout), done.stdout
            assert Path(f"/usr/bin/{command}").resolve().is_relative_to(f"/opt/devtrust/{role}")
        for role in ("agent", "verifier", "gate"):
            failed = run([f"/opt/devtrust/{role}/bin/python", "-c", IMPORT_ALL]).stdout.strip()
            assert not failed, f"/opt/devtrust/{role}: modules that do not import:\n{failed}"
        # Users and directories (sysusers.d, tmpfiles.d).
        assert run(["getent", "passwd", "devtrust"]).stdout.split(":")[5] == "/var/lib/devtrust"
        assert "tss" in run(["id", "-nG", "devtrust-agent"]).stdout.split()
        info = PKI.stat()
        assert stat.S_IMODE(info.st_mode) == 0o750
        assert (info.st_uid, info.st_gid) == (0, grp.getgrnam("devtrust").gr_gid)
        for state, owner in (
            ("/var/lib/devtrust", "devtrust"),
            ("/var/lib/devtrust-agent", "devtrust-agent"),
        ):
            assert Path(state).owner() == owner
        # IMA's count readable by group tss, where this host has one.
        tss = grp.getgrnam("tss").gr_gid
        for path in SECURITYFS:
            if path.exists():
                assert (path.stat().st_gid, stat.S_IMODE(path.stat().st_mode)) == (tss, 0o440)
        # Enabled, not started (nothing here runs systemd; the link is what enable makes).
        for unit in UNITS:
            assert (WANTS / unit).resolve() == Path(f"/usr/lib/systemd/system/{unit}").resolve()
        verify = run(
            ["systemd-analyze", "verify", *Path("/usr/lib/systemd/system").glob("devtrust-*")],
            check=False,
        )
        complaints = [line for line in verify.stderr.splitlines() if "devtrust" in line]
        assert verify.returncode == 0, verify.stderr
        assert not complaints, "\n".join(complaints)

        # The agent as its service runs it (user devtrust-agent, group tss) on the shipped
        # agent.yaml: the configuration loads and the host's evidence body is collected.
        collect = run(
            [
                *("setpriv", "--reuid=devtrust-agent", "--regid=devtrust-agent", "--init-groups"),
                *("/usr/bin/devtrust-agent", "collect", "--config", "/etc/devtrust/agent.yaml"),
            ]
        )
        assert collect.stdout.startswith("host "), collect.stdout + collect.stderr

        run(["/usr/bin/devtrust-verifier", "init", "--dir", PKI, "--hostname", "localhost"])
        check_pki_modes()
        serve_as_devtrust(tmp_path)
        # The gate's command on init's files: a server certificate is no device's.
        gate = run(
            [
                "/usr/bin/devtrust-gate",
                "check",
                PKI / "server.pem",
                "--ca-bundle",
                PKI / "device-bundle.pem",
            ],
            check=False,
        )
        assert gate.returncode == 1, gate.stdout + gate.stderr
        assert "server certificate" in gate.stderr

        assert stray_files() == [], "files Python wrote beside the packaged ones"
        pki_files = {str(p) for p in PKI.iterdir()}
        done = purge()
        assert done.returncode == 0, done.stdout + done.stderr
        check_purged(pki_files)


@needs_root
def test_upgrade_keeps_the_admins_configuration_and_choices(built: Built, tmp_path: Path) -> None:
    """An upgrade to a package whose shipped agent.yaml changed: the edited file stays (the
    new one beside it as .dpkg-dist), the agent's state stays, and a service the admin
    disabled is not enabled again."""
    agent = built.deb("devtrust-agent")
    tree = tmp_path / "next"
    run(["dpkg-deb", "--raw-extract", agent, tree])
    shipped = tree / "etc/devtrust/agent.yaml"
    shipped.write_text(shipped.read_text() + "# a later release's comment\n")
    control_file = tree / "DEBIAN/control"
    control_file.write_text(
        control_file.read_text().replace(f"Version: {version()}", "Version: 999")
    )
    md5sums = tree / "DEBIAN/md5sums"
    assert "etc/devtrust/agent.yaml" not in md5sums.read_text()  # conffiles: dpkg's own sums
    upgrade = tmp_path / "devtrust-agent_999_amd64.deb"
    run(["dpkg-deb", "--root-owner-group", "-Zzstd", "--build", tree, upgrade])

    config = Path("/etc/devtrust/agent.yaml")
    unit = "devtrust-agent.service"
    with machine_restored():
        apt_install(agent)
        edited = config.read_text().replace(
            'enrollment: "verifier.example.internal:7443"', 'enrollment: "verifier.lan:7443"'
        )
        assert "verifier.lan" in edited
        config.write_text(edited)
        state = Path("/var/lib/devtrust-agent/kept")
        state.write_text("the agent's state\n")
        run(["systemctl", "disable", unit])  # works on the files where systemd is not running
        assert not (WANTS / unit).exists()

        apt_install(upgrade, options=KEEP_EDITS)
        assert run(["dpkg-query", "-W", "-f", "${Version}", "devtrust-agent"]).stdout == "999"
        assert config.read_text() == edited
        assert Path(f"{config}.dpkg-dist").read_text() == shipped.read_text()
        assert state.read_text() == "the agent's state\n"
        assert not (WANTS / unit).exists(), "the upgrade enabled a unit the admin disabled"

        # The same package again (a reinstall) keeps the edit too.
        run(["dpkg", "--force-confdef", "--force-confold", "-i", upgrade], env=APT_ENV)
        assert config.read_text() == edited
        done = purge()
        assert done.returncode == 0, done.stdout + done.stderr
        for path in (config, Path(f"{config}.dpkg-dist"), state.parent):
            assert not path.exists(), f"{path} is left after purge"
