"""The operator command (`devtrust devices`, `show`, `score`, `watch`, `history`, `approve`,
`revoke`, `zone`; issue 10, item 5) against a real verifier on loopback, over real mTLS with
operator certificates of its CA, with devices enrolled and attested by swtpm:

- tables for people and JSON with stable keys for scripts, device ids shortened in tables
  and taken back as prefixes;
- approve, zone and revoke change the device, audited with the operator who ran them;
- watch prints a change as the verifier records it;
- failures are one line and an exit status: a viewer refused revoke (naming the role it
  needs), an unreachable verifier, a TLS mismatch, no such device, bad arguments;
- a device's text cannot drive the operator's terminal.

Most commands run in-process (``ops.execute``, on the verifier's event loop); the failures an
operator sees run as the real `devtrust` process, to show there is no traceback.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import io
import json
import socket
import sqlite3
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtrust.core.command import failure_of
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.verifier import cli, ops, ops_connect, ops_format
from devtrust.verifier.ca import CertificateAuthority
from devtrust.verifier.main import main as verifier_main
from devtrust.verifier.pki import PkiFiles, issue_operator
from devtrust.verifier.records import DeviceState
from devtrust.verifier.server import RunningVerifier
from devtrust.verifier.wire_ops import DeviceView, TrustView
from tests.conftest import SwtpmFactory
from tests.db import decision, device
from tests.env import enrolled_agent, first_results, running, verifier_config

OPERATORS = {"otto": "operator", "vera": "viewer"}
DEVICE_KEYS = {
    "device_id", "state", "zone", "labels", "host", "enrolled_at", "last_seen",
    "ek_certificate_sha256", "ak_name", "trust",
}  # fmt: skip
TRUST_KEYS = {
    "device_id", "tier", "score", "appraised_at", "expires_at", "policy_id", "evidence_digest",
    "claims", "findings", "submods",
}  # fmt: skip


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _config(workdir: Path, pki: PkiFiles, ek_ca: EndorsementCA) -> Any:
    return replace(verifier_config(workdir, pki, ek_ca), operators=OPERATORS)


def profile(workdir: Path, pki: PkiFiles, verifier: RunningVerifier | int, name: str) -> Path:
    """An operator's certificate of the verifier's CA and a profile naming it, with paths
    relative to the profile's folder."""
    folder = workdir / f"as-{name}"
    folder.mkdir(exist_ok=True)
    ca = CertificateAuthority.load(pki.ca_cert, pki.ca_key)
    cert, key = issue_operator(ca, folder, name=name, trust_domain="devtrust.local", now=_now())
    (folder / "ca.pem").write_bytes(pki.ca_cert.read_bytes())
    port = verifier if isinstance(verifier, int) else verifier.attestation_port
    path = folder / "operator.yaml"
    path.write_text(
        yaml.safe_dump(
            {"verifier": f"127.0.0.1:{port}", "cert": cert.name, "key": key.name, "ca": "ca.pem"}
        )
    )
    return path


@dataclass(frozen=True)
class Run:
    status: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def devtrust(
    *argv: str,
    stop: asyncio.Event | None = None,
    out: io.StringIO | None = None,
    err: io.StringIO | None = None,
) -> Run:
    """`devtrust ARGV` in this process and event loop: its output, and its failure as the
    command reports it (one line; an error it does not expect fails the test)."""
    args = cli.build_parser().parse_args(list(argv))
    out = out or io.StringIO()
    err = err or io.StringIO()
    try:
        status = await ops.execute(args, out=out, err=err, environ={}, stop=stop)
    except ops_connect.ERRORS.expected as exc:  # anything else is a bug: it fails the test
        failure = failure_of(exc, ops_connect.ERRORS)
        if failure is None:
            raise
        err.write(f"devtrust: {failure.line}\n")
        status = failure.status
    return Run(status, out.getvalue(), err.getvalue())


