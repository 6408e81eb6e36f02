"""``devtrust-demo`` (``python -m devtrust.swtpm.demo``): the whole main job on the embedded
default, on one machine.

Makes the verifier's CAs (its own, and the device issuing CA) and server certificate, starts
a verifier on SQLite, provisions and starts a swtpm with an EK certificate from a local
endorsement CA made for this run, runs an agent that enrolls and attests, and prints the trust
result, the device certificate and the bundle that verifies it (device issuing CAs only).
Every process and server it started is stopped on success, error or Ctrl-C.

It lives with the software TPMs, outside the runtime packages: it drives both the agent and
the verifier, which never import each other (tests/test_layers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

# grpc prints its own INFO lines (TLS handshake failures) unless told before it loads:
# one line per error is ours to write.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from cryptography import x509

from devtrust.agent.attest import AttestationClient
from devtrust.agent.config import AgentConfig, TpmConfig, VerifierEndpoint
from devtrust.agent.enroll import enroll
from devtrust.agent.main import make_host, make_tpm
from devtrust.agent.messages import AttestationResult
from devtrust.agent.state import AgentFiles
from devtrust.agent.wire import tier_from_wire
from devtrust.core.claims import DeviceClaims
from devtrust.core.command import TOOL_ERRORS, run_command
from devtrust.core.errors import DevtrustError
from devtrust.core.ids import serial_of
from devtrust.core.logsetup import configure_logging
from devtrust.core.spiffe import spiffe_ids
from devtrust.swtpm import EndorsementCA, Swtpm, provision
from devtrust.swtpm.bootlog import simulate_boot
from devtrust.swtpm.hosttree import write_host_tree
from devtrust.v1 import query_pb2, query_pb2_grpc
from devtrust.verifier.ca import pem
from devtrust.verifier.config import (
    AttestationConfig,
    CaConfig,
    EndorsementConfig,
    GpuConfig,
    ListenConfig,
    TlsConfig,
    VerifierConfig,
)
from devtrust.verifier.pki import init_pki, issue_operator, load_ca, writable_dir
from devtrust.verifier.server import start_verifier
from devtrust.verifier.tools import HelpFormatter, version_line

TIMEOUT_S = 60.0
DEMO_ZONE = "data-processing"
# Marks an --out directory as the demo's: a later demo may replace what is in it.
MARKER = ".devtrust-demo"
# What a demo writes in --out (demos before the marker left these and nothing else).
OUTPUTS = frozenset(
    {
        "verifier.db",
        "verifier.db-wal",
        "verifier.db-shm",
        "result.json",
        "device-cert.pem",
        "ca-bundle.pem",
    }
)


def check_out_dir(out: Path) -> None:
    """Refuse an --out directory that holds files no demo wrote: the demo replaces its
    verifier.db and result.json, and a user's own must not be lost. A directory made by an
    earlier demo (its marker, or only the demo's files, result.json among them) may be
    replaced; so may an empty or new one."""
    if not out.is_dir() or (out / MARKER).is_file():
        return  # new (made below), or not a directory (writable_dir says so)
    names = {p.name for p in out.iterdir()}
    if not names or ("result.json" in names and names <= OUTPUTS):
        return
    raise DevtrustError(
        f"--out {out} is not empty and no demo made it ({len(names)} entries, e.g. "
        f"{sorted(names)[0]!r}); the demo would replace verifier.db and result.json there: "
        "give a new or empty directory (--out DIR)"
    )


async def run_demo(out: Path, work: Path) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC)
    out.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        pki = init_pki(work / "verifier", hostnames=["localhost", "127.0.0.1"], now=now)
        ek_ca = EndorsementCA.create(work / "ek-ca")
        provision(work / "tpm", ek_ca)
        swtpm = Swtpm(work / "tpm")
        stack.callback(swtpm.stop)
        swtpm.start()

        db = out / "verifier.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        vcfg = VerifierConfig(
            database=db,
            listen=ListenConfig(enrollment="127.0.0.1:0", attestation="127.0.0.1:0"),
            tls=TlsConfig(server_cert=pki.server_cert, server_key=pki.server_key),
            ca=CaConfig(cert=pki.ca_cert, key=pki.ca_key),
            endorsement=EndorsementConfig(trust_swtpm_local_ca=ek_ca.cert_path),
            attestation=AttestationConfig(interval_s=30.0),
            # The operator who reads the result back below only reads.
            operators={"demo": "viewer"},
            # No GPU here: an empty RIM store of the demo's own, not the machine's.
            gpu=GpuConfig(rim_store=work / "rims"),
        )
        verifier = await start_verifier(vcfg)
        stack.push_async_callback(verifier.stop)
        # The operator assigns the zone and labels with the one-time bootstrap token (as
        # `devtrust token create --zone Z --label K=V` does); a device never
        # chooses its own. No GPU on this machine: a zone that requires no GPU state.
        token = secrets.token_urlsafe(24)
        await verifier.repos.tokens.add(
            hashlib.sha256(token.encode()).hexdigest(),
            now=now,
            expires_at=now + datetime.timedelta(hours=1),
            note="demo",
            zone=DEMO_ZONE,
            labels={"demo": "true"},
        )

        acfg = AgentConfig(
            verifier=VerifierEndpoint(
                enrollment=f"127.0.0.1:{verifier.enrollment_port}",
                attestation=f"127.0.0.1:{verifier.attestation_port}",
                ca_bundle=pki.ca_cert,
            ),
            tpm=TpmConfig(tcti=swtpm.tcti),
            state_dir=work / "agent-state",
            runtime_dir=work / "agent-run",
            # The swtpm's own measured boot (swtpm/bootlog.py), not this host's log, which
            # belongs to its real TPM.
            event_log=work / "event-log.bin",
            # A simulated well-configured host's posture (this machine's is not one),
            # appraised by the default policy; no GPU state on a machine without a GPU.
            posture_root=write_host_tree(work / "host"),
            gpu_source="none",
            bootstrap_token=token,
        )
        tpm = make_tpm(acfg)
        stack.callback(tpm.close)
        assert acfg.event_log is not None
        simulate_boot(tpm.backend.esapi, acfg.event_log)
        files = AgentFiles(acfg.state_dir, acfg.runtime_dir)
        host = make_host(acfg)
        enrollment = await enroll(acfg, tpm, files, host=host)

        loop = asyncio.get_running_loop()
        first: asyncio.Future[AttestationResult] = loop.create_future()

        def on_result(result: AttestationResult) -> None:
            if not first.done():
                first.set_result(result)

        stop = asyncio.Event()
        client = AttestationClient(
            acfg, tpm=tpm, host=host, files=files, enrollment=enrollment, on_result=on_result
        )
        agent_task = asyncio.create_task(client.run(stop))

        async def stop_agent() -> None:
            stop.set()
            await agent_task

        stack.push_async_callback(stop_agent)
        waiting: set[asyncio.Future[Any]] = {first, agent_task}
        done, _ = await asyncio.wait(
            waiting, timeout=TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if agent_task in done:
            agent_task.result()  # raises what stopped the agent
            raise RuntimeError("the agent stopped before its first result")
        if not done:
            raise RuntimeError(f"no attestation result within {TIMEOUT_S:.0f}s")
        result = first.result()
        if result.certificate is None:
            findings = "; ".join(f.message for f in result.trust.findings)
            raise RuntimeError(f"no device certificate: tier {result.trust.tier.label}: {findings}")

        # An operator reads the stored result back over the query API (mTLS).
        ca = load_ca(pki.ca_cert, pki.ca_key)
        op_cert, op_key = issue_operator(
            ca, work / "verifier", name="demo", trust_domain=vcfg.trust_domain, now=now
        )
        creds = grpc.ssl_channel_credentials(
            pem(ca.cert), op_key.read_bytes(), op_cert.read_bytes()
        )
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{verifier.attestation_port}", creds
        ) as channel:
            stored = await query_pb2_grpc.QueryStub(channel).GetTrustScore(
                query_pb2.GetTrustScoreRequest(device_id=enrollment.device_id), timeout=10
            )

        cert = x509.load_pem_x509_certificate((acfg.runtime_dir / "device.pem").read_bytes())
        shutil.copyfile(acfg.runtime_dir / "device.pem", out / "device-cert.pem")
        # The relying-party bundle as the agent keeps it beside its certificate: the device
        # issuing CAs only, so a channel, operator or server certificate does not verify.
        shutil.copyfile(acfg.runtime_dir / "ca-bundle.pem", out / "ca-bundle.pem")
        claims = DeviceClaims.from_certificate(cert)
        summary = {
            "device_id": enrollment.device_id,
            "tier": tier_from_wire(stored.tier).label,
            "score": stored.score,
            "claims": {
                c.name: {"value": c.value, "tier": tier_from_wire(c.tier).label}
                for c in stored.claims
            },
            "reasons": [{"id": f.id, "message": f.message} for f in stored.findings],
            "certificate": {
                "subject": cert.subject.rfc4514_string(),
                "spiffe_id": spiffe_ids(cert)[0],
                "serial": serial_of(cert.serial_number),
                "not_before": cert.not_valid_before_utc.isoformat(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "tier": claims.tier.label if claims else "",
                "zone": claims.zone if claims else "",
            },
            "verifier_database": str(db),
        }
        (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def print_summary(summary: dict[str, Any], out: Path) -> None:
    cert = summary["certificate"]
    lines = [
        f"device      {summary['device_id']}",
        f"tier        {summary['tier']}   score {summary['score']}/100",
        "claims      "
        + ", ".join(f"{k}={v['value']} ({v['tier']})" for k, v in summary["claims"].items()),
        "reasons     "
        + (
            "; ".join(f"{r['id']}: {r['message']}" for r in summary["reasons"])
            or "none: every check passed"
        ),
        f"certificate {cert['subject']}  {cert['spiffe_id']}",
        f"            serial {cert['serial']}, valid until {cert['not_after']}, "
        f"tier {cert['tier']}, zone {cert['zone']}",
        f"files       {out / 'result.json'}, {out / 'device-cert.pem'}, {out / 'ca-bundle.pem'}",
        f"check       openssl verify -CAfile {out / 'ca-bundle.pem'} {out / 'device-cert.pem'}",
    ]
    print("\n".join(lines))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _out_dir(value: str) -> Path:
    if not value.strip():  # Path("") would be the current directory
        raise DevtrustError("--out is empty: give the directory for the results")
    return Path(value)


def demo(out: Path, *, keep_work: bool = False) -> int:
    check_out_dir(out)
    writable_dir(out, "--out")  # before anything starts: one line, nothing to undo
    (out / MARKER).write_text(
        "written by `devtrust-demo`: a later demo may replace this directory\n"
    )
    # SIGTERM and Ctrl-C unwind alike, so the swtpm process and the servers are stopped too:
    # both raise KeyboardInterrupt. (asyncio.run's own Ctrl-C handling only cancels the main
    # task, and a cancellation that lands while the demo is already stopping what it started
    # is consumed there: the demo then finished as if never interrupted.)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="devtrust-demo-"))
    try:
        summary = asyncio.run(run_demo(out, work))
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(summary, out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devtrust-demo",
        description="verifier + swtpm agent on this machine: enroll, attest, certify",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--out", default="demo-out", help="where the results are written")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit 0 done, 1 an error (one line says what), 2 a usage error, 130 interrupted."""
    args = build_parser().parse_args(argv)
    configure_logging(logging.INFO if args.verbose else logging.WARNING)
    return run_command(
        "devtrust-demo", lambda: demo(_out_dir(args.out), keep_work=args.keep_work), TOOL_ERRORS
    )


if __name__ == "__main__":
    sys.exit(main())
