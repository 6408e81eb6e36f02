"""``devtrust audit``: check the audit trail's hash chains on the verifier's database
(``verify``), put entries written before the chains on them (``seal``), delete old entries
keeping the chains verifiable (``prune``). Run where the database is (its file, or a URL of
the server), not through the verifier's API: what is checked is what is stored.

Exit status of verify: 0 every chain intact, 1 a chain is broken (each broken chain's first
broken record is named, the earliest first), 2 bad arguments (a --chain the audit does not
hold) or a database that cannot be read.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import re
import sys
from pathlib import Path

from devtrust.core.errors import ConfigError
from devtrust.verifier import audit_db, tools
from devtrust.verifier.audit_chain import Break, Mark
from devtrust.verifier.storage import audit_rows

EXIT_INTACT, EXIT_BROKEN, EXIT_USAGE = 0, 1, tools.EXIT_USAGE
DATABASE_HELP = "the verifier's database: its file (or sqlite:///PATH) or postgresql://..."


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    audit = sub.add_parser(
        "audit", help="check and keep the audit trail's hash chains", description=__doc__
    )
    actions = audit.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "verify",
        help="check every chain: exit 0 intact, 1 broken (naming the first broken record)",
    )
    p.add_argument("--database", required=True, help=DATABASE_HELP)
    p.add_argument("--chain", help="check only this chain (a device id, policy, roles, audit)")
    p.add_argument(
        "--json", action="store_true", help="print the result and every chain's head as JSON"
    )
    p.add_argument(
        "--against",
        type=Path,
        metavar="FILE",
        help="an earlier verify --json kept outside the database: each chain must still hold "
        "the head it recorded (a chain rewritten since, hashes and all, does not)",
    )
    p.set_defaults(tool=verify)
    p = actions.add_parser(
        "prune",
        help="delete entries before a date, leaving a checkpoint the rest verifies from",
    )
    p.add_argument("--database", required=True, help=DATABASE_HELP)
    p.add_argument(
        "--before",
        required=True,
        type=parse_time,
        help="delete entries older than this (YYYY-MM-DD or an ISO time; UTC if no zone)",
    )
    p.set_defaults(tool=prune)
    p = actions.add_parser(
        "seal", help="put entries written before the chains (schema step 7) on their chains"
    )
    p.add_argument("--database", required=True, help=DATABASE_HELP)
    p.set_defaults(tool=seal)


def parse_time(text: str) -> datetime.datetime:
    """A time on the command line (`audit prune --before`, `report --since/--until`): ISO
    8601, a date alone at midnight, UTC when no offset is given."""
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: write YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS+00:00"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


def _actor() -> str:
    """Who runs a command that writes the audit: the local user (a name the audit's actor
    form cannot hold has its other characters as '_')."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    name = re.sub(r"[^A-Za-z0-9._@+-]", "_", user)[:128].lstrip("._@+-")
    return f"local/{name or 'unknown'}"


def _recorded(path: Path | None) -> dict[str, Mark]:
    """The heads of an earlier ``verify --json``; UsageError for a file that is not one."""
    if path is None:
        return {}
    try:
        heads = json.loads(path.read_text(encoding="utf-8"))["heads"]
        return {
            str(chain): Mark(int(h["seq"]), str(bytes.fromhex(h["hash"]).hex()))
            for chain, h in heads.items()
        }
    except OSError as exc:
        raise tools.UsageError(f"--against {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise tools.UsageError(
            f"--against {path}: not the output of `devtrust audit verify --json`"
        ) from None


def verify(args: argparse.Namespace) -> int:
    recorded = _recorded(args.against)
    try:
        with audit_db.opened(args.database, write=False) as db:
            report = audit_db.verify(db, chain=args.chain, recorded=recorded)
    except ConfigError as exc:
        raise tools.UsageError(str(exc)) from None
    except audit_db.driver_errors() as exc:
        raise tools.UsageError(audit_db.unreadable(exc)) from None
    if args.json:
        print(json.dumps(_as_json(report), indent=2))
    elif report.intact:
        print(f"audit intact: {report.chains} chains, {report.entries} entries")
    else:
        for found in report.broken:
            print(f"audit broken: {found.line()}")
        print(
            f"{len(report.broken)} of {report.chains} chains broken ({report.entries} entries "
            "read); the first broken record is named first",
            file=sys.stderr,
        )
    return EXIT_INTACT if report.intact else EXIT_BROKEN


def _as_json(report: audit_db.Report) -> dict[str, object]:
    def broken(b: Break) -> dict[str, object]:
        return {"chain": b.chain, "seq": b.seq, "id": b.id, "kind": str(b.kind), "what": b.what}

    return {
        "intact": report.intact,
        "chains": report.chains,
        "entries": report.entries,
        "broken": [broken(b) for b in report.broken],
        # Kept elsewhere, the heads show a chain rewritten since by someone able to write
        # the database (who could rewrite the checkpoints too).
        "heads": {c: {"seq": m.seq, "hash": m.hash} for c, m in sorted(report.heads.items())},
    }


def prune(args: argparse.Namespace) -> int:
    now, actor = audit_db.now(), _actor()
    before: datetime.datetime = args.before
    if before > now:
        raise tools.UsageError(f"--before {before.isoformat()} is in the future")
    try:
        with audit_db.opened(args.database, write=True) as db:
            # Old entries first on their chains, so that retention sees every entry.
            sealed = db.write(audit_rows.seal)
            # Retention deletes entries: never those of a broken chain, whose break it
            # would erase. The whole audit is checked first, and what to delete read, in
            # one read-only snapshot (no lock the verifiers' appends meet).
            report, plan = audit_db.plan_prune(db, before=before)
            if not report.intact:
                for found in report.broken:
                    print(f"audit broken: {found.line()}")
                print("prune refused: it would delete what shows the break", file=sys.stderr)
                return EXIT_BROKEN
            # Recorded before anything is deleted: verify accepts a pruning checkpoint only
            # where an audit_pruned entry names it.
            db.write(
                lambda c: audit_rows.record_prune(c, before=before, plan=plan, now=now, actor=actor)
            )
            done, entries = 0, 0
            for pruning in plan:
                pruned = db.write(lambda c, p=pruning: audit_rows.prune_chain(c, p, now=now))
                done, entries = done + (pruned > 0), entries + pruned
    except ConfigError as exc:
        raise tools.UsageError(str(exc)) from None
    except audit_db.driver_errors() as exc:
        raise tools.UsageError(audit_db.unreadable(exc)) from None
    if sealed:
        print(f"sealed {sealed} entries written before the chains")
    print(
        f"pruned {entries} entries before {before.isoformat()} from {done} chains "
        f"(recorded as audit_pruned by {actor})"
    )
    return EXIT_INTACT


def seal(args: argparse.Namespace) -> int:
    try:
        with audit_db.opened(args.database, write=True) as db:
            sealed = db.write(audit_rows.seal)
    except ConfigError as exc:
        raise tools.UsageError(str(exc)) from None
    except audit_db.driver_errors() as exc:
        raise tools.UsageError(audit_db.unreadable(exc)) from None
    print(f"sealed {sealed} entries written before the chains")
    return EXIT_INTACT
