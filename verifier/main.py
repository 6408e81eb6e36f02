"""``devtrust-verifier``: the verifier server (run as a systemd service)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import logging
import secrets
import signal
import sys
from pathlib import Path

from verifier.ca import CertificateAuthority
from verifier.config import VerifierConfig
from verifier.errors import DevtrustError
from verifier.pki import init_pki, issue_operator
from verifier.policy import PolicyError
from verifier.server import start_verifier
from verifier.store import DeviceState, Store

logger = logging.getLogger("devtrust.verifier")


async def serve(config: VerifierConfig) -> None:
    running = await start_verifier(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload_policy() -> None:
        try:
            policy = running.policy.reload()
        except PolicyError as exc:
            logger.error("SIGHUP: policy refused, the old one stays: %s", exc)  # noqa: TRY400
            return
        if policy is not None:
            logger.info("SIGHUP: policy %s loaded (%d rules)", policy.policy_id, len(policy.rules))

    loop.add_signal_handler(signal.SIGHUP, reload_policy)
    await stop.wait()
    logger.info("stopping")
    await running.stop(grace=5.0)


def _admin(args: argparse.Namespace, config: VerifierConfig, now: datetime.datetime) -> int:
    """Commands an administrator runs on the verifier host, against its database."""
    store = Store(config.database)
    try:
        if args.command == "token":
            token = secrets.token_urlsafe(32)
            expires = now + datetime.timedelta(seconds=args.ttl_s)
            store.add_token(
                hashlib.sha256(token.encode()).hexdigest(),
                now=now,
                expires_at=expires,
                note=args.note,
            )
            print(token)
            print(f"valid once, until {expires.isoformat()}", file=sys.stderr)
            return 0
        record = store.get_device(args.device_id)
        if record is None:
            print(f"devtrust-verifier: no device {args.device_id}", file=sys.stderr)
            return 1
        if record.state is not DeviceState.PENDING_APPROVAL:
            print(
                f"devtrust-verifier: device {args.device_id} is {record.state.value}, "
                "not pending approval",
                file=sys.stderr,
            )
            return 1
        store.set_state(args.device_id, DeviceState.ENROLLED, now=now, event="approved")
        print(f"approved {args.device_id}: its agent's next enrollment attempt completes")
        return 0
    finally:
        store.close()


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
    p = sub.add_parser("token", help="create a one-time bootstrap token for enrollment")
    p.add_argument("--config", type=Path, default=Path("/etc/devtrust/verifier.yaml"))
    p.add_argument("--ttl-s", type=int, default=24 * 3600, help="lifetime in seconds")
    p.add_argument("--note", default="", help="what the token is for (kept beside its hash)")
    p = sub.add_parser("approve", help="approve a device that awaits operator approval")
    p.add_argument("device_id")
    p.add_argument("--config", type=Path, default=Path("/etc/devtrust/verifier.yaml"))
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
        elif args.command in ("token", "approve"):
            return _admin(args, VerifierConfig.load(args.config), now)
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
