"""Issue 8, a new user's review of what landed: more mistakes that must end in one line, a
non-zero exit, no traceback, and nothing changed on disk.

Each case runs the real command (``python -m devtrust.verifier.main`` or
``devtrust.verifier.cli``) in a subprocess; the tables give the command, the exit status and
the one line.
"""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtrust.core.errors import DevtrustError
from devtrust.core.ids import DeviceId
from devtrust.swtpm import EndorsementCA
from devtrust.swtpm.demo import MARKER, check_out_dir
from devtrust.verifier.config import parse_address
from devtrust.verifier.pki import PkiFiles, init_pki
from devtrust.verifier.records import DeviceRecord, DeviceState
from tests.db import with_repos
from tests.test_user_errors_verifier import PROGS, _config, _copy_pki, _lines, _run, _write

NOT_UTF8 = b"# caf\xe9\npolicy_id: x\n"
DEVICE = DeviceId("ab" * 32)
SHA = "cd" * 32


def _snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- devtrust-verifier serve: configuration mistakes --------------------------------------


@dataclass(frozen=True)
class ServeCase:
    name: str
    # (tmp dir, its PKI, the configuration, the configuration's path) -> the line after
    # "devtrust-verifier: "; may change the configuration and write files.
    breaks: Callable[[Path, PkiFiles, dict[str, Any], Path], str]


def _refs(tmp: Path, data: dict[str, Any], refs: object) -> Path:
    path = tmp / "refs.yaml"
    path.write_text(refs if isinstance(refs, str) else yaml.safe_dump(refs))
    data["reference_values"] = str(path)
    return path


def _refs_case(name: str, group: dict[str, Any], line: str) -> ServeCase:
    def breaks(tmp: Path, pki: PkiFiles, data: dict[str, Any], cfg: Path) -> str:
        path = _refs(tmp, data, {"groups": [group]})
        return f"{path}.groups[0]: {line}"

    return ServeCase(name, breaks)


def _config_not_utf8(tmp: Path, pki: PkiFiles, data: dict[str, Any], cfg: Path) -> str:
    data["__raw__"] = b"database: /tmp/caf\xe9.db\n"
    return f"{cfg}: not UTF-8 text (byte 18): save it as UTF-8"


def _policy_not_utf8(tmp: Path, pki: PkiFiles, data: dict[str, Any], cfg: Path) -> str:
    (tmp / "policy.yaml").write_bytes(NOT_UTF8)
    data["policy"] = str(tmp / "policy.yaml")
    return f"{tmp / 'policy.yaml'}: not UTF-8 text (byte 5): save it as UTF-8"


def _refs_not_utf8(tmp: Path, pki: PkiFiles, data: dict[str, Any], cfg: Path) -> str:
    (tmp / "refs.yaml").write_bytes(NOT_UTF8)
    data["reference_values"] = str(tmp / "refs.yaml")
    return f"{tmp / 'refs.yaml'}: not UTF-8 text (byte 5): save it as UTF-8"


def _refs_empty(tmp: Path, pki: PkiFiles, data: dict[str, Any], cfg: Path) -> str:
    path = _refs(tmp, data, "")
    return (
        f"{path}: no reference value groups (expected `groups:` with at least one group, see "
        "verifier/refs.py): fill it in, or remove `reference_values:` from the configuration"
    )


def _message_bytes(value: int) -> Callable[[Path, PkiFiles, dict[str, Any], Path], str]:
    def breaks(tmp: Path, pki: PkiFiles, data: dict[str, Any], cfg: Path) -> str:
        data["limits"] = {"max_message_bytes": value}
        return (
            f"{cfg}.limits: max_message_bytes {value} is out of range: give 65536 (64 KiB) to "
            "2147483647 bytes"
        )

    return breaks


def _ek_not_sha(tmp: Path, pki: PkiFiles, data: dict[str, Any], cfg: Path) -> str:
    data["endorsement"]["allowed_ek_sha256"] = [SHA, "abc123"]
    return (
        f"{cfg}.endorsement: allowed_ek_sha256[1]: 'abc123' is not a sha256 (64 hex digits): "
        "give the device id the verifier logs for that TPM"
    )


def _local_ca_empty(tmp: Path, pki: PkiFiles, data: dict[str, Any], cfg: Path) -> str:
    (tmp / "local-ca.pem").write_text("not a certificate\n")
    data["endorsement"] = {"roots": [], "trust_swtpm_local_ca": str(tmp / "local-ca.pem")}
    return (
        f"swtpm local CA {tmp / 'local-ca.pem'} holds no certificate (PEM or DER): give the "
        "swtpm local CA's certificate (issuercert.pem), or remove "
        "`endorsement.trust_swtpm_local_ca:` from the configuration"
    )


