"""The figures of ``devtrust report``, computed from what was read (``report_data.Store``):
pure, no I/O, no clock (``now`` is passed in). The result is the report's JSON document
(schema ``VERSION``, described in ``report_command``'s help and the README); the HTML page
is rendered from the same document, so the two never disagree.

Definitions (said on the page too):

- compliant: an enrolled device whose current result has not expired and whose tier meets
  its zone's minimum (``Tier.meets``: NONE meets nothing); compliance = compliant / enrolled.
- compliance over time: at the end of each bucket, among the devices appraised by then, the
  share whose latest appraisal by then had not expired and met the zone's minimum (the
  device's zone as it is now).
- time to detect: the verifier stores no time of the posture change itself, only its
  appraisals. A detection is an appraisal worse than affirming right after an affirming one
  of the same device; its time to detect is the time between the two, an upper bound on the
  time from the change (which happened between them) to the verdict.
"""

from __future__ import annotations

import datetime
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from devtrust.core.tier import Tier
from devtrust.verifier.document import Bulletins, version_tuple
from devtrust.verifier.report_data import Appraisal, DeviceRow, Store

VERSION = 1
TIERS = ("affirming", "warning", "contraindicated", "none")
STATES = ("enrolled", "pending_approval", "revoked")
DRIVER_FINDING = "gpu.driver.security_bulletins"
# Bucket sizes for history, the smallest giving at most MAX_BUCKETS buckets.
BUCKETS: tuple[tuple[int, str], ...] = (
    (60, "minute"),
    (300, "5 minutes"),
    (900, "15 minutes"),
    (3600, "hour"),
    (86400, "day"),
)
MAX_BUCKETS = 60
TOP_FINDINGS = 10
DEVICES_PER_FINDING = 50
TTD_DEFINITION = (
    "The verifier stores its appraisals, not the moment a device's posture changed. A "
    "detection is an appraisal worse than affirming that follows an affirming appraisal of the "
    "same device; its time to detect is the time between the two. The change happened between "
    "them, so this is an upper bound on the time from the change to the verdict (the "
    "verifier's metrics measure the change-to-verdict time of changes the agent reports)."
)
COMPLIANCE_DEFINITION = (
    "Compliant: an enrolled device whose current result has not expired and whose tier is at "
    "or above its zone's minimum tier. Compliance: compliant devices / enrolled devices."
)
_BULLETIN = re.compile(r"bulletin (\S+) \((.*?), fixed in ([0-9][0-9.]*)\)")
# A finding that names the running driver first ("driver 580.65.06: bulletin ..."): the
# shipped rule does not (yet); the version is then unknown to the store.
_RUNNING = re.compile(r"^driver ([0-9][0-9.]*)")


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


def bucket_size(since: datetime.datetime, until: datetime.datetime) -> tuple[int, str]:
    span = max((until - since).total_seconds(), 1.0)
    for size, name in BUCKETS:
        if math.ceil(span / size) <= MAX_BUCKETS:
            return size, name
    return BUCKETS[-1]


def _valid_at(appraisal: Appraisal | None, moment: datetime.datetime) -> str:
    """The tier ``appraisal`` gives at ``moment``: none when there is none or it expired."""
    if appraisal is None:
        return "none"
    if appraisal.expires_at is not None and appraisal.expires_at <= moment:
        return "none"
    return appraisal.tier if appraisal.tier in TIERS else "none"


def _share(part: int, whole: int) -> float | None:
    return None if whole == 0 else round(part / whole, 4)


