"""``devtrust-verifier``: the verifier server (run as a systemd service)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import signal
import sys
from pathlib import Path

from verifier.ca import CertificateAuthority
from verifier.config import VerifierConfig
from verifier.errors import DevtrustError
from verifier.pki import init_pki, issue_operator
from verifier.server import start_verifier

logger = logging.getLogger("devtrust.verifier")


async def serve(config: VerifierConfig) -> None:
    running = await start_verifier(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("stopping")
    await running.stop(grace=5.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devtrust-verifier", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the verifier")
    p.add_argument("--config", type=Path, default=Path("/etc/devtrust/verifier.yaml"))
    p = sub.add_parser("init", help="make the CA and server certificate in a directory")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument(
        "--hostname",
        action="append",
        required=True,
        help="server name or IP address for the server certificate (repeatable)",
    )
    p = sub.add_parser("operator", help="issue an operator certificate for the query API")
    p.add_argument("--dir", type=Path, required=True, help="directory made by init")
    p.add_argument("--name", required=True)
    p.add_argument("--trust-domain", default="devtrust.local")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    now = datetime.datetime.now(datetime.UTC)
    try:
        if args.command == "serve":
            asyncio.run(serve(VerifierConfig.load(args.config)))
        elif args.command == "init":
            files = init_pki(args.dir, hostnames=args.hostname, now=now)
            print(f"CA {files.ca_cert}\nserver certificate {files.server_cert}")
        else:
            ca = CertificateAuthority.load(args.dir / "ca.pem", args.dir / "ca.key")
            cert, key = issue_operator(
                ca, args.dir, name=args.name, trust_domain=args.trust_domain, now=now
            )
            print(f"operator certificate {cert}\nkey {key}")
    except DevtrustError as exc:
        print(f"devtrust-verifier: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
