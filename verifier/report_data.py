"""What ``devtrust report`` reads of the verifier's database: the devices, their current
results, the certificates revoked, the policy in force and the audit chains' verification
(``Store``, plain values); and the period's appraisals, streamed once in time order into the
figures' accumulator (``Reading.stream``), never held together: a fleet's week of appraisals
is millions of rows (review H1). The figures are ``report_figures``' (pure).

Read as ``devtrust audit`` reads (``audit_db.opened``, never written nor migrated): SQL
with ``?`` marks on SQLite and PostgreSQL alike, everything (the chains' verification too)
in one read-only snapshot, so that a verifier writing meanwhile shows nothing half-written.
Of each appraisal only its device, time, tier, expiry and finding ids are read (extracted by
the database from the stored result); whole results only for the current ones and the few
examples shown.
"""

from __future__ import annotations

import datetime
import os
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from devtrust.core.errors import ConfigError
from devtrust.verifier import audit_db
from devtrust.verifier.config import DatabaseUrl, database_location

_IN_CHUNK = 500
# Chain verification reads and hashes the whole audit: by default only up to this many
# entries (about a minute); beyond, only when asked (--verify-chains).
VERIFY_LIMIT = 1_000_000
# A device's state when the period begins is its last appraisal before it, looked for among
# the entries up to this long after the period's start (entries are stored in about the
# order of their times; a clock a little off still finds its place).
_SLACK = datetime.timedelta(minutes=5)
# Times the SQLite file may change under an immutable reader before the report gives up.
_TRIES = 3
# The period's appraisals, with only what the figures need. The finding ids are joined with
# a newline (policy rule ids hold none); a result that is no JSON (a tampered row) gives
# none of them, and breaks its chain where the audit is verified.
_PERIOD = {
    "sqlite": (
        "SELECT a.id, a.device_id, a.at, a.tier, "
        "CASE WHEN json_valid(a.detail) THEN json_extract(a.detail, '$.expires_at') END, "
        "CASE WHEN json_valid(a.detail) AND json_type(a.detail, '$.findings') = 'array' THEN "
        "(SELECT group_concat(f.value, char(10)) FROM json_tree(a.detail, '$.findings') f "
        "WHERE f.key = 'id' AND f.type = 'text' AND f.path GLOB '$.findings[[]*]') END "
        "FROM audit a WHERE a.event = 'appraisal' AND a.at >= ? AND a.at < ? ORDER BY a.at, a.id"
    ),
    "postgresql": (
        "SELECT a.id, a.device_id, a.at, a.tier, a.detail::jsonb ->> 'expires_at', "
        "(SELECT string_agg(f ->> 'id', chr(10)) FROM jsonb_array_elements("
        "CASE WHEN jsonb_typeof(a.detail::jsonb -> 'findings') = 'array' "
        "THEN a.detail::jsonb -> 'findings' ELSE '[]'::jsonb END) f) "
        "FROM audit a WHERE a.event = 'appraisal' AND a.at >= ? AND a.at < ? ORDER BY a.at, a.id"
    ),
}
# Each device's last appraisal before the period: by the (device_id, id) index, from the
# entries before ``bound`` back.
_BEFORE = (
    "SELECT d.device_id, (SELECT a.id FROM audit a WHERE a.device_id = d.device_id "
    "AND a.id < ? AND a.event = 'appraisal' AND a.at < ? ORDER BY a.id DESC LIMIT 1) "
    "FROM devices d"
)


@dataclass(frozen=True)
class DeviceRow:
    """A device as stored: ``hostname`` is what the device said of itself at enrollment
    (device-supplied: neutralised and escaped wherever it is shown)."""

    device_id: str
    state: str
    zone: str
    hostname: str
    enrolled_at: datetime.datetime | None
    last_seen: datetime.datetime | None


@dataclass(frozen=True)
class FindingRow:
    id: str
    severity: str
    message: str
    found: str


class Appraisal(NamedTuple):
    """One stored appraisal: of the period's, only what the figures need (``findings``
    whole only for the current results and the examples). A tuple: millions are made, one
    at a time."""

    device_id: str
    at: datetime.datetime
    tier: str
    expires_at: datetime.datetime | None
    finding_ids: tuple[str, ...]
    policy_id: str = ""
    findings: tuple[FindingRow, ...] = ()
    entry: int = 0