def _server_of_another_ca(tmp: Path, pki: PkiFiles, data: dict[str, Any], cfg: Path) -> str:
    other = init_pki(
        tmp / "other", hostnames=["localhost"], now=datetime.datetime.now(datetime.UTC)
    )
    shutil.copy2(other.server_cert, pki.server_cert)
    shutil.copy2(other.server_key, pki.server_key)
    return (
        f"server certificate {pki.server_cert} is not issued by CA {pki.ca_cert}: agents "
        "would refuse the verifier; configure the server certificate and the CA that one "
        "`init` made together (`tls.server_cert`, `ca.cert`)"
    )


def _trust_domain(value: str) -> Callable[[Path, PkiFiles, dict[str, Any], Path], str]:
    def breaks(tmp: Path, pki: PkiFiles, data: dict[str, Any], cfg: Path) -> str:
        data["trust_domain"] = value
        return (
            f"{cfg}: trust_domain: {value!r} is not a SPIFFE trust domain: lowercase letters, "
            "digits, dots, hyphens and underscores, no scheme (e.g. devtrust.local)"
        )

    return breaks


def _ipv6_unbracketed(tmp: Path, pki: PkiFiles, data: dict[str, Any], cfg: Path) -> str:
    data["listen"]["enrollment"] = "::1:0"
    return f"{cfg}.listen: enrollment: '::1:0' is an IPv6 address without brackets: write [::1]:0"


SERVE_CASES = [
    ServeCase("configuration not UTF-8", _config_not_utf8),
    ServeCase("policy not UTF-8", _policy_not_utf8),
    ServeCase("reference values not UTF-8", _refs_not_utf8),
    ServeCase("reference values empty", _refs_empty),
    ServeCase("max_message_bytes too large", _message_bytes(99999999999)),
    ServeCase("max_message_bytes too small", _message_bytes(10)),
    _refs_case(
        "PCR value of the wrong length",
        {"name": "h100", "pcrs": {"sha256": {7: "65ca"}}},
        "group 'h100': pcrs.sha256 PCR 7: '65ca' is 4 hex digits; a sha256 value is 64",
    ),
    _refs_case(
        "PCR value not hex",
        {"name": "h100", "pcrs": {"sha256": {7: "zz" * 32}}},
        f"group 'h100': pcrs.sha256 PCR 7: {'zz' * 32!r} is not hex digits",
    ),
    _refs_case(
        "PCR index out of range",
        {"name": "h100", "pcrs": {"sha256": {24: SHA}}},
        "group 'h100': pcrs.sha256 PCR 24: PCR indices are 0..23",
    ),
    _refs_case(
        "PCR bank unknown",
        {"name": "h100", "pcrs": {"md5": {7: SHA}}},
        "group 'h100': pcrs: unsupported hash algorithm 'md5'",
    ),
    _refs_case(
        "boot application not a digest",
        {"name": "h100", "boot_applications": [SHA, "3f2a"]},
        "group 'h100': boot_applications[1]: '3f2a' is 4 hex digits; a sha256 digest is 64 hex "
        "digits",
    ),
    _refs_case(
        "dbx entry not a digest",
        {"name": "h100", "dbx_contains": [SHA + "00"]},
        f"group 'h100': dbx_contains[0]: {SHA!r}... is 66 hex digits; a sha256 digest is 64 hex "
        "digits",
    ),
    _refs_case("group without a name", {"secure_boot": True}, "name is required"),
    ServeCase("allowed EK not a sha256", _ek_not_sha),
    ServeCase("swtpm local CA holds no certificate", _local_ca_empty),
    ServeCase("server certificate of another CA", _server_of_another_ca),
    ServeCase("trust domain with a scheme", _trust_domain("spiffe://devtrust.local")),
    ServeCase("trust domain empty", _trust_domain("")),
    ServeCase("trust domain upper-case", _trust_domain("Devtrust.Local")),
    ServeCase("IPv6 address without brackets", _ipv6_unbracketed),
]