def compute(
    store: Store,
    *,
    since: datetime.datetime,
    until: datetime.datetime,
    now: datetime.datetime,
    minimums: Minimums,
    bulletins: Bulletins,
    zone_filter: str | None = None,
    database: str = "",
) -> dict[str, Any]:
    """The report's document (schema ``VERSION``); ``database``: where it was read, as
    shown (a server's URL without its password)."""
    by_id = {d.device_id: d for d in store.devices}
    size, name = bucket_size(since, until)
    zones, fleet = _now(store, now=now, minimums=minimums)
    return {
        "version": VERSION,
        "generated_at": iso(now),
        "period": {"since": iso(since), "until": iso(until), "bucket": name, "bucket_s": size},
        "zone_filter": zone_filter,
        "database": database,
        "empty": not store.devices,
        "definitions": {"compliance": COMPLIANCE_DEFINITION, "time_to_detect": TTD_DEFINITION},
        "fleet": fleet,
        "zones": zones,
        "history": _history(store, since=since, until=until, size=size, minimums=minimums),
        "appraisals": len(store.appraisals),
        "findings": _findings(store, by_id),
        "time_to_detect": _time_to_detect(store, by_id),
        "revoked_certificates": [
            {
                "serial": c.serial,
                **_who(by_id, c.device_id),
                "kind": c.kind,
                "reason": c.reason,
                "revoked_at": iso(c.revoked_at),
            }
            for c in store.revoked
        ],
        "revoked_devices": [
            {
                **_who(by_id, d.device_id),
                "revoked_at": iso(store.device_revoked_at.get(d.device_id)),
            }
            for d in store.devices
            if d.state == "revoked"
        ],
        "drivers_below_bulletins": _drivers(store, by_id, bulletins),
        "policy": _policy(store),
        "audit": {
            "intact": store.audit.intact,
            "chains": store.audit.chains,
            "entries": store.audit.entries,
            "last_id": store.audit.last_id,
            "last_at": store.audit.last_at or None,
            "broken": list(store.audit.broken),
        },
        "notes": list(store.notes),
    }


def _who(by_id: Mapping[str, DeviceRow], device_id: str) -> dict[str, str]:
    row = by_id.get(device_id)
    return {
        "device_id": device_id,
        "hostname": row.hostname if row else "",
        "zone": row.zone if row else "",
    }


def _now(
    store: Store, *, now: datetime.datetime, minimums: Minimums
) -> tuple[dict[str, Any], dict[str, Any]]:
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
        zone = zones.setdefault(device.zone, blank(minimums.of(device.zone).label))
        for into in (zone, fleet):
            into["devices"] += 1
            into["states"][device.state] = into["states"].get(device.state, 0) + 1
        if device.state != "enrolled":
            continue
        tier = _valid_at(store.current.get(device.device_id), now)
        ok = tier_of(tier).meets(minimums.of(device.zone))
        for into in (zone, fleet):
            into["enrolled"] += 1
            into["tiers"][tier] += 1
            into["compliant"] += ok
    for into in (*zones.values(), fleet):
        into["compliance"] = _share(into["compliant"], into["enrolled"])
    return dict(sorted(zones.items())), fleet


def _history(
    store: Store,
    *,
    since: datetime.datetime,
    until: datetime.datetime,
    size: int,
    minimums: Minimums,
) -> dict[str, Any]:
    zone_of = {d.device_id: d.zone for d in store.devices}
    latest: dict[str, Appraisal] = dict(store.before)
    ends: list[datetime.datetime] = []
    at = since
    while at < until:
        at = min(at + datetime.timedelta(seconds=size), until)
        ends.append(at)
    series: dict[str, list[float | None]] = {z: [] for z in sorted(set(zone_of.values()))}
    fleet: list[float | None] = []
    appraised: list[int] = []
    events = iter(store.appraisals)
    pending = next(events, None)
    for end in ends:
        while pending is not None and pending.at < end:
            latest[pending.device_id] = pending
            pending = next(events, None)
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for device_id, appraisal in latest.items():
            zone = zone_of.get(device_id)
            if zone is None:
                continue
            ok = tier_of(_valid_at(appraisal, end)).meets(minimums.of(zone))
            counts[zone][0] += ok
            counts[zone][1] += 1
        for zone, values in series.items():
            values.append(_share(*counts[zone]) if zone in counts else None)
        part, whole = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
        fleet.append(_share(part, whole))
        appraised.append(whole)
    return {
        "ends": [iso(e) for e in ends],
        "zones": series,
        "fleet": fleet,
        "appraised": appraised,
    }


