"""`devtrust-agent run` under systemd (review 13b, H1): what the verifier refuses, a TLS
failure on its certificate, a TPM that fails after start, are logged at ERROR with what to
fix, shown in STATUS= and retried at the next address; never exit 2, which the unit treats as
final (RestartPreventExitStatus=2). Exit 2 stays for mistakes on this host that a restart
repeats: a TPM device node that is not there, a workload_api.key_group the agent is not in.
`enroll` (one-shot, by a person) keeps its exits (tests/test_user_errors_agent.py).

Each case runs the agent as the unit does (`run`, a NOTIFY_SOCKET, a watchdog) against a
real verifier on loopback and a real swtpm, and waits for two refusals: the second shows
that it retried."""

from __future__ import annotations

import asyncio
import datetime
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from devtrust.agent.channel import REFUSED_MAX_S, refusal_backoff
from devtrust.agent.enroll import enroll
from devtrust.agent.main import make_host, make_tpm
from devtrust.agent.preflight import check_key_group, check_tpm_device
from devtrust.agent.state import AgentFiles
from devtrust.core.errors import ConfigError
from devtrust.swtpm import EndorsementCA
from devtrust.verifier.pki import PkiFiles, init_pki
from tests.conftest import SwtpmFactory
from tests.env import running, verifier_config
from tests.test_sdnotify import ROOT, Message, NotifySocket, _env
from tests.test_user_errors_agent import (
    Outcome,
    assert_one_line,
    base_config,
    closed_port,
    write_config,
)

LOG_ERROR = " ERROR "


def _refusals(needle: str) -> Callable[[Message], bool]:
    return lambda m: needle in (m.get("STATUS") or "") and "retrying in " in (m.get("STATUS") or "")


def run_until_refused_twice(config: Path, log: Path, needle: str) -> tuple[int, list[str]]:
    """`devtrust-agent run` until STATUS= has told a refusal holding ``needle`` twice, then
    SIGTERM: its exit status and its ERROR lines."""
    argv = [sys.executable, "-m", "devtrust.agent.main", "run", "--config", str(config)]
    with NotifySocket.bound() as notify, log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, env=_env(notify), cwd=ROOT)
        try:
            for n in range(2):
                notify.wait_for(_refusals(needle), proc, log, f"refusal #{n + 1} in STATUS=")
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    text = log.read_text()
    assert "Traceback" not in text, text
    return code, [line for line in text.splitlines() if LOG_ERROR in line]