@dataclass(frozen=True)
class RevokedCertificate:
    serial: str
    device_id: str
    kind: str
    reason: str
    revoked_at: datetime.datetime


@dataclass(frozen=True)
class PolicyRow:
    policy_id: str
    digest: str
    published_at: str
    published_by: str


@dataclass(frozen=True)
class AuditStatus:
    """``devtrust audit verify``'s answer on the same snapshot as the figures: intact or
    the broken records (each one line, the earliest first); ``verified`` False (and
    ``intact`` None) when the chains were not verified, ``why`` saying why."""

    verified: bool
    intact: bool | None
    chains: int
    entries: int
    last_id: int
    last_at: str
    broken: tuple[str, ...]
    why: str = ""


@dataclass(frozen=True)
class Store:
    devices: tuple[DeviceRow, ...]
    current: dict[str, Appraisal]
    revoked: tuple[RevokedCertificate, ...]
    # Devices revoked by an operator: when (the latest "revoked" audit entry), if recorded.
    device_revoked_at: dict[str, datetime.datetime]
    policy: PolicyRow | None
    audit: AuditStatus
    notes: list[str] = field(default_factory=list)


class Sink(Protocol):
    """What the period's appraisals are streamed into (``report_figures.Period``)."""

    def before(self, appraisal: Appraisal) -> None:
        """A device's last appraisal before the period (each device once, any order)."""

    def add(self, appraisal: Appraisal) -> None:
        """The period's appraisals, in time order (then the order they were stored)."""


def when(value: object) -> datetime.datetime | None:
    """A stored time (ISO 8601 text); None for none or one that is no time."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime.datetime):
        found = value
    else:
        try:
            found = datetime.datetime.fromisoformat(str(value))
        except ValueError:
            return None
    return found if found.tzinfo is not None else found.replace(tzinfo=datetime.UTC)


def _findings(items: object) -> tuple[FindingRow, ...]:
    if not isinstance(items, list):
        return ()
    return tuple(
        FindingRow(
            id=str(f.get("id", "")),
            severity=str(f.get("severity", "")),
            message=str(f.get("message", "")),
            found=str(f.get("found", "")),
        )
        for f in items
        if isinstance(f, dict)
    )


def appraisal_of(device_id: str, tier: str, detail: object, at: object) -> Appraisal | None:
    """A whole appraisal from its stored result (JSON, ``codec.result_to_json``); None for
    a row whose time cannot be read."""
    doc = audit_db.json_object(detail)
    stamp = when(at) or when(doc.get("appraised_at"))
    if stamp is None:
        return None
    findings = _findings(doc.get("findings"))
    return Appraisal(
        device_id=device_id,
        at=stamp,
        tier=tier or "none",
        expires_at=when(doc.get("expires_at")),
        finding_ids=tuple(f.id for f in findings),
        policy_id=str(doc.get("policy_id") or ""),
        findings=findings,
    )


def _hostname(text: object) -> str:
    name = audit_db.json_object(text).get("hostname")
    return name if isinstance(name, str) else ""


def _stamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat()


def read_only_url(url: str) -> str:
    """A PostgreSQL URL whose sessions start read-only (``default_transaction_read_only``
    in its options, beside any given): the report never writes, even through a statement
    that would run outside the read-only snapshot (review L10)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ours = "-c default_transaction_read_only=on"
    given = [value for key, value in query if key == "options"]
    kept = [(k, v) for k, v in query if k != "options"]
    kept.append(("options", " ".join([*given, ours]).strip()))
    text = urllib.parse.urlencode(kept, quote_via=urllib.parse.quote)
    return urllib.parse.urlunsplit(parts._replace(query=text))


