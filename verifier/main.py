"""``devtrust-verifier``: the verifier server (run as a systemd service)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import getpass
import hashlib
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

# grpc prints its own INFO lines (TLS handshake failures) unless told before it loads:
# one line per error is ours to write.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from devtrust.core.command import ErrorPolicy, one_line, run_command
from devtrust.core.errors import ConfigError, DevtrustError
from devtrust.core.logsetup import configure_logging
from devtrust.verifier import lifecycle
from devtrust.verifier.config import CertificatesConfig, VerifierConfig, trust_domain_problem
from devtrust.verifier.device_pki import rotate_device_ca
from devtrust.verifier.inventory import Inventory, parse_labels, zone_problem
from devtrust.verifier.logtext import printable
from devtrust.verifier.pki import (
    PkiFiles,
    check_operator_name,
    init_pki,
    issue_operator,
    load_ca,
)
from devtrust.verifier.policy import PolicyError
from devtrust.verifier.revocation import zone_change_reason
from devtrust.verifier.roles import LABELS, Role
from devtrust.verifier.server import start_verifier
from devtrust.verifier.storage import open_repositories
from devtrust.verifier.tools import HelpFormatter, version_line

logger = logging.getLogger("devtrust.verifier")
DEFAULT_CONFIG = Path("/etc/devtrust/verifier.yaml")
# A bootstrap token's lifetime: long enough to image a host, short enough to matter.
TOKEN_TTL_S = (60, 30 * 24 * 3600)


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
    low, high = TOKEN_TTL_S
    if not low <= args.ttl_s <= high:
        raise ValueError(
            f"--ttl-s {args.ttl_s}: a token lives {low} to {high} seconds (30 days); give a "
            "lifetime in that range"
        )
    labels = parse_labels(args.label)
    problem = zone_problem(args.zone)
    if problem is not None:
        raise ValueError(problem)
    token = secrets.token_urlsafe(32)
    expires = now + datetime.timedelta(seconds=args.ttl_s)

    async def add() -> None:
        repos = await open_repositories(config.database, create=False)  # only serve makes it
        try:
            await repos.tokens.add(
                hashlib.sha256(token.encode()).hexdigest(),
                now=now,
                expires_at=expires,
                note=args.note,
                zone=args.zone,
                labels=labels,
            )
        finally:
            await repos.close()

    asyncio.run(add())
    print(token)
    assigns = f"zone {args.zone or '(unassigned)'}, labels {labels}"
    print(f"valid once, until {expires.isoformat()}; assigns {assigns}", file=sys.stderr)
    return 0


def _approve(args: argparse.Namespace, config: VerifierConfig, now: datetime.datetime) -> int:
    """`approve DEVICE [--zone Z] [--label K=V]...`: let a pending device attest, and/or set
    its zone and labels (given labels replace all of them). The Query service's Approve
    transition (verifier/lifecycle.py), audited with the local user as its actor."""
    args.device_id = args.device_id.lower()  # ids are lower-case hex (the verifier logs them)
    labels = parse_labels(args.label) if args.label else None
    problem = zone_problem(args.zone) if args.zone is not None else None
    if problem is not None:
        raise ValueError(problem)
    action = lifecycle.Approve(zone=args.zone, labels=labels)
    inventory = None
    if action.assigns and config.enrollment.inventory is not None:
        inventory = Inventory.load(config.enrollment.inventory)
    return asyncio.run(_approve_stored(args, config, now, action, inventory))


def local_actor() -> str:
    """Who runs a command on the verifier host, as the audit names them."""
    try:
        return f"local/{getpass.getuser()}"
    except (KeyError, OSError):
        return f"local/uid-{os.getuid()}"


async def _approve_stored(
    args: argparse.Namespace,
    config: VerifierConfig,
    now: datetime.datetime,
    action: lifecycle.Approve,
    inventory: Inventory | None,
) -> int:
    repos = await open_repositories(config.database, create=False)  # only serve makes the database
    try:
        record = await repos.devices.get(args.device_id)
        if record is None:
            raise ValueError(
                f"no device {printable(args.device_id, 64)} in {config.database}: give the whole "
                "device id (the verifier logs it: `enrolled device=ID state=pending_approval`)"
            )
        device_id = record.device_id
        try:
            change = lifecycle.transition(
                device_id,
                lifecycle.standing(record),
                action,
                pinned=lifecycle.pinned_by(inventory, device_id),
            )
        except DevtrustError as exc:  # a usage error here: exit 1, as before
            raise ValueError(str(exc)) from None
        written = await repos.operations.apply(
            device_id,
            before=change.before,
            after=change.after,
            events=change.events,
            actor=local_actor(),
            now=now,
        )
        if not written:
            raise ValueError(f"device {device_id} changed while it was approved: run approve again")
        if change.zone_changed:
            # Its live certificates name the old zone. Recorded here (database, audit); a
            # running verifier loads revocations at start only, so its feed and CRL list
            # them once it restarts: move a device under a live verifier with SetZone.
            revoked = await repos.revocations.revoke_certificates(
                device_id,
                reason=zone_change_reason(change.before.zone, change.after.zone),
                actor=local_actor(),
                now=now,
            )
            if revoked:
                print(
                    f"revoked {len(revoked)} live certificates of {device_id} naming zone "
                    f"{change.before.zone or '(unassigned)'}; a running verifier publishes "
                    "them on its feed and CRL when it restarts",
                    file=sys.stderr,
                )
        if change.assigned:
            zone, labels = change.after.zone, change.after.labels
            print(f"device {device_id}: zone {zone or '(unassigned)'}, labels {labels}")
        if change.approved:
            print(f"approved {device_id}: its agent's next enrollment attempt completes")
        return 0
    finally:
        await repos.close()


async def _set_role(
    config: VerifierConfig, source: Path, name: str, role: Role | None, now: datetime.datetime
) -> str | None:
    """Record ``role`` (None: none) for operator ``name`` in the database; the role it had.
    The configuration's ``operators:`` wins: a name it lists is refused unless unchanged."""
    listed = config.operators.get(name)
    if listed is not None:
        if role is not None and role.label == listed:
            return listed
        raise ValueError(
            f"operator {name}'s role is set in {source} (operators: {name}: {listed}), which "
            "wins over the database: change it there and restart the verifier"
        )
    repos = await open_repositories(config.database, create=False)  # only serve makes it
    try:
        return await repos.roles.set(
            name, role.label if role else None, now=now, actor=local_actor()
        )
    finally:
        await repos.close()


