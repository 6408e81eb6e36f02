"""Build the Debian packages devtrust-agent, devtrust-verifier and devtrust-gate (``make deb``).

Each package holds a Python environment at /opt/devtrust/ROLE made with Debian's
/usr/bin/python3, so that it runs on the python3 package it depends on and on nothing of
the build machine, holding devtrust (only the role's part of it) and the role's
dependencies at the versions of the project's .venv: the ones the tests ran with. No
debhelper: the staged tree is made here and packed with ``dpkg-deb --root-owner-group``;
``dpkg-shlibdeps`` computes the libraries the compiled extensions need (tpm2-pytss links
Debian's libtss2).

Steps: one wheel of devtrust; a wheelhouse of every role's dependencies (pip's cache makes
it quick after the first time); then per role a venv, installed offline from the
wheelhouse, pruned to the role, moved from the staging directory to /opt (script
shebangs, pyvenv.cfg, activate scripts), byte-compiled as /opt paths (the package ships
the .pyc files, so that nothing Python writes at run time stays behind on purge), with the
units, sysusers.d and tmpfiles.d files, the shipped configuration as a conffile and the
maintainer scripts of packaging/deb/ROLE.

Run with the project's .venv (its pip and its packages' versions)::

    .venv/bin/python packaging/build_deb.py --out dist
"""

from __future__ import annotations

import argparse
import configparser
import datetime
import email.utils
import gzip
import hashlib
import importlib.metadata
import io
import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEB = ROOT / "packaging" / "deb"
SYSTEM_PYTHON = Path("/usr/bin/python3")
REVISION = "1"
MAINTAINER = "devtrust maintainers <maintainers@users.noreply.r-seed-451fd094.example>"
# The commands [project.scripts] makes; each package keeps its role's.
ALL_COMMANDS = ("devtrust-agent", "devtrust-verifier", "devtrust", "devtrust-gate", "devtrust-demo")
# What `python3 -m venv` puts in bin/.
VENV_FILES = ("python", "activate", "Activate.ps1")
# What the wheel is built from (pyproject's package-dir folders, its readme).
SOURCES = ("pyproject.toml", "README.md", "protos/devtrust", "agent", "verifier", "swtpm")


@dataclass(frozen=True)
class Role:
    """One binary package: what of devtrust it keeps, its commands and its files."""

    name: str  # the folder under packaging/deb and /opt/devtrust
    # Entries of the installed devtrust/ package kept (subpackages, modules, data files).
    keep: tuple[str, ...]
    commands: tuple[str, ...]
    service: bool  # a unit, sysusers.d and tmpfiles.d file, a conffile

    @property
    def package(self) -> str:
        return f"devtrust-{self.name}"

    @property
    def prefix(self) -> str:
        return f"/opt/devtrust/{self.name}"


# tests/test_layers.py keeps the import boundaries these rest on: the agent imports neither
# the verifier nor swtpm, the verifier not the agent, the gate only core (and devtrust.v1
# for its revocation follower). `devtrust simulate` (agents and software TPMs) is left out:
# it is a test and demonstration tool of a source checkout.
BASE = ("__init__.py", "py.typed", "core", "v1")
ROLES = (
    Role("agent", (*BASE, "agent", "spiffe"), ("devtrust-agent",), service=True),
    Role(
        "verifier",
        (*BASE, "verifier", "gate", "cli.py"),
        ("devtrust-verifier", "devtrust"),
        service=True,
    ),
    Role("gate", (*BASE, "gate", "example"), ("devtrust-gate",), service=False),
)


class BuildError(Exception):
    """A step failed: the message says which and why."""


def run(argv: Sequence[str | Path], *, cwd: Path | None = None) -> str:
    """Run a tool; its output is shown only when it fails."""
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        output = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
        raise BuildError(f"{' '.join(map(str, argv))} exited {done.returncode}:\n{output}")
    return done.stdout


