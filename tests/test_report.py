"""`devtrust report` over a store with a real history: a simulated fleet (`devtrust simulate`:
agents, a real verifier, faults injected and detected) plus entries written through the
storage API for what a short run does not make (zones, a revoked device, a driver below
the NVIDIA bulletins, devices with hostile hostnames and finding text). The page is opened
in a real headless Chromium: it renders, its scripts raise nothing, every figure it marks
(data-key, data-value) equals the figure this test computes from the store with its own
queries (never the report's code), and nothing a device sent becomes markup.

The expected figures (``expected``) are the store read with plain SQL and this file's own
arithmetic, following the definitions the page states.
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from devtrust.core.ids import DeviceId, Serial
from devtrust.core.tier import Tier
from devtrust.verifier.config import DEFAULT_POLICY
from devtrust.verifier.decision import Decision
from devtrust.verifier.records import CertificateRecord, DeviceRecord, DeviceState
from devtrust.verifier.storage import backends
from devtrust.verifier.storage.interfaces import DeviceQuery
from devtrust.verifier.trust import Claim, Finding, Severity, TrustResult

DEVTRUST = [sys.executable, "-m", "devtrust.cli"]
CHROMIUM = "/usr/bin/chromium"
SCRIPT_HOST = "<script>window.__pwned=1;document.title='pwned'</script>"
IMG_HOST = '"><img src=x onerror="window.__pwned=2">'
HOSTILE_MESSAGE = "</td><script>window.__pwned=3</script><img src=x onerror=alert(1)>"
# The shipped rule's found text for a device running 580.65.06 (policy/default.yaml): the
# R580 bulletins of the CSV fixed above it, in the CSV's order.
DRIVER_VERSION = "580.65.06"
DRIVER_FOUND = (
    f"driver {DRIVER_VERSION}, "
    "bulletin 5703 (NVIDIA GPU Display Driver - October 2025, fixed in 580.95.05), "
    "bulletin 5747 (GPU Display Driver - January 2026, fixed in 580.126.09), "
    "bulletin 5821 (GPU Display Driver - May 2026, fixed in 580.159.03)"
)
# A claimed hostname with a bidi override and a zero-width space; one claimed twice.
BIDI_HOST = "gpu-\u202enode-4\u200b"
TWIN_HOST = "gpu-node-3"
BULLETINS_CSV = DEFAULT_POLICY.parent / "nvidia-driver-bulletins.csv"
# Claim values of each tier (draft-ietf-rats-ar4si): the result's tier is its worst.
HOUR = datetime.timedelta(hours=1)
VALUE = {Tier.AFFIRMING: 2, Tier.WARNING: 32, Tier.CONTRAINDICATED: 96}


def report(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEVTRUST, "report", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


# --- the store ---------------------------------------------------------------------------------


def _device(n: int, *, zone: str, hostname: str, state: DeviceState) -> DeviceRecord:
    return DeviceRecord(
        device_id=DeviceId(f"{0xAB00 + n:064x}"),
        state=state,
        ek_certificate=b"ek",
        ek_public=b"ekpub",
        ak_public=b"akpub",
        ak_name="00",
        host={"hostname": hostname},
        enrolled_at=datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2),
        zone=zone,
    )


def _decision(
    rec: DeviceRecord,
    at: datetime.datetime,
    tier: Tier,
    findings: Sequence[Finding] = (),
    *,
    lasts: datetime.timedelta = datetime.timedelta(minutes=3),
) -> Decision:
    result = TrustResult(
        device_id=rec.device_id,
        claims={Claim.INSTANCE_IDENTITY: 2, Claim.CONFIGURATION: VALUE[tier]},
        findings=tuple(findings),
        appraised_at=at,
        expires_at=at + lasts,
        policy_id="devtrust-default-gpu-hosts-1",
    )
    return Decision(
        device_id=rec.device_id,
        zone=rec.zone,
        result=result,
        previous_tier=None,
        certificate=None,
        withheld="test",
        tpm=None,
        rebooted=False,
    )


def _finding(finding_id: str, message: str, found: str = "") -> Finding:
    return Finding(
        id=finding_id,
        severity=Severity.WARNING,
        claim=Claim.CONFIGURATION,
        message=message,
        found=found,
    )


def fill(database: str, now: datetime.datetime) -> dict[str, DeviceRecord]:
    """What a short simulation does not make, written through the storage API: devices in
    zones (two with hostile hostnames), appraisals before and in the period, a driver below
    the bulletins, a device revoked with its certificate, one pending approval; and the
    simulated devices (if any) moved into zones by the inventory."""

    def minutes(n: float) -> datetime.datetime:
        return now - datetime.timedelta(minutes=n)

    script = _device(1, zone="production", hostname=SCRIPT_HOST, state=DeviceState.ENROLLED)
    img = _device(2, zone="lab", hostname=IMG_HOST, state=DeviceState.ENROLLED)
    steady = _device(3, zone="production", hostname=TWIN_HOST, state=DeviceState.ENROLLED)
    gone = _device(4, zone="lab", hostname=BIDI_HOST, state=DeviceState.ENROLLED)
    waiting = _device(5, zone="lab", hostname=TWIN_HOST, state=DeviceState.PENDING_APPROVAL)
    driver = _finding(
        "gpu.driver.security_bulletins",
        f"device {script.device_id}: the GPU driver is at or above the fixed version of every "
        f"NVIDIA security bulletin for its branch: found {DRIVER_FOUND}",
        DRIVER_FOUND,
    )
    hostile = _finding("os.hostile_text", HOSTILE_MESSAGE, HOSTILE_MESSAGE)

    async def main() -> None:
        repos = await backends.open_repositories(database, create=True)
        try:
            for rec in (script, img, steady, gone, waiting):
                await repos.devices.save(rec, now=minutes(90), event="enrolled:enrolled")
            trust = repos.trust
            await trust.record(_decision(script, minutes(50), Tier.AFFIRMING))  # before
            await trust.record(_decision(script, minutes(20), Tier.AFFIRMING))
            await trust.record(
                _decision(script, minutes(17), Tier.WARNING, [driver, hostile], lasts=HOUR)
            )
            await trust.record(_decision(img, minutes(45), Tier.AFFIRMING))  # before
            await trust.record(
                _decision(img, minutes(6), Tier.CONTRAINDICATED, [hostile], lasts=HOUR)
            )
            for at in (25, 15, 5):
                # A finding that leaves the tier affirming: the device shows on the page.
                noted = [_finding("os.time_synchronized", "the clock drifts")] if at == 15 else []
                await trust.record(
                    _decision(steady, minutes(at), Tier.AFFIRMING, noted, lasts=HOUR)
                )
            await trust.record(_decision(gone, minutes(28), Tier.AFFIRMING))
            await repos.certificates.record(
                CertificateRecord(
                    serial=Serial("5eed0004"),
                    device_id=gone.device_id,
                    kind="device",
                    not_before=minutes(28),
                    not_after=now + datetime.timedelta(days=1),
                    der=b"der",
                )
            )
            await repos.revocations.revoke_device(
                gone.device_id,
                reason="decommissioned <b>by ops</b>",
                actor="local/test",
                now=minutes(12),
            )
            listed = await repos.devices.list(DeviceQuery(limit=100))
            simulated = sorted(
                r.device_id for r in listed if r.host.get("hostname", "").startswith("sim-")
            )
            for i, device_id in enumerate(simulated):
                zone = ("production", "research", "")[i % 3]
                if zone:
                    await repos.devices.set_assignment(
                        device_id, zone=zone, labels={}, now=now, event="assigned:inventory"
                    )
        finally:
            await repos.close()

    asyncio.run(main())
    return {"script": script, "img": img}


@dataclass(frozen=True)
class Fleet:
    database: Path
    since: datetime.datetime
    config: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """A simulated fleet's store (6 devices, driver, ECC and PCR faults, 10 s at a 2 s
    interval) with ``fill``'s entries; a configuration whose production zone accepts
    warning."""
    work = tmp_path_factory.mktemp("report")
    now = datetime.datetime.now(datetime.UTC)
    run = subprocess.run(
        [
            *DEVTRUST,
            "simulate",
            "--quiet",
            "--devices",
            "6",
            "--duration",
            "10",
            "--interval",
            "2",
            "--faults",
            "34%:driver,ecc,pcr",
            "--seed",
            "5",
            "--work",
            str(work / "sim"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    # 1: a fault missed or a result lost, which tests/test_simulate.py is about; the store
    # is what it is, and the report must tell it as it is.
    assert run.returncode in (0, 1), run.stdout + run.stderr
    database = work / "sim" / "verifier" / "verifier.db"
    assert database.exists(), run.stdout + run.stderr
    fill(str(database), now)
    config = work / "verifier.yaml"
    config.write_text(
        f"database: {database}\ncertificates:\n  zone_min_tier:\n    production: warning\n",
        encoding="utf-8",
    )
    return Fleet(database, now - datetime.timedelta(minutes=30), config)


# --- the figures, computed independently ---------------------------------------------------


def _time(text: object) -> datetime.datetime:
    return datetime.datetime.fromisoformat(str(text))


def _meets(tier: str, minimum: str) -> bool:
    order = ["affirming", "warning", "contraindicated"]
    return tier in order and order.index(tier) <= order.index(minimum)


def _share(part: int, whole: int) -> float | None:
    return None if whole == 0 else part / whole


def _nearest_rank(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1] if ordered else None


@dataclass(frozen=True)
class Period:
    """The report's own period, bucket and generation time (its JSON), and the zones'
    minimum tiers this test gave it."""

    now: datetime.datetime
    since: datetime.datetime
    until: datetime.datetime
    bucket: datetime.timedelta
    minimum: dict[str, str]

    def need(self, zone: str) -> str:
        return self.minimum.get(zone, "affirming")


Appraised = tuple[str, datetime.datetime, str, dict[str, Any]]


def expected(rows: Any, doc: dict[str, Any], minimum: dict[str, str]) -> dict[str, Any]:
    """Every figure the page marks, from the store: ``rows(sql)`` runs plain SQL on it;
    the period, the bucket and the generation time are the report's own (``doc``)."""
    period = Period(
        now=_time(doc["generated_at"]),
        since=_time(doc["period"]["since"]),
        until=_time(doc["period"]["until"]),
        bucket=datetime.timedelta(seconds=doc["period"]["bucket_s"]),
        minimum=minimum,
    )
    devices = rows(
        "SELECT d.device_id, d.state, d.zone, t.tier, t.expires_at, d.enrolled_at FROM devices d "
        "LEFT JOIN trust t ON t.device_id = d.device_id"
    )
    zone_of = {r[0]: r[2] for r in devices}
    appraisals: list[Appraised] = [
        (r[0], _time(r[1]), r[2], json.loads(r[3]))
        for r in rows(
            "SELECT device_id, at, tier, detail FROM audit WHERE event = 'appraisal' "
            "ORDER BY at, id"
        )
    ]
    revoked_at = {r[0]: _time(r[1]) for r in rows(
        "SELECT device_id, at FROM audit WHERE event = 'revoked' ORDER BY at, id")}  # fmt: skip
    if doc["fleet_at"]["now"]:
        # The period ends now: the fleet is the stored one, today's (the trust rows).
        assert doc["period"]["until"] == doc["generated_at"]
        fleet = _now_figures(devices, period)
        results = [(r[0], json.loads(r[1])) for r in rows("SELECT device_id, result FROM trust")]
        revoked = sum(r[1] == "revoked" for r in devices)
    else:
        # A period that ended earlier: the fleet then, from the audit's appraisals.
        fleet, results, revoked = _fleet_then(appraisals, devices, revoked_at, period)
    return (
        fleet
        | _finding_figures(appraisals, period)
        | _detection_figures(appraisals, zone_of, period)
        | _history_figures(appraisals, devices, revoked_at, period)
        | _driver_figures(results)
        | _stored_counts(rows, period)
        | {"revoked_devices.count": revoked}
    )