def _role(args: argparse.Namespace, config: VerifierConfig, now: datetime.datetime) -> int:
    """`role NAME ROLE|none`: assign an operator's role, or take it away (in force at the
    operator's next call)."""
    check_operator_name(args.name, given_as="NAME")
    role = None if args.role == "none" else Role.parse(args.role)
    was = asyncio.run(_set_role(config, args.config, args.name, role, now))
    print(
        f"operator {args.name}: role {args.role} (was {was or 'none'}), in force at its next call"
    )
    return 0


def _inventory_check(args: argparse.Namespace) -> int:
    """`inventory check`: validate an inventory before the verifier loads it at start."""
    path = args.file or _config(args.config).enrollment.inventory
    if path is None:
        raise ValueError(f"no inventory given, and none in {args.config} (enrollment.inventory)")
    inventory = Inventory.load(path)
    zones = sorted({a.zone for a in inventory.devices.values()})
    print(f"{path}: {len(inventory.devices)} devices, zones {', '.join(zones) or '-'}")
    return 0


def _config(path: Path) -> VerifierConfig:
    if not path.exists():
        raise ConfigError(
            f"configuration {path} does not exist: copy packaging/config/verifier.yaml there "
            "and adapt it, or give --config FILE"
        )
    return VerifierConfig.load(path)


def _admin(args: argparse.Namespace, now: datetime.datetime) -> int:
    """Commands an administrator runs on the verifier host; usage errors exit 1."""
    try:
        if args.command == "inventory":
            return _inventory_check(args)
        config = _config(args.config)
        if args.command == "token":
            return _token(args, config, now)
        if args.command == "role":
            return _role(args, config, now)
        return _approve(args, config, now)
    except ValueError as exc:
        print(f"devtrust-verifier: {one_line(exc)}", file=sys.stderr)
        return 1


