"""Issue 8, the verifier's side: every mistake a user can make gets one line naming the file
or address and the remedy, a non-zero exit, no traceback, and loses nothing.

Each case runs the real command (``python -m devtrust.verifier.main`` or
``devtrust.verifier.cli``) in a subprocess; the table gives the command, the exit status and
the one line.
"""

from __future__ import annotations

import asyncio
import errno
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtrust.swtpm import EndorsementCA
from devtrust.verifier.config import DEFAULT_ROOTS
from devtrust.verifier.pki import PkiFiles
from tests.env import running, verifier_config

ROOT = Path(__file__).resolve().parent.parent
# A place nobody can write, root included (tests run as root in CI containers).
UNWRITABLE = Path("/sys/devtrust-test")


def _unwritable_reason() -> str:
    """Why UNWRITABLE cannot be made: EPERM for root, EACCES for others."""
    try:
        UNWRITABLE.mkdir()
    except OSError as exc:
        return str(exc.strerror)
    UNWRITABLE.rmdir()
    pytest.fail(f"{UNWRITABLE} could be made: this test needs a place nobody can write")


ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d [A-Z]+ ")


def _run(module: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


# The program name that starts each command's error lines.
PROGS = {
    "devtrust.verifier.main": "devtrust-verifier",
    "devtrust.verifier.cli": "devtrust",
    "devtrust.swtpm.demo": "devtrust-demo",
}


def _lines(run: subprocess.CompletedProcess[str], prog: str) -> list[str]:
    """The program's own error lines (log lines have a timestamp first)."""
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    return [line for line in run.stderr.splitlines() if line.startswith(f"{prog}: ")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _copy_pki(pki: PkiFiles, directory: Path) -> PkiFiles:
    directory.mkdir(parents=True, exist_ok=True)
    for path in (*pki.all(), *pki.device_all()):
        if path.exists():  # the device CA files too: serve loads them beside the CA
            shutil.copy2(path, directory / path.name)
    return PkiFiles.in_dir(directory)


def _config(tmp: Path, pki: PkiFiles, ek_ca: EndorsementCA, **changes: Any) -> dict[str, Any]:
    """A verifier configuration that starts; ``changes`` replace top-level keys."""
    (tmp / "db").mkdir(exist_ok=True)
    data: dict[str, Any] = {
        "database": str(tmp / "db" / "verifier.db"),
        "listen": {"enrollment": "127.0.0.1:0", "attestation": "127.0.0.1:0"},
        "tls": {"server_cert": str(pki.server_cert), "server_key": str(pki.server_key)},
        "ca": {"cert": str(pki.ca_cert), "key": str(pki.ca_key)},
        "endorsement": {"roots": [], "trust_swtpm_local_ca": str(ek_ca.cert_path)},
        "policy": None,
    }
    data.update(changes)
    return data


def _write(tmp: Path, data: dict[str, Any]) -> Path:
    path = tmp / "verifier.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- devtrust-verifier serve: one line per broken input ------------------------------------


@dataclass(frozen=True)
class ServeCase:
    name: str
    # Break a working set-up: (tmp dir, its copied PKI, the configuration) -> the line's
    # expected text; the configuration may be changed in place.
    breaks: Callable[[Path, PkiFiles, dict[str, Any]], str]


def _missing_ca_key(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    pki.ca_key.unlink()
    return (
        f"CA key {pki.ca_key} does not exist: run `devtrust-verifier init --dir "
        f"{pki.ca_key.parent} --hostname NAME` to make a CA, or fix `ca.key:` in the "
        "configuration"
    )


def _missing_ca_cert(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    pki.ca_cert.unlink()
    return (
        f"CA certificate {pki.ca_cert} does not exist: run `devtrust-verifier init --dir "
        f"{pki.ca_cert.parent} --hostname NAME` to make a CA, or fix `ca.cert:` in the "
        "configuration"
    )


def _unreadable_ca_key(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    # Unreadable for root too: a directory where the key should be.
    pki.ca_key.unlink()
    pki.ca_key.mkdir()
    return f"CA key {pki.ca_key}: Is a directory: `ca.key:` must name a file"


def _garbage_ca_key(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    pki.ca_key.write_text("not a key\n")
    return f"CA key {pki.ca_key} is not an unencrypted PEM private key: give the file init made"


def _wrong_ca_key(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    data["ca"]["key"] = str(pki.server_key)
    return (
        f"CA key {pki.server_key} is not the key of CA certificate {pki.ca_cert}: give the "
        "pair that init made together"
    )


def _missing_server_key(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    pki.server_key.unlink()
    return (
        f"server key {pki.server_key} does not exist: run `devtrust-verifier init --dir "
        f"{pki.server_key.parent} --hostname NAME`, or fix `tls.server_key:` in the "
        "configuration"
    )


def _missing_server_cert(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    pki.server_cert.unlink()
    return (
        f"server certificate {pki.server_cert} does not exist: run `devtrust-verifier init "
        f"--dir {pki.server_cert.parent} --hostname NAME`, or fix `tls.server_cert:` in the "
        "configuration"
    )


def _wrong_server_key(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    data["tls"]["server_key"] = str(pki.ca_key)
    return (
        f"server key {pki.ca_key} is not the key of server certificate {pki.server_cert}: "
        "give the pair that init made together"
    )


def _missing_db_dir(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    db = tmp / "typo" / "verifier.db"
    data["database"] = str(db)
    return (
        f"database {db}: directory {db.parent} does not exist: create it, or fix "
        "`database:` in the configuration (it is not created: a typo would show an empty fleet)"
    )


def _unwritable_db_dir(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    db = UNWRITABLE.parent / "verifier.db"
    data["database"] = str(db)
    return (
        f"database {db} cannot be opened for writing (unable to open database file): it "
        f"must be a file, and it and {db.parent} writable by the verifier's user"
    )


def _not_sqlite(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    db = Path(data["database"])
    db.write_text("devices:\n  - not a database\n" * 100)
    return (
        f"database {db} is not an SQLite database: point `database:` at the verifier's "
        "database, or move this file away (it is left as it is)"
    )


def _truncated(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    db = Path(data["database"])
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE filler (x TEXT)")
        conn.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,) for _ in range(400)])
    conn.close()
    data_bytes = db.read_bytes()
    db.write_bytes(data_bytes[: len(data_bytes) // 2])
    return (
        f"database {db} is damaged (database disk image is malformed): restore it from a "
        "backup, or move it away to start an empty one (it is left as it is)"
    )


def _damaged_inside(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    """A page in the middle overwritten: opening and the schema do not notice, only the
    integrity check at start does."""
    db = Path(data["database"])
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE filler (x TEXT)")
        conn.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,) for _ in range(400)])
    conn.close()
    content = bytearray(db.read_bytes())
    middle = len(content) // 4096 // 2 * 4096
    content[middle : middle + 4096] = b"\xff" * 4096
    db.write_bytes(bytes(content))
    return (
        f"database {db} is damaged (database disk image is malformed): restore it from a "
        "backup, or move it away to start an empty one (it is left as it is)"
    )


def _missing_root(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    data["endorsement"] = {"roots": ["/usr/share/devtrust/ek-roots"]}
    return (
        "endorsement root /usr/share/devtrust/ek-roots does not exist: fix "
        "`endorsement.roots:` in the configuration, or leave it out to use the roots shipped "
        f"with devtrust ({DEFAULT_ROOTS})"
    )


def _empty_roots(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    (tmp / "roots").mkdir()
    data["endorsement"] = {"roots": [str(tmp / "roots")]}
    return (
        f"no endorsement roots (self-signed CA certificates, PEM or DER) in {tmp / 'roots'}: "
        "no EK certificate could verify; fix `endorsement.roots:` in the configuration"
    )


def _port_out_of_range(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    data["listen"] = {"enrollment": "127.0.0.1:99999", "attestation": "127.0.0.1:0"}
    return (
        f"{tmp / 'verifier.yaml'}.listen: enrollment: expected HOST:PORT with 0 <= PORT <= "
        "65535, got '127.0.0.1:99999'"
    )


def _no_port(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    data["listen"] = {"enrollment": "127.0.0.1:0", "attestation": "127.0.0.1"}
    return (
        f"{tmp / 'verifier.yaml'}.listen: attestation: expected HOST:PORT with 0 <= PORT <= "
        "65535, got '127.0.0.1'"
    )


def _unresolvable(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    data["listen"] = {"enrollment": "no-such-host.invalid:7443", "attestation": "127.0.0.1:0"}
    return "cannot listen on no-such-host.invalid:7443 (listen.enrollment): cannot resolve"


def _not_this_host(tmp: Path, pki: PkiFiles, data: dict[str, Any]) -> str:
    data["listen"] = {"enrollment": "127.0.0.1:0", "attestation": "192.0.2.1:7444"}
    return (
        "cannot listen on 192.0.2.1:7444 (listen.attestation): Cannot assign requested "
        "address: change `listen.attestation:` in the configuration to an address of this host"
    )


SERVE_CASES = [
    ServeCase("missing CA key", _missing_ca_key),
    ServeCase("missing CA certificate", _missing_ca_cert),
    ServeCase("unreadable CA key", _unreadable_ca_key),
    ServeCase("CA key not a key", _garbage_ca_key),
    ServeCase("CA key of another certificate", _wrong_ca_key),
    ServeCase("missing server key", _missing_server_key),
    ServeCase("missing server certificate", _missing_server_cert),
    ServeCase("server key of another certificate", _wrong_server_key),
    ServeCase("database directory missing", _missing_db_dir),
    ServeCase("database directory unwritable", _unwritable_db_dir),
    ServeCase("database not SQLite", _not_sqlite),
    ServeCase("database truncated", _truncated),
    ServeCase("database damaged inside", _damaged_inside),
    ServeCase("endorsement root missing", _missing_root),
    ServeCase("endorsement roots empty", _empty_roots),
    ServeCase("port out of range", _port_out_of_range),
    ServeCase("no port", _no_port),
    ServeCase("unresolvable host", _unresolvable),
    ServeCase("address not of this host", _not_this_host),
]


@pytest.mark.parametrize("case", SERVE_CASES, ids=[c.name for c in SERVE_CASES])
def test_serve_refuses_with_one_line(
    case: ServeCase, tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    own = _copy_pki(pki, tmp_path / "pki")
    data = _config(tmp_path, own, endorsement_ca)
    expected = case.breaks(tmp_path, own, data)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    run = _run("devtrust.verifier.main", "serve", "--config", str(_write(tmp_path, data)))
    assert run.returncode == 2, run.stderr
    [line] = _lines(run, "devtrust-verifier")
    assert line.startswith(f"devtrust-verifier: {expected}"), line
    for path, content in before.items():  # loses nothing: no file it was given is changed
        if path.name != "verifier.yaml":
            assert path.read_bytes() == content, path


def test_serve_without_a_configuration(tmp_path: Path) -> None:
    run = _run("devtrust.verifier.main", "serve", "--config", str(tmp_path / "verifier.yaml"))
    assert run.returncode == 2
    assert _lines(run, "devtrust-verifier") == [
        f"devtrust-verifier: configuration {tmp_path / 'verifier.yaml'} does not exist: copy "
        "packaging/config/verifier.yaml there and adapt it, or give --config FILE"
    ]


def test_a_second_verifier_on_the_same_ports_refuses(
    tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """gRPC sets SO_REUSEPORT: without care a second verifier binds the same ports and the
    kernel splits connections between the two (issue 8, item 1)."""
    enroll_port, attest_port = _free_port(), _free_port()
    listen = {
        "enrollment": f"127.0.0.1:{enroll_port}",
        "attestation": f"127.0.0.1:{attest_port}",
    }
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    first_yaml = _write(first_dir, _config(first_dir, pki, endorsement_ca, listen=listen))
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [sys.executable, "-m", "devtrust.verifier.main", "serve", "--config", str(first_yaml)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        _wait_for(tmp_path / "first.log", "verifier listening", first)
        for ports in (listen, {**listen, "enrollment": "127.0.0.1:0"}):
            second = _run(
                "devtrust.verifier.main",
                "serve",
                "--config",
                str(_write(second_dir, _config(second_dir, pki, endorsement_ca, listen=ports))),
            )
            key = "enrollment" if ports["enrollment"] != "127.0.0.1:0" else "attestation"
            assert second.returncode == 2, second.stderr
            assert _lines(second, "devtrust-verifier") == [
                f"devtrust-verifier: cannot listen on {ports[key]} (listen.{key}): address "
                "already in use (is another devtrust-verifier running?): stop what holds it, "
                f"or change `listen.{key}:` in the configuration"
            ]
        assert first.poll() is None  # the first one still serves
    finally:
        first.send_signal(signal.SIGTERM)
        code = first.wait(timeout=20)
        log.close()
    assert code == 0, (tmp_path / "first.log").read_text()


def test_a_verifiers_ports_cannot_be_shared(
    tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """The grpc.so_reuseport option itself: a socket that asks for SO_REUSEPORT cannot bind
    a running verifier's ports (it could with gRPC's default)."""

    async def scenario() -> list[int | None]:
        refused: list[int | None] = []
        async with running(verifier_config(tmp_path, pki, endorsement_ca)) as verifier:
            for port in (verifier.enrollment_port, verifier.attestation_port):
                with socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    try:
                        sock.bind(("127.0.0.1", port))
                    except OSError as exc:
                        refused.append(exc.errno)
        return refused

    assert asyncio.run(scenario()) == [errno.EADDRINUSE, errno.EADDRINUSE]


def _wait_for(log: Path, text: str, process: subprocess.Popen[bytes], limit_s: float = 30) -> str:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        content = log.read_text()
        if text in content:
            return content
        if process.poll() is not None:
            pytest.fail(f"the verifier exited {process.returncode}: {content}")
        time.sleep(0.1)
    pytest.fail(f"no {text!r} within {limit_s}s: {log.read_text()}")


# --- init, operator, token, demo -----------------------------------------------------------


@dataclass(frozen=True)
class CliCase:
    name: str
    module: str
    argv: Callable[[Path], list[str]]
    code: int
    line: Callable[[Path], str]


CLI_CASES = [
    CliCase(
        "init with an empty hostname",
        "devtrust.verifier.main",
        lambda t: ["init", "--dir", str(t / "pki"), "--hostname", ""],
        2,
        lambda t: (
            "devtrust-verifier: --hostname '' is neither an IP address nor a host name "
            "(letters, digits, hyphens and dots): give the name agents use to reach the verifier"
        ),
    ),
    CliCase(
        "init with a hostname that is not one",
        "devtrust.verifier.main",
        lambda t: ["init", "--dir", str(t / "pki"), "--hostname", "verifier example"],
        2,
        lambda t: (
            "devtrust-verifier: --hostname 'verifier example' is neither an IP address "
            "nor a host name (letters, digits, hyphens and dots): give the name agents use to "
            "reach the verifier"
        ),
    ),
    CliCase(
        "init into an unwritable place",
        "devtrust.verifier.main",
        lambda t: ["init", "--dir", str(UNWRITABLE), "--hostname", "localhost"],
        2,
        lambda t: (
            f"devtrust-verifier: cannot create {UNWRITABLE}: {_unwritable_reason()}: "
            "choose a directory you can write (--dir)"
        ),
    ),
    CliCase(
        "init into a file",
        "devtrust.verifier.main",
        lambda t: ["init", "--dir", str(t / "a-file"), "--hostname", "localhost"],
        2,
        lambda t: (
            f"devtrust-verifier: {t / 'a-file'} is not a directory: choose a directory (--dir)"
        ),
    ),
    CliCase(
        "operator where there is no CA",
        "devtrust.verifier.main",
        lambda t: ["operator", "--dir", str(t / "nothing"), "--name", "alice"],
        2,
        lambda t: (
            f"devtrust-verifier: CA certificate {t / 'nothing' / 'ca.pem'} does not "
            f"exist: run `devtrust-verifier init --dir {t / 'nothing'} --hostname NAME` to make a "
            "CA, or give --dir the directory that init made"
        ),
    ),
    CliCase(
        "operator with a name that is a path",
        "devtrust.verifier.main",
        lambda t: ["operator", "--dir", str(t), "--name", "../alice"],
        2,
        lambda t: (
            "devtrust-verifier: --name '../alice': an operator name is 1-64 letters, "
            "digits, dots, hyphens or underscores, starting with a letter or digit"
        ),
    ),
    CliCase(
        "demo into an unwritable place",
        "devtrust.swtpm.demo",
        lambda t: ["--out", str(UNWRITABLE)],
        1,
        lambda t: (
            f"devtrust-demo: cannot create {UNWRITABLE}: {_unwritable_reason()}: choose a "
            "directory you can write (--out)"
        ),
    ),
    CliCase(
        "demo into a file",
        "devtrust.swtpm.demo",
        lambda t: ["--out", str(t / "a-file")],
        1,
        lambda t: f"devtrust-demo: {t / 'a-file'} is not a directory: choose a directory (--out)",
    ),
    CliCase(
        "refs learn with --database, which is gone (it asks the verifier)",
        "devtrust.verifier.cli",
        lambda t: ["refs", "learn", "abcd", "--database", str(t / "a-file")],
        2,
        lambda t: f"devtrust: error: unrecognized arguments: --database {t / 'a-file'}",
    ),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_command_refuses_with_one_line(case: CliCase, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("a file, not a directory nor a database\n" * 50)
    (tmp_path / "db").mkdir()
    (tmp_path / "v.yaml").write_text(f"database: {tmp_path / 'db' / 'v.db'}\n")
    run = _run(case.module, *case.argv(tmp_path))
    prog = PROGS[case.module]
    assert run.returncode == case.code, run.stderr
    assert _lines(run, prog) == [case.line(tmp_path)]
    assert not (tmp_path / "db" / "v.db").exists()  # nothing made for a refused command
