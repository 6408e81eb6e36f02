"""``devtrust-agent``: the host agent (run as a systemd service; see packaging/systemd)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from agent.attest import AttestationClient
from agent.config import AgentConfig
from agent.enroll import EnrollmentPending, enroll
from agent.errors import DevtrustError
from agent.state import AgentFiles
from agent.tpm import AsyncTpm, TpmBackend

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
    args = parser.parse_args(argv)
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
