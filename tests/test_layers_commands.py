"""Operator commands run for real with the TPM and GPU libraries unimportable (issue 9: "operator
commands that load no TPM or GPU library"; tests/test_layers.py checks the imports on the
source). Importing a command's module is not enough: an import inside a function on the
command's path loads only when the command runs, so every command of `devtrust` and
`devtrust-verifier` but `serve` runs here through its real work, in a subprocess whose import
system refuses tpm2_pytss, pynvml, the agent and swtpm.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from devtrust.swtpm.hosttree import write_host_tree
from devtrust.verifier import ops_connect
from devtrust.verifier.ca import CertificateAuthority, pem
from devtrust.verifier.config import DEFAULT_POLICY, DEFAULT_RIM_ROOT
from devtrust.verifier.gpu.rim_store import RimStore
from devtrust.verifier.pki import init_pki, issue_operator
from tests.corpus import corpus_root
from tests.db import make_database
from tests.test_gate import DEVICE_CA_NAME, device_cert
from tests.test_layers import NOT_LOADED_BY_COMMANDS

# Run as `python -c`: a finder first on sys.meta_path refuses what an operator command must
# not load, and says so on stderr whatever the command then does with the ImportError; then
# the command's own main, with the arguments after -c.
_GUARDED_MAIN = """
import sys

BLOCKED = {blocked!r}


class Refuse:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            sys.__stderr__.write("BLOCKED IMPORT " + name + "\\n")
            sys.__stderr__.flush()
            raise ImportError("an operator command imported " + name)
        return None


sys.meta_path.insert(0, Refuse())
from {module} import main

sys.exit(main(sys.argv[1:]))
"""

PROGRAMS = {"devtrust": "devtrust.cli", "devtrust-verifier": "devtrust.verifier.main"}
# Commands that need what operators do not have: the verifier as a service on its host, and
# the fleet simulator (agents and software TPMs; tests/test_simulate.py runs it).
NOT_OPERATOR_COMMANDS = {"devtrust-verifier serve", "devtrust simulate"}
DEVICE = "ab" * 32


def guarded_run(module: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    code = _GUARDED_MAIN.format(blocked=NOT_LOADED_BY_COMMANDS, module=module)
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


def subcommands(parser: argparse.ArgumentParser, prefix: str) -> set[str]:
    """Every runnable command line of ``parser``: ``prog cmd [action]``."""
    found = set()
    for action in parser._actions:  # argparse lists its subparsers nowhere else
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= subcommands(sub, f"{prefix} {name}") or {f"{prefix} {name}"}
    return found


def _quotes() -> Path:
    """A real machine's quotes and the event log they vouch for (GCE, COS 85)."""
    return corpus_root() / "quotes" / "gce-cos85-nonce9009"


def _corpus_quote() -> list[str]:
    root = corpus_root()
    quote = json.loads((root / "expected.json").read_text())["quotes"]["gce-cos85-nonce9009"]
    q = quote["quote-sha256"]
    return [
        "--ak-pub", str(root / q["ak_public"]), "--message", str(root / q["message"]),
        "--signature", str(root / q["signature"]), "--nonce", q["nonce_hex"],
    ]  # fmt: skip


