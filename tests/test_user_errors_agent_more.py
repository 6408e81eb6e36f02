"""Issue 8, the agent's side, a new user's second pass: more mistakes with `devtrust-agent`
that ended in a traceback, or were taken as if nothing were wrong. Each is run through the
installed `devtrust-agent` command as a user runs it: exit status, exactly one line on stderr
that names the file or option and the remedy, no traceback, nothing half-written.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from tpm2_pytss.utils import ek_template

from devtrust.agent.channel import VerifierError
from devtrust.agent.config import EK_TYPES, AgentConfig, TpmConfig
from devtrust.agent.enroll import _with_token_remedy
from devtrust.core.errors import ConfigError
from devtrust.swtpm import EndorsementCA
from devtrust.verifier.config import EnrollmentConfig
from devtrust.verifier.pki import PkiFiles
from tests.conftest import SwtpmFactory
from tests.db import with_repos
from tests.env import running, verifier_config

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING) ")
LIMIT_S = 60


def agent_command() -> str:
    """The `devtrust-agent` console script of the environment that runs the tests."""
    beside = Path(sys.executable).parent / "devtrust-agent"
    found = str(beside) if beside.exists() else shutil.which("devtrust-agent")
    assert found, "devtrust-agent is not installed: pip install -e ."
    return found


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """What is not a log line: the one line the user reads."""
        return [line for line in self.stderr.splitlines() if not LOG_LINE.match(line)]


def agent(*args: str, cwd: Path | None = None) -> Outcome:
    done = subprocess.run(
        [agent_command(), *args],
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
        cwd=cwd,
        check=False,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


async def agent_async(*args: str) -> Outcome:
    proc = await asyncio.create_subprocess_exec(
        agent_command(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), LIMIT_S)
    assert proc.returncode is not None
    return Outcome(proc.returncode, out.decode(), err.decode())


def assert_one_line(outcome: Outcome, code: int, *needles: str) -> str:
    """Exit ``code``, no traceback, exactly one non-log line, holding every needle."""
    assert "Traceback" not in outcome.stderr + outcome.stdout, outcome.stderr
    assert outcome.code == code, outcome.stderr
    assert len(outcome.error_lines) == 1, outcome.stderr
    line = outcome.error_lines[0]
    assert line.startswith("devtrust-agent: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


# --- mistakes in the configuration or on the command line ---------------------------------


@dataclass(frozen=True)
class Case:
    """One mistake: the files it needs ({name: bytes}, a.yaml the configuration; "{d}" in a
    value is the test's directory), the command, what the user sees."""

    name: str
    files: dict[str, bytes]
    args: tuple[str, ...]
    needles: tuple[str, ...]
    code: int = 2


NOT_UTF8 = {"a.yaml": b"\xff\xfe"}
SMI_NO_XML = {"a.yaml": b"gpu_source: nvidia-smi-xml\n"}
NO_ROOT = {"a.yaml": b"posture_root: '{d}/no-such-root'\n"}
FILE_ROOT = {"a.yaml": b"posture_root: '{d}/a.yaml'\n"}
NO_XML = {"a.yaml": b"gpu_source: nvidia-smi-xml\ngpu_xml: missing.xml\n"}
XML_UNUSED = {"a.yaml": b"gpu_xml: capture.xml\n"}
BAD_EK = {"a.yaml": b"tpm: {ek_type: EK-RSA4096x}\n"}
INNER_SPACE_TOKEN = {"a.yaml": b'bootstrap_token: "abc def"\n'}
CONFIG = ("--config", "{d}/a.yaml")
ROOT_REMEDY = "give the directory posture is read from (/ on a host)"
XML_REMEDY = "give the file `nvidia-smi -q -x` wrote"

CASES = [
    *(
        Case(
            f"configuration not UTF-8: {command}",
            NOT_UTF8,
            (command, *CONFIG),
            ("{d}/a.yaml: not UTF-8 text", "save it as UTF-8"),
        )
        for command in ("collect", "run", "enroll")
    ),
    Case(
        "configuration is a directory: collect",
        {},
        ("collect", "--config", "{d}"),
        ("{d}: cannot read: Is a directory",),
    ),
    *(
        Case(
            f"nvidia-smi-xml without gpu_xml: {command}",
            SMI_NO_XML,
            (command, *CONFIG),
            (
                "{d}/a.yaml: gpu_source nvidia-smi-xml needs gpu_xml: set gpu_xml to the file "
                "`nvidia-smi -q -x` wrote, or set gpu_source to auto",
            ),
        )
        for command in ("collect", "run", "enroll")
    ),
    Case(
        "gpu_xml set but gpu_source does not read it",
        XML_UNUSED,
        ("run", *CONFIG),
        (
            "{d}/a.yaml: gpu_xml {d}/capture.xml is set but gpu_source is 'auto', which does "
            "not read it: set gpu_source to nvidia-smi-xml, or remove gpu_xml",
        ),
    ),
    *(
        Case(
            f"posture_root does not exist: {command}",
            NO_ROOT,
            (command, *CONFIG),
            (f"{{d}}/a.yaml: posture_root {{d}}/no-such-root does not exist: {ROOT_REMEDY}",),
        )
        for command in ("collect", "run")
    ),
    Case(
        "posture_root is a file",
        FILE_ROOT,
        ("run", *CONFIG),
        (f"{{d}}/a.yaml: posture_root {{d}}/a.yaml is not a directory: {ROOT_REMEDY}",),
    ),
    Case(
        "--root does not exist",
        {},
        ("collect", "--root", "{d}/no-such-root"),
        (f"--root {{d}}/no-such-root does not exist: {ROOT_REMEDY}",),
    ),
    Case(
        "--gpu-xml does not exist",
        {},
        ("collect", "--gpu-xml", "{d}/missing.xml"),
        (f"--gpu-xml {{d}}/missing.xml: cannot read: No such file or directory; {XML_REMEDY}",),
    ),
    Case(
        "--gpu-xml is not nvidia-smi XML",
        {"capture.xml": b"<html/>"},
        ("collect", "--gpu-xml", "{d}/capture.xml"),
        (
            "--gpu-xml {d}/capture.xml: not nvidia-smi -q -x output: root element <html>; "
            f"{XML_REMEDY}",
        ),
    ),
    *(
        Case(
            f"gpu_xml does not exist: {command}",
            NO_XML,
            (command, *CONFIG),
            (
                "{d}/a.yaml: gpu_xml {d}/missing.xml: cannot read: No such file or "
                f"directory; {XML_REMEDY}",
            ),
        )
        for command in ("collect", "run")
    ),
    *(
        Case(
            f"unknown tpm.ek_type: {command}",
            BAD_EK,
            (command, *CONFIG),
            (
                "{d}/a.yaml.tpm: ek_type 'EK-RSA4096x' is not an EK template this agent knows: "
                "give one of EK-RSA2048, EK-ECC256, EK-HIGH-RSA2048, ",
                "EK-HIGH-RSA4096 (the one your TPM's EK certificate is for",
            ),
        )
        for command in ("run", "enroll")
    ),
    Case(
        "a bootstrap token with a space inside",
        INNER_SPACE_TOKEN,
        ("enroll", *CONFIG),
        (
            "{d}/a.yaml: bootstrap_token holds ' ' at position 4, which no token has "
            "(A-Z a-z 0-9 - _): paste exactly the line `devtrust token create` "
            "printed",
        ),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_local_mistake_one_line(case: Case, tmp_path: Path) -> None:
    d = str(tmp_path)
    for name, data in case.files.items():
        (tmp_path / name).write_bytes(data.replace(b"{d}", d.encode()))
    outcome = agent(*(a.replace("{d}", d) for a in case.args), cwd=tmp_path)
    line = assert_one_line(outcome, case.code, *(n.replace("{d}", d) for n in case.needles))
    assert "check tpm.tcti" not in line  # refused before the TPM is opened
    assert not outcome.stdout  # nothing collected
    assert not (tmp_path / "state").exists()


def test_collect_reads_a_posture_root_and_capture_that_are_there(tmp_path: Path) -> None:
    """The checks above refuse only what is wrong: the same command on a root and a
    nvidia-smi capture that exist collects."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    xml = tmp_path / "capture.xml"
    xml.write_text("<nvidia_smi_log><driver_version>580.1</driver_version></nvidia_smi_log>")
    outcome = agent("collect", "--root", str(root), "--gpu-xml", str(xml))
    assert outcome.code == 0, outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert "gpu       nvidia-smi-xml: driver 580.1, 0 GPUs" in outcome.stdout, outcome.stdout


# --- the configuration, as loaded ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "written", "sent"),
    [
        ("trailing space and newline", "TOKEN \n", "TOKEN"),
        ("leading tab", "\tTOKEN", "TOKEN"),
        ("blank is no token", " \n", ""),
        ("as pasted", "Ab-_09", "Ab-_09"),
    ],
)
def test_bootstrap_token_surrounding_whitespace_is_stripped(
    tmp_path: Path, name: str, written: str, sent: str
) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump({"bootstrap_token": written}))
    assert AgentConfig.load(path).bootstrap_token == sent, name


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("EK-RSA2048", "EK-RSA2048"),
        ("ek-ecc256", "EK-ECC256"),
        ("L-1", "EK-RSA2048"),
        ("h-3", "EK-HIGH-ECC384"),
    ],
)
def test_ek_type_names_and_aliases(written: str, canonical: str) -> None:
    assert TpmConfig(ek_type=written).ek_type == canonical


@pytest.mark.parametrize("written", ["EK-RSA4096x", "EK-HIGH-ECCSM2P256", "H-5", ""])
def test_ek_type_unknown_or_unsupported_is_refused(tmp_path: Path, written: str) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump({"tpm": {"ek_type": written}}))
    with pytest.raises(ConfigError, match=r"a\.yaml\.tpm: ek_type .* give one of EK-RSA2048"):
        AgentConfig.load(path)


def test_every_accepted_ek_type_is_a_tpm2_pytss_template() -> None:
    """agent/tpm.py hands the name to tpm2-pytss's create_ek_template: each name and alias
    accepted here must be one it knows, as the same template."""
    for name, alias in EK_TYPES.items():
        template = ek_template.lookup(name)
        assert template is not None, name
        assert ek_template.lookup(alias) is template, alias


# --- the bootstrap token, against a real verifier -------------------------------------------


def _agent_yaml(path: Path, *, tcti: str, address: str, ca: Path, token: str) -> Path:
    work = path.parent
    path.write_text(
        yaml.safe_dump(
            {
                "verifier": {"enrollment": address, "attestation": address, "ca_bundle": str(ca)},
                "tpm": {"tcti": tcti},
                "state_dir": str(work / "state"),
                "runtime_dir": str(work / "run"),
                "gpu_source": "none",
                "rpc_timeout_s": 5.0,
                "reconnect_max_s": 0.5,
                "bootstrap_token": token,
            }
        )
    )
    return path


@dataclass(frozen=True)
class TokenCase:
    name: str
    # What the user put in bootstrap_token; TOKEN is replaced by one the verifier issued.
    written: str
    code: int
    needles: tuple[str, ...] = ()


TOKEN_CASES = [
    TokenCase("pasted with a trailing space and newline", "TOKEN \n", 0),
    TokenCase(
        "none given: the verifier's remedy, once",
        "",
        2,
        (
            "PERMISSION_DENIED",
            "requires a bootstrap token",
            "create one with `devtrust token create` and set bootstrap_token in the "
            "agent's configuration",
        ),
    ),
]


@pytest.mark.parametrize("case", TOKEN_CASES, ids=[c.name for c in TOKEN_CASES])
def test_bootstrap_token_against_a_verifier(
    case: TokenCase,
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    config = replace(
        verifier_config(workdir, pki, endorsement_ca),
        enrollment=EnrollmentConfig(require_token=True),
    )
    token = "tok-" + "A1_-" * 10
    with_repos(
        config.database,
        lambda store: store.tokens.add(
            hashlib.sha256(token.encode()).hexdigest(),
            now=now,
            expires_at=now + datetime.timedelta(hours=1),
        ),
    )
    tpm = swtpm_factory()

    async def scenario() -> Outcome:
        async with running(config) as verifier:
            path = _agent_yaml(
                workdir / "agent.yaml",
                tcti=tpm.tcti,
                address=f"127.0.0.1:{verifier.enrollment_port}",
                ca=pki.ca_cert,
                token=case.written.replace("TOKEN", token),
            )
            return await agent_async("enroll", "--config", str(path), "--give-up-s", "2")

    outcome = asyncio.run(scenario())
    if case.code == 0:
        assert outcome.code == 0, outcome.stderr
        assert "Traceback" not in outcome.stderr
        device_id = (workdir / "state" / "device-id").read_text().strip()
        assert outcome.stdout.strip() == device_id
        return
    line = assert_one_line(outcome, case.code, *case.needles)
    assert line.count("token create") == 1, line
    assert not (workdir / "state" / "device-id").exists()


class _RpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    ("name", "code", "details", "token", "added"),
    [
        (
            "the verifier names the remedy",
            grpc.StatusCode.PERMISSION_DENIED,
            "requires a bootstrap token and none was given; create one with "
            "`devtrust token create` and set bootstrap_token",
            "",
            "",
        ),
        (
            "spent: the verifier names none",
            grpc.StatusCode.PERMISSION_DENIED,
            "device d: bootstrap token already used",
            "t",
            "; bootstrap_token cannot be used: set it to a new token from "
            "`devtrust token create` on the verifier",
        ),
        (
            "empty, and the verifier names none",
            grpc.StatusCode.PERMISSION_DENIED,
            "unknown bootstrap token",
            "",
            "; bootstrap_token is empty: set it to a token from `devtrust token create` "
            "on the verifier",
        ),
        ("not about a token", grpc.StatusCode.PERMISSION_DENIED, "untrusted EK", "", ""),
        (
            "a zone conflict mentions the token, but a new token would not help",
            grpc.StatusCode.PERMISSION_DENIED,
            "device d is pinned to zone 'a' with labels {}; its bootstrap token assigns zone 'b'",
            "t",
            "",
        ),
        ("not a refusal", grpc.StatusCode.INVALID_ARGUMENT, "bad token field", "", ""),
    ],
)
def test_token_remedy_only_where_the_verifier_gives_none(
    name: str, code: grpc.StatusCode, details: str, token: str, added: str
) -> None:
    error = VerifierError(f"the verifier refused: {code.name}: {details}")
    cfg: Any = AgentConfig(bootstrap_token=token)
    result = _with_token_remedy(error, cfg, _RpcError(code, details))
    assert str(result) == str(error) + added, name
