"""Issue 8, the verifier's side, continued: `init` and `operator` lose nothing, the shipped
configuration starts after the documented steps, a token and an approval together, and
what the commands say (--version, help with defaults, the README's commands parse).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from devtrust import cli
from devtrust.agent.enroll import EnrollmentPending, enroll
from devtrust.agent.main import make_host, make_tpm
from devtrust.agent.state import AgentFiles
from devtrust.agent.tpm import TpmBackend
from devtrust.swtpm import EndorsementCA, Swtpm, simulate
from devtrust.verifier import main as verifier_main
from devtrust.verifier.config import DEFAULT_ROOTS, EnrollmentConfig
from devtrust.verifier.enrollment import device_id_for
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.server import RunningVerifier
from devtrust.verifier.tools import default_text
from devtrust.verifier.tpm.structures import parse_public
from tests.conftest import SwtpmFactory
from tests.env import agent_config, running, verifier_config
from tests.test_ops_cli import Run, devtrust, profile
from tests.test_user_errors_verifier import ISO, ROOT, _lines, _run, _wait_for

SHIPPED_YAML = ROOT / "packaging" / "config" / "verifier.yaml"


# --- init and operator: nothing replaced without --force, nothing lost with it --------------


def test_init_refuses_an_existing_ca_and_force_keeps_the_old_files(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    first = _run(
        "devtrust.verifier.main", "init", "--dir", str(directory), "--hostname", "localhost"
    )
    assert first.returncode == 0, first.stderr
    files = PkiFiles.in_dir(directory)
    old = {p: p.read_bytes() for p in files.all()}

    again = _run(
        "devtrust.verifier.main", "init", "--dir", str(directory), "--hostname", "localhost"
    )
    assert again.returncode == 2
    assert _lines(again, "devtrust-verifier") == [
        f"devtrust-verifier: {directory} already holds a CA (ca.pem, ca.key, server.pem, "
        "server.key); replacing it would make every certificate it issued stop verifying: "
        "keep it, or run init again with --force (the old files are kept as *.bak)"
    ]
    assert {p: p.read_bytes() for p in files.all()} == old

    forced = _run(
        "devtrust.verifier.main",
        "init",
        "--dir",
        str(directory),
        "--hostname",
        "localhost",
        "--force",
    )
    assert forced.returncode == 0, forced.stderr
    assert "Traceback" not in forced.stderr
    for path, content in old.items():
        assert path.read_bytes() != content  # replaced ...
        [backup] = directory.glob(f"{path.name}.*.bak")
        assert backup.read_bytes() == content  # ... and the old one kept
        assert backup.stat().st_mode & 0o777 == path.stat().st_mode & 0o777
    assert f"the old files are kept as {directory}/ca.key." in forced.stderr


def test_operator_certificate_issued_again_keeps_the_old_one(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    assert (
        _run(
            "devtrust.verifier.main", "init", "--dir", str(directory), "--hostname", "h"
        ).returncode
        == 0
    )
    argv = ["operator", "--dir", str(directory), "--name", "alice"]
    assert _run("devtrust.verifier.main", *argv).returncode == 0
    key = directory / "operator-alice.key"
    old = key.read_bytes()
    assert _run("devtrust.verifier.main", *argv, "--force").returncode == 0
    [backup] = directory.glob("operator-alice.key.*.bak")
    assert backup.read_bytes() == old != key.read_bytes()


# --- the shipped configuration ---------------------------------------------------------------


def test_shipped_configuration_names_only_paths_the_install_makes() -> None:
    """Every absolute path in packaging/config/verifier.yaml is made by the documented steps
    (init's directory, the state directory); nothing under /usr/share, which nothing
    installs."""
    text = "\n".join(
        line.split("#", 1)[0] for line in SHIPPED_YAML.read_text().splitlines()
    )  # comments are examples
    paths = re.findall(r"(?<![\w.])/[\w./-]+", text)
    assert paths
    for path in paths:
        assert path.startswith(("/etc/devtrust/verifier/", "/var/lib/devtrust/")), path


def test_shipped_configuration_starts_after_init(tmp_path: Path) -> None:
    """README "Running it for real": init, operator, serve, with the shipped file changed only
    in its paths (and loopback ports, so that tests may run side by side)."""
    etc, state = tmp_path / "etc" / "verifier", tmp_path / "var"
    state.mkdir()  # the unit's StateDirectory=devtrust makes /var/lib/devtrust
    init = _run("devtrust.verifier.main", "init", "--dir", str(etc), "--hostname", "localhost")
    assert init.returncode == 0, init.stderr
    operator = _run("devtrust.verifier.main", "operator", "--dir", str(etc), "--name", "alice")
    assert operator.returncode == 0, operator.stderr
    text = SHIPPED_YAML.read_text()
    text = text.replace("/etc/devtrust/verifier", str(etc)).replace("/var/lib/devtrust", str(state))
    text = text.replace("0.0.0.0:7443", "127.0.0.1:0").replace("0.0.0.0:7444", "127.0.0.1:0")
    config = tmp_path / "verifier.yaml"
    config.write_text(text)
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "devtrust.verifier.main", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        _wait_for(tmp_path / "serve.log", "verifier listening", serve)
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(timeout=20)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert code == 0, output
    assert "Traceback" not in output
    assert f"endorsement roots: 40 from {DEFAULT_ROOTS}\n" in output
    lines = output.splitlines()
    assert lines
    for line in lines:  # every log line: ISO 8601 with the UTC offset
        assert ISO.match(line), line


# --- token and approval together ------------------------------------------------------------


def test_approved_device_completes_with_the_token_it_spent(
    tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """require_token and require_approval: the token is spent at the pending enrollment;
    the attempt after `approve` presents it again and completes (issue 8, item 5)."""
    config = replace(
        verifier_config(tmp_path, pki, endorsement_ca),
        enrollment=EnrollmentConfig(require_token=True, require_approval=True),
    )
    tpm = swtpm_factory()
    token = ""

    async def attempt(verifier: RunningVerifier) -> str:
        cfg = replace(agent_config(tmp_path, pki, verifier, tpm), bootstrap_token=token)
        atpm = make_tpm(cfg)
        try:
            files = AgentFiles(cfg.state_dir, cfg.runtime_dir)
            enrollment = await enroll(cfg, atpm, files, host=make_host(cfg))
        except EnrollmentPending:
            return "pending"
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        finally:
            atpm.close()
        return f"enrolled {enrollment.device_id}"

    device_id = device_id_for(parse_public(_ek_public(tpm)).public_key())
    other = ("1" if device_id[0] == "0" else "0") * 64

    async def scenario() -> tuple[list[str], Run]:
        nonlocal token
        async with running(config) as verifier:
            alice = str(profile(tmp_path, pki, verifier, "alice"))  # tests/env.py's admin
            made = await devtrust("token", "create", "--ttl-s", "600", "--profile", alice)
            assert made.status == 0, made.err
            token = made.out.strip()
            outcomes = [await attempt(verifier), await attempt(verifier)]
            approved = await devtrust("approve", device_id, "--profile", alice)
            assert approved.status == 0, approved.err
            outcomes.append(await attempt(verifier))
            return outcomes, await devtrust("approve", other, "--profile", alice)

    outcomes, unknown = asyncio.run(scenario())
    assert outcomes == ["pending", "pending", f"enrolled {device_id}"]
    assert unknown.status != 0
    [line] = unknown.err.splitlines()
    assert line.startswith(f"devtrust: approve: no device {other!r}"), line


def _ek_public(tpm: Swtpm) -> bytes:
    backend = TpmBackend(tpm.tcti)
    try:
        return backend.ek_public()
    finally:
        backend.close()


# --- what the tools say: --version, help with defaults, README commands -----------------------


def _version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


@pytest.mark.parametrize("module", ["devtrust.verifier.main", "devtrust.verifier.cli"])
def test_version(module: str) -> None:
    run = _run(module, "--version")
    assert run.returncode == 0
    assert run.stdout == f"devtrust {_version()}\n"


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(_parsers(sub))
    return found


@pytest.mark.parametrize(
    "build",
    [verifier_main.build_parser, cli.build_parser, simulate.build_parser],
    ids=["devtrust-verifier", "devtrust", "devtrust simulate"],
)
def test_every_option_has_help_that_shows_its_default(
    build: Callable[[], argparse.ArgumentParser],
) -> None:
    for parser in _parsers(build()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{parser.prog} {action.dest}: no help text"
            if action.option_strings and not action.required:
                shown = f"(default: {default_text(action.default)})"
                assert shown in text, f"{parser.prog} {action.dest}"


def _readme_commands() -> list[str]:
    """Every `devtrust-verifier ...` and `devtrust ...` command line of README.md: inline code
    and lines of code blocks (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    commands: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands.extend(line.split("  #")[0].split(" # ")[0] for line in joined.splitlines())
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    commands.extend(" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose))
    sudo = re.compile(r"^sudo\s+(?:-u\s+\S+\s+)?")
    commands = [sudo.sub("", c.strip()) for c in commands]
    pattern = re.compile(r"^(?:\S*/)?(devtrust-verifier|devtrust)\s+(.*)$")
    return [" ".join(c.split()) for c in commands if pattern.match(c)]


def _as_argv(command: str) -> tuple[str, list[str]]:
    """A README line as argv: optional parts [..] taken, "..." dropped, a|b as a."""
    command = command.replace("[", "").replace("]", "").replace("...", "")
    prog, *argv = shlex.split(command)
    return Path(prog).name, [arg.split("|")[0] for arg in argv]


def test_readme_commands_parse() -> None:
    commands = _readme_commands()
    progs = {_as_argv(c)[0] for c in commands}
    assert progs == {"devtrust", "devtrust-verifier"}, commands
    assert any("token create" in c for c in commands)
    for command in commands:
        prog, argv = _as_argv(command)
        parser = verifier_main.build_parser() if prog == "devtrust-verifier" else cli.build_parser()
        if argv[:1] == ["simulate"]:
            parser, argv = simulate.build_parser(), argv[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"README command does not parse ({exc.code}): {command}")