def _now_figures(devices: list[Any], period: Period) -> dict[str, Any]:
    out: dict[str, Any] = {}
    groups: dict[str, list[Any]] = defaultdict(list)
    for r in devices:
        groups[f"zones.{r[2]}"].append(r)
        groups["fleet"].append(r)
    for prefix, members in groups.items():
        enrolled = [r for r in members if r[1] == "enrolled"]
        tiers = [
            r[3] if r[3] is not None and _time(r[4]) > period.now else "none" for r in enrolled
        ]
        compliant = sum(_meets(t, period.need(r[2])) for t, r in zip(tiers, enrolled, strict=True))
        out[f"{prefix}.devices"] = len(members)
        for tier in ("affirming", "warning", "contraindicated", "none"):
            out[f"{prefix}.tiers.{tier}"] = tiers.count(tier)
        for state in ("enrolled", "pending_approval", "revoked"):
            out[f"{prefix}.states.{state}"] = sum(r[1] == state for r in members)
        out[f"{prefix}.compliance"] = _share(compliant, len(enrolled))
    return out


def _fleet_then(
    appraisals: list[Appraised],
    devices: list[Any],
    revoked_at: dict[str, datetime.datetime],
    period: Period,
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]], int]:
    """The fleet at the period's end T, by the page's words: the devices enrolled (or asking
    to) by T; their state at T (a device revoked now was enrolled at T when the audit
    records its revocation after T); each enrolled one's latest appraisal before T, none
    or expired at T counting as no result. Also those latest results (for the drivers) and
    the devices revoked at T."""
    until = period.until
    latest: dict[str, Appraised] = {}
    for appraisal in appraisals:  # in time order
        if appraisal[1] < until:
            latest[appraisal[0]] = appraisal
    out: dict[str, Any] = {}
    groups: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for device_id, now_state, zone, _, _, enrolled_at in devices:
        if _time(enrolled_at) > until:
            continue
        later = now_state == "revoked" and revoked_at.get(device_id, until) > until
        then = "enrolled" if later else now_state
        groups[f"zones.{zone}"].append((device_id, then, zone))
        groups["fleet"].append((device_id, then, zone))
    for prefix, members in groups.items():
        tiers, compliant = [], 0
        for device_id, state, zone in members:
            if state != "enrolled":
                continue
            found = latest.get(device_id)
            live = found is not None and _time(found[3]["expires_at"]) > until
            tier = found[2] if found is not None and live else "none"
            tiers.append(tier)
            compliant += _meets(tier, period.need(zone))
        out[f"{prefix}.devices"] = len(members)
        for tier in ("affirming", "warning", "contraindicated", "none"):
            out[f"{prefix}.tiers.{tier}"] = tiers.count(tier)
        for state in ("enrolled", "pending_approval", "revoked"):
            out[f"{prefix}.states.{state}"] = sum(m[1] == state for m in members)
        out[f"{prefix}.compliance"] = _share(compliant, len(tiers))
    results = [(device_id, a[3]) for device_id, a in latest.items()]
    return out, results, sum(m[1] == "revoked" for m in groups["fleet"])