class Reading:
    """The database open in one read-only snapshot (``reading``)."""

    def __init__(self, db: Any, dialect: str) -> None:
        self._db = db
        self._dialect = dialect

    def store(
        self,
        *,
        since: datetime.datetime,
        until: datetime.datetime,
        zone: str | None,
        verify: bool | None,
    ) -> Store:
        """Everything but the period's appraisals; the audit chains verified when
        ``verify`` (None: when the audit holds at most ``VERIFY_LIMIT`` entries)."""
        rows = self._db.rows
        devices = tuple(
            DeviceRow(
                device_id=str(r[0]),
                state=str(r[1]),
                zone=str(r[2]),
                hostname=_hostname(r[3]),
                enrolled_at=when(r[4]),
                last_seen=when(r[5]),
            )
            for r in rows(
                "SELECT device_id, state, zone, host, enrolled_at, last_seen FROM devices "
                "ORDER BY device_id"
            )
            if zone is None or str(r[2]) == zone
        )
        wanted = {d.device_id for d in devices}
        current: dict[str, Appraisal] = {}
        for r in rows("SELECT device_id, tier, result, appraised_at FROM trust"):
            if str(r[0]) in wanted:
                found = appraisal_of(str(r[0]), str(r[1]), r[2], r[3])
                if found is not None:
                    current[found.device_id] = found
        # A second either side in SQL (times are compared as text there), exact here.
        low, high = since - datetime.timedelta(seconds=1), until + datetime.timedelta(seconds=1)
        revoked = []
        for r in rows(
            "SELECT serial, device_id, kind, revocation_reason, revoked_at FROM certificates "
            "WHERE revoked_at IS NOT NULL AND revoked_at >= ? AND revoked_at <= ? "
            "ORDER BY revoked_at, serial",
            (_stamp(low), _stamp(high)),
        ):
            at = when(r[4])
            if str(r[1]) in wanted and at is not None and since <= at < until:
                revoked.append(RevokedCertificate(str(r[0]), str(r[1]), str(r[2]), str(r[3]), at))
        device_revoked_at: dict[str, datetime.datetime] = {}
        for r in rows("SELECT device_id, at FROM audit WHERE event = 'revoked' ORDER BY at, id"):
            at = when(r[1])
            if str(r[0]) in wanted and at is not None:
                device_revoked_at[str(r[0])] = at
        policy = next(
            (
                PolicyRow(str(r[0]), str(r[1]), str(r[2]), str(r[3]))
                for r in rows(
                    "SELECT policy_id, digest, published_at, published_by FROM policies "
                    "WHERE slot = 'current'"
                )
            ),
            None,
        )
        return Store(
            devices=devices,
            current=current,
            revoked=tuple(revoked),
            device_revoked_at=device_revoked_at,
            policy=policy,
            audit=self._audit(verify),
        )

    def _audit(self, verify: bool | None) -> AuditStatus:
        # By the primary key: no scan (MAX(at) would be one).
        [(first_id, last_id)] = list(self._db.rows("SELECT MIN(id), MAX(id) FROM audit"))
        last_at = ""
        if last_id is not None:
            found = list(self._db.rows("SELECT at FROM audit WHERE id = ?", (last_id,)))
            last_at = str(found[0][0]) if found else ""
        span = 0 if last_id is None else int(last_id) - int(first_id) + 1
        if verify is False or (verify is None and span > VERIFY_LIMIT):
            why = (
                "not verified (--no-verify-chains)"
                if verify is False
                else f"not verified: the audit holds about {span} entries, more than "
                f"{VERIFY_LIMIT} (--verify-chains verifies them; devtrust audit verify too)"
            )
            return AuditStatus(False, None, 0, 0, int(last_id or 0), last_at, (), why)
        # In this snapshot, the figures' (review L8): audit_db.verify would open its own.
        checked = audit_db.verify_in_snapshot(self._db)
        return AuditStatus(
            verified=True,
            intact=checked.intact,
            chains=checked.chains,
            entries=checked.entries,
            last_id=int(last_id or 0),
            last_at=last_at,
            broken=tuple(b.line() for b in checked.broken),
        )

    def stream(
        self,
        sink: Sink,
        wanted: set[str],
        *,
        since: datetime.datetime,
        until: datetime.datetime,
    ) -> int:
        """Each wanted device's last appraisal before ``since``, then the appraisals of
        [since, until) in time order, into ``sink``; the number of the period's."""
        for appraisal in self._before(wanted, since):
            sink.before(appraisal)
        low, high = since - datetime.timedelta(seconds=1), until + datetime.timedelta(seconds=1)
        names: dict[str, str] = {}
        count = 0
        for r in self._db.rows(_PERIOD[self._dialect], (_stamp(low), _stamp(high))):
            device_id = str(r[1])
            if device_id not in wanted:
                continue
            at = when(r[2])
            if at is None or not since <= at < until:
                continue
            ids = (
                ()
                if r[5] is None
                else tuple(sorted({names.setdefault(i, i) for i in str(r[5]).split("\n") if i}))
            )
            sink.add(
                Appraisal(
                    device_id=names.setdefault(device_id, device_id),
                    at=at,
                    tier=names.setdefault(str(r[3]), str(r[3])) or "none",
                    expires_at=when(r[4]),
                    finding_ids=ids,
                    entry=int(r[0]),
                )
            )
            count += 1
        return count

    def _before(self, wanted: set[str], since: datetime.datetime) -> list[Appraisal]:
        """Each device's last appraisal before ``since`` (a query per device by its index,
        in one statement; then those entries, a page of ids at a time)."""
        rows = self._db.rows
        # The first entry some minutes into the period bounds the search from above.
        later = list(
            rows(
                "SELECT id FROM audit WHERE event = 'appraisal' AND at >= ? ORDER BY at LIMIT 1",
                (_stamp(since + _SLACK),),
            )
        )
        if later:
            bound = int(later[0][0])
        else:
            [(top,)] = list(rows("SELECT MAX(id) FROM audit"))
            bound = int(top or 0) + 1
        ids = [
            int(r[1])
            for r in rows(_BEFORE, (bound, _stamp(since)))
            if r[1] is not None and str(r[0]) in wanted
        ]
        found: list[Appraisal] = []
        for chunk in _chunks(ids, _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            for r in rows(
                f"SELECT device_id, tier, detail, at FROM audit WHERE id IN ({marks})",  # noqa: S608 - marks only
                chunk,
            ):
                appraisal = appraisal_of(str(r[0]), str(r[1]), r[2], r[3])
                if appraisal is not None and appraisal.at < since:
                    found.append(appraisal)
        return found

    def entries(self, ids: Iterable[int]) -> dict[int, Appraisal]:
        """The appraisals of these audit entries, whole (the examples shown)."""
        out: dict[int, Appraisal] = {}
        for chunk in _chunks(sorted(set(ids)), _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            for r in self._db.rows(
                f"SELECT id, device_id, tier, detail, at FROM audit WHERE id IN ({marks})",  # noqa: S608 - marks only
                chunk,
            ):
                found = appraisal_of(str(r[1]), str(r[2]), r[3], r[4])
                if found is not None:
                    out[int(r[0])] = found
        return out


@contextmanager
def reading(database: str) -> Iterator[Reading]:
    """``database`` open read-only, inside one snapshot (ConfigError for a database that is
    none or is newer than this code; the drivers' errors for one unreadable)."""
    try:
        location = database_location(database)
    except ValueError as exc:
        raise ConfigError(f"--database {exc}") from None
    if isinstance(location, DatabaseUrl):
        with (
            audit_db.opened(read_only_url(str.__str__(location)), write=False) as db,
            db.snapshot(),
        ):
            yield Reading(db, "postgresql")
        return
    with audit_db.opened(database, write=False) as db, db.snapshot():
        yield Reading(db, "sqlite")


def unchanged(path: Path) -> Any:
    """What says whether an SQLite file was rewritten: the identity, size and time of the
    file; None when a verifier has it open (a -wal exists: the read then takes SQLite's
    locks and sees one state whatever is written meanwhile)."""
    if Path(f"{path}-wal").exists():
        return None
    found = os.stat(path)
    return (found.st_ino, found.st_size, found.st_mtime_ns)


def consistent(database: str, read: Any) -> Any:
    """``read()`` (reading the database) again while an SQLite file it read without locks
    (immutable: no verifier had it open) was rewritten meanwhile, by a verifier started
    during the read and checkpointing (review L10); ConfigError when it keeps changing."""
    try:
        location = database_location(database)
    except ValueError as exc:
        raise ConfigError(f"--database {exc}") from None
    if not isinstance(location, Path):
        return read()
    for _ in range(_TRIES):
        before = unchanged(location) if location.exists() else None
        result = read()
        if before is None or before == unchanged(location):
            return result
    raise ConfigError(
        f"--database {location}: the file changed while it was read, {_TRIES} times: run the "
        "report again"
    )


def _chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
