"""The simulator's check of the verifiers' Prometheus metrics against their store (issue 13).

Each embedded verifier serves its metrics (``metrics.listen`` on a port of its own,
``devtrust.swtpm.sim_verifier``). The run scrapes them while the fleet attests, once more
before the devices stop (open streams against the devices attached), and at the end, after
the last stream closed and the devices gauge was read from the store again; then the store
is read (``read_fleet``) and the numbers compared:

- devices by zone, state and tier (the gauge, the same on every replica) = the store's
  devices and their latest result at that time;
- appraisals (summed over replicas) = decisions stored, per tier too;
- certificates issued = certificate rows, revoked = rows revoked; enrollments (enrolled,
  pending approval) = the audit's entries of enrollments stored with that outcome (the
  counter counts calls: a device that enrolls again counts again, in both);
- open streams before the devices stop = devices attached.

Counters live in a verifier process: a replica killed or restarted by a fault starts again
at 0, so after such faults (or with workers that do not share their metrics) the counters
are shown, not compared; the devices gauge and the streams are compared always.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from devtrust.core.errors import DevtrustError
from devtrust.verifier.audit_chain import Event
from devtrust.verifier.metrics import VerifierMetrics
from devtrust.verifier.storage.backends import open_repositories
from devtrust.verifier.storage.codec import iso
from devtrust.verifier.storage.repositories import SqlRepositories
from devtrust.verifier.storage.sql import Connection

# The verifiers read their devices gauge from the store this often in a simulation.
REFRESH_S = 1.0
SCRAPE_TIMEOUT_S = 10.0

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Scrape:
    """One verifier's samples: (sample name, sorted labels) -> value, and its families."""

    samples: dict[tuple[str, Labels], float]
    families: frozenset[str] = frozenset()

    def total(self, name: str, **match: str) -> float:
        """The sum of ``name``'s samples whose labels include ``match``."""
        want = set(match.items())
        return sum(
            v for (n, labels), v in self.samples.items() if n == name and want <= set(labels)
        )

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for (n, labels), v in self.samples.items():
            if n == name:
                d = dict(labels)
                key = tuple(d.get(k, "") for k in keys)
                out[key] = out.get(key, 0.0) + v
        return out


def scrape(port: int) -> Scrape:
    """GET /metrics of the verifier on 127.0.0.1:``port``, parsed by prometheus_client."""
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as reply:
            text = reply.read().decode()
    except OSError as exc:
        raise DevtrustError(f"cannot scrape the verifier's metrics at {url}: {exc}") from exc
    samples: dict[tuple[str, Labels], float] = {}
    families: set[str] = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Scrape(samples, frozenset(families))


def verifier_families() -> frozenset[str]:
    """Every metric family the verifier defines, from its own definitions."""
    registry = CollectorRegistry()
    VerifierMetrics(registry)
    return frozenset(family.name for family in registry.collect())


def summed(scrapes: Iterable[Scrape], name: str, **match: str) -> float:
    return sum(s.total(name, **match) for s in scrapes)


@dataclass(frozen=True)
class StoreFleet:
    """What the store holds, read independently of the metrics' own query: devices by
    (zone, state, tier) at ``at``, decisions by tier, certificates issued and revoked."""

    devices: dict[tuple[str, str, str], int]
    decisions: dict[str, int]
    certificates: int
    revoked: int
    # Enrollments stored, by outcome (enrolled, pending_approval): one audit entry each.
    enrollments: dict[str, int]


async def read_fleet(database: Path | str, at: datetime.datetime) -> StoreFleet:
    """The store's side of the check, device by device (not the grouped query the gauge
    uses), read-only, after the verifiers stopped."""
    repos = await open_repositories(database, create=False, read_only=True)
    try:
        if not isinstance(repos, SqlRepositories):
            raise DevtrustError(f"cannot read the fleet of {repos.location}")

        def work(db: Connection) -> StoreFleet:
            trust = {
                str(r[0]): (str(r[1]), str(r[2]))
                for r in db.execute("SELECT device_id, tier, expires_at FROM trust").fetchall()
            }
            devices: dict[tuple[str, str, str], int] = {}
            for device_id, zone, state in db.execute(
                "SELECT device_id, zone, state FROM devices"
            ).fetchall():
                tier, expires = trust.get(str(device_id), ("none", ""))
                if not expires or expires <= iso(at):
                    tier = "none"
                key = (str(zone), str(state), tier)
                devices[key] = devices.get(key, 0) + 1
            decisions: dict[str, int] = {}
            for (tier,) in db.execute(
                "SELECT tier FROM audit WHERE event = ?", ("appraisal",)
            ).fetchall():
                decisions[str(tier)] = decisions.get(str(tier), 0) + 1
            certificates = int(db.execute("SELECT COUNT(*) FROM certificates").fetchone()[0])
            revoked = int(
                db.execute(
                    "SELECT COUNT(*) FROM certificates WHERE revoked_at IS NOT NULL"
                ).fetchone()[0]
            )
            enrollments = {
                outcome: int(
                    db.execute("SELECT COUNT(*) FROM audit WHERE event = ?", (event,)).fetchone()[0]
                )
                for outcome, event in (
                    ("enrolled", Event.ENROLLED.value),
                    ("pending_approval", Event.ENROLLED_PENDING.value),
                )
            }
            return StoreFleet(devices, decisions, certificates, revoked, enrollments)

        return await repos.engine.read(work)
    finally:
        await repos.close()