def _directory(value: str, flag: str) -> Path:
    """A directory named on the command line; an empty one is not the current directory."""
    if not value.strip():
        raise DevtrustError(
            f"{flag} is empty: give the directory (e.g. {flag} /etc/devtrust/verifier)"
        )
    return Path(value)


def _init(args: argparse.Namespace, now: datetime.datetime) -> int:
    directory = _directory(args.dir, "--dir")
    files = init_pki(directory, hostnames=args.hostname, now=now, force=args.force)
    if files.backups:
        kept = ", ".join(str(b) for b in files.backups)
        print(f"replaced the CA; the old files are kept as {kept}", file=sys.stderr)
    print(f"CA {files.ca_cert}\nserver certificate {files.server_cert}")
    print(f"device issuing CA {files.device_ca_cert}\nrelying-party bundle {files.device_bundle}")
    return 0


def _ca(args: argparse.Namespace, now: datetime.datetime) -> int:
    """`ca rotate`: publish a next device issuing CA now; it signs from --activate-after."""
    directory = _directory(args.dir, "--dir")
    lifetime_s = args.device_lifetime_s
    if lifetime_s < 60 or (args.activate_after is not None and args.activate_after < 0):
        raise DevtrustError(
            "--device-lifetime-s is at least 60 and --activate-after at least 0 (seconds)"
        )
    delay = lifetime_s if args.activate_after is None else args.activate_after
    rotation = rotate_device_ca(
        directory,
        now=now,
        activate_after=datetime.timedelta(seconds=delay),
        device_lifetime=datetime.timedelta(seconds=lifetime_s),
    )
    files = PkiFiles.in_dir(directory)
    if rotation is None:
        print(f"device issuing CA {files.device_ca_cert}: signs at once (there was none)")
    else:
        if rotation.promoted:
            print(f"device issuing CA {files.device_ca_cert}: the published one, now signing")
        print(
            f"next device issuing CA {files.next_cert}: published now, signs from "
            f"{rotation.next.activate_after.isoformat()}; restart the verifier before then"
        )
    print(f"relying-party bundle {files.device_bundle}")
    return 0


