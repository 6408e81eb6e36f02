"""The figures of ``devtrust report``, computed from what was read (``report_data.Store``
and the period's appraisals streamed into ``Period``): pure, no I/O, no clock (``now`` is
passed in). The result is the report's JSON document (schema ``VERSION``, described in
``report_command``'s help and the README); the HTML page is rendered from the same
document, so the two never disagree.

Definitions (said on the page too; one compliance everywhere, review M4):

- compliant at a time T: a device enrolled at T whose latest result by T had not expired at T
  and whose tier meets its zone's minimum (``Tier.meets``: NONE meets nothing); compliance =
  compliant / enrolled. "enrolled at T" as far as the store tells: enrolled now or revoked
  after T (the audit's "revoked" entry), and enrolled (``enrolled_at``) by T; a device
  pending approval now, or revoked at an unrecorded time, counts at no time.
- the fleet (devices, states, tiers, compliance, drivers, policies in results): at the
  period's end ``until`` (now by default), by the definition above: each device's latest
  appraisal before ``until`` (the stored current result where it is one: always when
  ``until`` is now, so that the figures are today's), expiry judged at ``until``; the
  history's last bucket is the same figure. Over time: at each bucket's end, from the
  audit's appraisals.
- time to detect: the verifier stores no time of the posture change itself, only its
  appraisals. A detection is an appraisal worse than affirming right after an affirming one
  of the same device; its time to detect is the time between the two, an upper bound on the
  time from the change (which happened between them) to the verdict.

Memory is per device (its latest appraisal) and per finding, never per appraisal: the
period's appraisals pass once, in time order (review H1).
"""

from __future__ import annotations

import datetime
import heapq
import itertools
import math
import re
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from devtrust.core.tier import Tier
from devtrust.verifier.document import Bulletins, version_tuple
from devtrust.verifier.logtext import printable
from devtrust.verifier.report_data import Appraisal, DeviceRow, Store

VERSION = 3
TIERS = ("affirming", "warning", "contraindicated", "none")
STATES = ("enrolled", "pending_approval", "revoked")
DRIVER_FINDING = "gpu.driver.security_bulletins"
# Bucket sizes for history, the smallest giving at most MAX_BUCKETS buckets; each aligned
# to UTC (a bucket of an hour ends on the hour, of a day at midnight UTC).
BUCKETS: tuple[tuple[int, str], ...] = (
    (60, "minute"),
    (300, "5 minutes"),
    (900, "15 minutes"),
    (3600, "hour"),
    (21600, "6 hours"),
    (86400, "day"),
    (7 * 86400, "7 days"),
    (30 * 86400, "30 days"),
)
MAX_BUCKETS = 60
# Detections listed whole (the longest; every one is in the figures).
LISTED = 100
TOP_FINDINGS = 10
DEVICES_PER_FINDING = 50
HOSTNAME_SHOWN = 64
# A period's end this close to the generation time is "now": the fleet is today's.
NOW_SLACK = datetime.timedelta(seconds=5)
# A driver version as NVML writes it (580.65.06): anything else is not taken for one.
DRIVER_VERSION = re.compile(r"[0-9]{1,6}(?:\.[0-9]{1,6}){1,3}")
TTD_DEFINITION = (
    "The verifier stores its appraisals, not the moment a device's posture changed. A "
    "detection is an appraisal worse than affirming that follows an affirming appraisal of the "
    "same device; its time to detect is the time between the two. The change happened between "
    "them, so this is an upper bound on the time from the change to the verdict (the "
    "verifier's metrics measure the change-to-verdict time of changes the agent reports)."
)
COMPLIANCE_DEFINITION = (
    "Compliant: an enrolled device whose latest result has not expired and whose tier is at "
    "or above its zone's minimum tier. Compliance: compliant devices / enrolled devices."
)
FLEET_DEFINITION = (
    "The fleet at the period's end: each device's latest appraisal before then (the stored "
    "current result when the period ends now), an expired one counting as no result; device "
    "states then as far as the store tells (as in the history below: revoked then if revoked "
    "by then, per the audit's revocation entry; devices enrolled later are not counted); zones "
    "and claimed hostnames as they are now."
)
HISTORY_DEFINITION = (
    "At the end of each bucket, the same definition then: among the devices enrolled at that "
    "time, the share whose latest appraisal by then had not expired and met its zone's minimum "
    "tier (zones as they are now). Enrolled at that time, as far as the store tells: enrolled "
    "now, or revoked later than that (the audit's revocation entry), and enrolled by then "
    "(the device's enrollment time); devices pending approval now, or revoked at an "
    "unrecorded time, are counted at no time."
)
HOSTNAME_NOTE = (
    "Devices are identified by their device id (the hash of their TPM's endorsement key). "
    "The hostname is what the device claimed at enrollment: unverified, non-printable "
    "characters shown escaped, and a name claimed by more than one device marked."
)


