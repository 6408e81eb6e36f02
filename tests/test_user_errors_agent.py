"""Issue 8, the agent's side: every mistake a user can make with `devtrust-agent` gets one
line on stderr that says what is wrong and what to do, a non-zero exit, no traceback, and
nothing half-written. The CLI runs as a user runs it (``python -m devtrust.agent.main``)
against a real verifier on loopback, real swtpm processes, or a closed port.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import hashlib
import importlib.metadata
import logging
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from devtrust.agent.attest import withheld_reason
from devtrust.agent.channel import explain, host_of, short_detail
from devtrust.agent.config import AgentConfig, TpmConfig, VerifierEndpoint
from devtrust.agent.main import build_parser
from devtrust.agent.wire import tier_from_wire, verdict_from_wire
from devtrust.core.ids import DeviceId
from devtrust.swtpm import EndorsementCA, Swtpm
from devtrust.swtpm.bootlog import header_only_log
from devtrust.v1 import common_pb2
from devtrust.verifier.config import EnrollmentConfig
from devtrust.verifier.pki import PkiFiles, init_pki
from devtrust.verifier.storage import SqliteRepositories
from tests.conftest import SwtpmFactory
from tests.db import with_repos
from tests.env import enrolled_agent, first_results, running, verifier_config

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING) ")
# Not far above the 2 s the tests allow for retries, well below a hang.
LIMIT_S = 60


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, cfg: AgentConfig) -> Path:
    """The agent configuration as a user writes it (YAML), from the dataclass."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    path.write_text(yaml.safe_dump(plain(dataclasses.asdict(cfg))))
    return path


def base_config(workdir: Path, tcti: str, enrollment: str, ca_bundle: Path) -> AgentConfig:
    return AgentConfig(
        verifier=VerifierEndpoint(
            enrollment=enrollment, attestation=enrollment, ca_bundle=ca_bundle
        ),
        tpm=TpmConfig(tcti=tcti),
        state_dir=workdir / "state",
        runtime_dir=workdir / "run",
        event_log=header_only_log(workdir / "event-log.bin"),
        gpu_source="none",
        rpc_timeout_s=5.0,
        reconnect_max_s=0.5,
    )


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()

    @property
    def error_lines(self) -> list[str]:
        """What is not a log line: the one line the user reads."""
        return [line for line in self.lines if not LOG_LINE.match(line)]


async def agent_cli(*args: str, timeout_s: float = LIMIT_S) -> Outcome:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devtrust.agent.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return Outcome(proc.returncode, out.decode(), err.decode())


