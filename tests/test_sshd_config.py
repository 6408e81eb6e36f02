"""Issue 8, item 7: sshd_config read as sshd reads it (agent/posture.py ``sshd_settings``).

Each case is a small configuration tree and what sshd makes of it: the effective global
PermitRootLogin and PasswordAuthentication, or a refusal. Every case is read twice by the
agent: from a posture root (Includes under ``ROOT/etc/ssh``) and from absolute paths (as
``sshd -f FILE`` reads them). Where the machine has sshd, ``sshd -T -f FILE`` reads the same
files and must agree, refusals included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from devtrust.agent.posture import SshdConfigError, collect_posture, sshd_settings

# sshd installed, or unpacked by `make test` (openssh-server and libwrap0 from the apt
# archive, not installed: no service, no open port) into .cache/openssh-server.
UNPACKED = Path(__file__).resolve().parent.parent / ".cache" / "openssh-server"
SSHD = "/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else str(UNPACKED / "usr/sbin/sshd")
SSHD_ENV = {
    **os.environ,
    "LD_LIBRARY_PATH": ":".join(
        str(UNPACKED / d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
    ),
}
DEFAULT = ("prohibit-password", "yes")


@dataclass(frozen=True)
class Case:
    name: str
    config: str
    # (PermitRootLogin, PasswordAuthentication), or None when sshd refuses the file.
    expected: tuple[str, str] | None
    # Other files, relative to the Include directory ("{dir}" in the text: /etc/ssh there).
    files: dict[str, str] = field(default_factory=dict)
    error: str = ""  # in SshdConfigError's message


CASES = [
    Case("blank", "PermitRootLogin no\n", ("no", "yes")),
    Case("equals", "PermitRootLogin=no\n", ("no", "yes")),
    Case("tab", "PermitRootLogin\tno\n", ("no", "yes")),
    Case("equals between blanks", "PermitRootLogin = no\n", ("no", "yes")),
    Case("equals then blank", "PermitRootLogin= no\nPasswordAuthentication =no\n", ("no", "no")),
    Case("blanks, tab and equals", "PermitRootLogin \t=\t no\n", ("no", "yes")),
    Case(
        "keyword and value in any case",
        "PERMITROOTLOGIN No\npasswordauthentication NO\n",
        ("no", "no"),
    ),
    Case("first value wins", "PermitRootLogin no\nPermitRootLogin yes\n", ("no", "yes")),
    Case("indented", "   \tPermitRootLogin no\n", ("no", "yes")),
    Case("comment after the value", "PermitRootLogin no # never\n", ("no", "yes")),
    Case("commented out", "#PermitRootLogin yes\n# PasswordAuthentication no\n", DEFAULT),
    Case("double-quoted value", 'PermitRootLogin "no"\n', ("no", "yes")),
    Case("single-quoted value", "PermitRootLogin 'yes'\n", ("yes", "yes")),
    Case("quoted keyword", '"PermitRootLogin" no\n', ("no", "yes")),
    Case("old name", "PermitRootLogin without-password\n", ("prohibit-password", "yes")),
    Case(
        "forced commands", "PermitRootLogin forced-commands-only\n", ("forced-commands-only", "yes")
    ),
    Case("CRLF line ends", "PermitRootLogin no\r\nPasswordAuthentication no\r\n", ("no", "no")),
    Case("nothing set: compiled-in defaults", "Port 22\n", DEFAULT),
    Case(
        "a conditional Match block does not leak",
        "PasswordAuthentication no\nMatch User alice\n  PermitRootLogin yes\n"
        "  PasswordAuthentication yes\n",
        ("prohibit-password", "no"),
    ),
    Case(
        "Match Address does not leak either",
        "Match Address 10.0.0.0/8\nPermitRootLogin yes\n",
        DEFAULT,
    ),
    Case(
        "Match all ends a conditional block",
        "Match User bob\nPermitRootLogin yes\nMatch all\nPermitRootLogin no\n",
        ("no", "yes"),
    ),
    Case(
        "Match all applies to every connection, over the global value",
        "PermitRootLogin yes\nMatch all\nPermitRootLogin no\n",
        ("no", "yes"),
    ),
    Case(
        "Include in place, before a later line",
        "Include {dir}/sshd_config.d/*.conf\nPermitRootLogin yes\n",
        ("no", "no"),
        files={
            "sshd_config.d/10-hardening.conf": "PermitRootLogin no\nPasswordAuthentication no\n"
        },
    ),
    Case(
        "Include after a line: the earlier line wins",
        "PermitRootLogin yes\nInclude {dir}/sshd_config.d/*.conf\n",
        ("yes", "yes"),
        files={"sshd_config.d/10-hardening.conf": "PermitRootLogin no\n"},
    ),
    Case(
        "Include globs are sorted",
        "Include {dir}/sshd_config.d/*.conf\n",
        ("no", "yes"),
        files={
            "sshd_config.d/20-late.conf": "PermitRootLogin yes\n",
            "sshd_config.d/10-early.conf": "PermitRootLogin no\n",
        },
    ),
    Case(
        "a glob does not match hidden files",
        "Include {dir}/sshd_config.d/*\n",
        DEFAULT,
        files={"sshd_config.d/.hidden.conf": "PermitRootLogin yes\n"},
    ),
    Case(
        "Include of nothing",
        "Include {dir}/sshd_config.d/*.conf\nPermitRootLogin no\n",
        ("no", "yes"),
    ),
    Case(
        "a Match in an included file ends with that file",
        "Include {dir}/sshd_config.d/*.conf\nPermitRootLogin no\n",
        ("no", "yes"),
        files={"sshd_config.d/50-cloud.conf": "Match User ci\nPermitRootLogin yes\n"},
    ),
    Case(
        "an Include inside a conditional block applies to that block only",
        "Match User bob\nInclude {dir}/sshd_config.d/*.conf\n",
        DEFAULT,
        files={"sshd_config.d/50-x.conf": "Match all\nPermitRootLogin yes\n"},
    ),
    Case(
        "several patterns on one Include",
        "Include {dir}/a.conf {dir}/b.conf\n",
        ("yes", "no"),
        files={"a.conf": "PasswordAuthentication no\n", "b.conf": "PermitRootLogin yes\n"},
    ),
    Case(
        "an unknown value", "PermitRootLogin maybe\n", None, error="line 1: PermitRootLogin maybe"
    ),
    Case("a keyword alone", "PermitRootLogin\n", None, error="no argument after keyword"),
    Case(
        "only a comment after the keyword",
        "PermitRootLogin # no\n",
        None,
        error="PermitRootLogin (nothing)",
    ),
    Case("two values", "PermitRootLogin no yes\n", None, error="PermitRootLogin no yes"),
    Case("two equals signs", "PermitRootLogin==no\n", None, error="PermitRootLogin =no"),
    Case("an open quote", 'PermitRootLogin "no\n', None, error="invalid quotes"),
    Case("Match without criteria", "Match\n", None, error="no argument after keyword"),
    Case("Match all with more", "Match all User bob\n", None, error="cannot be combined"),
    Case("Match User without a name", "Match User # x\n", None, error="Match User needs"),
    Case(
        "a bad value in a block that does not apply is still refused",
        "Match User bob\nPasswordAuthentication maybe\n",
        None,
        error="line 2: PasswordAuthentication maybe",
    ),
    Case(
        "a bad value in an included file names that file",
        "Include {dir}/sshd_config.d/*.conf\n",
        None,
        files={"sshd_config.d/10-bad.conf": "\nPermitRootLogin perhaps\n"},
        error="sshd_config.d/10-bad.conf line 2: PermitRootLogin perhaps",
    ),
]
IDS = [c.name for c in CASES]


def _tree(base: Path, case: Case, include_dir: Path, shown_dir: str) -> Path:
    """Write the case's files into ``include_dir``; Include lines name ``shown_dir``."""
    include_dir.mkdir(parents=True, exist_ok=True)
    for rel, text in case.files.items():
        (include_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (include_dir / rel).write_text(text)
    main = include_dir / "sshd_config"
    main.write_text(case.config.replace("{dir}", shown_dir))
    return main


def _agent(case: Case, main: Path, root: Path, name: str) -> tuple[str, str]:
    got = sshd_settings(main.read_text(), name=name, root=root)
    return got["permitrootlogin"], got["passwordauthentication"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sshd_config_from_a_posture_root(case: Case, tmp_path: Path) -> None:
    main = _tree(tmp_path, case, tmp_path / "etc/ssh", "/etc/ssh")
    if case.expected is None:
        with pytest.raises(
            SshdConfigError, match=case.error.replace("(", r"\(").replace(")", r"\)")
        ):
            _agent(case, main, tmp_path, "/etc/ssh/sshd_config")
    else:
        assert _agent(case, main, tmp_path, "/etc/ssh/sshd_config") == case.expected


def test_relative_include_is_relative_to_etc_ssh(tmp_path: Path) -> None:
    (tmp_path / "etc/ssh/sshd_config.d").mkdir(parents=True)
    (tmp_path / "etc/ssh/sshd_config.d/10.conf").write_text("PermitRootLogin=no\n")
    (tmp_path / "etc/ssh/sshd_config").write_text("Include sshd_config.d/*.conf\n")
    posture = collect_posture(tmp_path)
    assert posture.sshd.permit_root_login == "no"
    assert posture.sshd.password_authentication is True


def test_a_configuration_sshd_refuses_reads_as_unknown(tmp_path: Path) -> None:
    (tmp_path / "etc/ssh").mkdir(parents=True)
    (tmp_path / "etc/ssh/sshd_config").write_text("Port 22\nPermitRootLogin nope\n")
    posture = collect_posture(tmp_path)
    assert not posture.HasField("sshd")
    [unknown] = [u for u in posture.unavailable if u.field == "sshd"]
    assert unknown.detail.startswith("/etc/ssh/sshd_config line 2: PermitRootLogin nope")


def test_include_loops_end(tmp_path: Path) -> None:
    (tmp_path / "etc/ssh").mkdir(parents=True)
    (tmp_path / "etc/ssh/sshd_config").write_text("Include sshd_config\n")
    with pytest.raises(SshdConfigError, match="Include nested deeper than 16"):
        sshd_settings("Include sshd_config\n", name="/etc/ssh/sshd_config", root=tmp_path)


# --- against sshd itself ------------------------------------------------------------------


def _sshd_t(config: Path, host_key: Path) -> tuple[int, dict[str, str], str]:
    """``sshd -T -f config`` (with a host key line first): its exit status, the settings
    it reports and its stderr."""
    text = config.read_text()
    config.write_text(f"HostKey {host_key}\n{text}")
    out = subprocess.run(
        [*AS_NOBODY, SSHD, "-T", "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=SSHD_ENV,
    )
    config.write_text(text)
    settings = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    return out.returncode, settings, out.stderr


# As root, sshd -T wants its privilege separation user and directory, which only an
# installed openssh-server makes; as an ordinary user it reads the files and reports. So
# under root it runs as nobody, on files in a directory anyone may read.
AS_NOBODY = (
    ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.geteuid() == 0 else []
)


@pytest.fixture
def readable_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="devtrust-sshd-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def host_key() -> Iterator[Path]:
    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} is missing: `make test` unpacks openssh-server there")
    home = Path(tempfile.mkdtemp(prefix="devtrust-sshd-key-"))
    home.chmod(0o755)
    key = home / "host_ed25519"
    private = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    key.write_bytes(private)
    key.chmod(0o600)
    if AS_NOBODY:
        shutil.chown(key, user="nobody")
    yield key
    shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sshd_agrees(case: Case, readable_tmp: Path, host_key: Path) -> None:
    """The same files, read by ``sshd -T -f`` and by the agent (absolute Include paths)."""
    main = _tree(readable_tmp, case, readable_tmp / "ssh", str(readable_tmp / "ssh"))
    code, settings, err = _sshd_t(main, host_key)
    if case.expected is None:
        assert code != 0, f"sshd accepted it: {settings.get('permitrootlogin')}"
        with pytest.raises(SshdConfigError):
            _agent(case, main, Path("/"), str(main))
        return
    assert code == 0, err
    sshd = (
        settings["permitrootlogin"].replace("without-password", "prohibit-password"),
        settings["passwordauthentication"],
    )
    assert sshd == case.expected, "sshd -T disagrees with the table"
    assert _agent(case, main, Path("/"), str(main)) == sshd