def _findings(store: Store, by_id: Mapping[str, DeviceRow]) -> list[dict[str, Any]]:
    counted: Counter[str] = Counter()
    devices: dict[str, Counter[str]] = defaultdict(Counter)
    last: dict[tuple[str, str], datetime.datetime] = {}
    for appraisal in store.appraisals:
        for finding_id in set(appraisal.finding_ids):
            counted[finding_id] += 1
            devices[finding_id][appraisal.device_id] += 1
            last[finding_id, appraisal.device_id] = appraisal.at
    top = sorted(counted, key=lambda f: (-counted[f], -len(devices[f]), f))[:TOP_FINDINGS]
    out = []
    for finding_id in top:
        seen = sorted(devices[finding_id].items(), key=lambda item: (-item[1], item[0]))
        example = store.examples.get(finding_id)
        out.append(
            {
                "id": finding_id,
                "severity": example.severity if example else "",
                "example": example.message if example else "",
                "appraisals": counted[finding_id],
                "device_count": len(seen),
                "devices": [
                    {
                        **_who(by_id, device_id),
                        "appraisals": n,
                        "last_at": iso(last[finding_id, device_id]),
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


def _time_to_detect(store: Store, by_id: Mapping[str, DeviceRow]) -> dict[str, Any]:
    previous: dict[str, Appraisal] = dict(store.before)
    detections: list[dict[str, Any]] = []
    for appraisal in store.appraisals:
        before = previous.get(appraisal.device_id)
        previous[appraisal.device_id] = appraisal
        if before is None or before.tier != "affirming" or appraisal.tier == "affirming":
            continue
        detections.append(
            {
                **_who(by_id, appraisal.device_id),
                "last_affirming_at": iso(before.at),
                "detected_at": iso(appraisal.at),
                "seconds": round((appraisal.at - before.at).total_seconds(), 3),
                "tier": appraisal.tier,
                "findings": sorted(set(appraisal.finding_ids)),
            }
        )
    per_zone: dict[str, list[float]] = defaultdict(list)
    for d in detections:
        per_zone[str(d["zone"])].append(float(d["seconds"]))
    return {
        **_stats(float(d["seconds"]) for d in detections),
        "zones": {zone: _stats(values) for zone, values in sorted(per_zone.items())},
        "detections": detections,
    }


def _drivers(
    store: Store, by_id: Mapping[str, DeviceRow], bulletins: Bulletins
) -> list[dict[str, Any]]:
    """Devices whose current result says their GPU driver is below a security bulletin's
    fixed version (the policy rule ``gpu.driver.security_bulletins``, whose finding names
    the running version first, then each bulletin and its fixed version; results stored
    before the rule named the running version give none)."""
    known = {(b.bulletin, b.branch): b for b in bulletins.entries}
    newest: dict[str, str] = {}
    for b in bulletins.entries:
        if version_tuple(b.fixed) > version_tuple(newest.get(b.branch, "0")):
            newest[b.branch] = b.fixed
    out = []
    for device_id, appraisal in sorted(store.current.items()):
        texts = [f.found or f.message for f in appraisal.findings if f.id == DRIVER_FINDING]
        if not texts:
            continue
        missing = sorted(
            {(m[1], m[3]) for text in texts for m in _BULLETIN.finditer(text)},
            key=lambda item: (version_tuple(item[1]), item[0]),
        )
        running = next((m[1] for m in map(_RUNNING.match, texts) if m), None)
        branch = f"R{missing[-1][1].split('.', 1)[0]}" if missing else ""
        rows = [known.get((number, branch)) for number, _ in missing]
        cves = {cve for row in rows if row is not None for cve in row.cves if cve}
        out.append(
            {
                **_who(by_id, device_id),
                "state": by_id[device_id].state if device_id in by_id else "",
                "appraised_at": iso(appraisal.at),
                "driver_version": running,
                "branch": branch,
                "bulletins": [number for number, _ in missing],
                "fixed_in": missing[-1][1] if missing else None,
                "latest_fixed_in_branch": newest.get(branch),
                "cves": len(cves),
                "max_cvss": max((row.max_cvss for row in rows if row is not None), default=None),
            }
        )
    return out


def _policy(store: Store) -> dict[str, Any]:
    in_results = Counter(a.policy_id for a in store.current.values() if a.policy_id)
    row = store.policy
    return {
        "policy_id": row.policy_id if row else None,
        "digest": row.digest if row else None,
        "published_at": row.published_at if row else None,
        "published_by": row.published_by if row else None,
        "in_current_results": dict(sorted(in_results.items())),
    }