@pytest.mark.parametrize("case", SERVE_CASES, ids=[c.name for c in SERVE_CASES])
def test_serve_refuses_with_one_line(
    case: ServeCase, tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    own = _copy_pki(pki, tmp_path / "pki")
    data = _config(tmp_path, own, endorsement_ca)
    cfg = tmp_path / "verifier.yaml"
    expected = case.breaks(tmp_path, own, data, cfg)
    raw = data.pop("__raw__", None)
    if raw is None:
        _write(tmp_path, data)
    else:
        cfg.write_bytes(raw)
    before = _snapshot(tmp_path)
    run = _run("devtrust.verifier.main", "serve", "--config", str(cfg))
    assert run.returncode == 2, run.stderr
    assert _lines(run, "devtrust-verifier") == [f"devtrust-verifier: {expected}"]
    assert _snapshot(tmp_path) == before  # nothing changed, no database made
    assert not any((tmp_path / "db").iterdir())


def test_ipv6_in_brackets_is_accepted() -> None:
    assert parse_address("[::1]:7443") == ("::1", 7443)
    with pytest.raises(ValueError, match=r"write \[::1\]:7443"):
        parse_address("::1:7443")


# --- commands: one line, nothing made or replaced -----------------------------------------


@dataclass(frozen=True)
class CliCase:
    name: str
    module: str
    argv: Callable[[Path], list[str]]
    code: int
    line: Callable[[Path], str]


def _cfg(t: Path) -> str:
    return str(t / "v.yaml")


CLI_CASES = [
    CliCase(
        "demo into a directory of other files",
        "devtrust.swtpm.demo",
        lambda t: ["--out", str(t / "mine")],
        1,
        lambda t: (
            f"devtrust-demo: --out {t / 'mine'} is not empty and no demo made it (2 entries, e.g. "
            "'notes.txt'); the demo would replace verifier.db and result.json there: give a "
            "new or empty directory (--out DIR)"
        ),
    ),
    CliCase(
        "demo with an empty --out",
        "devtrust.swtpm.demo",
        lambda t: ["--out", ""],
        1,
        lambda t: "devtrust-demo: --out is empty: give the directory for the results",
    ),
    # token create and approve ask the verifier (Query API), never a database file.
    CliCase(
        "token create with a CA file that is not there",
        "devtrust.verifier.cli",
        lambda t: [
            "token",
            "create",
            "--verifier",
            "127.0.0.1:1",
            "--cert",
            str(t / "pki" / "operator-alice.pem"),
            "--key",
            str(t / "pki" / "operator-alice.key"),
            "--ca",
            str(t / "db" / "ca.pem"),
        ],
        2,
        lambda t: f"devtrust: cannot read --ca {t / 'db' / 'ca.pem'}: No such file or directory",
    ),
    CliCase(
        "approve with a CA file that is not there",
        "devtrust.verifier.cli",
        lambda t: [
            "approve",
            DEVICE,
            "--verifier",
            "127.0.0.1:1",
            "--cert",
            str(t / "pki" / "operator-alice.pem"),
            "--key",
            str(t / "pki" / "operator-alice.key"),
            "--ca",
            str(t / "db" / "ca.pem"),
        ],
        2,
        lambda t: f"devtrust: cannot read --ca {t / 'db' / 'ca.pem'}: No such file or directory",
    ),
    # refs learn asks the verifier (GetStoredEvidence), never a database file.
    CliCase(
        "refs learn without a verifier to ask",
        "devtrust.verifier.cli",
        lambda t: [
            "refs",
            "learn",
            DEVICE,
            "--verifier",
            "127.0.0.1:1",
            "--cert",
            str(t / "pki" / "operator-alice.pem"),
            "--key",
            str(t / "pki" / "operator-alice.key"),
            "--ca",
            str(t / "db" / "ca.pem"),
        ],
        2,
        lambda t: f"devtrust: cannot read --ca {t / 'db' / 'ca.pem'}: No such file or directory",
    ),
    CliCase(
        "refs learn with a file that is not a CA",
        "devtrust.verifier.cli",
        lambda t: [
            "refs",
            "learn",
            DEVICE,
            "--verifier",
            "127.0.0.1:1",
            "--cert",
            str(t / "pki" / "operator-alice.pem"),
            "--key",
            str(t / "pki" / "operator-alice.key"),
            "--ca",
            str(t / "mine" / "notes.txt"),
        ],
        2,
        lambda t: f"devtrust: --ca {t / 'mine' / 'notes.txt'} holds no PEM certificate",
    ),
    CliCase(
        "operator issued again",
        "devtrust.verifier.main",
        lambda t: ["operator", "--dir", str(t / "pki"), "--name", "alice"],
        2,
        lambda t: (
            f"devtrust-verifier: {t / 'pki'} already holds operator alice's certificate "
            "(operator-alice.pem, operator-alice.key): keep it, or run operator again with "
            "--force (the old files are kept as *.bak)"
        ),
    ),
    CliCase(
        "operator with a trust domain that has a scheme",
        "devtrust.verifier.main",
        lambda t: [
            "operator",
            "--dir",
            str(t / "pki"),
            "--name",
            "bob",
            "--trust-domain",
            "spiffe://x",
        ],
        2,
        lambda t: (
            "devtrust-verifier: --trust-domain 'spiffe://x' is not a SPIFFE trust domain: "
            "lowercase letters, digits, dots, hyphens and underscores, no scheme (e.g. "
            "devtrust.local)"
        ),
    ),
    CliCase(
        "init with an empty --dir",
        "devtrust.verifier.main",
        lambda t: ["init", "--dir", "", "--hostname", "localhost"],
        2,
        lambda t: (
            "devtrust-verifier: --dir is empty: give the directory (e.g. --dir "
            "/etc/devtrust/verifier)"
        ),
    ),
    CliCase(
        "operator with an empty --dir",
        "devtrust.verifier.main",
        lambda t: ["operator", "--dir", " ", "--name", "alice"],
        2,
        lambda t: (
            "devtrust-verifier: --dir is empty: give the directory (e.g. --dir "
            "/etc/devtrust/verifier)"
        ),
    ),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_command_refuses_with_one_line(case: CliCase, tmp_path: Path, pki: PkiFiles) -> None:
    (tmp_path / "db").mkdir()
    (tmp_path / "v.yaml").write_text(f"database: {tmp_path / 'db' / 'v.db'}\n")
    (tmp_path / "empty.db").write_bytes(b"")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own notes\n" * 100)
    (tmp_path / "mine" / "verifier.db").write_text("my own database\n")
    own = _copy_pki(pki, tmp_path / "pki")
    made = _run(
        "devtrust.verifier.main", "operator", "--dir", str(own.ca_cert.parent), "--name", "alice"
    )
    assert made.returncode == 0, made.stderr
    before = _snapshot(tmp_path)
    run = _run(case.module, *case.argv(tmp_path))
    prog = PROGS[case.module]
    assert run.returncode == case.code, run.stderr
    assert _lines(run, prog) == [case.line(tmp_path)]
    assert _snapshot(tmp_path) == before  # nothing made, replaced or migrated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "empty.db", "mine", "pki", "v.yaml"]
    assert not any((tmp_path / "db").iterdir())


# --- what the refusals leave possible --------------------------------------------------------


def test_operator_force_replaces_and_keeps_the_old_files(tmp_path: Path, pki: PkiFiles) -> None:
    own = _copy_pki(pki, tmp_path / "pki")
    argv = ["operator", "--dir", str(own.ca_cert.parent), "--name", "alice"]
    assert _run("devtrust.verifier.main", *argv).returncode == 0
    key, cert = own.ca_cert.parent / "operator-alice.key", own.ca_cert.parent / "operator-alice.pem"
    old = {key: key.read_bytes(), cert: cert.read_bytes()}
    forced = _run("devtrust.verifier.main", *argv, "--force")
    assert forced.returncode == 0, forced.stderr
    for path, content in old.items():
        [backup] = path.parent.glob(f"{path.name}.*.bak")
        assert backup.read_bytes() == content != path.read_bytes()


def _pending_device(database: Path) -> None:
    with_repos(
        database,
        lambda store: store.devices.save(
            DeviceRecord(
                device_id=DEVICE,
                state=DeviceState.PENDING_APPROVAL,
                ek_certificate=b"",
                ek_public=b"ek",
                ak_public=b"ak",
                ak_name="00",
                host={},
                enrolled_at=datetime.datetime.now(datetime.UTC),
            ),
            now=datetime.datetime.now(datetime.UTC),
            event="enrolled:enrolled",
        ),
    )


def test_demo_out_of_an_earlier_demo_may_be_replaced(tmp_path: Path) -> None:
    check_out_dir(tmp_path / "new")
    check_out_dir(tmp_path)  # empty
    (tmp_path / "verifier.db").write_text("x")
    with pytest.raises(DevtrustError, match="no demo made it"):  # a verifier's own database
        check_out_dir(tmp_path)
    (tmp_path / "result.json").write_text("{}")
    check_out_dir(tmp_path)  # what demos before the marker left
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DevtrustError, match="no demo made it"):
        check_out_dir(tmp_path)
    (tmp_path / MARKER).write_text("")
    check_out_dir(tmp_path)
