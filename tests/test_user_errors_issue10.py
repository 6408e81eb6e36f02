"""A new operator's mistakes with issue 10's commands (`devtrust gate check`, `devtrust`'s
operator commands): each is one line that names what to fix, with
the command's exit status, and no traceback. The verifier-backed ones (a viewer revoking, a
prefix of two devices, `role` for a name the configuration lists, `ca rotate` twice) are in
tests/test_ops_cli.py, tests/test_user_errors_verifier.py and tests/test_ca.py.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from devtrust.verifier import cli, ops_connect
from devtrust.verifier.ca import CertificateAuthority
from devtrust.verifier.pki import PkiFiles, issue_operator


def _run(main: Callable[[list[str]], int], argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return int(str(exc.code))


def _operator(pki: PkiFiles, folder: Path) -> Path:
    ca = CertificateAuthority.load(pki.ca_cert, pki.ca_key)
    now = datetime.datetime.now(datetime.UTC)
    cert, _ = issue_operator(ca, folder, name="alice", trust_domain="devtrust.local", now=now)
    return cert


# What is given (CERT, --ca-bundle), the status, and what stderr's last line says.
GATE_MISTAKES = [
    ("{operator}", "{bundle}", 1, "is an operator certificate (spiffe://devtrust.local/operator/"
     "alice), which the gate never takes: give a device certificate"),
    ("{server}", "{bundle}", 1, "is a server certificate, which the gate never takes"),
    ("{key}", "{bundle}", 2, "not a PEM or DER certificate: its PEM blocks are PRIVATE KEY, "
     "none a CERTIFICATE"),
    ("{operator}", "{key}", 2, "CA bundle"),
    ("{empty}", "{bundle}", 2, "is empty: give a PEM or DER certificate file"),
    ("{operator}", "{empty}", 2, "is empty: give a PEM or DER certificate file"),
]  # fmt: skip


@pytest.mark.parametrize(("cert", "bundle", "status", "says"), GATE_MISTAKES)
def test_gate_check_says_what_was_given_instead_of_a_device_certificate(
    cert: str,
    bundle: str,
    status: int,
    says: str,
    pki: PkiFiles,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "empty.pem").write_bytes(b"\n")
    names = {
        "{operator}": str(_operator(pki, tmp_path)),
        "{server}": str(pki.server_cert),
        "{key}": str(pki.ca_key),
        "{empty}": str(tmp_path / "empty.pem"),
        "{bundle}": str(pki.device_bundle),
    }
    got = _run(cli.main, ["gate", "check", names[cert], "--ca-bundle", names[bundle]])
    out, err = capsys.readouterr()
    assert got == status
    assert "Traceback" not in err
    [line] = err.splitlines()
    assert line.startswith("devtrust: ")
    assert says in line
    if status == 1:  # the decision itself is still one line on stdout
        assert out.startswith("gate.untrusted: ")
        assert out.count("\n") == 1
    else:
        assert out == ""


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        # the profile `devtrust-verifier operator` prints, used before the address is filled in
        (["devices", "--verifier", "HOST:PORT"],
         "verifier 'HOST:PORT' is not HOST:PORT: give the verifier's host and its attestation "
         "port (listen.attestation"),
        (["devices", "--timeout", "0"], "'0' is not a number of seconds above 0 and at most 3600"),
    ],
)  # fmt: skip
def test_operator_command_mistakes_name_the_fix(
    argv: list[str],
    says: str,
    pki: PkiFiles,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DEVTRUST_PROFILE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cert = _operator(pki, tmp_path)
    files = ["--cert", str(cert), "--key", str(cert.with_suffix(".key")), "--ca", str(pki.ca_cert)]
    status = _run(cli.main, [*argv, *files])
    err = capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in err
    assert says in err.splitlines()[-1]


def test_the_enrollment_port_is_named_as_the_wrong_port() -> None:
    """An operator pointing `devtrust` at listen.enrollment gets UNIMPLEMENTED (TLS there
    takes any client): the line says which port to give, not only "older than this"."""
    exc = grpc.aio.AioRpcError(
        grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "Method not found!"
    )
    error = ops_connect.rpc_error(exc, address="h:7443", action="devices", timeout=10.0)
    assert error.status == ops_connect.EXIT_REFUSED
    assert str(error) == (
        "devices: h:7443 does not serve the query API: give the verifier's attestation port "
        "(listen.attestation), not its enrollment port, or the verifier is older than this "
        "devtrust: Method not found!"
    )