async def devtrust_process(*argv: str, env: dict[str, str] | None = None) -> Run:
    """The real `devtrust` command, as an operator runs it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devtrust.verifier.cli",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def _audit(database: Path, dev: str) -> list[tuple[str, str]]:
    db = sqlite3.connect(database)
    try:
        rows = db.execute(
            "SELECT event, actor FROM audit WHERE device_id = ? ORDER BY id", (dev,)
        ).fetchall()
    finally:
        db.close()
    return [(event, actor) for event, actor in rows]


async def _until(condition: Any, what: str, limit_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"no {what} within {limit_s} s"
        await asyncio.sleep(0.05)


# --- reading and changing devices -------------------------------------------------------------


@dataclass
class Seen:
    runs: dict[str, Run]
    attested: str
    pending: str
    score: int


def test_an_operator_reads_and_changes_devices(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    config = _config(workdir, pki, endorsement_ca)
    pending = replace(device(5), state=DeviceState.PENDING_APPROVAL, zone="model-development")

    async def scenario() -> Seen:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            await verifier.repos.devices.save(
                pending, now=_now(), event="enrolled:pending_approval"
            )
            [result] = await first_results(agent)
            otto = str(profile(workdir, pki, verifier, "otto"))
            dev = agent.enrollment.device_id
            short = dev[:12]
            runs: dict[str, Run] = {}

            async def run(name: str, *argv: str) -> None:
                runs[name] = await devtrust(*argv, "--profile", otto)

            await run("devices", "devices")
            await run("devices json", "devices", "--json")
            await run("affirming", "devices", "--tier", "affirming", "--json")
            await run("stale", "devices", "--stale", "--json")
            await run("show", "show", short)
            await run("show json", "show", dev, "--json")
            await run("score", "score", short)
            await run("score json", "score", short, "--json")
            await run("approve", "approve", pending.device_id, "--zone", "production-inference",
                      "--label", "sku=h100")  # fmt: skip
            await run("zone", "zone", short, "management", "--label", "rack=7")
            await run("zone keeps labels", "zone", short, "data-processing", "--json")
            await run("history", "history", short)
            await run("history json", "history", short, "--json", "--limit", "2")
            await run("revoke", "revoke", short, "--reason", "lost in transit")
            await run("revoked", "show", dev, "--json")
            await run("revoke again", "revoke", short, "--reason", "again")
            await run("bad zone", "zone", pending.device_id, "bad zone")
            await run("no device", "show", "cd" * 32)
            unknown = next(p for p in ("f" * 12, "e" * 12) if not dev.startswith(p))
            await run("no prefix", "score", unknown)
            return Seen(runs, dev, pending.device_id, result.trust.score)

    seen = asyncio.run(scenario())
    runs, dev = seen.runs, seen.attested
    refused = {"revoke again", "bad zone", "no device", "no prefix"}
    failed = {n: r.err for n, r in runs.items() if n not in refused and r.status != 0}
    assert not failed

    # The table: a header, one aligned row per device, ids shortened.
    lines = runs["devices"].out.splitlines()
    assert lines[0].split() == ["DEVICE", "STATE", "TIER", "SCORE", "ZONE", "LABELS", "HOST",
                                "LAST", "SEEN"]  # fmt: skip
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {dev[:12], seen.pending[:12]}
    assert rows[dev[:12]].split()[1:4] == ["enrolled", "affirming", str(seen.score)]
    assert rows[seen.pending[:12]].split()[1:5] == [
        "pending_approval", "none", "0", "model-development",
    ]  # fmt: skip
    columns = [lines[0].index(h) for h in ("STATE", "TIER", "SCORE", "ZONE", "LABELS", "HOST")]
    for line in lines[1:]:  # each cell starts under its heading
        assert all(line[c - 2 : c] == "  " and line[c] != " " for c in columns), line

    # JSON: the full ids and the stable keys.
    listed = runs["devices json"].json()
    assert {d["device_id"] for d in listed} == {dev, seen.pending}
    assert all(set(d) == DEVICE_KEYS for d in listed)
    attested = next(d for d in listed if d["device_id"] == dev)
    assert set(attested["trust"]) == TRUST_KEYS
    assert (attested["trust"]["tier"], attested["trust"]["score"]) == ("affirming", seen.score)
    assert [d["device_id"] for d in runs["affirming"].json()] == [dev]
    assert [d["device_id"] for d in runs["stale"].json()] == [seen.pending]  # never appraised

    # show and score: the whole id, taken back from its prefix.
    assert f"device                 {dev}" in runs["show"].out
    assert "state                  enrolled" in runs["show"].out
    assert "  tier        affirming" in runs["show"].out
    assert runs["show json"].json()["device_id"] == dev
    assert f"device      {dev}" in runs["score"].out
    assert f"score       {seen.score}/100" in runs["score"].out
    score = runs["score json"].json()
    assert set(score) == TRUST_KEYS
    assert (score["device_id"], score["tier"], score["score"]) == (dev, "affirming", seen.score)

    # The changes, each with what the verifier answered.
    assert runs["approve"].out.strip() == (
        f"approved {seen.pending}: enrolled, zone production-inference, labels sku=h100"
    )
    assert runs["zone"].out.strip() == f"assigned {dev}: enrolled, zone management, labels rack=7"
    moved = runs["zone keeps labels"].json()
    assert (moved["zone"], moved["labels"]) == ("data-processing", {"rack": "7"})
    assert runs["revoke"].out.startswith(f"revoked {dev}: ")
    assert "live device certificate" in runs["revoke"].out
    assert runs["revoked"].json()["state"] == "revoked"

    # History: newest first, with who made each change.
    history = runs["history"].out.splitlines()
    assert history[0].split() == ["AT", "EVENT", "ACTOR", "DETAIL"]
    events = [line.split()[1:3] for line in history[1:]]
    # The first move took the device's certificate, which named its old zone.
    assert events[:3] == [
        ["assigned:operator", "operator/otto"],
        ["certificates_revoked", "operator/otto"],
        ["assigned:operator", "operator/otto"],
    ]
    assert ["appraisal", "device"] in events
    assert f"affirming, score {seen.score}" in history[events.index(["appraisal", "device"]) + 1]
    page = runs["history json"].json()
    assert [(e["event"], e["actor"]) for e in page] == [
        ("assigned:operator", "operator/otto"),
        ("certificates_revoked", "operator/otto"),
    ]
    assert page[0]["detail"]["zone"] == "data-processing"
    assert set(page[0]) == {"at", "event", "actor", "trust", "detail"}

    # Audited with the operator, in the verifier's own database.
    assert _audit(config.database, dev)[-4:] == [
        ("assigned:operator", "operator/otto"),
        ("certificates_revoked", "operator/otto"),
        ("assigned:operator", "operator/otto"),
        ("revoked", "operator/otto"),
    ]
    assert ("approved", "operator/otto") in _audit(config.database, seen.pending)

    # Refusals: one line each, with the status a script can tell apart.
    again = runs["revoke again"]
    assert (again.status, again.err) == (1, f"devtrust: revoke: device {dev} is revoked already\n")
    assert runs["bad zone"].status == 2
    assert "zone 'bad zone' is not" in runs["bad zone"].err
    assert runs["no device"].status == 5
    assert runs["no device"].err.startswith(f"devtrust: show: no device {'cd' * 32!r}")
    assert runs["no prefix"].status == 5
    assert "starts with" in runs["no prefix"].err


def test_the_profile_that_operator_prints_works_once_given_the_address(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, capsys: pytest.CaptureFixture[str]
) -> None:
    own = workdir / "own-pki"
    own.mkdir()
    for name in ("ca.pem", "ca.key"):
        (own / name).write_bytes((pki.directory / name).read_bytes())
    assert verifier_main(["operator", "--dir", str(own), "--name", "otto"]) == 0
    printed = capsys.readouterr().out
    text = printed[printed.index("# a profile for `devtrust`") :]
    config = _config(workdir, pki, endorsement_ca)

    async def scenario() -> Run:
        async with running(config) as verifier:
            path = workdir / "operator.yaml"
            path.write_text(text.replace("HOST:PORT", f"127.0.0.1:{verifier.attestation_port}"))
            return await devtrust("devices", "--json", "--profile", str(path))

    run = asyncio.run(scenario())
    assert (run.status, run.json()) == (0, []), run.err


def test_lists_and_histories_are_read_page_by_page(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of one: every device is listed, and history stops at --limit; a stored warning
    result shows as the verifier holds it, and --tier filters on the verifier's side."""
    monkeypatch.setattr(ops, "PAGE", 1)
    config = _config(workdir, pki, endorsement_ca)
    now = _now()

    async def scenario() -> tuple[Run, Run, Run]:
        async with running(config) as verifier:
            for n, tier in ((1, Tier.AFFIRMING), (2, Tier.WARNING), (3, Tier.AFFIRMING)):
                await verifier.repos.devices.save(device(n), now=now, event="enrolled:enrolled")
                at = now - datetime.timedelta(seconds=n)
                await verifier.repos.trust.record(decision(n, at=at, tier=tier))
            otto = str(profile(workdir, pki, verifier, "otto"))
            return (
                await devtrust("devices", "--profile", otto),
                await devtrust("devices", "--tier", "warning", "--json", "--profile", otto),
                await devtrust("history", f"{1:064x}", "--limit", "1", "--json", "--profile", otto),
            )

    table, warning, history = asyncio.run(scenario())
    rows = [line.split() for line in table.out.splitlines()[1:]]
    assert [(r[0], r[2], r[3], r[6]) for r in rows] == [
        # Ids alike in all but their last digit are shown whole.
        (f"{1:064x}", "affirming", "100", "host-1"),
        (f"{2:064x}", "warning", "50", "host-2"),
        (f"{3:064x}", "affirming", "100", "host-3"),
    ]
    assert [d["device_id"] for d in warning.json()] == [f"{2:064x}"]
    assert [e["event"] for e in history.json()] == ["appraisal"]