def _finding_figures(appraisals: list[Appraised], period: Period) -> dict[str, Any]:
    in_period = [a for a in appraisals if period.since <= a[1] < period.until]
    out: dict[str, Any] = {"appraisals": len(in_period)}
    per_finding: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for device_id, _, _, detail in in_period:
        for finding_id in {f["id"] for f in detail["findings"]}:
            per_finding[finding_id][device_id] += 1
    for finding_id, devs in per_finding.items():
        out[f"findings.{finding_id}.appraisals"] = sum(devs.values())
        out[f"findings.{finding_id}.device_count"] = len(devs)
        for device_id, n in devs.items():
            out[f"findings.{finding_id}.devices.{device_id}"] = n
    return out


def _detection_figures(
    appraisals: list[Appraised], zone_of: dict[str, str], period: Period
) -> dict[str, Any]:
    """An appraisal worse than affirming right after an affirming one of the device."""
    last: dict[str, tuple[datetime.datetime, str]] = {}
    spans: dict[str, list[float]] = {"": []}
    for device_id, at, tier, _ in appraisals:
        before = last.get(device_id)
        last[device_id] = (at, tier)
        if not (period.since <= at < period.until and before and before[1] == "affirming"):
            continue
        if tier != "affirming":
            seconds = (at - before[0]).total_seconds()
            spans[""].append(seconds)
            spans.setdefault(f"zones.{zone_of[device_id]}", []).append(seconds)
    out: dict[str, Any] = {}
    for key, values in spans.items():
        prefix = "time_to_detect" + (f".{key}" if key else "")
        out[f"{prefix}.count"] = len(values)
        out[f"{prefix}.median_s"] = _nearest_rank(values, 0.5)
        out[f"{prefix}.max_s"] = max(values) if values else None
        out[f"{prefix}.p90_s"] = _nearest_rank(values, 0.9)
    return out


