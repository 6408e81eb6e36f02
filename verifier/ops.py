"""The operator command: ``devtrust devices``, ``show``, ``score``, ``watch``, ``history``,
``approve``, ``revoke`` and ``zone``, a client of the verifier's Query API (DESIGN.md flow 3)
over mTLS with an operator certificate. It never opens the database: what an operator may see
and change is the verifier's to decide (verifier/authz.py), wherever the operator runs this.

Where the verifier is and who is asking: ``--verifier HOST:PORT --cert FILE --key FILE --ca
FILE``, or the same keys (``verifier``, ``cert``, ``key``, ``ca``) in a profile (YAML; relative
paths from its folder): ``--profile FILE``, else ``$DEVTRUST_PROFILE``, else
``~/.config/devtrust/operator.yaml`` when it exists. Options win over the profile
(verifier/ops_connect.py, which also words the failures: one line, and an exit status a
script can tell apart).

Output: tables for people, ``--json`` for scripts (verifier/ops_format.py); the views come
from verifier/wire_ops.py, the only one of these modules that sees protobuf.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.core.errors import DevtrustError
from devtrust.core.files import write_atomic
from devtrust.core.tier import Tier
from devtrust.verifier import ops_format as fmt
from devtrust.verifier.inventory import DEFAULT_TOKEN_TTL_S, TOKEN_TTL_S
from devtrust.verifier.ops_connect import (
    CHANNEL_OPTIONS,
    DEFAULT_PROFILE,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TEXT,
    EXIT_UNREACHABLE,
    PROFILE_ENV,
    OpsError,
    connection,
    rpc_error,
    usage,
)
from devtrust.verifier.pki import check_operator_name
from devtrust.verifier.roles import LABELS
from devtrust.verifier.tools import learn_group, learned_text
from devtrust.verifier.wire_ops import (
    ChangeView,
    DeviceFilter,
    DeviceView,
    HistoryView,
    QueryClient,
    RoleView,
)

PAGE = 500  # devices or history entries asked per call (the verifier's largest page)
# WatchTrust's deadline (STYLE 15): the watch opens the stream again at once when it passes.
WATCH_STREAM_S = 3600.0
MIN_PREFIX = 4


# --- the commands ------------------------------------------------------------------------------


@dataclass
class Session:
    """One command's connection and where it writes."""

    client: QueryClient
    address: str
    action: str  # the command, as errors name it
    out: TextIO
    err: TextIO
    clock: Callable[[], datetime.datetime]
    ca_path: Path | None = None  # the CA the connection trusts, for profiles it writes

    def print(self, *lines: str) -> None:
        for line in lines:
            self.out.write(line + "\n")
        self.out.flush()  # a reader of `watch | ...` sees each change as it comes

    def json(self, value: Any, *, indent: int | None = 2) -> None:
        self.print(json.dumps(value, indent=indent, sort_keys=False))


async def resolve(session: Session, ref: str) -> str:
    """The device ``ref`` names: a whole id as it is, a prefix when exactly one device's id
    starts with it (asked as the first two ids after it, in id order)."""
    if len(ref) == 64:
        return ref
    page, _ = await session.client.devices_page(DeviceFilter(), after=ref, limit=2)
    found = [d.device_id for d in page if d.device_id.startswith(ref)]
    where = f"{session.action}: {ref}"
    if not found:
        raise OpsError(
            f"{where}: no device id on the verifier at {session.address} starts with it",
            EXIT_NOT_FOUND,
        )
    if len(found) > 1:
        raise usage(f"{where} starts more than one device id ({', '.join(found)}): give more")
    return found[0]