def _operator(args: argparse.Namespace, now: datetime.datetime) -> int:
    directory = _directory(args.dir, "--dir")
    check_operator_name(args.name)
    problem = trust_domain_problem(args.trust_domain)
    if problem is not None:
        raise DevtrustError(f"--trust-domain {problem}")
    ca = load_ca(directory / "ca.pem", directory / "ca.key", configured=False)
    present = [
        p.name
        for p in (directory / f"operator-{args.name}.pem", directory / f"operator-{args.name}.key")
        if p.exists()
    ]
    if present and not args.force:
        raise DevtrustError(
            f"{directory} already holds operator {args.name}'s certificate "
            f"({', '.join(present)}): keep it, or run operator again with --force (the old "
            "files are kept as *.bak)"
        )
    if args.role is not None:  # recorded first: no certificate without the role asked for
        config = _config(args.config)
        try:
            asyncio.run(_set_role(config, args.config, args.name, Role.parse(args.role), now))
        except ValueError as exc:
            raise DevtrustError(str(exc)) from None
    cert, key = issue_operator(
        ca, directory, name=args.name, trust_domain=args.trust_domain, now=now
    )
    print(f"operator certificate {cert}\nkey {key}")
    if args.role is not None:
        print(f"role {args.role} (in force at once)")
    else:
        print(
            f"no role: the verifier refuses {args.name} until one is assigned (`operators:` in "
            f"its configuration, or `devtrust-verifier role {args.name} ROLE`)",
            file=sys.stderr,
        )
    # The operator's `devtrust` profile (verifier/ops_connect.py), all but the address.
    print(
        "# a profile for `devtrust` (~/.config/devtrust/operator.yaml): give the address\n"
        f"verifier: HOST:PORT\ncert: {cert.resolve()}\nkey: {key.resolve()}\n"
        f"ca: {(directory / 'ca.pem').resolve()}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devtrust-verifier", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)

    config_help = "the verifier's configuration file"
    p = command("serve", "run the verifier")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    p = command("init", "make the CA and server certificate in a directory")
    p.add_argument("--dir", required=True, help="directory for the CA and server files")
    p.add_argument(
        "--hostname",
        action="append",
        required=True,
        help="server name or IP address for the server certificate (repeatable)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a CA already there (every certificate it issued stops verifying); "
        "the replaced files are kept as NAME.<time>.bak",
    )
    p = command("ca", "rotate the device issuing CA (published ahead of signing)")
    p.add_argument("action", choices=["rotate"], help="what to do")
    p.add_argument("--dir", required=True, help="directory made by init")
    default_lifetime = CertificatesConfig().device_lifetime_s
    p.add_argument(
        "--device-lifetime-s",
        type=int,
        default=default_lifetime,
        help="certificates.device_lifetime_s of the verifier: a retired CA stays in the bundle "
        "this long after its successor starts signing",
    )
    p.add_argument(
        "--activate-after",
        type=int,
        default=None,
        help="seconds from now until the new CA signs; default: the device certificate "
        "lifetime, so that relying parties hold it before any certificate it signed",
    )
    p = command("token", "create a one-time bootstrap token for enrollment")
    p.add_argument("action", nargs="?", choices=["create"], default="create", help="what to do")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    p.add_argument(
        "--ttl-s",
        type=int,
        default=24 * 3600,
        help=f"lifetime in seconds, {TOKEN_TTL_S[0]} to {TOKEN_TTL_S[1]} (30 days)",
    )
    p.add_argument("--note", default="", help="what the token is for (kept beside its hash)")
    p.add_argument("--zone", default="", help="zone of the device that first enrolls with it")
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeatable)")
    p = command("approve", "approve a pending device and/or set a device's zone and labels")
    p.add_argument("device_id", help="the device id (sha256 of its EK public key, hex)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    p.add_argument("--zone", default=None, help="the device's zone from now on; none: unchanged")
    p.add_argument(
        "--label", action="append", default=[], help="KEY=VALUE (repeatable; replaces all)"
    )
    p = command(
        "role",
        "assign an operator's role on the query API, or take it away (none); in force at its "
        "next call. The configuration's `operators:` wins for the names it lists",
    )
    p.add_argument("name", help="operator name, as in spiffe://TD/operator/NAME")
    p.add_argument("role", choices=[*LABELS, "none"], help="the role from now on")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    p = command("inventory", "enrollment inventory (device id -> zone, labels)")
    p.add_argument("action", choices=["check"], help="what to do")
    p.add_argument(
        "file", type=Path, nargs="?", help="the inventory; default: enrollment.inventory"
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    p = command("operator", "issue an operator certificate for the query API")
    p.add_argument("--dir", required=True, help="directory made by init")
    p.add_argument("--name", required=True, help="operator name, in spiffe://TD/operator/NAME")
    p.add_argument(
        "--role",
        choices=LABELS,
        default=None,
        help="record this role for NAME in the verifier's database (see `role`); none: the "
        "verifier refuses NAME until a role is assigned",
    )
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=config_help + " (with --role)"
    )
    p.add_argument(
        "--trust-domain", default="devtrust.local", help="TD, as trust_domain in the config"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace this operator's certificate and key if there are some; the replaced "
        "files are kept as NAME.<time>.bak",
    )
    return parser


def _run(args: argparse.Namespace, now: datetime.datetime) -> int:
    if args.command == "serve":
        asyncio.run(serve(_config(args.config)))
        return 0
    if args.command in ("token", "approve", "inventory", "role"):
        return _admin(args, now)
    if args.command == "ca":
        return _ca(args, now)
    return _init(args, now) if args.command == "init" else _operator(args, now)


# A mistake in the command line, the configuration or a file it names exits 2; anything
# else is a bug (exit 70). Ctrl-C before serve's own handlers are in place exits 130.
ERRORS = ErrorPolicy(expected=(DevtrustError, OSError), status=2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    return run_command(
        "devtrust-verifier", lambda: _run(args, datetime.datetime.now(datetime.UTC)), ERRORS
    )


if __name__ == "__main__":
    sys.exit(main())