def assert_one_line(outcome: Outcome, code: int, *needles: str, absent: str = "") -> str:
    """Exit ``code``, no traceback, exactly one non-log line, holding every needle."""
    assert "Traceback" not in outcome.stderr + outcome.stdout, outcome.stderr
    assert outcome.code == code, outcome.stderr
    assert len(outcome.error_lines) == 1, outcome.stderr
    line = outcome.error_lines[0]
    assert line.startswith("devtrust-agent: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    if absent:
        assert absent not in line.lower(), line
    return line


# --- against a real verifier ---------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One mistake: how to make it (verifier settings, agent settings), what the user sees."""

    name: str
    needles: tuple[str, ...]
    absent: str = ""
    require_token: bool = False
    require_approval: bool = False
    code: int = 2
    # (cfg, context) -> cfg: the mistake, applied to a working agent configuration.
    mistake: Callable[[AgentConfig, dict[str, Any]], AgentConfig] = lambda cfg, _: cfg
    foreign_ek: bool = False


CASES = [
    Case(
        "TLS name mismatch: the certificate names localhost, the agent uses 127.0.0.1",
        (
            "verifier.enrollment 127.0.0.1:",
            "does not name 127.0.0.1 (it names localhost)",
            "`devtrust-verifier init --hostname 127.0.0.1`",
        ),
        mistake=lambda cfg, ctx: replace(
            cfg, verifier=replace(cfg.verifier, ca_bundle=ctx["narrow_pki"].ca_cert)
        ),
    ),
    Case(
        "the CA bundle is another verifier's CA",
        ("verifier.enrollment 127.0.0.1:", "is not signed by the CA in verifier.ca_bundle"),
        mistake=lambda cfg, ctx: replace(
            cfg, verifier=replace(cfg.verifier, ca_bundle=ctx["other_pki"].ca_cert)
        ),
    ),
    Case(
        "untrusted EK",
        ("PERMISSION_DENIED", "does not chain to a trusted endorsement root"),
        foreign_ek=True,
    ),
    Case(
        "no bootstrap token where one is required",
        (
            "PERMISSION_DENIED",
            "bootstrap token",
            "create one with `devtrust token create` and set bootstrap_token in the "
            "agent's configuration",
        ),
        absent="unknown",
        require_token=True,
    ),
    Case(
        "a bootstrap token the verifier never issued",
        ("PERMISSION_DENIED", "bootstrap token", "bootstrap_token cannot be used"),
        require_token=True,
        mistake=lambda cfg, _: replace(cfg, bootstrap_token="tok-" + "0" * 40),
    ),
    Case(
        "a spent bootstrap token",
        ("PERMISSION_DENIED", "bootstrap token already used", "token create"),
        require_token=True,
        mistake=lambda cfg, ctx: replace(cfg, bootstrap_token=ctx["spent"]),
    ),
    Case(
        "awaiting approval (not a mistake: a step)",
        ("awaits operator approval: approve it on the verifier (`devtrust approve ",),
        require_approval=True,
        code=3,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_enroll_against_a_verifier_one_line(
    case: Case,
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    other_endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ctx: dict[str, Any] = {
        "narrow_pki": init_pki(workdir / "narrow-pki", hostnames=["localhost"], now=now),
        "other_pki": init_pki(workdir / "other-pki", hostnames=["127.0.0.1"], now=now),
        "spent": "tok-" + "s" * 40,
    }
    server_pki = ctx["narrow_pki"] if "TLS name" in case.name else pki
    config = replace(
        verifier_config(workdir, server_pki, endorsement_ca),
        enrollment=EnrollmentConfig(
            require_token=case.require_token, require_approval=case.require_approval
        ),
    )
    if case.require_token:
        digest = hashlib.sha256(ctx["spent"].encode()).hexdigest()

        async def spend(store: SqliteRepositories) -> bool:
            await store.tokens.add(digest, now=now, expires_at=now + datetime.timedelta(hours=1))
            return await store.tokens.use(digest, device_id=DeviceId("another-device"), now=now)

        assert with_repos(config.database, spend)
    tpm = swtpm_factory(other_endorsement_ca if case.foreign_ek else None)

    async def scenario() -> Outcome:
        async with running(config) as verifier:
            address = f"127.0.0.1:{verifier.enrollment_port}"
            cfg = case.mistake(base_config(workdir, tpm.tcti, address, pki.ca_cert), ctx)
            path = write_config(workdir / "agent.yaml", cfg)
            return await agent_cli("enroll", "--config", str(path), "--give-up-s", "2")

    outcome = asyncio.run(scenario())
    assert_one_line(outcome, case.code, *case.needles, absent=case.absent)
    if case.code == 2:
        assert str(workdir / "agent.yaml") in outcome.error_lines[0]
    # No retry for what retrying cannot fix, and nothing half-written.
    assert not [line for line in outcome.lines if "enrollment at" in line], outcome.stderr
    assert not (workdir / "state" / "device-id").exists()


# --- without a verifier -------------------------------------------------------------------


def test_unreachable_verifier_is_retried_then_one_line(
    workdir: Path, pki: PkiFiles, shared_swtpm: Swtpm
) -> None:
    port = closed_port()
    cfg = base_config(workdir, shared_swtpm.tcti, f"127.0.0.1:{port}", pki.ca_cert)
    path = write_config(workdir / "agent.yaml", cfg)
    started = time.monotonic()
    outcome = asyncio.run(agent_cli("enroll", "--config", str(path), "--give-up-s", "2"))
    took = time.monotonic() - started
    assert_one_line(
        outcome,
        75,
        f"{path}: verifier.enrollment 127.0.0.1:{port}: no answer in ",
        "UNAVAILABLE: Failed to connect to remote host: Connection refused",
        "check that `devtrust-verifier serve` runs there and that this is its enrollment port",
    )
    attempts = [line for line in outcome.lines if LOG_LINE.match(line)]
    assert len(attempts) >= 2, outcome.stderr  # it retried
    for line in attempts:
        assert f"enrollment at 127.0.0.1:{port} failed: UNAVAILABLE: " in line, line
        assert "Connection refused" in line
    assert took < LIMIT_S / 2
    assert not (workdir / "state" / "device-id").exists()


def test_run_keeps_retrying_an_unreachable_verifier_until_stopped(
    workdir: Path, pki: PkiFiles, shared_swtpm: Swtpm
) -> None:
    port = closed_port()
    cfg = base_config(workdir, shared_swtpm.tcti, f"127.0.0.1:{port}", pki.ca_cert)
    path = write_config(workdir / "agent.yaml", cfg)
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtrust.agent.main", "run", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(6)  # import, TPM, then attempts 0.5 s apart (reconnect_max_s)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err
    attempts = [line for line in err.splitlines() if "enrollment at" in line]
    assert len(attempts) >= 3, err
    assert all(LOG_LINE.match(line) for line in err.splitlines()), err
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("name", "change", "needles"),
    [
        (
            "CA bundle missing",
            {"ca_bundle": "missing.pem"},
            ("missing.pem: cannot read: No such file or directory", "copy there the ca.pem"),
        ),
        (
            "CA bundle not PEM",
            {"ca_bundle": "agent.yaml"},
            ("agent.yaml: not a PEM certificate bundle", "copy there the ca.pem"),
        ),
        (
            "TPM not there",
            {"tcti": "closed"},
            ("cannot open TPM at 'swtpm:host=127.0.0.1,port=", "check tpm.tcti in "),
        ),
    ],
)
def test_local_mistakes_one_line(
    workdir: Path,
    pki: PkiFiles,
    shared_swtpm: Swtpm,
    name: str,
    change: dict[str, str],
    needles: tuple[str, ...],
) -> None:
    ca = workdir / change["ca_bundle"] if "ca_bundle" in change else pki.ca_cert
    tcti = f"swtpm:host=127.0.0.1,port={closed_port()}" if "tcti" in change else shared_swtpm.tcti
    cfg = base_config(workdir, tcti, f"127.0.0.1:{closed_port()}", ca)
    path = write_config(workdir / "agent.yaml", cfg)
    outcome = asyncio.run(agent_cli("enroll", "--config", str(path), "--give-up-s", "0"))
    assert_one_line(outcome, 2, *needles)
    assert not [line for line in outcome.lines if "enrollment at" in line], name
    assert not (workdir / "state" / "device-id").exists()


@pytest.mark.parametrize(
    ("name", "text", "needles"),
    [
        (
            "no configuration file",
            None,
            ("does not exist: copy packaging/config/agent.yaml there and adapt it",),
        ),
        (
            "port out of range",
            "verifier: {enrollment: 'v.example:99999'}\n",
            ("agent.yaml.verifier: enrollment v.example:99999: port 99999 is not in 1-65535",),
        ),
        ("empty address", "verifier: {attestation: ' '}\n", ("attestation is empty",)),
        (
            "no backoff",
            "reconnect_max_s: 0\n",
            ("agent.yaml: reconnect_max_s must be positive, got 0.0",),
        ),
        ("misspelt key", "reconect_max_s: 5\n", ("unknown key(s) reconect_max_s",)),
    ],
)
def test_configuration_mistakes_one_line(
    tmp_path: Path, name: str, text: str | None, needles: tuple[str, ...]
) -> None:
    path = tmp_path / "agent.yaml"
    if text is not None:
        path.write_text(text)
    for command in ("enroll", "run"):
        outcome = asyncio.run(agent_cli(command, "--config", str(path)))
        assert_one_line(outcome, 2, str(path), *needles)


# --- the command line ---------------------------------------------------------------------


def test_version() -> None:
    outcome = asyncio.run(agent_cli("--version"))
    assert outcome.code == 0
    assert outcome.stdout.strip() == f"devtrust-agent {importlib.metadata.version('devtrust')}"


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [("devtrust-agent", parser), *sorted(subs.choices.items())]


@pytest.mark.parametrize(("name", "parser"), _parsers(), ids=[n for n, _ in _parsers()])
def test_every_option_has_help_and_shows_its_default(
    name: str, parser: argparse.ArgumentParser
) -> None:
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action.choices, dict):  # the subcommands: each has its own test
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        if action.default not in (None, False, "==SUPPRESS==") and action.option_strings:
            assert f"(default: {action.default})" in " ".join(text.split()), (
                f"{name} {action.option_strings}: default not shown"
            )


def test_bad_give_up_value_is_a_usage_error() -> None:
    outcome = asyncio.run(agent_cli("enroll", "--give-up-s", "-5"))
    assert outcome.code == 2
    assert "Traceback" not in outcome.stderr
    assert "--give-up-s: '-5': expected seconds, 0 or more" in outcome.stderr


# --- pure pieces -----------------------------------------------------------------------------


class _RpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    ("name", "code", "details", "final"),
    [
        (
            "refused",
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last "
            "error: UNKNOWN: ipv4:127.0.0.1:9: Failed to connect to remote host: Connection "
            "refused",
            None,
        ),
        ("dns", grpc.StatusCode.UNAVAILABLE, "errors resolving x.invalid:7443", None),
        ("busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "retry in 3 s", None),
        ("slow", grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", None),
        ("expired challenge", grpc.StatusCode.FAILED_PRECONDITION, "expired", None),
        (
            "name",
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: "
            "UNKNOWN: ipv4:127.0.0.1:9: Custom verification check failed with error: "
            "UNAUTHENTICATED: Hostname Verification Check failed.",
            "does not name h",
        ),
        (
            "ca",
            grpc.StatusCode.UNAVAILABLE,
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): "
            "SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
            "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK",
            "not signed by the CA in verifier.ca_bundle",
        ),
        (
            "denied",
            grpc.StatusCode.PERMISSION_DENIED,
            "no",
            "the verifier refused: PERMISSION_DENIED: no",
        ),
        ("malformed", grpc.StatusCode.INVALID_ARGUMENT, "bad", "INVALID_ARGUMENT: bad"),
    ],
)
def test_failures_retried_or_final(
    name: str, code: grpc.StatusCode, details: str, final: str | None
) -> None:
    failure = explain(_RpcError(code, details), key="k", address="h:9", cfg=AgentConfig())
    if final is None:
        assert failure.final is None, name
    else:
        assert failure.final is not None
        assert final in failure.final, failure.final
        assert failure.final.startswith("k h:9: ")


def test_short_detail_and_host() -> None:
    assert (
        short_detail(
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: "
            "Failed to connect to remote host: Connection refused"
        )
        == "Failed to connect to remote host: Connection refused"
    )
    assert [host_of(a) for a in ("h:1", "dns:///h.example:7443", "[::1]:7443", "10.0.0.1")] == [
        "h",
        "h.example",
        "::1",
        "10.0.0.1",
    ]


def test_tier_words_and_why_no_certificate() -> None:
    assert [tier_from_wire(t).label for t in range(5)] == [
        "none",
        "none",
        "affirming",
        "warning",
        "contraindicated",
    ]
    trust = common_pb2.TrustResult(
        tier=common_pb2.TIER_WARNING,
        findings=[common_pb2.Finding(id="eventlog.missing"), common_pb2.Finding(id="x.y")],
    )
    assert withheld_reason(verdict_from_wire(trust)) == "tier warning (eventlog.missing, x.y)"
    assert withheld_reason(verdict_from_wire(common_pb2.TrustResult())) == "tier none (no findings)"


# --- the attestation stream ---------------------------------------------------------------


# `run` retries a stream certificate that does not name the address (and every refusal),
# as the systemd unit needs: tests/test_agent_refused.py. `enroll` exits for them (above).


def test_the_agent_says_why_no_certificate_came(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without an event log the verifier finds eventlog.missing (a warning) and withholds the
    certificate the agent asked for: the agent logs the tier as a word and the finding."""
    tpm = swtpm_factory()

    async def scenario() -> list[Any]:
        async with (
            running(verifier_config(workdir, pki, endorsement_ca)) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            agent.cfg = replace(agent.cfg, event_log=None)
            return await first_results(agent)

    with caplog.at_level(logging.INFO, logger="devtrust.agent.attest"):
        results = asyncio.run(scenario())
    assert results[0].certificate is None
    messages = [r.getMessage() for r in caplog.records if r.name == "devtrust.agent.attest"]
    assert any(m.startswith("trust result: tier=warning ") for m in messages), messages
    assert "no certificate: tier warning (eventlog.missing)" in messages, messages