def bucket_ends(period: Period) -> list[datetime.datetime]:
    """The buckets' ends as the page defines them: every whole multiple of the bucket since
    the epoch (UTC) after the period's start, then its end."""
    size = period.bucket.total_seconds()
    start = math.floor(period.since.timestamp() / size) + 1
    ends = [
        datetime.datetime.fromtimestamp(n * size, datetime.UTC)
        for n in range(start, math.ceil(period.until.timestamp() / size) + 1)
    ]
    return [e for e in ends if e < period.until] + [period.until]


def _history_figures(
    appraisals: list[Appraised],
    devices: list[Any],
    revoked_at: dict[str, datetime.datetime],
    period: Period,
) -> dict[str, Any]:
    """The definition on the page, followed word by word: at the end T of each bucket,
    among the devices enrolled at T (enrolled now, or revoked after T; enrolled by T;
    neither pending nor revoked at an unknown time), the share whose latest appraisal
    before T had not expired at T and met its zone's minimum (zones as they are now)."""
    out: dict[str, Any] = {}
    for i, end in enumerate(bucket_ends(period)):
        latest = {a[0]: (a[2], _time(a[3]["expires_at"])) for a in appraisals if a[1] < end}
        count: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for device_id, state, zone, _, _, enrolled_at in devices:
            if enrolled_at is not None and _time(enrolled_at) > end:
                continue
            if state == "revoked":
                if device_id not in revoked_at or revoked_at[device_id] <= end:
                    continue
            elif state != "enrolled":
                continue
            tier, expires = latest.get(device_id, ("none", end))
            count[zone][0] += expires > end and _meets(tier, period.need(zone))
            count[zone][1] += 1
        for zone in {r[2] for r in devices}:
            out[f"history.zones.{zone}.{i}"] = _share(*count[zone]) if zone in count else None
        enrolled = sum(c[1] for c in count.values())
        out[f"history.fleet.{i}"] = _share(sum(c[0] for c in count.values()), enrolled)
        out[f"history.enrolled.{i}"] = enrolled
    return out


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _driver_figures(results: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Of the fleet's latest results: the driver version the finding names first when it
    is digits and dots; the bulletins of its branch (the CSV) whose fixed version is above
    it; none for another."""
    with BULLETINS_CSV.open(newline="") as fh:
        bulletins = list(csv.DictReader(fh))
    out: dict[str, Any] = {}
    drivers = 0
    for device_id, result in results:
        found = [
            f["found"] for f in result["findings"] if f["id"] == "gpu.driver.security_bulletins"
        ]
        if not found:
            continue
        drivers += 1
        version = found[0].removeprefix("driver ").split(", bulletin ")[0]
        if not found[0].startswith("driver ") or not re.fullmatch(r"\d+(\.\d+){1,3}", version):
            out[f"drivers.{device_id}.cves"] = out[f"drivers.{device_id}.max_cvss"] = None
            continue
        match = [
            b
            for b in bulletins
            if b["branch"] == "R" + version.split(".")[0]
            and _version(b["fixed_versions"]) > _version(version)
        ]
        out[f"drivers.{device_id}.cves"] = len({c for b in match for c in b["cves"].split(";")})
        out[f"drivers.{device_id}.max_cvss"] = max(float(b["max_cvss"]) for b in match)
    out["drivers_below_bulletins.count"] = drivers
    return out


def _stored_counts(rows: Any, period: Period) -> dict[str, Any]:
    revoked = rows("SELECT revoked_at FROM certificates WHERE revoked_at IS NOT NULL")
    return {
        "revoked_certificates.count": sum(
            period.since <= _time(r[0]) < period.until for r in revoked
        ),
        "audit.intact": True,
        "audit.entries": rows("SELECT COUNT(*) FROM audit WHERE chain IS NOT NULL")[0][0],
        "audit.chains": rows("SELECT COUNT(*) FROM audit_heads")[0][0],
        "audit.last_id": rows("SELECT MAX(id) FROM audit")[0][0],
    }


def flatten(doc: dict[str, Any]) -> dict[str, Any]:
    """The JSON document's main figures under the keys the page marks them with."""
    flat = {
        "fleet.devices": doc["fleet"]["devices"],
        "fleet.compliance": doc["fleet"]["compliance"],
        "appraisals": doc["appraisals"],
        "revoked_certificates.count": len(doc["revoked_certificates"]),
        "revoked_devices.count": len(doc["revoked_devices"]),
        "drivers_below_bulletins.count": len(doc["drivers_below_bulletins"]),
        "time_to_detect.count": doc["time_to_detect"]["count"],
        "time_to_detect.median_s": doc["time_to_detect"]["median_s"],
        "audit.entries": doc["audit"]["entries"],
        "audit.last_id": doc["audit"]["last_id"],
    }
    for zone, z in doc["zones"].items():
        flat[f"zones.{zone}.compliance"] = z["compliance"]
        flat[f"zones.{zone}.devices"] = z["devices"]
        for tier, n in z["tiers"].items():
            flat[f"zones.{zone}.tiers.{tier}"] = n
        for state, n in z["states"].items():
            flat[f"zones.{zone}.states.{state}"] = n
    for zone, values in doc["history"]["zones"].items():
        for i, value in enumerate(values):
            flat[f"history.zones.{zone}.{i}"] = value
    for f in doc["findings"]:
        flat[f"findings.{f['id']}.appraisals"] = f["appraisals"]
        flat[f"findings.{f['id']}.device_count"] = f["device_count"]
    return flat


def sqlite_rows(database: Path) -> Any:
    def rows(sql: str) -> list[Any]:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
            return conn.execute(sql).fetchall()

    return rows


def check_figures(marked: dict[str, Any], want: dict[str, Any]) -> None:
    """Every marked figure has its independently computed value (floats to the report's
    rounding: 4 places for shares, 3 for seconds)."""
    assert marked, "the page marks no figure"
    for key, value in marked.items():
        assert key in want, f"{key} = {value!r}: no such figure computed from the store"
        expect = want[key]
        if isinstance(expect, float) and value is not None:
            assert value == pytest.approx(expect, abs=1e-3), key
        else:
            assert value == expect, (key, value, expect)


# --- the page in Chromium ----------------------------------------------------------------------


class Dom(HTMLParser):
    """The dumped DOM: the marked figures, the script-error box, the scripts' marker, and
    every element and attribute (to find any injected one)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.figures: dict[str, Any] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.errors = ""
        self.ran = False
        self.text: list[str] = []
        self._in_errors = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.tags.append((tag, found))
        key = found.get("data-key")
        if key is not None:
            assert key not in self.figures or self.figures[key] == json.loads(
                found["data-value"] or ""
            ), f"{key} marked twice with different values"
            self.figures[key] = json.loads(found["data-value"] or "")
        self._in_errors = found.get("id") == "script-errors"
        if found.get("id") == "script-done":
            self.ran = found.get("data-ran") == "1"

    def handle_endtag(self, tag: str) -> None:
        self._in_errors = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_errors:
            self.errors += data


def chromium(*args: str, page: Path) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run on ``page`` (a profile of its own, nothing fetched)."""
    assert Path(CHROMIUM).exists(), "chromium is not installed (`make test` installs it)"
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                *args,
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )


