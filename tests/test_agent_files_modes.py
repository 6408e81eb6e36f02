"""The files the agent shares with workloads keep their modes under the unit (review 13b,
H2): UMask=0077, a non-root user, the unit's seccomp filter. device.pem and ca-bundle.pem are
0644 (workloads read them by name), device.key 0600, or 0640 with workload_api.key_group as
its group; each mode is set on the open file, whatever the umask.

The sandboxed case runs as the unit does: a child that drops to a non-root uid with only the
key group, umask 077, then loads the agent unit's seccomp rules (tests/test_sdnotify.py's
sandbox), then writes the identity files with the agent's own code. A copy of the unit
without its ``SystemCallFilter=@chown`` line shows the filter is what decides."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtrust.core.files import write_atomic
from tests.test_sdnotify import AGENT_UNIT, ROOT

NOBODY = 65534
# A group the child is in that is not its primary one (the key's group): any gid will do.
KEY_GID = 4242

CHILD = """
import datetime, os, sys
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from devtrust.agent.state import AgentFiles, key_pem, new_key
from tests.test_sdnotify import enter_sandbox

runtime, unit, gid = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
key = new_key()
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d")])
now = datetime.datetime.now(datetime.UTC)
cert = (
    x509.CertificateBuilder().subject_name(name).issuer_name(name)
    .public_key(key.public_key()).serial_number(1)
    .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
    .sign(key, hashes.SHA256())
)
pem = cert.public_bytes(serialization.Encoding.PEM)
files = AgentFiles(runtime / "state", runtime, key_gid=gid)
# As systemd starts the agent: its user, one supplementary group, UMask=0077, the filter.
os.setgroups([gid])
os.setgid(NOBODY := 65534)
os.setuid(NOBODY)
os.umask(0o077)
enter_sandbox(unit)
try:
    files._write_device_certificate(key_pem(key), pem, pem)
except OSError as exc:
    print(f"{type(exc).__name__}: {exc}")
    sys.exit(1)
"""


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    yield
    os.umask(old)


def _mode(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


@pytest.mark.usefixtures("strict_umask")
def test_write_atomic_gives_the_mode_asked_whatever_the_umask(tmp_path: Path) -> None:
    for mode in (0o644, 0o640, 0o600):
        path = tmp_path / f"f{mode:o}"
        write_atomic(path, b"x", mode=mode)
        assert _mode(path)[0] == mode, oct(mode)


@pytest.mark.usefixtures("strict_umask")
def test_write_atomic_replaces_a_symlink_not_its_target(tmp_path: Path) -> None:
    """The mode goes to the new file, never through a link put at the path (review L1)."""
    target = tmp_path / "secret"
    target.write_bytes(b"s")
    target.chmod(0o600)
    link = tmp_path / "ca.pem"
    link.symlink_to(target)
    write_atomic(link, b"new", mode=0o644)
    assert not link.is_symlink()
    assert _mode(target)[0] == 0o600
    assert target.read_bytes() == b"s"


@pytest.fixture
def runtime() -> Iterator[Path]:
    """A directory the non-root child may write: under /tmp (pytest's own is root's 0700)."""
    with tempfile.TemporaryDirectory(prefix="devtrust-modes-") as top:
        os.chmod(top, 0o755)  # noqa: S103 - traversable by the child's uid
        run = Path(top) / "run"
        run.mkdir()
        os.chown(run, NOBODY, NOBODY)
        yield run


def _child(runtime: Path, unit: Path) -> subprocess.CompletedProcess[str]:
    assert os.geteuid() == 0, "this test drops to another uid, as systemd does: run it as root"
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(runtime), str(unit), str(KEY_GID)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


def test_identity_files_under_the_unit(runtime: Path) -> None:
    done = _child(runtime, AGENT_UNIT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _mode(runtime / "device.key") == (0o640, NOBODY, KEY_GID)
    assert _mode(runtime / "device.pem") == (0o644, NOBODY, NOBODY)
    assert _mode(runtime / "ca-bundle.pem") == (0o644, NOBODY, NOBODY)


def test_without_chown_in_the_filter_the_key_cannot_be_shared(runtime: Path) -> None:
    """The same with the unit's ``SystemCallFilter=@chown`` left out: fchown is refused."""
    unit = runtime.parent / AGENT_UNIT.name  # the child reads it as its non-root user
    text = AGENT_UNIT.read_text()
    assert "\nSystemCallFilter=@chown\n" in text
    unit.write_text(text.replace("\nSystemCallFilter=@chown\n", "\n"))
    done = _child(runtime, unit)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "PermissionError: [Errno 1] Operation not permitted" in done.stdout