def _labels(pairs: list[tuple[str, str]]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for key, value in pairs:
        if key in labels:
            raise usage(f"--label {key} is given twice")
        labels[key] = value
    return labels


async def devices(session: Session, args: argparse.Namespace) -> int:
    where = DeviceFilter(
        tier=args.tier, zone=args.zone, labels=_labels(args.label), stale_only=args.stale
    )
    found: list[DeviceView] = []
    after = ""
    while True:
        page, token = await session.client.devices_page(where, after=after, limit=PAGE)
        found += page
        if not token or token <= after:  # the last page (a token that does not advance: too)
            break
        after = token
    if args.json:
        session.json([fmt.device_json(d) for d in found])
    elif found:
        session.print(*fmt.devices_table(found, session.clock()))
    else:
        session.err.write("no devices match\n")
    return EXIT_OK


async def show(session: Session, args: argparse.Namespace) -> int:
    device = await session.client.device(await resolve(session, args.device))
    if args.json:
        session.json(fmt.device_json(device))
    else:
        session.print(*fmt.device_lines(device, session.clock()))
    return EXIT_OK


async def score(session: Session, args: argparse.Namespace) -> int:
    if args.signed and not args.ear:
        raise usage("score: --signed signs the EAR: give --ear --signed")
    if args.ear:
        made = await session.client.ear(await resolve(session, args.device), signed=args.signed)
        session.print(*fmt.ear_lines(made, signed=args.signed))
        return EXIT_OK
    trust = await session.client.trust_score(await resolve(session, args.device))
    if args.json:
        session.json(fmt.trust_json(trust))
    else:
        session.print(*fmt.score_lines(trust, session.clock()))
    return EXIT_OK


async def history(session: Session, args: argparse.Namespace) -> int:
    device_id = await resolve(session, args.device)
    entries: list[HistoryView] = []
    token = ""
    while len(entries) < args.limit:
        want = min(PAGE, args.limit - len(entries))
        page, token = await session.client.history_page(device_id, token=token, limit=want)
        entries += page
        if not token or not page:
            break
    if args.json:
        session.json([fmt.history_json(e) for e in entries])
    else:
        session.print(*fmt.history_table(entries))
    return EXIT_OK


async def approve(session: Session, args: argparse.Namespace) -> int:
    device_id = await resolve(session, args.device)
    labels = _labels(args.label)
    device = await session.client.approve(device_id, zone=args.zone, labels=labels or None)
    if args.json:
        session.json(fmt.device_json(device))
    else:
        session.print(fmt.device_summary("approved", device))
    return EXIT_OK


async def zone(session: Session, args: argparse.Namespace) -> int:
    """Labels: those given replace all, --clear-labels removes them, neither keeps them (as
    read just before; a change made by someone else between is overwritten)."""
    device_id = await resolve(session, args.device)
    if args.label and args.clear_labels:
        raise usage("--label and --clear-labels together: give one")
    if args.label or args.clear_labels:
        labels = _labels(args.label)
    else:
        labels = dict((await session.client.device(device_id)).labels)
    device = await session.client.set_zone(device_id, zone=args.zone, labels=labels)
    if args.json:
        session.json(fmt.device_json(device))
    else:
        session.print(fmt.device_summary("assigned", device))
    return EXIT_OK


async def revoke(session: Session, args: argparse.Namespace) -> int:
    revoked = await session.client.revoke(await resolve(session, args.device), reason=args.reason)
    if args.json:
        session.json(fmt.revoked_json(revoked))
    else:
        session.print(fmt.revoked_summary(revoked))
    return EXIT_OK


def _missed(change: ChangeView, known: Mapping[str, tuple[Tier, int]]) -> ChangeView | None:
    """A current result sent when a stream is opened again, as the change it shows since
    the last stream (None: nothing changed, or a device enrolled since and never appraised)."""
    assert change.trust is not None
    seen = known.get(change.device_id)
    if seen is None:
        if change.trust.appraised_at is None:
            return None
    elif seen == (change.trust.tier, change.trust.score):
        return None
    return replace(change, previous_tier=seen[0] if seen else None, end_of_initial=False)


async def _follow(session: Session, args: argparse.Namespace, device_id: str) -> int:
    """Print each change until the stream fails. The stream always asks for the current
    results first: their end says the watch is in place (noted on stderr), and when a stream
    reaches its deadline the next one's current results show what changed in between
    (compared with what was last seen). The first's are printed only with --initial. A
    device can come twice (a current result, then the change it was): printed once."""
    known: dict[str, tuple[Tier, int]] = {}
    first = True
    what = (
        f"device {device_id}" if device_id else f"zone {args.zone}" if args.zone else "all devices"
    )
    while True:
        initial = True
        try:
            async for change in session.client.watch(
                zone=args.zone, device_id=device_id, initial=True, deadline_s=WATCH_STREAM_S
            ):
                if change.trust is not None:
                    shown: ChangeView | None = change
                    if initial and first:  # as it is when the watch begins
                        shown = replace(change, previous_tier=None) if args.initial else None
                    elif initial:
                        shown = _missed(change, known)
                    elif known.get(change.device_id) == (change.trust.tier, change.trust.score):
                        shown = None  # seen already, as a current result just before
                    known[change.device_id] = (change.trust.tier, change.trust.score)
                    if shown is not None:
                        _print_change(session, args, shown, initial=initial and first)
                if change.end_of_initial and initial:
                    initial = False
                    if first:
                        session.err.write(
                            f"watching trust changes of {what} on {session.address}; Ctrl-C ends\n"
                        )
                        session.err.flush()
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED or initial:
                raise
        else:
            raise OpsError(
                f"watch: the verifier at {session.address} ended the watch (shutting down?)",
                EXIT_UNREACHABLE,
            )
        first = False


def _print_change(
    session: Session, args: argparse.Namespace, change: ChangeView, *, initial: bool
) -> None:
    if args.json:
        session.json(fmt.change_json(change, initial=initial), indent=None)
    else:
        line = fmt.initial_line if initial else fmt.change_line
        session.print(line(change, session.clock()))


async def watch(
    session: Session, args: argparse.Namespace, stop: asyncio.Event | None = None
) -> int:
    """Until Ctrl-C (or ``stop``, for callers that embed it)."""
    device_id = await resolve(session, args.device) if args.device else ""
    follow = asyncio.ensure_future(_follow(session, args, device_id))
    if stop is None:
        return await follow
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({follow, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if follow in done:
        stopped.cancel()
        return follow.result()
    follow.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follow
    return EXIT_OK


async def token(session: Session, args: argparse.Namespace) -> int:
    """A one-time bootstrap token: the token on stdout (for a script), what it assigns and
    until when on stderr."""
    made = await session.client.create_token(
        zone=args.zone, labels=_labels(args.label), ttl_s=args.ttl_s, note=args.note
    )
    if args.json:
        session.json(fmt.token_json(made))
        return EXIT_OK
    session.print(made.token)
    session.err.write(fmt.token_note(made) + "\n")
    return EXIT_OK


async def role(session: Session, args: argparse.Namespace) -> int:
    """Assign an operator's role, or take it away (none); in force at its next call."""
    done = await session.client.set_role(args.name, "" if args.role == "none" else args.role)
    if args.json:
        session.json(fmt.role_json(done))
    else:
        session.print(fmt.role_line(done))
    return EXIT_OK


async def operator_issue(session: Session, args: argparse.Namespace) -> int:
    """`operator issue`: a key made here, a certificate of the verifier's CA for it (the
    private key never leaves this machine), the role recorded, and a profile in --out."""
    out = Path(args.out)
    paths = {kind: out / f"{args.name}.{kind}" for kind in ("pem", "key", "yaml")}
    present = [str(p) for p in paths.values() if p.exists() or p.is_symlink()]
    if present:
        raise OpsError(
            f"operator issue: {', '.join(present)} already there: keep them, or choose another "
            "--out",
            EXIT_REFUSED,
        )
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    issued = await session.client.issue_operator_certificate(args.name, args.role, spki)
    profile = {
        "verifier": session.address,
        "cert": str(paths["pem"].resolve()),
        "key": str(paths["key"].resolve()),
        "ca": str(session.ca_path or ""),
    }
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        write_atomic(paths["key"], key_pem, mode=0o600)
        write_atomic(paths["pem"], issued.certificate_pem, mode=0o644)
        text = "".join(f"{k}: {json.dumps(v)}\n" for k, v in profile.items())
        write_atomic(paths["yaml"], text.encode(), mode=0o644)
    except OSError as exc:
        raise OpsError(
            f"operator issue: cannot write in {out}: {exc.strerror}", EXIT_REFUSED
        ) from None
    if args.json:
        session.json(
            {
                **fmt.role_json(RoleView(issued.name, issued.role, issued.previous_role)),
                **{k: str(v) for k, v in paths.items()},
            }
        )
    else:
        session.print(
            f"operator {issued.name}: certificate {paths['pem']}, key {paths['key']}, "
            f"profile {paths['yaml']}; role {issued.role} (was {issued.previous_role or 'none'})"
        )
    return EXIT_OK


async def learn(session: Session, args: argparse.Namespace) -> int:
    """`refs learn`: a reference-value group from a device's last good evidence."""
    device_id = await resolve(session, args.device)
    stored = await session.client.stored_evidence(device_id)
    group = learn_group(stored, name=args.name or f"learned-{device_id[:8]}")
    session.print(*learned_text(device_id, group))
    return EXIT_OK


Command = Callable[[Session, argparse.Namespace], Awaitable[int]]


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def execute(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    environ: Mapping[str, str] = os.environ,
    clock: Callable[[], datetime.datetime] = _utcnow,
    stop: asyncio.Event | None = None,
) -> int:
    """Run the command ``args`` names (parsed by ``add_parsers``'s parsers); its failures
    raise ``OpsError``. ``stop`` ends a watch."""
    conn = connection(args, environ)
    credentials = grpc.ssl_channel_credentials(conn.ca_pem, conn.key_pem, conn.cert_pem)
    async with grpc.aio.secure_channel(
        conn.address, credentials, options=CHANNEL_OPTIONS
    ) as channel:
        client = QueryClient(channel, timeout=args.timeout)
        session = Session(client, conn.address, args.command, out, err, clock, conn.ca_path)
        try:
            if args.command == "watch":
                return await watch(session, args, stop)
            command: Command = args.ops
            return await command(session, args)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(
                exc, address=conn.address, action=args.command, timeout=args.timeout
            ) from None


def run(args: argparse.Namespace) -> int:
    return asyncio.run(execute(args, out=sys.stdout, err=sys.stderr))


# --- the command line --------------------------------------------------------------------------


def device_ref(text: str) -> str:
    """A device id, or the first digits of one (as tables show them)."""
    ref = text.strip().lower()
    if not MIN_PREFIX <= len(ref) <= 64 or any(c not in "0123456789abcdef" for c in ref):
        shown = ref if len(ref) <= 80 else f"{ref[:77]}..."
        raise argparse.ArgumentTypeError(
            f"{shown!r} is not a device id (64 hex digits) nor its first {MIN_PREFIX} or more"
        )
    return ref


def label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def tier(text: str) -> Tier:
    try:
        return Tier.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def operator_name(text: str) -> str:
    try:
        check_operator_name(text, given_as="NAME")
    except DevtrustError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds above 0 and at most 3600"
        )
    return value


def positive(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count from 1 to 100000")
    return int(text)


def ttl(text: str) -> int:
    low, high = TOKEN_TTL_S
    if not text.isdigit() or not low <= int(text) <= high:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a token lives {low} to {high} seconds (30 days); give a lifetime in "
            "that range"
        )
    return int(text)


def _common(*, json: bool = True) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection (options win over the profile)")
    group.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"YAML with verifier, cert, key, ca; default: ${PROFILE_ENV}, else "
        f"{DEFAULT_PROFILE} if it exists",
    )
    group.add_argument(
        "--verifier", default="", metavar="HOST:PORT", help="HOST:PORT of the verifier's mTLS port"
    )
    group.add_argument(
        "--cert", type=Path, default=None, metavar="FILE", help="operator certificate (PEM)"
    )
    group.add_argument(
        "--key", type=Path, default=None, metavar="FILE", help="its private key (PEM)"
    )
    group.add_argument(
        "--ca", type=Path, default=None, metavar="FILE", help="the verifier's CA (PEM)"
    )
    group.add_argument(
        "--timeout", type=timeout, default=10.0, metavar="S", help="seconds per call"
    )
    if json:
        common.add_argument("--json", action="store_true", help="print JSON (stable keys)")
    return common


def add_parsers(sub: Any, refs: Any = None) -> None:
    """Add the operator commands to the ``devtrust`` subcommand parser ``sub`` (and ``learn``
    to ``refs``, the parser of `devtrust refs`, when given)."""
    common = _common()

    def command(name: str, text: str, ops: Callable[..., Awaitable[int]]) -> Any:
        p = sub.add_parser(name, help=text, description=text, epilog=EXIT_TEXT, parents=[common])
        p.set_defaults(tool=run, ops=ops)
        return p

    def device(p: Any) -> None:
        p.add_argument("device", type=device_ref, metavar="DEVICE", help="device id or prefix")

    def labels(p: Any, text: str) -> None:
        p.add_argument(
            "--label", type=label, action="append", default=[], metavar="KEY=VALUE", help=text
        )

    p = command("devices", "list devices with their trust (every page)", devices)
    p.add_argument(
        "--tier",
        type=tier,
        default=None,
        metavar="TIER",
        help="only this tier (none, affirming, ...)",
    )
    p.add_argument("--zone", default="", help="only this zone")
    labels(p, "only devices with this KEY=VALUE label (repeatable: all of them)")
    p.add_argument(
        "--stale",
        action="store_true",
        help="only devices never appraised, or whose latest result is past its staleness bound",
    )
    device(command("show", "a device: state, zone, host, its latest result", show))
    p = command("score", "a device's trust tier, score and findings", score)
    device(p)
    p.add_argument(
        "--ear",
        action="store_true",
        help="print the result as an EAR (draft-ietf-rats-ear claims set, JSON) instead",
    )
    p.add_argument(
        "--signed",
        action="store_true",
        help="with --ear: print it as a JWT signed by the verifier's EAR key (ES256; verify "
        "with its ear.pem)",
    )
    p = command("watch", "print each change of tier or score, until Ctrl-C", watch)
    p.add_argument("--zone", default="", help="only devices of this zone")
    p.add_argument(
        "--device", type=device_ref, default=None, metavar="DEVICE", help="only this device"
    )
    p.add_argument("--initial", action="store_true", help="print current results first")
    p = command("history", "a device's audit trail, newest first, with who did what", history)
    device(p)
    p.add_argument("--limit", type=positive, default=20, metavar="N", help="entries at most")
    p = command("approve", "approve a pending device (and assign a zone or labels)", approve)
    device(p)
    p.add_argument("--zone", default="", help="assign this zone; none: unchanged")
    labels(p, "KEY=VALUE (repeatable; replaces all labels); none: unchanged")
    p = command("revoke", "revoke a device: no attestation, no renewal, its certificates on "
                "the revocation feed", revoke)  # fmt: skip
    device(p)
    p.add_argument("--reason", required=True, metavar="TEXT", help="why (kept in the audit)")
    p = command("zone", "move a device to a zone ('' for none)", zone)
    device(p)
    p.add_argument("zone", metavar="ZONE", help="the zone from now on")
    labels(p, "KEY=VALUE (repeatable; replaces all labels); none: labels kept")
    p.add_argument("--clear-labels", action="store_true", help="remove every label")
    p = command("token", "create a one-time bootstrap token for enrollment (role operator)", token)
    p.add_argument("action", choices=["create"], help="what to do")
    p.add_argument("--zone", default="", help="zone of the device that first enrolls with it")
    labels(p, "KEY=VALUE the device gets (repeatable)")
    p.add_argument(
        "--ttl-s",
        type=ttl,
        default=DEFAULT_TOKEN_TTL_S,
        metavar="N",
        help=f"lifetime in seconds, {TOKEN_TTL_S[0]} to {TOKEN_TTL_S[1]} (30 days)",
    )
    p.add_argument("--note", default="", help="what the token is for (kept beside its hash)")
    p = command(
        "role",
        "assign an operator's role on the query API, or take it away (none); in force at its "
        "next call (role admin). The verifier's `operators:` wins for the names it lists",
        role,
    )
    p.add_argument(
        "name", type=operator_name, help="operator name, as in spiffe://TD/operator/NAME"
    )
    p.add_argument("role", choices=[*LABELS, "none"], help="the role from now on")
    p = command(
        "operator",
        "issue a new operator's certificate (role admin): its key is made here and stays here; "
        "writes NAME.pem, NAME.key and a profile NAME.yaml in --out",
        operator_issue,
    )
    p.add_argument("action", choices=["issue"], help="what to do")
    p.add_argument(
        "name", type=operator_name, help="operator name, as in spiffe://TD/operator/NAME"
    )
    p.add_argument("--role", required=True, choices=LABELS, help="the new operator's role")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the three files")
    if refs is not None:
        text = "propose reference values from a known-good device (role viewer)"
        p = refs.add_parser(
            "learn", help=text, description=text, epilog=EXIT_TEXT, parents=[_common(json=False)]
        )
        p.set_defaults(tool=run, ops=learn, command="refs learn")
        device(p)
        p.add_argument("--name", default="", help="group name; empty: learned-<device>")
