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
from verifier.inventory import Inventory, parse_labels, zone_problem
from verifier.pki import init_pki, issue_operator
from verifier.policy import PolicyError
from verifier.records import DeviceState
from verifier.server import start_verifier
from verifier.store import Store

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


def _token(args: argparse.Namespace, config: VerifierConfig, now: datetime.datetime) -> int:
    """`token create`: a one-time bootstrap token, stored hashed, with what it assigns."""
    labels = parse_labels(args.label)
    problem = zone_problem(args.zone)
    if problem is not None:
        raise ValueError(problem)
    token = secrets.token_urlsafe(32)
    expires = now + datetime.timedelta(seconds=args.ttl_s)
    store = Store(config.database)
    try:
        store.add_token(
            hashlib.sha256(token.encode()).hexdigest(),
            now=now,
            expires_at=expires,
            note=args.note,
            zone=args.zone,
            labels=labels,
        )
    finally:
        store.close()
    print(token)
    assigns = f"zone {args.zone or '(unassigned)'}, labels {labels}"
    print(f"valid once, until {expires.isoformat()}; assigns {assigns}", file=sys.stderr)
    return 0


def _approve(args: argparse.Namespace, config: VerifierConfig, now: datetime.datetime) -> int:
    """`approve DEVICE [--zone Z] [--label K=V]...`: let a pending device attest, and/or set
    its zone and labels (given labels replace all of them). Audited."""
    labels = parse_labels(args.label) if args.label else None
    problem = zone_problem(args.zone) if args.zone is not None else None
    if problem is not None:
        raise ValueError(problem)
    assigns = args.zone is not None or labels is not None
    if assigns and config.enrollment.inventory is not None:
        listed = Inventory.load(config.enrollment.inventory).get(args.device_id)
        if listed is not None:
            raise ValueError(
                f"device {args.device_id} is listed in the inventory "
                f"{config.enrollment.inventory} (zone {listed.zone}), which wins over "
                "approval: change it there and restart the verifier"
            )
    store = Store(config.database)
    try:
        record = store.get_device(args.device_id)
        if record is None:
            raise ValueError(f"no device {args.device_id}")
        pending = record.state is DeviceState.PENDING_APPROVAL
        if record.state is DeviceState.REVOKED or not (pending or assigns):
            raise ValueError(
                f"device {args.device_id} is {record.state.value}, not pending approval"
            )
        if assigns:
            zone = record.zone if args.zone is None else args.zone
            labels = record.labels if labels is None else labels
            store.set_assignment(
                args.device_id, zone=zone, labels=labels, now=now, event="assigned:approval"
            )
            print(f"device {args.device_id}: zone {zone or '(unassigned)'}, labels {labels}")
        if pending:
            store.set_state(args.device_id, DeviceState.ENROLLED, now=now, event="approved")
            print(f"approved {args.device_id}: its agent's next enrollment attempt completes")
        return 0
    finally:
        store.close()


def _inventory_check(args: argparse.Namespace) -> int:
    """`inventory check`: validate an inventory before the verifier loads it at start."""
    path = args.file or VerifierConfig.load(args.config).enrollment.inventory
    if path is None:
        raise ValueError(f"no inventory given, and none in {args.config} (enrollment.inventory)")
    inventory = Inventory.load(path)
    zones = sorted({a.zone for a in inventory.devices.values()})
    print(f"{path}: {len(inventory.devices)} devices, zones {', '.join(zones) or '-'}")
    return 0


def _admin(args: argparse.Namespace, now: datetime.datetime) -> int:
    """Commands an administrator runs on the verifier host; usage errors exit 1."""
    try:
        if args.command == "inventory":
            return _inventory_check(args)
        config = VerifierConfig.load(args.config)
        if args.command == "token":
            return _token(args, config, now)
        return _approve(args, config, now)
    except ValueError as exc:
        print(f"devtrust-verifier: {exc}", file=sys.stderr)
        return 1


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
    p.add_argument("action", nargs="?", choices=["create"], default="create")
    p.add_argument("--config", type=Path, default=Path("/etc/devtrust/verifier.yaml"))
    p.add_argument("--ttl-s", type=int, default=24 * 3600, help="lifetime in seconds")
    p.add_argument("--note", default="", help="what the token is for (kept beside its hash)")
    p.add_argument("--zone", default="", help="zone of the device that first enrolls with it")
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeatable)")
    p = sub.add_parser(
        "approve", help="approve a pending device and/or set a device's zone and labels"
    )
    p.add_argument("device_id")
    p.add_argument("--config", type=Path, default=Path("/etc/devtrust/verifier.yaml"))
    p.add_argument("--zone", default=None, help="the device's zone from now on")
    p.add_argument(
        "--label", action="append", default=[], help="KEY=VALUE (repeatable; replaces all)"
    )
    p = sub.add_parser("inventory", help="enrollment inventory (device id -> zone, labels)")
    p.add_argument("action", choices=["check"])
    p.add_argument("file", type=Path, nargs="?", help="default: enrollment.inventory")
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
        elif args.command in ("token", "approve", "inventory"):
            return _admin(args, now)
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