class Clock:
    """Prints each step and its seconds, so that a slow step shows itself."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()

    def step(self, what: str) -> None:
        now = time.monotonic()
        print(f"  {what}: {now - self.last:.1f} s", flush=True)
        self.last = now


def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def constraints(path: Path) -> Path:
    """Every distribution of the running environment (the project's .venv) at its version,
    as pip constraints: the packages get what the tests ran with."""
    pins = sorted(
        f"{d.metadata['Name']}=={d.version}"
        for d in importlib.metadata.distributions()
        if d.metadata["Name"] and d.metadata["Name"].lower() != "devtrust"
    )
    path.write_text("\n".join(pins) + "\n")
    return path


def build_wheel(work: Path) -> Path:
    """One wheel of devtrust, built from a copy of the sources so that the checkout gets no
    build/ or egg-info."""
    src = work / "src"
    for name in SOURCES:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(
                origin, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, src / name)
    wheels = work / "devtrust-wheel"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, src])
    (wheel,) = wheels.glob("devtrust-*.whl")
    return wheel


def build_wheelhouse(work: Path, pins: Path) -> Path:
    house = work / "wheelhouse"
    requirements = [a for r in ROLES for a in ("-r", DEB / r.name / "requirements.txt")]
    run([sys.executable, "-m", "pip", "wheel", "-q", "-w", house, "-c", pins, *requirements])
    return house


# --- one role's environment -------------------------------------------------------------


def make_venv(role: Role, stage: Path, wheel: Path, house: Path, pins: Path) -> Path:
    venv = stage / role.prefix.lstrip("/")
    run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", python, "install", "-q"]
    offline: list[str | Path] = ["--no-compile", "--no-index", "--find-links", house]
    run([*pip, *offline, "-c", pins, "-r", DEB / role.name / "requirements.txt"])
    run([*pip, *offline, "--no-deps", wheel])
    prune(role, venv)
    return venv


def site_packages(venv: Path) -> Path:
    (found,) = (venv / "lib").glob("python3.*/site-packages")
    return found


def prune(role: Role, venv: Path) -> None:
    """Take out the other roles' code and commands, and devtrust's direct_url.json (a
    file: URL of the build directory), keeping its RECORD and entry points true."""
    site = site_packages(venv)
    package = site / "devtrust"
    gone: list[Path] = []
    for entry in sorted(package.iterdir()):
        if entry.name not in role.keep:
            gone.append(entry)
    # bin/ keeps the interpreter, the activate scripts and the role's commands: not the other
    # roles' nor the dependencies' (cel, typer, pygmentize...), which nothing here runs.
    for path in sorted((venv / "bin").iterdir()):
        if not path.name.startswith(VENV_FILES) and path.name not in role.commands:
            gone.append(path)
    (info,) = site.glob("devtrust-*.dist-info")
    gone.append(info / "direct_url.json")
    for path in gone:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    removed = {p.resolve() for p in gone}
    record = info / "RECORD"
    lines = [
        line
        for line in record.read_text().splitlines()
        if not any(
            p == (site / line.split(",", 1)[0]).resolve()
            or p in (site / line.split(",", 1)[0]).resolve().parents
            for p in removed
        )
    ]
    record.write_text("\n".join(lines) + "\n")
    points = configparser.ConfigParser(interpolation=None)
    points.optionxform = str  # type: ignore[assignment,method-assign]
    points.read(info / "entry_points.txt")
    for command in ALL_COMMANDS:
        if command not in role.commands:
            points.remove_option("console_scripts", command)
    text = io.StringIO()
    points.write(text)
    (info / "entry_points.txt").write_text(text.getvalue())


def relocate(venv: Path, stage: Path) -> None:
    """The staging path out of the text files that hold it (script shebangs, pyvenv.cfg,
    activate scripts); any other file holding it stops the build."""
    staged = str(stage).encode()
    for path in sorted(p for p in venv.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        if staged not in data:
            continue
        if path.parent != venv / "bin" and path != venv / "pyvenv.cfg":
            raise BuildError(f"{path} holds the staging path {stage}: nothing rewrites it")
        path.write_bytes(data.replace(staged, b""))


def compile_bytecode(venv: Path, stage: Path) -> None:
    """The .pyc files, made by the python3 that runs them, naming /opt paths (tracebacks).
    checked-hash: valid whatever the files' times become in the package."""
    run(
        [
            SYSTEM_PYTHON,
            "-m",
            "compileall",
            "-q",
            "-j0",
            "--invalidation-mode",
            "checked-hash",
            "-s",
            stage,
            "-p",
            "/",
            site_packages(venv),
        ]
    )


# --- the package tree ---------------------------------------------------------------------


def install_file(source: Path, target: Path, mode: int = 0o644) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(mode)


def changelog(role: Role, version: str) -> bytes:
    """The changelog.Debian Debian policy asks every package for: this build's one entry."""
    when = email.utils.format_datetime(datetime.datetime.now(datetime.UTC))  # ... +0000
    text = (
        f"{role.package} ({version}) unstable; urgency=medium\n\n"
        f"  * Built by `make deb` from the devtrust source (packaging/build_deb.py).\n\n"
        f" -- {MAINTAINER}  {when}\n"
    )
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def add_files(role: Role, stage: Path, version: str) -> list[str]:
    """Everything but the venv; returns the conffiles."""
    for command in role.commands:
        link = stage / "usr/bin" / command
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"{role.prefix}/bin/{command}")
    doc = stage / "usr/share/doc" / role.package
    install_file(DEB / "copyright", doc / "copyright")
    install_file(DEB / role.name / "README.Debian", doc / "README.Debian")
    (doc / "changelog.Debian.gz").write_bytes(changelog(role, version))
    if not role.service:
        return []
    packaging = ROOT / "packaging"
    name = role.package
    install_file(
        packaging / "systemd" / f"{name}.service", stage / f"usr/lib/systemd/system/{name}.service"
    )
    install_file(
        packaging / "sysusers.d" / f"{name}.conf", stage / f"usr/lib/sysusers.d/{name}.conf"
    )
    install_file(
        packaging / "tmpfiles.d" / f"{name}.conf", stage / f"usr/lib/tmpfiles.d/{name}.conf"
    )
    conffile = f"/etc/devtrust/{role.name}.yaml"
    install_file(packaging / "config" / f"{role.name}.yaml", stage / conffile.lstrip("/"))
    if role.name == "agent":
        (stage / "etc/devtrust/agent").mkdir()  # for the verifier's CA certificate
    return [conffile]