@pytest.fixture(scope="module")
def rendered(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("page")
    page, doc = out / "report.html", out / "report.json"
    run = report(
        "--config",
        str(fleet.config),
        "--since",
        fleet.since.isoformat(),
        "--html",
        str(page),
        "--json",
        str(doc),
    )
    assert run.returncode == 0, run.stderr
    return page, json.loads(doc.read_text(encoding="utf-8"))


def test_the_page_in_a_browser_matches_the_store(fleet: Fleet, rendered: Any) -> None:
    page, doc = rendered
    dumped = chromium("--dump-dom", page=page)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = Dom()
    dom.feed(dumped.stdout)
    # It rendered, its scripts ran to their end and raised nothing.
    assert "Fleet attestation report" in dumped.stdout
    assert dom.ran, "the page's last script did not run"
    assert dom.errors.strip() == ""
    # Every figure on it is the store's.
    minimum = {"production": "warning"}
    want = expected(sqlite_rows(fleet.database), doc, minimum)
    check_figures(dom.figures, want)
    # The figures that matter here are all on it, and the fleet is the one built.
    for key in (
        "fleet.compliance",
        "zones.production.compliance",
        "zones.lab.compliance",
        "revoked_certificates.count",
        "drivers_below_bulletins.count",
        "time_to_detect.count",
        "audit.entries",
        "findings.os.hostile_text.appraisals",
    ):
        assert key in dom.figures, key
    assert dom.figures["drivers_below_bulletins.count"] >= 1
    assert dom.figures["revoked_devices.count"] == 1
    assert dom.figures["time_to_detect.count"] >= 2  # the two written, and the faults
    assert dom.figures["zones.lab.states.pending_approval"] == 1
    assert dom.figures["audit.intact"] is True
    # The hostile strings are text on the page, never markup: no element or attribute came
    # from them, no script of theirs ran (the title is the report's).
    text = "".join(dom.text)
    for hostile in (SCRIPT_HOST, IMG_HOST, HOSTILE_MESSAGE):
        assert hostile in text, hostile
    assert "window.__pwned" not in "".join(
        v or "" for _, attrs in dom.tags for k, v in attrs.items() if k.startswith("on")
    )
    assert not [attrs for tag, attrs in dom.tags if tag == "img"]
    scripts = [t for t, _ in dom.tags if t == "script"]
    assert len(scripts) == 2, "a script element the report did not write"
    # Devices are named by their id first (review M6); the hostname is their claim, its
    # bidi override and zero-width space shown escaped, a name two devices claim marked.
    ids = {f"{0xAB00 + n:064x}" for n in range(1, 6)}
    shown = {a.get("title") for t, a in dom.tags if t == "code" and a.get("class") == "dev"}
    assert ids & shown, "no device shown by its id"
    assert BIDI_HOST.encode("unicode_escape").decode() in text
    assert "\u202e" not in dumped.stdout
    assert "\u200b" not in dumped.stdout
    assert "claimed by 2 devices" in text
    # Only the page's own scripts run (review L6): one added to it is refused by its policy.
    tampered = page.with_name("tampered.html")
    tampered.write_text(
        page.read_text(encoding="utf-8").replace(
            "</body>",
            "<script>document.getElementById('script-done').setAttribute('data-ran','2')"
            "</script></body>",
        ),
        encoding="utf-8",
    )
    again = chromium("--dump-dom", page=tampered)
    assert again.returncode == 0, again.stderr[-2000:]
    checked = Dom()
    checked.feed(again.stdout)
    assert checked.ran, "a script the report did not write ran"
    assert "<title>Fleet attestation report</title>" in dumped.stdout
    # And a picture of it (kept where DEVTRUST_REPORT_SCREENSHOT says, for people to look).
    shot = page.with_suffix(".png")
    taken = chromium(f"--screenshot={shot}", "--window-size=1280,3000", page=page)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("DEVTRUST_REPORT_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
        shutil.copyfile(page, Path(keep).with_suffix(".html"))


def test_the_json_holds_the_same_figures(fleet: Fleet, rendered: Any) -> None:
    _, doc = rendered
    assert doc["version"] == 3
    assert doc["zone_filter"] is None
    assert doc["zones"]["production"]["min_tier"] == "warning"
    assert doc["zones"]["lab"]["min_tier"] == "affirming"
    want = expected(sqlite_rows(fleet.database), doc, {"production": "warning"})
    flat = flatten(doc)
    check_figures(flat, want)
    revoked = {c["serial"]: c for c in doc["revoked_certificates"]}
    assert revoked["5eed0004"]["reason"] == "decommissioned <b>by ops</b>"
    (driver,) = [d for d in doc["drivers_below_bulletins"] if d["hostname"] == SCRIPT_HOST]
    assert driver["branch"] == "R580"
    assert driver["driver_version"] == DRIVER_VERSION
    assert driver["bulletins"] == ["5703", "5747", "5821"]
    assert driver["fixed_in"] == "580.159.03"
    assert driver["max_cvss"] == 8.8
    # One compliance (review M4): the history's last bucket ends now, and is the headline's.
    assert doc["period"]["until"] == doc["generated_at"]
    assert doc["history"]["fleet"][-1] == doc["fleet"]["compliance"]
    for zone, z in doc["zones"].items():
        assert doc["history"]["zones"][zone][-1] == z["compliance"], zone
    assert doc["policy"]["policy_id"] == "devtrust-default-gpu-hosts-1"
    assert len(doc["policy"]["digest"]) == 64
