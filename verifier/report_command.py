"""``devtrust report``: the fleet's state and its history over a period, for an auditor, as
one self-contained HTML page (``--html``) and/or a JSON document (``--json``), read from
the verifier's database directly (its file, or a URL of the server), as ``devtrust audit``
reads it: what is reported is what is stored.

The page and the document hold the same figures (``report_figures``: the fleet at the
period's end, now by default: compliance per zone, tiers, enrollment states; compliance
over time, the most frequent findings and their devices, time to detect, certificates
revoked, drivers below the NVIDIA security bulletins, the policy in force, the audit
chains' verification). The JSON has a ``version`` field (3), raised when a field changes
meaning or goes.

The audit chains are verified (as ``devtrust audit verify`` does, in the same snapshot as
the figures) when the audit holds at most a million entries, or always with
--verify-chains; never with --no-verify-chains. The page says which.

Exit status: 0 the report was written, 2 bad arguments or a database that cannot be read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from devtrust.core.errors import ConfigError
from devtrust.core.tier import Tier
from devtrust.verifier import (
    audit_command,
    audit_db,
    report_data,
    report_figures,
    report_html,
    tools,
)
from devtrust.verifier.config import DEFAULT_POLICY, DatabaseUrl, VerifierConfig, database_location
from devtrust.verifier.document import Bulletins

DEFAULT_DAYS = 7
DATABASE_HELP = (
    "the verifier's database: its file (or sqlite:///PATH) or postgresql://...; none: the "
    "one --config names"
)
BULLETINS = DEFAULT_POLICY.parent / "nvidia-driver-bulletins.csv"
# The files written: they list devices, their hostnames and findings.
MODE = 0o640


class _Formatter(argparse.RawDescriptionHelpFormatter, tools.HelpFormatter):
    """The description as written, every option's default shown (as every command's)."""


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "report",
        help="the fleet's compliance and history as an HTML page and/or JSON, for auditors",
        description=__doc__,
        formatter_class=_Formatter,
    )
    p.add_argument("--database", help=DATABASE_HELP)
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the verifier's configuration: its database, and the zones' minimum tiers "
        "(certificates.min_tier, zone_min_tier; without it every zone's is affirming)",
    )
    p.add_argument("--html", type=Path, metavar="FILE", help="write the page here")
    p.add_argument("--json", metavar="FILE", help="write the figures here as JSON (- for stdout)")
    period = p.add_mutually_exclusive_group()
    period.add_argument(
        "--days",
        type=_days,
        metavar="N",
        help=f"the period: the last N days (default {DEFAULT_DAYS})",
    )
    period.add_argument(
        "--since",
        type=audit_command.parse_time,
        metavar="TIME",
        help="the period's start (YYYY-MM-DD or an ISO time; UTC if no zone)",
    )
    p.add_argument(
        "--until",
        type=audit_command.parse_time,
        metavar="TIME",
        help="the period's end (default: now); the fleet's state is shown as it was then",
    )
    p.add_argument("--zone", metavar="ZONE", help="only the devices of this zone")
    chains = p.add_mutually_exclusive_group()
    chains.add_argument(
        "--verify-chains",
        dest="verify_chains",
        action="store_const",
        const=True,
        help="verify the audit chains whatever their length (default: when the audit holds "
        f"at most {report_data.VERIFY_LIMIT} entries; it reads and hashes all of them)",
    )
    chains.add_argument(
        "--no-verify-chains",
        dest="verify_chains",
        action="store_const",
        const=False,
        help="do not verify the audit chains (the page says they were not)",
    )
    p.set_defaults(tool=report)


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not 0 < value <= 3660:
        raise argparse.ArgumentTypeError(f"{text}: give more than 0 and at most 3660 days")
    return value


def period_of(
    args: argparse.Namespace, now: datetime.datetime
) -> tuple[datetime.datetime, datetime.datetime]:
    """(since, until) from --since/--until/--days, until no later than ``now`` (what has
    not happened has no figures: review L9); UsageError for an empty period."""
    until: datetime.datetime = min(args.until or now, now)
    if args.since is not None:
        since: datetime.datetime = args.since
    else:
        since = until - datetime.timedelta(days=args.days or DEFAULT_DAYS)
    if since >= until:
        raise tools.UsageError(
            f"the period is empty: --since {since.isoformat()} is not before "
            f"--until {until.isoformat()}"
        )
    return since, until


def _settings(args: argparse.Namespace) -> tuple[str, report_figures.Minimums]:
    """The database to read and the zones' minimum tiers, from the arguments and the
    configuration file."""
    minimums = report_figures.Minimums()
    database: str | None = args.database
    if args.config is not None:
        try:
            config = VerifierConfig.load(args.config)
        except (ConfigError, OSError, ValueError) as exc:
            raise tools.UsageError(f"--config {args.config}: {exc}") from None
        minimums = report_figures.Minimums(config.certificates.min, config.certificates.zone_min)
        if database is None:
            found = config.database
            database = str.__str__(found) if isinstance(found, DatabaseUrl) else str(found)
    if database is None:
        raise tools.UsageError("give --database FILE|URL (or --config naming one)")
    return database, minimums


def _shown(location: Path | DatabaseUrl) -> str:
    """The database as the report names it: a server's URL without its password."""
    return location.redacted if isinstance(location, DatabaseUrl) else str(location)


