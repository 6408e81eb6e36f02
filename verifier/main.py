"""``devtrust-verifier``: the verifier server (run as a systemd service)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import logging
import os
import sys
from pathlib import Path

# grpc prints its own INFO lines (TLS handshake failures) unless told before it loads:
# one line per error is ours to write.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from devtrust.core.command import ErrorPolicy, Failure, one_line, run_command
from devtrust.core.errors import ConfigError, DevtrustError
from devtrust.core.logsetup import FORMATS, configure_logging
from devtrust.core.sdnotify import Notifier
from devtrust.verifier.config import (
    MAX_WORKERS,
    CertificatesConfig,
    VerifierConfig,
    trust_domain_problem,
)
from devtrust.verifier.device_pki import rotate_device_ca
from devtrust.verifier.inventory import Inventory
from devtrust.verifier.pki import (
    PkiFiles,
    check_operator_name,
    init_pki,
    issue_ear_signer,
    issue_operator,
    key_group,
    load_ca,
)
from devtrust.verifier.roles import LABELS
from devtrust.verifier.running import unavailable_at_start
from devtrust.verifier.server import start_verifier
from devtrust.verifier.serving import serve_until_signalled
from devtrust.verifier.tools import HelpFormatter, version_line
from devtrust.verifier.workers import WorkerUnavailable, supervise

logger = logging.getLogger("devtrust.verifier")
DEFAULT_CONFIG = Path("/etc/devtrust/verifier.yaml")
# A bootstrap token's lifetime: long enough to image a host, short enough to matter.
TOKEN_TTL_S = (60, 30 * 24 * 3600)


async def serve(
    config: VerifierConfig, *, workers: int | None = None, log_format: str = "text"
) -> None:
    """Serve until SIGTERM or SIGINT (SIGHUP reloads the policy): one process, or
    ``workers`` (default: server.workers) worker processes under a parent
    (verifier/workers.py). Under systemd (``$NOTIFY_SOCKET``), the process systemd started
    tells it READY=1 once both ports serve, its STATUS=, WATCHDOG=1, reloads and stopping
    (devtrust/core/sdnotify.py); the variables are taken out of the environment, so that
    workers do not speak for the service."""
    notifier = Notifier.from_environ(unset=True)
    count = workers if workers is not None else config.server.workers
    if count > 1:
        await supervise(
            config,
            count,
            level=logging.getLogger().level,
            log_format=log_format,
            notifier=notifier,
        )
        return
    await serve_until_signalled(await start_verifier(config), notifier=notifier)


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


def _inventory(args: argparse.Namespace) -> int:
    """`inventory check`, run on the verifier host; usage errors exit 1."""
    try:
        return _inventory_check(args)
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
    group = key_group(directory, args.group)
    files = init_pki(
        directory,
        hostnames=args.hostname,
        now=now,
        force=args.force,
        group=None if group is None else group.gid,
    )
    if files.backups:
        kept = ", ".join(str(b) for b in files.backups)
        print(f"replaced the CA; the old files are kept as {kept}", file=sys.stderr)
    print(f"CA {files.ca_cert}\nserver certificate {files.server_cert}")
    print(f"device issuing CA {files.device_ca_cert}\nrelying-party bundle {files.device_bundle}")
    print(f"EAR signing certificate {files.ear_cert}")
    if group is None:
        keys = "0600, yours (give --group GROUP for the service's group to read them)"
    else:
        keys = f"0640, group {group.name} ({group.why}) may read them"
    print(
        f"keys: {files.server_key.name}, {files.device_ca_key.name} and {files.ear_key.name} "
        f"{keys}; "
        f"{files.ca_key.name} 0600, yours only: the service gets it through systemd's "
        "LoadCredential= (serve --ca-key)",
        file=sys.stderr,
    )
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


def _ear_key(args: argparse.Namespace, now: datetime.datetime) -> int:
    """`ear-key`: a new EAR signing key and certificate from the CA in --dir."""
    directory = _directory(args.dir, "--dir")
    group = key_group(directory, args.group)
    files = issue_ear_signer(
        directory, now=now, force=args.force, group=None if group is None else group.gid
    )
    if files.backups:
        kept = ", ".join(str(b) for b in files.backups)
        print(f"replaced the EAR signing key; the old files are kept as {kept}", file=sys.stderr)
    print(f"EAR signing certificate {files.ear_cert}\nkey {files.ear_key}")
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
    cert, key = issue_operator(
        ca, directory, name=args.name, trust_domain=args.trust_domain, now=now
    )
    print(f"operator certificate {cert}\nkey {key}")
    print(
        f"no role yet: the verifier refuses {args.name} until an admin runs "
        f"`devtrust role {args.name} ROLE` (ROLE: {', '.join(LABELS)}); the first admin is "
        f"listed in verifier.yaml (`operators: {{{args.name}: admin}}`, then restart it)",
        file=sys.stderr,
    )
    # The operator's `devtrust` profile (verifier/ops_connect.py), all but the address.
    print(
        "# a profile for `devtrust` (~/.config/devtrust/operator.yaml): give the address\n"
        f"verifier: HOST:PORT\ncert: {cert.resolve()}\nkey: {key.resolve()}\n"
        f"ca: {(directory / 'ca.pem').resolve()}"
    )
    return 0


def _workers(text: str) -> int:
    """--workers N: 1 to MAX_WORKERS processes."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"give 1 to {MAX_WORKERS} processes, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devtrust-verifier", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="log lines for people (text) or one JSON object per line for log shippers",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)

    config_help = "the verifier's configuration file"
    p = command("serve", "run the verifier")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    p.add_argument(
        "--workers",
        type=_workers,
        default=None,
        metavar="N",
        help="worker processes sharing the ports and the database (default: server.workers "
        "in the configuration, 1: one process)",
    )
    p.add_argument(
        "--ca-key",
        type=Path,
        default=None,
        metavar="PATH",
        help="the CA key from PATH instead of ca.key in the configuration (under systemd: "
        "%%d/ca.key, the credential LoadCredential= gives the service)",
    )
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
    p.add_argument(
        "--group",
        default=None,
        help="group that may read the keys the service reads (server key, device issuing "
        "CA key, EAR signing key: made 0640); default: the group owning --dir when that is "
        "the service's group, devtrust (the packaged /etc/devtrust/verifier is "
        "root:devtrust; any other group must be named here); ca.key stays 0600",
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
    p = command(
        "ear-key",
        "issue the EAR signing key and certificate (ear.key, ear.pem) with the CA in a "
        "directory init made (init makes them too)",
    )
    p.add_argument("--dir", required=True, help="directory made by init")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an EAR signing key already there; the replaced files are kept as "
        "NAME.<time>.bak",
    )
    p.add_argument(
        "--group",
        default=None,
        help="group that may read ear.key (made 0640), as for init; default: the group "
        "owning --dir when that is the service's group, devtrust",
    )
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
        config = _config(args.config)
        if args.ca_key is not None:
            config = dataclasses.replace(config, ca=dataclasses.replace(config.ca, key=args.ca_key))
        asyncio.run(serve(config, workers=args.workers, log_format=args.log_format))
        return 0
    if args.command == "inventory":
        return _inventory(args)
    if args.command == "ca":
        return _ca(args, now)
    if args.command == "ear-key":
        return _ear_key(args, now)
    return _init(args, now) if args.command == "init" else _operator(args, now)