def test_run_retries_an_attestation_certificate_that_does_not_name_the_address(
    workdir: Path, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """Enrolled through localhost (which the certificate names), attesting to 127.0.0.1
    (which it does not): the line that says what to do, each time, and no exit (until this
    change, exit 2: an impostor answering once, or an expired server.pem, stopped the agent
    for good under the unit)."""
    now = datetime.datetime.now(datetime.UTC)
    narrow = init_pki(workdir / "narrow-pki", hostnames=["localhost"], now=now)
    tpm = swtpm_factory()

    async def scenario() -> tuple[int, list[str]]:
        async with running(verifier_config(workdir, narrow, endorsement_ca)) as verifier:
            good = f"localhost:{verifier.enrollment_port}"
            cfg = base_config(workdir, tpm.tcti, good, narrow.ca_cert)
            atpm = make_tpm(cfg)
            try:
                files = AgentFiles(cfg.state_dir, cfg.runtime_dir)
                await enroll(cfg, atpm, files, host=make_host(cfg))
            finally:
                atpm.close()
            wrong = f"127.0.0.1:{verifier.attestation_port}"
            path = write_config(
                workdir / "agent.yaml",
                replace(cfg, verifier=replace(cfg.verifier, attestation=wrong)),
            )
            return await asyncio.to_thread(
                run_until_refused_twice, path, workdir / "agent.log", "does not name 127.0.0.1"
            )

    code, errors = asyncio.run(scenario())
    assert code == 0
    assert len(errors) >= 2, errors
    for line in errors[:2]:
        assert "verifier.attestation 127.0.0.1:" in line
        assert "does not name 127.0.0.1 (it names localhost)" in line
        assert "devtrust-verifier init --hostname 127.0.0.1" in line
    assert (workdir / "state" / "device-id").exists()  # the enrollment is kept


CASES: list[tuple[str, str, bool]] = [
    # name, what the line says, the TPM's EK from another manufacturer
    ("another verifier's CA bundle", "is not signed by the CA in verifier.ca_bundle", False),
    ("an EK the verifier does not trust", "does not chain to a trusted endorsement root", True),
]


@pytest.mark.parametrize(("name", "needle", "foreign_ek"), CASES, ids=[c[0] for c in CASES])
def test_run_retries_what_enrollment_refuses(
    name: str,
    needle: str,
    foreign_ek: bool,
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    other_endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    other = init_pki(workdir / "other-pki", hostnames=["127.0.0.1"], now=now)
    tpm = swtpm_factory(other_endorsement_ca if foreign_ek else None)

    async def scenario() -> tuple[int, list[str]]:
        async with running(verifier_config(workdir, pki, endorsement_ca)) as verifier:
            address = f"127.0.0.1:{verifier.enrollment_port}"
            ca = pki.ca_cert if foreign_ek else other.ca_cert
            path = write_config(workdir / "agent.yaml", base_config(workdir, tpm.tcti, address, ca))
            return await asyncio.to_thread(
                run_until_refused_twice, path, workdir / "agent.log", needle
            )

    code, errors = asyncio.run(scenario())
    assert code == 0, name
    assert len(errors) >= 2, errors
    assert all(needle in line and "verifier.enrollment 127.0.0.1:" in line for line in errors)
    assert not (workdir / "state" / "device-id").exists()


def test_run_retries_a_tpm_that_does_not_answer(workdir: Path, pki: PkiFiles) -> None:
    """A TPM reached through another process (swtpm, the resource manager daemon) that does
    not answer yet: retried, said; not exit 2."""
    tcti = f"swtpm:host=127.0.0.1,port={closed_port()}"
    cfg = base_config(workdir, tcti, f"127.0.0.1:{closed_port()}", pki.ca_cert)
    path = write_config(workdir / "agent.yaml", cfg)
    code, errors = run_until_refused_twice(path, workdir / "agent.log", "cannot open TPM at")
    assert code == 0
    assert len(errors) >= 2, errors


def test_run_refuses_a_tpm_device_that_is_not_there(workdir: Path, pki: PkiFiles) -> None:
    """A device node in tpm.tcti that does not exist is this host's mistake: exit 2 at once
    (the unit does not restart it), one line naming the key and what to do."""
    missing = workdir / "no-tpm"
    cfg = base_config(workdir, f"device:{missing}", f"127.0.0.1:{closed_port()}", pki.ca_cert)
    path = write_config(workdir / "agent.yaml", cfg)
    done = subprocess.run(
        [sys.executable, "-m", "devtrust.agent.main", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert_one_line(
        Outcome(done.returncode, done.stdout, done.stderr),
        2,
        f"{path}: tpm.tcti device:{missing}: {missing} does not exist",
        "ls /dev/tpm*",
    )


def test_tpm_device_this_user_may_not_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    device = tmp_path / "tpmrm0"
    device.touch()
    check_tpm_device(f"device:{device}", where="tpm.tcti")  # there, and may be opened
    monkeypatch.setattr("os.access", lambda *_a, **_k: False)
    with pytest.raises(ConfigError, match=r"may not open .*tpmrm0: add it to the device's group"):
        check_tpm_device(f"device:{device}", where="tpm.tcti")
    for other in ("swtpm:port=2321", "tabrmd", "device"):
        check_tpm_device(other, where="tpm.tcti")  # another process's: retried by `run`


def test_key_group_the_agent_is_not_in() -> None:
    """The kernel would refuse to give device.key to it at the first renewal: refused at start
    instead, with the drop-in that fixes it."""
    with pytest.raises(ConfigError, match=r"is not in group .*SupplementaryGroups="):
        check_key_group(4242, where="workload_api.key_group", euid=1000, groups=(1000, 996))
    check_key_group(4242, where="k", euid=1000, groups=(1000, 4242))  # a member
    check_key_group(4242, where="k", euid=0, groups=(0,))  # root gives files to any group
    check_key_group(None, where="k", euid=1000, groups=(1000,))  # none configured


def test_refusal_waits_grow_to_minutes() -> None:
    """From reconnect_max_s (the longest wait for an unreachable verifier) up to 5 minutes."""
    backoff = refusal_backoff(30.0)
    bounds = []
    for _ in range(8):
        bounds.append(backoff.bound)
        backoff.delay()
    assert bounds[0] == 30.0
    assert bounds[-1] == REFUSED_MAX_S == 300.0