def report(args: argparse.Namespace) -> int:
    if args.html is None and args.json is None:
        raise tools.UsageError("give --html FILE and/or --json FILE (- for stdout)")
    now = datetime.datetime.now(datetime.UTC)
    since, until = period_of(args, now)
    database, minimums = _settings(args)
    location = _location(database)
    if isinstance(location, Path) and not location.exists():
        # audit_db opens it read-only, and would say only that it cannot be opened.
        raise tools.UsageError(f"--database {location}: no such file")
    try:
        bulletins = Bulletins.load(BULLETINS)
    except (OSError, ValueError) as exc:
        raise tools.UsageError(f"the NVIDIA bulletins {BULLETINS}: {exc}") from None

    def read() -> dict[str, Any]:
        with report_data.reading(database) as db:
            store = db.store(since=since, until=until, zone=args.zone, verify=args.verify_chains)
            period = report_figures.Period(store, since=since, until=until, minimums=minimums)
            db.stream(period, {d.device_id for d in store.devices}, since=since, until=until)
            # The fleet at the period's end: the latest appraisals, whole (their findings).
            latest = period.settle(store.current, now=now)
            examples = db.entries([*period.example.values(), *latest])
        store.notes.extend(_notes(store, args))
        return report_figures.compute(
            store,
            period,
            since=since,
            until=until,
            now=now,
            minimums=minimums,
            bulletins=bulletins,
            examples=examples,
            zone_filter=args.zone,
            database=_shown(location),
        )

    try:
        doc: dict[str, Any] = report_data.consistent(database, read)
    except ConfigError as exc:
        raise tools.UsageError(str(exc)) from None
    except audit_db.driver_errors() as exc:
        raise tools.UsageError(audit_db.unreadable(exc).replace("audit", "database")) from None
    if args.json is not None:
        text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            _write(Path(args.json), text, "--json")
    if args.html is not None:
        _write(args.html, report_html.render(doc), "--html")
    return tools.EXIT_VALID


def _location(database: str) -> Path | DatabaseUrl:
    try:
        return database_location(database)
    except ValueError as exc:
        raise tools.UsageError(f"--database {exc}") from None


def _notes(store: report_data.Store, args: argparse.Namespace) -> list[str]:
    notes = []
    if not store.devices:
        notes.append(
            f"no devices in zone {args.zone!r}" if args.zone is not None else "the fleet is empty"
        )
    if args.config is None:
        notes.append(f"no --config: every zone's minimum tier is taken as {Tier.AFFIRMING.label}")
    return notes


def _write(path: Path, text: str, option: str) -> None:
    """``text`` into ``path`` whole: written into a new file of a name no one can guess
    beside it (``mkstemp``: created, never a link followed), readable by its owner and group
    only (it lists devices and their findings), then renamed over ``path`` (review L7)."""
    temporary: str | None = None
    try:
        if path.exists() and not path.is_file():
            # A device, a pipe (/dev/stdout, /dev/null): written to as it is, never replaced
            # by a regular file (renaming over /dev/null would take it from every program).
            with path.open("wb") as out:
                out.write(text.encode("utf-8"))
            return
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        with os.fdopen(handle, "wb") as out:
            os.fchmod(out.fileno(), MODE)
            out.write(text.encode("utf-8"))
        os.replace(temporary, path)
        temporary = None
    except (OSError, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise tools.UsageError(f"{option} {path}: {why}") from None
    finally:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