def shlibs_depends(role: Role, stage: Path, work: Path) -> str:
    """Debian's libraries the compiled extensions link (dpkg-shlibdeps, in the debian/ layout
    it expects: debian/control, the tree at debian/PACKAGE)."""
    elves = sorted(
        str(p.relative_to(work))
        for p in stage.rglob("*.so*")
        if p.is_file() and not p.is_symlink() and p.read_bytes()[:4] == b"\x7fELF"
    )
    # DEBIAN/ marks the package's root, where $ORIGIN in the RPATH of a wheel's bundled
    # libraries (psycopg-binary's) is resolved.
    (stage / "DEBIAN").mkdir(exist_ok=True)
    control = work / "debian" / "control"
    control.write_text(f"Source: devtrust\n\nPackage: {role.package}\nArchitecture: amd64\n")
    out = run(["dpkg-shlibdeps", "-O", "--warnings=0", *elves], cwd=work)
    match = re.search(r"^shlibs:Depends=(.*)$", out, re.MULTILINE)
    if match is None:
        raise BuildError(f"dpkg-shlibdeps gave no shlibs:Depends for {role.package}: {out}")
    return match.group(1)


def installed_size(stage: Path) -> int:
    """KiB, as dpkg-gencontrol counts: each file rounded up, one per directory or link."""
    total = 0
    for path in stage.rglob("*"):
        if path.is_relative_to(stage / "DEBIAN"):
            continue
        if path.is_file() and not path.is_symlink():
            total += (path.stat().st_size + 1023) // 1024
        else:
            total += 1
    return total