# --- watching ---------------------------------------------------------------------------------


def test_watch_prints_each_change_as_it_is_recorded(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    config = _config(workdir, pki, endorsement_ca)

    async def scenario() -> tuple[Run, Run, Run, str, int]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            vera = str(profile(workdir, pki, verifier, "vera"))  # a viewer may watch
            dev = agent.enrollment.device_id
            stop = asyncio.Event()
            argvs = [
                ("watch", "--initial"),
                ("watch", "--device", dev[:8], "--json"),
                ("watch", "--zone", "elsewhere"),
            ]
            outs = [(io.StringIO(), io.StringIO()) for _ in argvs]
            watches = [
                asyncio.create_task(devtrust(*argv, "--profile", vera, stop=stop, out=out, err=err))
                for argv, (out, err) in zip(argvs, outs, strict=True)
            ]
            # Each watch says on stderr once it is in place; then the device attests.
            await _until(lambda: all("watching" in e.getvalue() for _, e in outs), "watches")
            [result] = await first_results(agent)
            table_out, json_out = outs[0][0], outs[1][0]
            await _until(
                lambda: len(table_out.getvalue().splitlines()) == 2 and json_out.getvalue(),
                "printed change",
            )
            await asyncio.sleep(0.5)  # time for anything else to be (wrongly) printed
            stop.set()
            table, js, elsewhere = await asyncio.wait_for(asyncio.gather(*watches), 20)
            return table, js, elsewhere, dev, result.trust.score

    table, js, elsewhere, dev, score = asyncio.run(scenario())
    assert (table.status, js.status, elsewhere.status) == (0, 0, 0), table.err + js.err
    assert "watching trust changes of all devices on 127.0.0.1:" in table.err
    assert f"watching trust changes of device {dev} on" in js.err
    lines = table.out.splitlines()
    assert len(lines) == 2, lines
    # The current result first (never appraised), then the change the attestation made.
    assert lines[0].split()[1:] == [dev[:12], "-", "now", "none", "score", "0"]
    assert lines[1].split()[1:] == [dev[:12], "-", "new", "->", "affirming", "score", str(score)]
    [change] = [json.loads(line) for line in js.out.splitlines()]
    assert set(change) == {"device_id", "zone", "initial", "previous_tier", "trust"}
    assert (change["device_id"], change["initial"], change["previous_tier"]) == (dev, False, None)
    assert (change["trust"]["tier"], change["trust"]["score"]) == ("affirming", score)
    assert elsewhere.out == ""  # another zone: nothing


def test_a_watch_outlives_its_streams_deadline(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each stream has a deadline (STYLE 15); the watch opens the next at once, prints no
    result twice, and prints a change made between two streams."""
    monkeypatch.setattr(ops, "WATCH_STREAM_S", 0.4)
    config = _config(workdir, pki, endorsement_ca)
    now = _now()

    async def scenario() -> Run:
        async with running(config) as verifier:
            await verifier.repos.devices.save(device(1), now=now, event="enrolled:enrolled")
            vera = str(profile(workdir, pki, verifier, "vera"))
            stop = asyncio.Event()
            out, err = io.StringIO(), io.StringIO()
            task = asyncio.create_task(devtrust("watch", "--profile", vera, stop=stop, out=out,
                                                err=err))  # fmt: skip
            await _until(lambda: "watching" in err.getvalue(), "the watch")
            # Stored but not published: only the next stream's start can show it.
            await verifier.repos.trust.record(decision(1, at=_now(), tier=Tier.WARNING))
            await asyncio.sleep(1.0)  # streams end and open again
            changed = replace(decision(1, at=_now()), previous_tier=Tier.WARNING)
            await verifier.repos.trust.record(changed)
            await verifier.watch.publish(changed)
            await asyncio.sleep(1.0)
            stop.set()
            return await asyncio.wait_for(task, 10)

    run = asyncio.run(scenario())
    assert run.status == 0, run.err
    changes = [line.split()[2:] for line in run.out.splitlines()]
    assert changes == [
        ["-", "none", "->", "warning", "score", "50"],
        ["-", "warning", "->", "affirming", "score", "100"],
    ]


# --- what an operator sees when it fails ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_failures_are_one_line_with_their_status(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    config = _config(workdir, pki, endorsement_ca)
    dev = device(7)

    async def scenario() -> dict[str, Run]:
        async with running(config) as verifier:
            await verifier.repos.devices.save(dev, now=_now(), event="enrolled:enrolled")
            vera = profile(workdir, pki, verifier, "vera")
            nobody = profile(workdir, pki, verifier, "nobody")
            return {
                "viewer lists": await devtrust_process(
                    "devices", "--json", env={"DEVTRUST_PROFILE": str(vera)}
                ),
                "viewer revokes": await devtrust_process(
                    "revoke", dev.device_id, "--reason", "stolen", "--profile", str(vera)
                ),
                "no role": await devtrust("score", dev.device_id, "--profile", str(nobody)),
                "wrong ca": await devtrust(
                    "devices", "--profile", str(vera), "--ca", str(pki.device_bundle)
                ),
                "still enrolled": await devtrust(
                    "show", dev.device_id, "--json", "--profile", str(vera)
                ),
            }

    runs = asyncio.run(scenario())
    assert runs["viewer lists"].status == 0, runs["viewer lists"].err
    assert [d["device_id"] for d in runs["viewer lists"].json()] == [dev.device_id]
    refused = runs["viewer revokes"]
    assert refused.status == 4
    assert refused.out == ""
    [line] = refused.err.splitlines()
    assert line.startswith("devtrust: revoke: refused by the verifier at 127.0.0.1:")
    assert line.endswith(
        "operator vera has role viewer; /devtrust.v1.Query/Revoke needs role operator or above"
    )
    assert runs["still enrolled"].json()["state"] == "enrolled"
    no_role = runs["no role"]
    assert no_role.status == 4
    assert "operator nobody has no role on this verifier" in no_role.err
    assert "/devtrust.v1.Query/GetTrustScore needs viewer" in no_role.err
    wrong_ca = runs["wrong ca"]
    assert wrong_ca.status == 3
    assert "TLS with the verifier at 127.0.0.1:" in wrong_ca.err
    assert "check that --ca is the verifier's CA" in wrong_ca.err


def test_an_unreachable_verifier_is_named(workdir: Path, pki: PkiFiles) -> None:
    port = _free_port()  # nothing listens there
    path = profile(workdir, pki, port, "otto")
    run = asyncio.run(devtrust_process("devices", "--profile", str(path)))
    assert run.status == 3
    assert run.out == ""
    assert run.err.splitlines() == [
        f"devtrust: devices: the verifier at 127.0.0.1:{port} is unreachable: it is down, or "
        f"the port is wrong (failed to connect to all addresses; last error: UNKNOWN: "
        f"ipv4:127.0.0.1:{port}: Failed to connect to remote host: Connection refused)"
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["devices"], "which verifier, as whom? missing --verifier, --cert, --key, --ca"),
        (["show", "xyz"], "argument DEVICE: 'xyz' is not a device id"),
        (["devices", "--label", "novalue"], "'novalue' is not KEY=VALUE"),
        (["devices", "--tier", "great"], "unknown tier 'great'"),
        (["revoke", "ab" * 32], "the following arguments are required: --reason"),
        (["devices", "--profile", "{missing}"], "cannot read: No such file or directory"),
        (["devices", "--profile", "{bad key}"], "unknown key(s) port; known: verifier"),
        (["devices", "--profile", "{vera}", "--key", "{otto key}"],
         "is not the key of the certificate"),
        (["devices", "--profile", "{vera}", "--ca", "{otto key}"], "holds no PEM certificate"),
        (["devices", "--profile", "{vera}", "--verifier", "localhost"], "is not HOST:PORT"),
        (["devices", "--profile", "{vera}", "--label", "a=1", "--label", "a=2"],
         "--label a is given twice"),
        *((["token", "create", f"--ttl-s={ttl}"],
           f"argument --ttl-s: '{ttl}': a token lives 60 to 2592000 seconds (30 days); give a "
           "lifetime in that range") for ttl in ("-5", "0", "59", "2592001", "1" + "0" * 20)),
        (["role", "bad name", "viewer"], "NAME 'bad name': an operator name is 1-64 letters"),
    ],
)  # fmt: skip
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str],
    message: str,
    workdir: Path,
    pki: PkiFiles,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DEVTRUST_PROFILE", raising=False)
    monkeypatch.setenv("HOME", str(workdir / "home"))
    vera = profile(workdir, pki, _free_port(), "vera")
    otto = profile(workdir, pki, _free_port(), "otto")
    (workdir / "bad.yaml").write_text("verifier: h:1\nport: 2\n")
    names = {
        "{missing}": str(workdir / "missing.yaml"),
        "{bad key}": str(workdir / "bad.yaml"),
        "{vera}": str(vera),
        "{otto key}": str(otto.parent / "operator-otto.key"),
    }
    argv = [names.get(a, a) for a in argv]
    try:
        status = cli.main(argv)
        lines = 1  # ours: one line
    except SystemExit as exc:  # argparse's: its usage, then one line
        status = int(str(exc.code))
        lines = 0
    err = capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in err
    assert message in err.splitlines()[-1]
    if lines:
        assert len(err.splitlines()) == 1, err
    else:
        assert err.startswith("usage: devtrust ")


# --- what reaches the terminal ------------------------------------------------------------------


def _view(n: int, hostname: str) -> DeviceView:
    trust = TrustView(
        device_id=f"{n:064x}", tier=Tier.AFFIRMING, score=100, claims={"hardware": 2},
        findings=(), appraised_at=None, expires_at=None, policy_id="", evidence_digest="",
        submods=(),
    )  # fmt: skip
    return DeviceView(
        device_id=f"{n:064x}", state=DeviceState.ENROLLED, zone="z", labels={"k": "v\x07"},
        host={"hostname": hostname}, enrolled_at=None, last_seen=None,
        ek_certificate_sha256="", ak_name="", trust=trust,
    )  # fmt: skip


def test_a_device_cannot_drive_the_operators_terminal() -> None:
    """A hostname and a label with escape sequences are shown escaped, in every view."""
    now = _now()
    view = _view(1, "evil\x1b[2J\x1b]0;owned\x07")
    text = "\n".join([*ops_format.devices_table([view], now), *ops_format.device_lines(view, now)])
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "evil\\x1b[2J\\x1b]0;owned\\x07" in text
    assert "k=v\\x07" in text


def test_short_ids_grow_where_two_devices_share_them() -> None:
    a, b, c = "ab" * 32, "ab" * 6 + "cd" * 26, "12" * 32
    assert ops_format.short_ids([a, b, c]) == {a: a[:16], b: b[:16], c: c[:16]}
    assert ops_format.short_ids([a, c]) == {a: a[:12], c: c[:12]}


def test_tokens_and_roles_over_the_api(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """`devtrust token create` (an operator) and `devtrust role` (an admin) change the
    verifier's database through the Query API; the configuration's `operators:` wins."""
    config = replace(_config(workdir, pki, endorsement_ca), operators={**OPERATORS, "ada": "admin"})

    async def scenario() -> tuple[dict[str, Run], Any, dict[str, str]]:
        async with running(config) as verifier:
            otto = str(profile(workdir, pki, verifier, "otto"))
            ada = str(profile(workdir, pki, verifier, "ada"))
            runs = {
                "token": await devtrust(
                    "token",
                    "create",
                    "--zone",
                    "model-development",
                    "--label",
                    "demo=true",
                    "--ttl-s",
                    "600",
                    "--note",
                    "rack 7",
                    "--profile",
                    otto,
                ),
                "token json": await devtrust("token", "create", "--json", "--profile", otto),
                "token bad zone": await devtrust(
                    "token", "create", "--zone", "bad zone", "--profile", otto
                ),
                "viewer token": await devtrust(
                    "token", "create", "--profile", str(profile(workdir, pki, verifier, "vera"))
                ),
                "role": await devtrust("role", "carol", "viewer", "--profile", ada),
                "role again": await devtrust("role", "carol", "operator", "--profile", ada),
                "role bob": await devtrust("role", "bob", "admin", "--profile", ada),
                "listed": await devtrust("role", "otto", "admin", "--profile", ada),
                "not admin": await devtrust("role", "carol", "admin", "--profile", otto),
            }
            token = runs["token"].out.strip()
            stored = await verifier.repos.tokens.get(hashlib.sha256(token.encode()).hexdigest())
            return runs, stored, await verifier.repos.roles.all()

    runs, stored, roles = asyncio.run(scenario())
    assert runs["token"].status == 0, runs["token"]
    assert "valid once, until " in runs["token"].err
    assert "assigns zone model-development, labels {'demo': 'true'}" in runs["token"].err
    assert stored is not None
    assert (stored.zone, stored.labels) == (
        "model-development",
        {"demo": "true"},
    )
    made = runs["token json"].json()
    assert set(made) == {"token", "expires_at", "zone", "labels"}
    assert made["zone"] == ""
    assert runs["token bad zone"].status != 0
    assert "bad zone" in runs["token bad zone"].err
    assert runs["viewer token"].status != 0
    assert "operator vera has role viewer" in runs["viewer token"].err
    assert runs["role"].out.strip() == (
        "operator carol: role viewer (was none), in force at its next call"
    )
    assert "role operator (was viewer)" in runs["role again"].out
    assert runs["listed"].status != 0
    assert "operator otto's role is set in the verifier's configuration (operators: otto: " \
        "operator), which wins over the database" in runs["listed"].err  # fmt: skip
    assert runs["not admin"].status != 0
    assert roles == {"carol": "operator", "bob": "admin"}


def test_token_labels_are_checked_and_approve_takes_an_upper_case_id(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """A token's label with a space, or too long, is refused with one line; `approve` takes a
    device id typed in upper case (the client lowercases it)."""
    config = _config(workdir, pki, endorsement_ca)
    pending = replace(device(7), state=DeviceState.PENDING_APPROVAL)

    async def scenario() -> tuple[dict[str, Run], DeviceState | None]:
        async with running(config) as verifier:
            await verifier.repos.devices.save(
                pending, now=_now(), event="enrolled:pending_approval"
            )
            otto = str(profile(workdir, pki, verifier, "otto"))
            runs = {
                "space": await devtrust("token", "create", "--label", "k= v", "--profile", otto),
                "long": await devtrust(
                    "token", "create", "--label", "k=" + "x" * 300, "--profile", otto
                ),
                "upper": await devtrust("approve", pending.device_id.upper(), "--profile", otto),
            }
            record = await verifier.repos.devices.get(pending.device_id)
            return runs, None if record is None else record.state

    runs, state = asyncio.run(scenario())
    for name, shown in (
        ("space", "value ' v' is not up to 128 printable ASCII characters other than space: "
                  "it has ' ' at position 1"),
        ("long", f"value {'x' * 64!r}... is not up to 128 printable ASCII characters other "
                 "than space: it is 300 characters long"),
    ):  # fmt: skip
        run = runs[name]
        assert run.status != 0, run
        assert len(run.err.splitlines()) == 1, run.err
        assert "label k: " + shown in run.err
        assert run.out == ""
    assert runs["upper"].status == 0, runs["upper"]
    assert state is DeviceState.ENROLLED