@dataclass
class MetricsFigures:
    """The metrics side of a run, for the figures (``--json``: ``metrics``)."""

    scrapes: int = 0
    # Open streams (summed over replicas) before the devices stopped, and devices attached.
    open_streams: float | None = None
    attached: int | None = None
    # At the end: appraisals, certificates, enrollments (summed), devices gauge (one replica).
    appraisals: float | None = None
    appraisals_by_tier: dict[str, float] = field(default_factory=dict)
    findings: dict[str, float] = field(default_factory=dict)
    certificates_issued: float | None = None
    certificates_revoked: float | None = None
    enrollments: dict[str, float] = field(default_factory=dict)
    devices: dict[str, float] = field(default_factory=dict)
    appraisal_p50_s: float | None = None
    appraisal_p99_s: float | None = None
    detection_mean_s: float | None = None
    detections: float = 0.0
    # Counters comparable with the store: no replica restarted, one process each.
    counters_compared: bool = False
    checked: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scrapes": self.scrapes,
            "open_streams_before_stop": self.open_streams,
            "devices_attached_before_stop": self.attached,
            "appraisals": self.appraisals,
            "appraisals_by_tier": dict(self.appraisals_by_tier),
            "findings": dict(self.findings),
            "certificates_issued": self.certificates_issued,
            "certificates_revoked": self.certificates_revoked,
            "enrollments": dict(self.enrollments),
            "devices_by_zone_state_tier": dict(self.devices),
            "appraisal_latency_p50_s": _round(self.appraisal_p50_s),
            "appraisal_latency_p99_s": _round(self.appraisal_p99_s),
            "detection_mean_s": _round(self.detection_mean_s),
            "detections": self.detections,
            "counters_compared_with_store": self.counters_compared,
            "checked": list(self.checked),
            "mismatches": list(self.mismatches),
        }

    def line(self) -> str:
        compared = (
            ""
            if self.counters_compared
            else (
                " (counters not compared: a replica restarted, workers' metrics not summed, or "
                "a database of other runs)"
            )
        )
        verdict = "match the store" if not self.mismatches else "; ".join(self.mismatches)
        return (
            f"metrics      {self.scrapes} scrapes; {self.appraisals or 0:,.0f} appraisals, "
            f"latency p50 {_ms(self.appraisal_p50_s)} p99 {_ms(self.appraisal_p99_s)}, "
            f"detection mean {_ms(self.detection_mean_s)}; {len(self.checked)} checks "
            f"{verdict}{compared}"
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def histogram_quantile(scrape: Iterable[Scrape], name: str, q: float) -> float | None:
    """PromQL's histogram_quantile over the summed buckets (linear within a bucket)."""
    buckets: dict[float, float] = {}
    for s in scrape:
        for (n, labels), v in s.samples.items():
            if n == f"{name}_bucket":
                le = float(dict(labels)["le"])
                buckets[le] = buckets.get(le, 0.0) + v
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total == 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if upper == float("inf"):
                return lower
            width = count - below
            return lower + (upper - lower) * ((rank - below) / width if width else 0.0)
        lower, below = upper, count
    return lower


class FleetMetrics:
    """The scrapes of a run's verifiers (their metrics ports) and the check at its end."""

    def __init__(self, ports: list[int], *, workers: int = 1) -> None:
        self.ports = ports
        self.figures = MetricsFigures()
        # Each verifier's endpoint shows all of it: one process, or a parent summing its
        # workers (verifier/metrics_workers.py says so with devtrust_metrics_workers).
        self.workers = workers
        self.whole = workers == 1

    async def scrape_all(self) -> list[Scrape]:
        scrapes = await asyncio.gather(*(asyncio.to_thread(scrape, p) for p in self.ports))
        self.figures.scrapes += len(scrapes)
        return list(scrapes)

    async def while_running(self, every_s: float, stop: asyncio.Event) -> None:
        """Scrape every ``every_s`` until ``stop`` (a replica down is skipped)."""
        while not stop.is_set():
            for port in self.ports:
                try:
                    await asyncio.to_thread(scrape, port)
                    self.figures.scrapes += 1
                except DevtrustError:
                    pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)

    async def before_stop(self, attached: int, *, within_s: float = 15.0) -> None:
        """Open streams (summed) against the devices attached, waiting out reconnections."""
        deadline = time.monotonic() + within_s
        while True:
            scrapes = await self.scrape_all()
            streams = summed(scrapes, "devtrust_attestation_streams")
            self.whole = self.whole or all(s.total("devtrust_metrics_workers") for s in scrapes)
            if not self.whole or streams == attached or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        self.figures.open_streams, self.figures.attached = streams, attached
        if self.whole:
            self._compare("open streams before the devices stopped", streams, attached)

    async def at_end(self, *, within_s: float = 30.0) -> tuple[list[Scrape], datetime.datetime]:
        """Once every stream closed and the devices gauge was read after that: the last
        scrapes, and the time their devices gauge was read at (for the store's side)."""
        closed = time.time()
        deadline = time.monotonic() + within_s
        while True:
            scrapes = await self.scrape_all()
            streams = summed(scrapes, "devtrust_attestation_streams")
            read = [s.total("devtrust_devices_refreshed_timestamp_seconds") for s in scrapes]
            if streams == 0 and min(read) > closed:
                break
            if time.monotonic() > deadline:
                self.figures.mismatches.append(
                    f"the verifiers did not settle within {within_s:g} s (streams {streams:g})"
                )
                break
            if streams:
                closed = time.time()
            await asyncio.sleep(0.25)
        newest = max(range(len(scrapes)), key=lambda i: read[i])
        at = datetime.datetime.fromtimestamp(read[newest], datetime.UTC)
        return scrapes, at

    def check(self, scrapes: list[Scrape], store: StoreFleet, *, counters: bool) -> None:
        f = self.figures
        f.counters_compared = counters
        want = verifier_families()
        for n, scraped in enumerate(scrapes):
            self._compare(f"every metric served by verifier {n}", want - scraped.families, set())
        f.appraisals = summed(scrapes, "devtrust_appraisals_total")
        f.appraisals_by_tier = {
            k[0]: v for k, v in _by(scrapes, "devtrust_appraisals_total", "tier").items()
        }
        f.findings = {
            k[0]: v for k, v in _by(scrapes, "devtrust_findings_total", "finding").items()
        }
        f.certificates_issued = summed(scrapes, "devtrust_certificates_issued_total")
        f.certificates_revoked = summed(scrapes, "devtrust_certificates_revoked_total")
        f.enrollments = {
            k[0]: v for k, v in _by(scrapes, "devtrust_enrollments_total", "outcome").items()
        }
        f.appraisal_p50_s = histogram_quantile(scrapes, "devtrust_appraisal_seconds", 0.5)
        f.appraisal_p99_s = histogram_quantile(scrapes, "devtrust_appraisal_seconds", 0.99)
        f.detections = summed(scrapes, "devtrust_detection_seconds_count")
        if f.detections:
            f.detection_mean_s = summed(scrapes, "devtrust_detection_seconds_sum") / f.detections
        # The gauge: every replica reads the same store; the freshest reading is compared.
        newest = max(scrapes, key=lambda s: s.total("devtrust_devices_refreshed_timestamp_seconds"))
        gauge = {
            key: v for key, v in newest.by("devtrust_devices", "zone", "state", "tier").items() if v
        }
        f.devices = {"/".join(k): v for k, v in sorted(gauge.items())}
        self._compare(
            "devices by zone, state and tier",
            gauge,
            {k: float(v) for k, v in store.devices.items()},
        )
        if not counters:
            return
        self._compare("appraisals", f.appraisals, sum(store.decisions.values()))
        self._compare(
            "appraisals by tier",
            {k: v for k, v in f.appraisals_by_tier.items() if v},
            {k: float(v) for k, v in store.decisions.items()},
        )
        self._compare("certificates issued", f.certificates_issued, store.certificates)
        self._compare("certificates revoked", f.certificates_revoked, store.revoked)
        self._compare(
            "enrollments (enrolled, pending approval)",
            {k: f.enrollments.get(k, 0.0) for k in store.enrollments},
            {k: float(v) for k, v in store.enrollments.items()},
        )

    def _compare(self, what: str, metric: object, store: object) -> None:
        self.figures.checked.append(what)
        if metric != store:
            self.figures.mismatches.append(f"{what}: metrics {metric}, store {store}")


def _by(scrapes: list[Scrape], name: str, key: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for s in scrapes:
        for k, v in s.by(name, key).items():
            out[k] = out.get(k, 0.0) + v
    return out