def write_control(
    role: Role, stage: Path, conffiles: list[str], depends: str, version: str
) -> None:
    control = stage / "DEBIAN"
    control.mkdir(exist_ok=True)
    template = string.Template((DEB / role.name / "control").read_text())
    (control / "control").write_text(
        template.substitute(
            version=version,
            maintainer=MAINTAINER,
            installed_size=installed_size(stage),
            shlibs_depends=depends,
        )
    )
    if conffiles:
        (control / "conffiles").write_text("".join(f"{c}\n" for c in conffiles))
    for script in ("postinst", "prerm", "postrm"):
        if (DEB / role.name / script).exists():
            install_file(DEB / role.name / script, control / script, 0o755)
    sums = []
    for path in sorted(p for p in stage.rglob("*") if p.is_file() and not p.is_symlink()):
        relative = path.relative_to(stage)
        if relative.parts[0] == "DEBIAN" or f"/{relative}" in conffiles:
            continue
        sums.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {relative}\n")  # noqa: S324 - dpkg's md5sums
    (control / "md5sums").write_text("".join(sums))


def check_tree(stage: Path, work: Path) -> None:
    """No file of the package names the build directory."""
    marker = str(work).encode()
    for path in stage.rglob("*"):
        if path.is_symlink():
            if str(work) in os.readlink(path):
                raise BuildError(f"{path} links into the build directory {work}")
        elif path.is_file() and marker in path.read_bytes():
            raise BuildError(f"{path} names the build directory {work}")


def build_role(
    role: Role,
    work: Path,
    out: Path,
    *,
    wheel: Path,
    house: Path,
    pins: Path,
    version: str,
    clock: Clock,
) -> Path:
    stage = work / "debian" / role.package
    venv = make_venv(role, stage, wheel, house, pins)
    relocate(venv, stage)
    clock.step(f"{role.package}: venv")
    compile_bytecode(venv, stage)
    clock.step(f"{role.package}: bytecode")
    conffiles = add_files(role, stage, version)
    depends = shlibs_depends(role, stage, work)
    clock.step(f"{role.package}: dpkg-shlibdeps")
    write_control(role, stage, conffiles, depends, version)
    check_tree(stage, work)
    deb = out / f"{role.package}_{version}_amd64.deb"
    # zstd: seconds where xz takes minutes on these trees; dpkg and apt read it since bookworm.
    run(["dpkg-deb", "--root-owner-group", "-Zzstd", "--build", stage, deb])
    clock.step(f"{role.package}: dpkg-deb")
    return deb


def build(out: Path, work: Path, roles: Sequence[Role], clock: Clock) -> list[Path]:
    if not SYSTEM_PYTHON.exists():
        raise BuildError(f"{SYSTEM_PYTHON} is missing: the packages are built on Debian's python3")
    version = f"{project_version()}-{REVISION}"
    if work.exists() and any(work.iterdir()):
        raise BuildError(f"--work {work} is not empty: give a new directory")
    out.mkdir(parents=True, exist_ok=True)
    (work / "debian").mkdir(parents=True)
    pins = constraints(work / "constraints.txt")
    wheel = build_wheel(work)
    clock.step(f"wheel {wheel.name}")
    house = build_wheelhouse(work, pins)
    clock.step("wheelhouse of the dependencies")
    return [
        build_role(
            role, work, out, wheel=wheel, house=house, pins=pins, version=version, clock=clock
        )
        for role in roles
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the .deb files go")
    parser.add_argument(
        "--work",
        type=Path,
        help="an empty build directory, kept (default: a temporary one, removed)",
    )
    parser.add_argument(
        "--role", action="append", choices=[r.name for r in ROLES], help="only this (repeatable)"
    )
    args = parser.parse_args(argv)
    roles = [r for r in ROLES if args.role is None or r.name in args.role]
    clock = Clock()
    try:
        if args.work is not None:
            debs = build(args.out.resolve(), args.work.resolve(), roles, clock)
        else:
            with tempfile.TemporaryDirectory(prefix="devtrust-deb-") as tmp:
                debs = build(args.out.resolve(), Path(tmp), roles, clock)
    except BuildError as exc:
        print(f"build_deb: {exc}", file=sys.stderr)
        return 1
    for deb in debs:
        print(f"{deb} ({deb.stat().st_size // 1024} KiB)")
    print(f"built in {time.monotonic() - clock.started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