# Exit statuses, also what the systemd unit's RestartPreventExitStatus= lists: 2 is a
# mistake in the command line, the configuration or a file it names (restarting cannot fix
# it: the unit does not restart on it); 75 (EX_TEMPFAIL) the database did not answer at start
# (a PostgreSQL server restarting: a later start may work, so the unit restarts); anything
# else is a bug (70, restarted). Ctrl-C before serve's own handlers are in place exits 130.
EXIT_CONFIG, EXIT_TEMPFAIL = 2, 75


def _explain(exc: Exception) -> Failure | None:
    """A database that does not answer is no mistake of the configuration (exit 75), nor is
    a worker that it did not answer (or that hung in its start: verifier/workers.py)."""
    if isinstance(exc, WorkerUnavailable) or unavailable_at_start(exc):
        return Failure(
            f"{one_line(exc)} (the database did not answer: try again once it does)",
            EXIT_TEMPFAIL,
        )
    return None


ERRORS = ErrorPolicy(expected=(DevtrustError, OSError), status=EXIT_CONFIG, explain=_explain)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO, args.log_format)
    return run_command(
        "devtrust-verifier", lambda: _run(args, datetime.datetime.now(datetime.UTC)), ERRORS
    )


if __name__ == "__main__":
    sys.exit(main())
