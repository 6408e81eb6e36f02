"""`devtrust-verifier init` and the service's group (brief 13's contract): the keys the
service reads (server key, device issuing CA key) are 0640 with the group that runs it, given
by --group or taken from the directory it is made in when that is the service's group
(the package makes /etc/devtrust/verifier root:devtrust 0750; no other group is inferred);
ca.key stays 0600 and the caller's, for systemd's LoadCredential= alone. Modes are exact
whatever the umask."""

from __future__ import annotations

import grp
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtrust.verifier import pki
from devtrust.verifier.main import main

SERVICE_KEYS = ("server.key", "device-ca.key", "ear.key")


@pytest.fixture
def other_group() -> grp.struct_group:
    """A group that is not the caller's primary one (the test runs as root, as on CI)."""
    assert os.geteuid() == 0, "this test gives files to another group: run it as root"
    return next(g for g in grp.getgrall() if g.gr_gid != os.getegid())


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)  # as the unit's UMask=0077, and many admins' shells
    yield
    os.umask(old)


def _access(path: Path) -> tuple[int, int]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_gid


def _init(directory: Path, *extra: str) -> int:
    return main(["init", "--dir", str(directory), "--hostname", "localhost", *extra])


@pytest.fixture
def service_group(other_group: grp.struct_group, monkeypatch: pytest.MonkeyPatch) -> None:
    """``other_group`` plays the service's group (devtrust, made by the package: CI has no
    package installed)."""
    monkeypatch.setattr(pki, "SERVICE_GROUP", other_group.gr_name)


@pytest.mark.usefixtures("strict_umask", "service_group")
def test_group_of_the_directory(
    tmp_path: Path, other_group: grp.struct_group, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "verifier"
    directory.mkdir(mode=0o750)
    os.chown(directory, -1, other_group.gr_gid)
    assert _init(directory) == 0
    for name in SERVICE_KEYS:
        assert _access(directory / name) == (0o640, other_group.gr_gid), name
    assert _access(directory / "ca.key") == (0o600, os.getegid())
    assert _access(directory / "ca.pem")[0] == 0o644
    err = capsys.readouterr().err
    assert f"group {other_group.gr_name} (the group owning {directory}) may read them" in err
    assert "ca.key 0600, yours only" in err


@pytest.mark.usefixtures("strict_umask")
def test_another_group_of_the_directory_is_not_inferred(
    tmp_path: Path, other_group: grp.struct_group, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory whose group is not the service's (a setgid /srv of group staff, one made
    by hand): the keys stay the caller's; that group needs --group, said in the output."""
    assert other_group.gr_name != pki.SERVICE_GROUP
    directory = tmp_path / "srv-pki"
    directory.mkdir(mode=0o750)
    os.chown(directory, -1, other_group.gr_gid)
    assert _init(directory) == 0
    for name in (*SERVICE_KEYS, "ca.key"):
        assert _access(directory / name) == (0o600, os.getegid()), name
    assert "give --group GROUP" in capsys.readouterr().err


@pytest.mark.usefixtures("strict_umask")
def test_group_given(tmp_path: Path, other_group: grp.struct_group) -> None:
    directory = tmp_path / "new"  # made by init: owned by the caller's group
    assert _init(directory, "--group", other_group.gr_name) == 0
    for name in SERVICE_KEYS:
        assert _access(directory / name) == (0o640, other_group.gr_gid), name
    assert _access(directory / "ca.key") == (0o600, os.getegid())


def test_own_group_keeps_keys_private(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory of the caller's own group (a personal one, a test's): nothing is shared."""
    assert _init(tmp_path / "mine") == 0
    for name in (*SERVICE_KEYS, "ca.key"):
        assert _access(tmp_path / "mine" / name) == (0o600, os.getegid()), name
    assert "give --group GROUP" in capsys.readouterr().err


def test_unknown_group_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _init(tmp_path / "x", "--group", "no-such-group-13") == 2
    err = capsys.readouterr().err
    assert err.startswith("devtrust-verifier: --group no-such-group-13: no such group")
    assert not (tmp_path / "x" / "ca.key").exists()


def test_rotation_keeps_the_group(tmp_path: Path, other_group: grp.struct_group) -> None:
    """`ca rotate` after such an init makes the next device CA key for the same group
    (verifier/device_pki.py follows the key there)."""
    directory = tmp_path / "verifier"
    assert _init(directory, "--group", other_group.gr_name) == 0
    assert main(["ca", "rotate", "--dir", str(directory)]) == 0
    assert _access(directory / "device-ca-next.key") == (0o640, other_group.gr_gid)


@pytest.mark.usefixtures("strict_umask")
def test_backup_copy_is_never_more_open_than_the_key(tmp_path: Path) -> None:
    """Without hard links, the backup is a copy: made 0600 and then given the key's mode,
    never the umask's 0644 (review 13b L2)."""
    os.umask(0o022)
    key = tmp_path / "ca.key"
    key.write_bytes(b"secret")
    key.chmod(0o600)
    backup = tmp_path / "ca.key.bak"
    seen: list[int] = []
    real_fchmod = os.fchmod

    def spy(fd: int, mode: int) -> None:  # the copy's mode once its bytes are in
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fchmod(fd, mode)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fchmod", spy)
        pki._copy_private(key, backup)
    assert backup.read_bytes() == b"secret"
    assert _access(backup)[0] == 0o600
    assert seen == [0o600]