def _collected_evidence(tmp: Path) -> Path:
    """What `devtrust-agent collect --json` prints for a host tree and a real GPU capture."""
    xml = next((corpus_root() / "gpu").rglob("qx-gb200-lost.xml"))
    root = write_host_tree(tmp / "host")
    argv = ["collect", "--root", str(root), "--gpu-xml", str(xml), "--json"]
    run = subprocess.run(
        [sys.executable, "-m", "devtrust.agent.main", *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    (tmp / "evidence.json").write_text(run.stdout)
    return tmp / "evidence.json"


def _device_certificate(tmp: Path) -> None:
    """A device issuing CA (the relying party's bundle) and a device certificate of it."""
    ca = CertificateAuthority.create(
        common_name=DEVICE_CA_NAME, now=datetime.datetime.now(datetime.UTC)
    )
    (tmp / "bundle.pem").write_bytes(pem(ca.cert))
    (tmp / "device.pem").write_bytes(pem(device_cert(ca)))


def _gpu_corpus() -> Path:
    """nvtrust's recorded Hopper report, chain and the RIMs it matches (their signers
    expired in 2025: checked at a time before)."""
    return corpus_root() / "gpu" / "nvidia_nvtrust_attestation"


def _gpu_check() -> list[str]:
    gpu = _gpu_corpus()
    return [
        *("--report", str(gpu / "attestationReport-545.00.txt")),
        *("--chain", str(gpu / "gpuAkCertChain-545.00.txt")),
        *("--rim", str(gpu / "Driver_RIM_test_no_gpu.swidtag")),
        *("--rim", str(gpu / "1010_0200_882_96005E0001_test_no_gpu.swidtag")),
        *("--at", "2024-06-01"),
    ]


def _rim_store(tmp: Path) -> None:
    """A RIM store holding the recorded driver RIM."""
    RimStore.open(tmp / "rims").add(
        (_gpu_corpus() / "Driver_RIM_test_no_gpu.swidtag").read_bytes(),
        roots=x509.load_pem_x509_certificates(DEFAULT_RIM_ROOT.read_bytes()),
        at=datetime.datetime(2024, 6, 1, tzinfo=datetime.UTC),
    )


# Operator commands given their connection by a profile file; the others by options.
PROFILED = ("devices", "watch", "revoke")


def _operator_identity(tmp: Path) -> None:
    """An operator's certificate and key, the CA, and a profile naming them and an address
    where nothing listens (a port just closed)."""
    files = init_pki(tmp / "pki", hostnames=["localhost"], now=datetime.datetime.now(datetime.UTC))
    ca = CertificateAuthority.load(files.ca_cert, files.ca_key)
    issue_operator(
        ca, tmp, name="ops", trust_domain="devtrust.local", now=datetime.datetime.now(datetime.UTC)
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile = {
        "verifier": f"127.0.0.1:{port}",
        "cert": "operator-ops.pem",
        "key": "operator-ops.key",
        "ca": "pki/ca.pem",
    }
    (tmp / "operator.yaml").write_text(json.dumps(profile))  # JSON is YAML


def _connection(tmp: Path, *, profile: bool) -> list[str]:
    if profile:
        return ["--profile", str(tmp / "operator.yaml")]
    given = json.loads((tmp / "operator.yaml").read_text())
    return [
        *("--verifier", given["verifier"], "--ca", str(tmp / "pki" / "ca.pem")),
        *("--cert", str(tmp / "operator-ops.pem"), "--key", str(tmp / "operator-ops.key")),
    ]


@dataclass(frozen=True)
class Command:
    """One operator command line, run through its real work: ``argv`` from a temporary
    directory (after ``prepare`` there), ``shows`` in what it prints."""

    line: str  # "PROG COMMAND [ACTION]"
    argv: Callable[[Path], list[str]]
    shows: str
    prepare: Callable[[Path], object] = lambda tmp: None
    # A client of the verifier's Query API runs against an address where nothing listens:
    # everything up to the call is its real work, and the failure is a clean one.
    status: int = 0


def _query_client(argv: list[str]) -> Command:
    def full(tmp: Path) -> list[str]:
        return [*argv, *_connection(tmp, profile=argv[0] in PROFILED)]

    return Command(
        f"devtrust {argv[0]}",
        full,
        "is unreachable: it is down, or the port is wrong",
        prepare=_operator_identity,
        status=ops_connect.EXIT_UNREACHABLE,
    )


COMMANDS = [
    Command(
        "devtrust eventlog replay",
        lambda t: ["eventlog", "replay", "--events", str(_quotes() / "eventlog.bin")],
        "PCR 9",
    ),
    Command("devtrust quote check", lambda t: ["quote", "check", *_corpus_quote()], "valid"),
    Command(
        "devtrust policy eval",
        lambda t: [
            *("policy", "eval", "--policy", str(DEFAULT_POLICY)),
            *("--evidence", str(t / "evidence.json"), "--zone", "z", "--label", "k=v"),
        ],
        "gpu.",
        prepare=_collected_evidence,
    ),
    Command(
        "devtrust refs learn",
        lambda t: ["refs", "learn", DEVICE, *_connection(t, profile=True)],
        "is unreachable: it is down, or the port is wrong",
        prepare=_operator_identity,
        status=ops_connect.EXIT_UNREACHABLE,
    ),
    Command(
        "devtrust gate check",
        lambda t: ["gate", "check", str(t / "device.pem"), "--ca-bundle", str(t / "bundle.pem")],
        "gate.allowed: device",
        prepare=_device_certificate,
    ),
    Command("devtrust gpu check", lambda t: ["gpu", "check", *_gpu_check()], "valid: the GPU"),
    Command(
        "devtrust gpu rim add",
        lambda t: [
            *("gpu", "rim", "add", str(_gpu_corpus() / "Driver_RIM_test_no_gpu.swidtag")),
            *("--store", str(t / "rims"), "--at", "2024-06-01"),
        ],
        "added driver RIM 545.00",
    ),
    Command(
        "devtrust gpu rim fetch",
        lambda t: [
            *("gpu", "rim", "fetch"),
            *("--report", str(_gpu_corpus() / "attestationReport-545.00.txt")),
            *("--chain", str(_gpu_corpus() / "gpuAkCertChain-545.00.txt")),
            *("--service", "http://127.0.0.1:1/v1/rim/", "--store", str(t / "rims")),
        ],
        "not fetched: NV_GPU_DRIVER_GH100_545.00: cannot reach 127.0.0.1:1",
        status=1,
    ),
    Command(
        "devtrust gpu rim list",
        lambda t: ["gpu", "rim", "list", "--store", str(t / "rims")],
        "driver 545.00",
        prepare=_rim_store,
    ),
    Command(
        "devtrust gpu rim remove",
        lambda t: ["gpu", "rim", "remove", "driver", "545.00", "--store", str(t / "rims")],
        "removed the driver RIM 545.00",
        prepare=_rim_store,
    ),
    *(
        _query_client(argv)
        for argv in (
            ["devices", "--zone", "z", "--label", "k=v", "--stale", "--json"],
            ["show", DEVICE],
            ["score", DEVICE, "--json"],
            ["watch", "--zone", "z"],
            ["history", DEVICE, "--limit", "5"],
            ["approve", DEVICE, "--zone", "z"],
            ["revoke", DEVICE, "--reason", "stolen"],
            ["zone", DEVICE, "z", "--label", "k=v"],
            ["token", "create", "--zone", "z", "--label", "k=v", "--ttl-s", "600"],
            ["role", "bob", "viewer"],
            ["operator", "issue", "bob", "--role", "viewer", "--out", "issued"],
        )
    ),
    # The audit commands read and write the verifier's database file itself.
    Command(
        "devtrust audit verify",
        lambda t: ["audit", "verify", "--database", str(t / "v.db")],
        "audit intact: 0 chains, 0 entries",
        prepare=lambda t: make_database(t / "v.db"),
    ),
    Command(
        "devtrust audit prune",
        lambda t: ["audit", "prune", "--database", str(t / "v.db"), "--before", "2026-01-01"],
        "pruned 0 entries",
        prepare=lambda t: make_database(t / "v.db"),
    ),
    Command(
        "devtrust report",
        lambda t: ["report", "--database", str(t / "v.db"), "--json", "-"],
        '"version": 3',
        prepare=lambda t: make_database(t / "v.db"),
    ),
    Command(
        "devtrust audit seal",
        lambda t: ["audit", "seal", "--database", str(t / "v.db")],
        "sealed 0 entries",
        prepare=lambda t: make_database(t / "v.db"),
    ),
    Command(
        "devtrust-verifier init",
        lambda t: ["init", "--dir", str(t / "pki"), "--hostname", "localhost"],
        "server certificate",
    ),
    Command(
        "devtrust-verifier operator",
        lambda t: ["operator", "--dir", str(t / "pki"), "--name", "alice"],
        "operator certificate",
        prepare=lambda t: init_pki(
            t / "pki", hostnames=["localhost"], now=datetime.datetime.now(datetime.UTC)
        ),
    ),
    Command(
        "devtrust-verifier ca",
        lambda t: ["ca", "rotate", "--dir", str(t / "pki"), "--device-lifetime-s", "60"],
        "next device issuing CA",
        prepare=lambda t: init_pki(
            t / "pki", hostnames=["localhost"], now=datetime.datetime.now(datetime.UTC)
        ),
    ),
    Command(
        "devtrust-verifier ear-key",
        lambda t: ["ear-key", "--dir", str(t / "pki"), "--force"],
        "EAR signing certificate",
        prepare=lambda t: init_pki(
            t / "pki", hostnames=["localhost"], now=datetime.datetime.now(datetime.UTC)
        ),
    ),
    Command(
        "devtrust-verifier inventory",
        lambda t: ["inventory", "check", str(t / "inventory.yaml")],
        "1 devices, zones z",
        prepare=lambda t: (t / "inventory.yaml").write_text(f"{DEVICE}:\n  zone: z\n"),
    ),
]


def test_every_operator_command_is_run() -> None:
    """A new command gets a row in COMMANDS (or is named as no operator command)."""
    lines = set()
    for prog, module in PROGRAMS.items():
        parser = importlib.import_module(module).build_parser()
        lines |= subcommands(parser, prog)
    assert {c.line for c in COMMANDS} == lines - NOT_OPERATOR_COMMANDS
    assert lines >= NOT_OPERATOR_COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=[c.line for c in COMMANDS])
def test_operator_commands_run_without_tpm_or_gpu_libraries(
    command: Command, tmp_path: Path
) -> None:
    """Each command does its real work (its exit status, its output) with tpm2_pytss,
    pynvml, the agent and swtpm unimportable: a function-level import on its path fails it
    too."""
    command.prepare(tmp_path)
    prog = command.line.split()[0]
    run = guarded_run(PROGRAMS[prog], command.argv(tmp_path), tmp_path)
    assert "BLOCKED IMPORT" not in run.stderr, run.stderr
    assert run.returncode == command.status, run.stderr
    assert command.shows in run.stdout + run.stderr, run.stdout


def test_the_guard_refuses_what_commands_must_not_load(tmp_path: Path) -> None:
    code = _GUARDED_MAIN.format(blocked=NOT_LOADED_BY_COMMANDS, module="devtrust.verifier.cli")
    code = code.replace("from devtrust.verifier.cli import main", "import tpm2_pytss.types")
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert "BLOCKED IMPORT tpm2_pytss" in run.stderr
    assert run.returncode != 0
