"""``devtrust-agent``: the host agent (run as a systemd service; see packaging/systemd)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import logging
import signal
import sys
from pathlib import Path

from google.protobuf import json_format

from agent.attest import AttestationClient
from agent.collect import collect_body
from agent.config import AgentConfig
from agent.enroll import EnrollmentPending, enroll
from agent.errors import DevtrustError
from agent.state import AgentFiles
from agent.tpm import AsyncTpm, TpmBackend
from protos.devtrust.v1 import attestation_pb2

logger = logging.getLogger("devtrust.agent")
PENDING_RETRY_S = 60.0


def make_tpm(cfg: AgentConfig) -> AsyncTpm:
    return AsyncTpm(TpmBackend(cfg.tpm.tcti, ek_type=cfg.tpm.ek_type, ak_handle=cfg.tpm.ak_handle))


async def run(cfg: AgentConfig, *, enroll_only: bool = False) -> None:
    files = AgentFiles(cfg.state_dir, cfg.runtime_dir)
    tpm = make_tpm(cfg)
    try:
        enrollment = files.load_enrollment()
        while enrollment is None:
            try:
                enrollment = await enroll(cfg, tpm, files)
            except EnrollmentPending as exc:
                if enroll_only:
                    raise
                logger.info("%s; asking again in %.0fs", exc, PENDING_RETRY_S)
                await asyncio.sleep(PENDING_RETRY_S)
        if enroll_only:
            print(enrollment.device_id)
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await AttestationClient(cfg, tpm, files, enrollment).run(stop)
    finally:
        tpm.close()


def collect(args: argparse.Namespace) -> int:
    """`devtrust-agent collect`: the evidence body as JSON, to feed `devtrust policy eval`."""
    try:
        cfg = AgentConfig.load(args.config) if args.config else AgentConfig()
    except DevtrustError as exc:
        print(f"devtrust-agent: {exc}", file=sys.stderr)
        return 2
    if args.root:
        cfg = dataclasses.replace(cfg, posture_root=args.root)
    if args.gpu_xml:
        cfg = dataclasses.replace(cfg, gpu_source="nvidia-smi-xml", gpu_xml=args.gpu_xml)
    body = attestation_pb2.EvidenceBody.FromString(
        collect_body(cfg, now=datetime.datetime.now(datetime.UTC))
    )
    if args.json:
        print(json_format.MessageToJson(body, preserving_proto_field_name=True))
        return 0
    os_, gpu = body.os, body.gpu
    print(
        f"host      {body.host.hostname} ({os_.os_id} {os_.os_version}, kernel "
        f"{os_.kernel_release})"
    )
    print(
        f"posture   secure_boot={_opt(os_, 'secure_boot')} lockdown={os_.lockdown or '?'} "
        f"selinux={os_.selinux_mode or '?'} sshd root={os_.sshd.permit_root_login or '?'} "
        f"listening={len(os_.listening)} modules={len(os_.modules)}"
    )
    print(f"gpu       {gpu.source}: driver {gpu.driver_version or '?'}, {len(gpu.gpus)} GPUs")
    unknown = [u.field for u in (*os_.unavailable, *gpu.unavailable)]
    print(f"unknown   {', '.join(unknown) or 'none'}")
    return 0


def _opt(msg: attestation_pb2.OsPosture, name: str) -> str:
    return str(getattr(msg, name)) if msg.HasField(name) else "?"  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devtrust-agent", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "enroll if needed, then attest until stopped"),
        ("enroll", "enroll this host's TPM and print the device id"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", type=Path, default=Path("/etc/devtrust/agent.yaml"))
    p = sub.add_parser(
        "collect", help="print the evidence body this host would send (without a quote)"
    )
    p.add_argument("--config", type=Path, help="agent configuration (optional)")
    p.add_argument("--root", type=Path, help="read posture from this root instead of /")
    p.add_argument("--gpu-xml", type=Path, help="take GPU state from nvidia-smi -q -x output")
    p.add_argument("--json", action="store_true", help="JSON (default: a summary)")
    args = parser.parse_args(argv)
    if args.command == "collect":
        return collect(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = AgentConfig.load(args.config)
        asyncio.run(run(cfg, enroll_only=args.command == "enroll"))
    except EnrollmentPending as exc:
        print(f"devtrust-agent: {exc}", file=sys.stderr)
        return 3
    except DevtrustError as exc:
        print(f"devtrust-agent: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
