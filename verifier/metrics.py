"""The verifier's Prometheus metrics (issue 13, item 3): what they are, the decision sink
that moves most of them, the task that reads the fleet from the database, and the endpoint.

Every label is bounded: zones are the operators' (tokens, inventory, approval; never the
device's word), tiers four, finding ids come from code and from the policy's rule ids,
revocation reasons are the kinds in ``REVOKE_KINDS`` (not the free text an operator gives),
enrollment outcomes those in ``ENROLL_OUTCOMES``.

Why the devices gauge is read from the store and not counted from this process's decisions:
replicas and workers each see only their own streams, and a device that stopped attesting
makes no decision at all; the store holds the fleet. Every replica reports the same numbers,
so dashboards take ``max`` (or one replica's) rather than ``sum`` of it.

Several worker processes (server.workers > 1, verifier/workers.py): each records into
prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, made by the parent before
the workers start: verifier/metrics_workers.py) and the parent serves one endpoint that sums
them; counters and histograms add up, the stream gauge is summed over live workers, the
devices gauges take the most recent worker's reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from devtrust.core.errors import ConfigError
from devtrust.core.tier import Tier
from devtrust.verifier.config import MetricsConfig, parse_address
from devtrust.verifier.decision import DETECTION_WINDOW_S, Decision
from devtrust.verifier.storage.interfaces import Devices, FleetCount

logger = logging.getLogger(__name__)
# No *_created series: one more per counter and histogram child that no dashboard reads
# (the multiprocess mode has none either: one output in both modes).
disable_created_metrics()  # type: ignore[no-untyped-call]
Clock = Callable[[], datetime.datetime]
# The lowest tier a zone's devices must meet to count as compliant (the verifier's
# certificates.min_tier and zone_min_tier: settings.CertificateSettings.min_tier_for).
Minimum = Callable[[str], Tier]
# Compliance, the same definition as the fleet report's (verifier/report_figures.py).
COMPLIANCE_DEFINITION = (
    "compliant: an enrolled device whose current result has not expired and whose tier meets "
    "its zone's minimum (certificates.min_tier, zone_min_tier); compliance = compliant / "
    "enrolled devices of the zone"
)

# Appraisal latency, evidence received -> decision stored: a cached policy outcome takes a
# few milliseconds, a whole event log or a CEL evaluation on a loaded host seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A device's PostureChanged note -> the stored verdict that changed its result: the
# coalescing window (attestation.posture_min_interval_s, 10 s by default) and a challenge
# round trip; seconds to minutes.
DETECTION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0)
TIERS = tuple(t.label for t in Tier)
# Why certificates were revoked (devtrust_certificates_revoked_total{reason}).
REVOKE_KINDS = ("device_revoked", "tier_below_minimum", "zone_changed", "superseded")
# How an enrollment call ended (devtrust_enrollments_total{outcome}): the device enrolled,
# waits for approval, or was refused (a bad EK or proof, a revoked device, a token), or was
# turned away by the rate limit or the pending bound.
ENROLL_OUTCOMES = ("enrolled", "pending_approval", "refused", "rate_limited")


class VerifierMetrics:
    """The metrics of one verifier. ``registry``: where they are collected from (a test's,
    or the endpoint's); None in a worker process of several, whose values go to the
    multiprocess files instead."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.devices = Gauge(
            "devtrust_devices",
            "Devices the database holds, by zone, state and tier (the latest result's, none "
            "when never appraised or stale), read every metrics.refresh_s",
            ["zone", "state", "tier"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.devices_compliant = Gauge(
            "devtrust_devices_compliant",
            "Enrolled devices whose current result meets their zone's minimum tier, by zone, "
            "read with devtrust_devices (" + COMPLIANCE_DEFINITION + ")",
            ["zone"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.devices_refreshed = Gauge(
            "devtrust_devices_refreshed_timestamp_seconds",
            "When devtrust_devices was last read from the database (Unix time)",
            registry=r,
            # Worker 0's (the one reader): gone with it when it dies (metrics_workers.py).
            multiprocess_mode="mostrecent",
        )
        self.appraisals = Counter(
            "devtrust_appraisals",
            "Appraisal decisions stored, by the device's zone and the tier decided",
            ["zone", "tier"],
            registry=r,
        )
        self.findings = Counter(
            "devtrust_findings",
            "Findings of stored decisions, by finding id (each id once per decision)",
            ["finding"],
            registry=r,
        )
        self.appraisal_seconds = Histogram(
            "devtrust_appraisal_seconds",
            "Evidence received to its decision stored, seconds",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.detection_seconds = Histogram(
            "devtrust_detection_seconds",
            "From a device's PostureChanged note to the stored verdict that changed its result "
            "(tier or finding ids), seconds; at most one per device per "
            f"{DETECTION_WINDOW_S:.0f} s; answers that changed nothing are not counted",
            buckets=DETECTION_BUCKETS,
            registry=r,
        )
        self.certificates_issued = Counter(
            "devtrust_certificates_issued",
            "Certificates issued and stored: kind channel (enrollment) or device (appraisal)",
            ["kind"],
            registry=r,
        )
        self.certificates_revoked = Counter(
            "devtrust_certificates_revoked",
            "Certificates revoked by this verifier, by reason: " + ", ".join(REVOKE_KINDS),
            ["reason"],
            registry=r,
        )
        self.streams = Gauge(
            "devtrust_attestation_streams",
            "Attestation streams open",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.enrollments = Counter(
            "devtrust_enrollments",
            "Enrollment calls by outcome (calls, not devices: a device enrolling again, or a "
            "client retrying a refused call, counts each time): " + ", ".join(ENROLL_OUTCOMES),
            ["outcome"],
            registry=r,
        )
        # Every series a dashboard expects is there from the start, at 0.
        for kind in REVOKE_KINDS:
            self.certificates_revoked.labels(kind)
        for outcome in ENROLL_OUTCOMES:
            self.enrollments.labels(outcome)
        for kind in ("channel", "device"):
            self.certificates_issued.labels(kind)
        self.streams.set(0)
        # The (zone, state, tier) series set at the last refresh: those gone are set to 0.
        self._shown: set[tuple[str, str, str]] = set()
        self._zones_shown: set[str] = set()

    def revoked(self, reason: str, count: int) -> None:
        if count:
            self.certificates_revoked.labels(reason).inc(count)

    def enrolled(self, outcome: str) -> None:
        self.enrollments.labels(outcome).inc()

    def show_fleet(self, counts: Iterable[FleetCount], at: float, *, minimum: Minimum) -> None:
        """The devices gauges as ``counts`` (a fleet_counts reading) says, read at ``at``:
        by zone, state and tier, and the compliant devices of each zone with an enrolled
        device, by ``minimum`` (the zone's lowest tier)."""
        shown: set[tuple[str, str, str]] = set()
        totals: dict[tuple[str, str, str], int] = {}
        compliant: dict[str, int] = {}
        for count in counts:
            key = (count.zone, count.state, count.tier)
            totals[key] = totals.get(key, 0) + count.devices
            if count.state == "enrolled":
                compliant.setdefault(count.zone, 0)
                if Tier.parse(count.tier).meets(minimum(count.zone)):
                    compliant[count.zone] += count.devices
        for key, value in totals.items():
            self.devices.labels(*key).set(value)
            shown.add(key)
        # A series once shown stays, at 0: a rate or ratio over it sees the drop.
        for key in self._shown - shown:
            self.devices.labels(*key).set(0)
        self._shown |= shown
        for zone, devices in compliant.items():
            self.devices_compliant.labels(zone).set(devices)
        for zone in self._zones_shown - compliant.keys():
            self.devices_compliant.labels(zone).set(0)
        self._zones_shown |= compliant.keys()
        self.devices_refreshed.set(at)


class MetricsSink:
    """A DecisionSink after the store: the metrics a stored decision moves. It does no I/O
    and never raises past a metric; a few microseconds per decision (bench/metrics_cost.py):
    each labelled series' child is looked up once and kept (their labels are bounded)."""

    def __init__(
        self, metrics: VerifierMetrics, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._m = metrics
        self._monotonic = monotonic
        self._appraisals: dict[tuple[str, str], Any] = {}
        self._findings: dict[str, Any] = {}
        self._device_certificates = metrics.certificates_issued.labels("device")

    async def publish(self, decision: Decision) -> None:
        result = decision.result
        key = (decision.zone, result.tier.label)
        child = self._appraisals.get(key)
        if child is None:
            child = self._appraisals[key] = self._m.appraisals.labels(*key)
        child.inc()
        findings = result.findings
        if findings:
            for finding in {f.id for f in findings}:
                counter = self._findings.get(finding)
                if counter is None:
                    counter = self._findings[finding] = self._m.findings.labels(finding)
                counter.inc()
        if decision.certificate is not None:
            self._device_certificates.inc()
        if decision.received is not None or decision.posture_noted is not None:
            now = self._monotonic()
            if decision.received is not None:
                self._m.appraisal_seconds.observe(max(0.0, now - decision.received))
            if decision.posture_noted is not None:
                self._m.detection_seconds.observe(max(0.0, now - decision.posture_noted))


class FleetReader:
    """Reads the devices gauges from the database every ``interval_s`` (and once at start):
    a database that does not answer leaves the last reading, and its timestamp, as they were.
    ``minimum``: each zone's lowest tier, for the compliant devices."""

    def __init__(
        self,
        metrics: VerifierMetrics,
        devices: Devices,
        *,
        interval_s: float,
        clock: Clock,
        minimum: Minimum,
    ) -> None:
        self._metrics = metrics
        self._devices = devices
        self._interval_s = interval_s
        self._clock = clock
        self._minimum = minimum
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        now = self._clock()
        counts = await self._devices.fleet_counts(now)
        self._metrics.show_fleet(counts, now.timestamp(), minimum=self._minimum)

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - an outage, or anything: try again later
                logger.warning("metrics: devices not read from the database: %s", exc)
            await asyncio.sleep(self._interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="metrics-fleet")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


@dataclass
class Endpoint:
    """prometheus_client's HTTP server (a thread; GET /metrics), and where it listens."""

    server: WSGIServer
    thread: threading.Thread
    port: int

    async def aclose(self) -> None:
        await asyncio.to_thread(self.server.shutdown)
        self.server.server_close()


def loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine's loopback only."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another name: it may resolve to anything
        return False


def serve(listen: str, registry: CollectorRegistry, *, key: str = "metrics.listen") -> Endpoint:
    """The endpoint on ``listen`` (HOST:PORT, port 0: any free one); ConfigError naming
    ``key`` when it cannot listen there. A warning in the log when ``listen`` is not
    loopback: the endpoint has no authentication (review 13a, L5)."""
    host, port = parse_address(listen)
    if not loopback(host):
        logger.warning(
            "metrics endpoint on %s (%s) is not loopback: it has no authentication or TLS, so "
            "anyone who reaches it reads the zones, tiers and rule ids; keep it on a "
            "management network or put a proxy with TLS in front",
            listen,
            key,
        )
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {listen} ({key}): {exc.strerror or exc}: change `{key}:` in the "
            'configuration (or "" to turn the metrics endpoint off)'
        ) from exc
    return Endpoint(server, thread, int(server.server_address[1]))


# Set in a worker's environment by the parent that serves the workers' metrics.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class VerifierMetricsService:
    """The metrics of a running verifier: the values, the fleet reader, and the endpoint
    (none in a worker whose parent serves them). ``start`` once serving; ``aclose`` at stop
    (before the store closes: the reader reads it)."""

    def __init__(
        self,
        metrics: VerifierMetrics,
        reader: FleetReader | None,
        *,
        listen: str,
        registry: CollectorRegistry | None,
    ) -> None:
        self.metrics = metrics
        self.reader = reader
        self._listen = listen
        self._registry = registry
        self.endpoint: Endpoint | None = None

    @property
    def port(self) -> int:
        """The endpoint's port (0: none here)."""
        return self.endpoint.port if self.endpoint is not None else 0

    def start(self) -> None:
        """Listen (ConfigError naming metrics.listen when it cannot) and read the fleet."""
        if self._registry is not None:
            self.endpoint = serve(self._listen, self._registry)
            logger.info("metrics on http://%s/metrics", self._address)
        if self.reader is not None:
            self.reader.start()

    @property
    def _address(self) -> str:
        host = parse_address(self._listen)[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def aclose(self) -> None:
        if self.reader is not None:
            await self.reader.aclose()
        if self.endpoint is not None:
            await self.endpoint.aclose()
            self.endpoint = None


def open_metrics(
    config: MetricsConfig,
    devices: Devices,
    *,
    clock: Clock,
    minimum: Minimum,
    worker: tuple[int, int] | None = None,
) -> VerifierMetricsService | None:
    """The metrics of a verifier (None: ``metrics.listen`` is ""). ``worker``: (index, count)
    of this process among the workers. With several workers whose parent set up the
    multiprocess directory, values go there and the parent serves them; without it (a
    parent that does not), worker 0 serves its own values alone, said in the log. Either
    way only worker 0 reads the fleet (the devices gauges): every worker reads the same
    store, and one reading is all the endpoint shows (review 13a, L1). ``minimum``: each
    zone's lowest tier (certificates.min_tier, zone_min_tier)."""
    if not config.listen:
        return None
    shared = worker is not None and worker[1] > 1
    registry: CollectorRegistry | None = None
    if shared and os.environ.get(MULTIPROC_ENV):
        metrics = VerifierMetrics(None)
    else:
        if shared and worker is not None and worker[0] != 0:
            return None
        registry = CollectorRegistry()
        metrics = VerifierMetrics(registry)
        if shared:
            logger.warning(
                "metrics on %s show worker 0 only: this verifier's parent did not set up "
                "the workers' shared metrics",
                config.listen,
            )
    reader = None
    if worker is None or worker[0] == 0:
        reader = FleetReader(
            metrics, devices, interval_s=config.refresh_s, clock=clock, minimum=minimum
        )
    return VerifierMetricsService(metrics, reader, listen=config.listen, registry=registry)


__all__ = [
    "COMPLIANCE_DEFINITION",
    "ENROLL_OUTCOMES",
    "REVOKE_KINDS",
    "MetricsSink",
    "VerifierMetrics",
    "VerifierMetricsService",
    "open_metrics",
    "serve",
]