@dataclass(frozen=True)
class Minimums:
    """The lowest tier each zone certifies (the verifier's certificates.min_tier and
    zone_min_tier; affirming when no configuration is given)."""

    default: Tier = Tier.AFFIRMING
    zones: Mapping[str, Tier] = field(default_factory=dict)

    def of(self, zone: str) -> Tier:
        return self.zones.get(zone, self.default)


def iso(moment: datetime.datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(datetime.UTC).isoformat()


def tier_of(label: str) -> Tier:
    try:
        return Tier.parse(label)
    except ValueError:
        return Tier.NONE


def buckets(
    since: datetime.datetime, until: datetime.datetime
) -> tuple[int, str, list[datetime.datetime]]:
    """The bucket size (seconds, name) and the buckets' ends: every multiple of the size
    (from the epoch, UTC: whole minutes, hours, days) after ``since``, then ``until``; at
    most MAX_BUCKETS of them, whatever the period."""
    span = max((until - since).total_seconds(), 1.0)
    size, name = BUCKETS[-1]
    for size_s, label in BUCKETS:
        if math.ceil(span / size_s) + 1 <= MAX_BUCKETS:
            size, name = size_s, label
            break
    else:
        days = math.ceil(span / 86400 / (MAX_BUCKETS - 1))
        size, name = days * 86400, f"{days} days"
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    step = datetime.timedelta(seconds=size)
    first = math.floor((since - epoch).total_seconds() / size) + 1
    ends = []
    at = epoch + first * step
    while at < until:
        ends.append(at)
        at += step
    ends.append(until)
    return size, name, ends


def _valid_at(tier: str, expires_at: datetime.datetime | None, moment: datetime.datetime) -> str:
    """The tier a result gives at ``moment``: none when it expired."""
    if expires_at is not None and expires_at <= moment:
        return "none"
    return tier if tier in TIERS else "none"


def _share(part: int, whole: int) -> float | None:
    return None if whole == 0 else round(part / whole, 4)


def state_at(
    device: DeviceRow, revoked_at: datetime.datetime | None, moment: datetime.datetime
) -> str | None:
    """The device's state at ``moment`` as far as the store tells (``HISTORY_DEFINITION``,
    which ``_enrolled_window`` follows: enrolled then exactly when its window holds
    ``moment``); None when it enrolled (or asked to) later."""
    if device.enrolled_at is not None and device.enrolled_at > moment:
        return None
    if device.state == "revoked" and revoked_at is not None and revoked_at > moment:
        return "enrolled"
    return device.state


def _enrolled_window(
    device: DeviceRow, revoked_at: datetime.datetime | None
) -> tuple[datetime.datetime, datetime.datetime] | None:
    """When the device was enrolled, as far as the store tells (``HISTORY_DEFINITION``)."""
    start = device.enrolled_at or datetime.datetime.min.replace(tzinfo=datetime.UTC)
    if device.state == "enrolled":
        return start, datetime.datetime.max.replace(tzinfo=datetime.UTC)
    if device.state == "revoked" and revoked_at is not None:
        return start, revoked_at
    return None


_Detection = tuple[str, datetime.datetime, datetime.datetime, str, tuple[str, ...]]


class Period:
    """The period's figures, from its appraisals streamed in time order (``report_data
    .Sink``): each device's latest appraisal, the history's buckets closed as time passes
    them, the findings' counts, the detections."""

    def __init__(
        self,
        store: Store,
        *,
        since: datetime.datetime,
        until: datetime.datetime,
        minimums: Minimums,
    ) -> None:
        self.size, self.name, self.ends = buckets(since, until)
        self.until = until
        self.settled = False
        self.is_now = False
        self._zone = {d.device_id: d.zone for d in store.devices}
        self._need = {d.device_id: minimums.of(d.zone) for d in store.devices}
        self._windows = {
            d.device_id: w
            for d in store.devices
            if (w := _enrolled_window(d, store.device_revoked_at.get(d.device_id))) is not None
        }
        # Each device's latest appraisal so far: the one before the period whole, the
        # period's with their entry ids only (read whole at the end, ``wanted``).
        self._latest: dict[str, Appraisal] = {}
        self._next = 0
        self.series: dict[str, list[float | None]] = {
            z: [] for z in sorted(set(self._zone.values()))
        }
        self.fleet: list[float | None] = []
        self.enrolled: list[int] = []
        self.appraisals = 0
        self.counted: Counter[str] = Counter()
        self.devices: dict[str, Counter[str]] = defaultdict(Counter)
        self.last: dict[tuple[str, str], datetime.datetime] = {}
        self.example: dict[str, int] = {}
        # Detections: every one's time (8 bytes) per zone, the LISTED longest whole.
        self.spans: dict[str, array[float]] = defaultdict(lambda: array("d"))
        self.detected: Counter[str] = Counter()
        self.longest: list[tuple[float, int, _Detection]] = []

    def before(self, appraisal: Appraisal) -> None:
        self._latest[appraisal.device_id] = appraisal

    def add(self, appraisal: Appraisal) -> None:
        self._close(appraisal.at)
        device_id = appraisal.device_id
        self.appraisals += 1
        for finding_id in appraisal.finding_ids:
            self.counted[finding_id] += 1
            self.devices[finding_id][device_id] += 1
            self.last[finding_id, device_id] = appraisal.at
            self.example[finding_id] = appraisal.entry
        previous = self._latest.get(device_id)
        if previous is not None and previous.tier == "affirming" and appraisal.tier != "affirming":
            seconds = round((appraisal.at - previous.at).total_seconds(), 3)
            self.spans[self._zone.get(device_id, "")].append(seconds)
            self.detected[device_id] += 1
            found = (device_id, previous.at, appraisal.at, appraisal.tier, appraisal.finding_ids)
            item = (seconds, -self.appraisals, found)
            if len(self.longest) < LISTED:
                heapq.heappush(self.longest, item)
            elif item > self.longest[0]:
                heapq.heapreplace(self.longest, item)
        self._latest[device_id] = appraisal

    def settle(self, current: Mapping[str, Appraisal], *, now: datetime.datetime) -> list[int]:
        """After the last appraisal: close the buckets left, the last (the period's end)
        with each device's latest appraisal before ``until``, the stored current result
        (``current``) where it is one (appraised before ``until``, or whenever when
        ``until`` is now: today's fleet is the stored one); the audit entries of the
        latest appraisals to read whole (their findings and policy: ``fleet_at``)."""
        if self.settled:
            return []
        self.settled = True
        self.is_now = now - self.until <= NOW_SLACK
        self._close(self.until - datetime.timedelta.resolution)
        for device_id, stored in current.items():
            if device_id in self._zone and (self.is_now or stored.at < self.until):
                self._latest[device_id] = stored
        self._close(None)
        return sorted({a.entry for a in self._latest.values() if a.entry})

    def fleet_at(self, whole: Mapping[int, Appraisal]) -> dict[str, Appraisal]:
        """Each device's latest appraisal at the period's end (``settle``), whole where
        ``whole`` (the entries read) has it."""
        return {
            device_id: whole.get(a.entry, a) if a.entry else a
            for device_id, a in self._latest.items()
        }

    def _close(self, upto: datetime.datetime | None) -> None:
        """Every bucket ending at or before ``upto`` (None: all): its figures are those of
        the appraisals before its end, all added by now."""
        while self._next < len(self.ends) and (upto is None or self.ends[self._next] <= upto):
            self._bucket(self.ends[self._next])
            self._next += 1

    def _bucket(self, end: datetime.datetime) -> None:
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for device_id, (start, stop) in self._windows.items():
            if not start <= end < stop:
                continue
            latest = self._latest.get(device_id)
            tier = "none" if latest is None else _valid_at(latest.tier, latest.expires_at, end)
            into = counts[self._zone[device_id]]
            into[0] += tier_of(tier).meets(self._need[device_id])
            into[1] += 1
        for zone, values in self.series.items():
            values.append(_share(*counts[zone]) if zone in counts else None)
        whole = sum(c[1] for c in counts.values())
        self.fleet.append(_share(sum(c[0] for c in counts.values()), whole))
        self.enrolled.append(whole)


def compute(
    store: Store,
    period: Period,
    *,
    since: datetime.datetime,
    until: datetime.datetime,
    now: datetime.datetime,
    minimums: Minimums,
    bulletins: Bulletins,
    examples: Mapping[int, Appraisal] | None = None,
    zone_filter: str | None = None,
    database: str = "",
) -> dict[str, Any]:
    """The report's document (schema ``VERSION``); ``period``: the period's appraisals,
    all streamed in; ``examples``: the audit entries ``period.example`` names, whole;
    ``database``: where it was read, as shown (a server's URL without its password)."""
    period.settle(store.current, now=now)
    whole = examples or {}
    latest = period.fleet_at(whole)
    states = {
        d.device_id: s
        for d in store.devices
        if (s := state_at(d, store.device_revoked_at.get(d.device_id), until)) is not None
    }
    people = _People(store.devices, states)
    zones, fleet = _fleet(store, latest, states, until=until, minimums=minimums)
    return {
        "version": VERSION,
        "generated_at": iso(now),
        "fleet_at": {
            "at": iso(until),
            "now": period.is_now,
            "devices_later": len(store.devices) - len(states),
        },
        "period": {
            "since": iso(since),
            "until": iso(until),
            "bucket": period.name,
            "bucket_s": period.size,
        },
        "zone_filter": zone_filter,
        "database": database,
        "empty": not store.devices,
        "definitions": {
            "compliance": COMPLIANCE_DEFINITION,
            "fleet": FLEET_DEFINITION,
            "history": HISTORY_DEFINITION,
            "time_to_detect": TTD_DEFINITION,
            "devices": HOSTNAME_NOTE,
        },
        "fleet": fleet,
        "zones": zones,
        "history": {
            "ends": [iso(e) for e in period.ends],
            "zones": period.series,
            "fleet": period.fleet,
            "enrolled": period.enrolled,
        },
        "appraisals": period.appraisals,
        "findings": _findings(period, people, whole),
        "time_to_detect": _time_to_detect(period, people),
        "revoked_certificates": [
            {
                "serial": c.serial,
                **people.who(c.device_id),
                "kind": c.kind,
                "reason": c.reason,
                "revoked_at": iso(c.revoked_at),
            }
            for c in store.revoked
        ],
        "revoked_devices": [
            {
                **people.who(d.device_id),
                "revoked_at": iso(store.device_revoked_at.get(d.device_id)),
            }
            for d in store.devices
            if states.get(d.device_id) == "revoked"
        ],
        "drivers_below_bulletins": _drivers(latest, people, bulletins),
        "policy": _policy(store, latest),
        "audit": {
            "verified": store.audit.verified,
            "intact": store.audit.intact,
            "why": store.audit.why or None,
            "chains": store.audit.chains,
            "entries": store.audit.entries,
            "last_id": store.audit.last_id,
            "last_at": store.audit.last_at or None,
            "broken": list(store.audit.broken),
        },
        "notes": list(store.notes),
    }


class _People:
    """Who a device is, as the report shows it: its id first, then the hostname it claimed
    (review M6)."""

    def __init__(self, devices: Iterable[DeviceRow], states: Mapping[str, str]) -> None:
        self._by_id = {d.device_id: d for d in devices}
        self._shared = Counter(d.hostname for d in self._by_id.values() if d.hostname)
        self._states = states

    def state(self, device_id: str) -> str:
        """Its state at the period's end (``state_at``)."""
        return self._states.get(device_id, "")

    def who(self, device_id: str) -> dict[str, Any]:
        row = self._by_id.get(device_id)
        host = row.hostname if row else ""
        return {
            "device_id": device_id,
            "hostname": host,
            "hostname_shown": printable(host, HOSTNAME_SHOWN),
            "hostname_shared": self._shared[host] if host else 0,
            "zone": row.zone if row else "",
        }


def _fleet(
    store: Store,
    latest: Mapping[str, Appraisal],
    states: Mapping[str, str],
    *,
    until: datetime.datetime,
    minimums: Minimums,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fleet at ``until``: the devices known by then, their states then (``states``),
    and the enrolled ones' tiers by their latest appraisal (``latest``), judged then."""
    zones: dict[str, dict[str, Any]] = {}

    def blank(min_tier: str) -> dict[str, Any]:
        return {
            "min_tier": min_tier,
            "devices": 0,
            "states": dict.fromkeys(STATES, 0),
            "tiers": dict.fromkeys(TIERS, 0),
            "enrolled": 0,
            "compliant": 0,
            "compliance": None,
        }

    fleet = blank("")
    del fleet["min_tier"]
    for device in store.devices:
        state = states.get(device.device_id)
        if state is None:
            continue
        zone = zones.setdefault(device.zone, blank(minimums.of(device.zone).label))
        for into in (zone, fleet):
            into["devices"] += 1
            into["states"][state] = into["states"].get(state, 0) + 1
        if state != "enrolled":
            continue
        found = latest.get(device.device_id)
        tier = "none" if found is None else _valid_at(found.tier, found.expires_at, until)
        ok = tier_of(tier).meets(minimums.of(device.zone))
        for into in (zone, fleet):
            into["enrolled"] += 1
            into["tiers"][tier] += 1
            into["compliant"] += ok
    for into in (*zones.values(), fleet):
        into["compliance"] = _share(into["compliant"], into["enrolled"])
    return dict(sorted(zones.items())), fleet


def _findings(
    period: Period, people: _People, examples: Mapping[int, Appraisal]
) -> list[dict[str, Any]]:
    counted, devices = period.counted, period.devices
    top = sorted(counted, key=lambda f: (-counted[f], -len(devices[f]), f))[:TOP_FINDINGS]
    out = []
    for finding_id in top:
        seen = sorted(devices[finding_id].items(), key=lambda item: (-item[1], item[0]))
        entry = examples.get(period.example.get(finding_id, 0))
        example = next((f for f in entry.findings if f.id == finding_id), None) if entry else None
        out.append(
            {
                "id": finding_id,
                "severity": example.severity if example else "",
                "example": example.message if example else "",
                "appraisals": counted[finding_id],
                "device_count": len(seen),
                "devices": [
                    {
                        **people.who(device_id),
                        "appraisals": n,
                        "last_at": iso(period.last[finding_id, device_id]),
                    }
                    for device_id, n in seen[:DEVICES_PER_FINDING]
                ],
            }
        )
    return out


def _percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile (q in 0..1) of sorted ``values``."""
    if not values:
        return None
    rank = max(math.ceil(q * len(values)), 1)
    return round(values[rank - 1], 3)


def _stats(seconds: Iterable[float]) -> dict[str, Any]:
    ordered = sorted(seconds)
    return {
        "count": len(ordered),
        "median_s": _percentile(ordered, 0.5),
        "p90_s": _percentile(ordered, 0.9),
        "max_s": round(ordered[-1], 3) if ordered else None,
    }


def _time_to_detect(period: Period, people: _People) -> dict[str, Any]:
    """The detections' figures (all of them), and the LISTED longest (in time order)."""
    listed = [item[2] for item in sorted(period.longest, key=lambda item: -item[1])]
    detections = [
        {
            **people.who(device_id),
            "last_affirming_at": iso(before),
            "detected_at": iso(at),
            "seconds": round((at - before).total_seconds(), 3),
            "tier": tier,
            "findings": sorted(set(ids)),
        }
        for device_id, before, at, tier, ids in listed
    ]
    return {
        **_stats(itertools.chain.from_iterable(period.spans.values())),
        "zones": {zone: _stats(values) for zone, values in sorted(period.spans.items())},
        "devices": len(period.detected),
        "most_by_one_device": max(period.detected.values(), default=0),
        "detections": detections,
    }


def driver_version(found: str) -> tuple[str | None, str]:
    """The running driver version the bulletins finding names first (the shipped rule's
    ``found``: "driver VERSION, bulletin ..."), when it is one (``DRIVER_VERSION``); else
    None, and the text where it should be, escaped and clipped (the device sends the
    version: it is never parsed further, review M3)."""
    head = found.removeprefix("driver ") if found.startswith("driver ") else None
    if head is None:
        return None, printable(found, HOSTNAME_SHOWN)
    text = head.split(", bulletin ", 1)[0]
    if len(text) <= 32 and DRIVER_VERSION.fullmatch(text):
        return text, text
    return None, printable(text, HOSTNAME_SHOWN)


def _rendered(version: str, missing: Sequence[Any]) -> str:
    """The finding's ``found`` as the shipped rule writes it for ``version``."""
    items = [f"driver {version}"]
    items += [f"bulletin {b.bulletin} ({b.title}, fixed in {b.fixed})" for b in missing]
    return ", ".join(items)


def _drivers(
    latest: Mapping[str, Appraisal], people: _People, bulletins: Bulletins
) -> list[dict[str, Any]]:
    """Devices whose latest result at the period's end (``latest``) has the finding
    ``gpu.driver.security_bulletins``:
    the driver version it names, validated, and the bulletins computed from that version
    and the bulletins' data as the verifier does (``Bulletins.missing``), never read from the
    finding's text. A version that is none is "unparseable"; one whose finding is not what
    the rule writes for it with these bulletins (another bulletins file, or text added to the
    version) "unmatched": either way the device is listed, with no figures."""
    newest: dict[str, str] = {}
    for b in bulletins.entries:
        if version_tuple(b.fixed) > version_tuple(newest.get(b.branch, "0")):
            newest[b.branch] = b.fixed
    out = []
    for device_id, appraisal in sorted(latest.items()):
        texts = [f.found for f in appraisal.findings if f.id == DRIVER_FINDING]
        if not texts:
            continue
        version, shown = driver_version(texts[0])
        missing = bulletins.missing(version) if version else []
        shown = shown if version else f"unparseable: {shown}"
        if version is not None and (not missing or texts[0] != _rendered(version, missing)):
            shown = f"unmatched: {shown} (the finding is not the bulletins' for it)"
            version, missing = None, []
        ordered = sorted(missing, key=lambda b: (version_tuple(b.fixed), b.bulletin))
        branch = f"R{version.split('.', 1)[0]}" if version else ""
        cves = {cve for b in ordered for cve in b.cves if cve}
        out.append(
            {
                **people.who(device_id),
                "state": people.state(device_id),
                "appraised_at": iso(appraisal.at),
                "driver_version": version,
                "driver_shown": shown,
                "branch": branch,
                "bulletins": [b.bulletin for b in ordered],
                "fixed_in": ordered[-1].fixed if ordered else None,
                "latest_fixed_in_branch": newest.get(branch) if version else None,
                "cves": len(cves) if version else None,
                "max_cvss": max((b.max_cvss for b in ordered), default=None),
            }
        )
    return out


def _policy(store: Store, latest: Mapping[str, Appraisal]) -> dict[str, Any]:
    in_results = Counter(a.policy_id for a in latest.values() if a.policy_id)
    row = store.policy
    return {
        "policy_id": row.policy_id if row else None,
        "digest": row.digest if row else None,
        "published_at": row.published_at if row else None,
        "published_by": row.published_by if row else None,
        "in_latest_results": dict(sorted(in_results.items())),
    }
