"""The fleet simulator's faults and figures, without I/O (``devtrust simulate``).

What a fault is, which finding shows that the verifier caught it, when each is injected, and
the figures a run ends with (percentiles, the table, the JSON). The simulator
(``devtrust.swtpm.simulate``) does the injecting and the measuring; everything here is a
value or a pure function of values, tested table by table in tests/test_sim_faults.py.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from devtrust.swtpm.sim_metrics import MetricsFigures


class FaultKind(enum.Enum):
    """What can go wrong, and what each does to a simulated device or the fleet."""

    PCR = "pcr"  # a PCR extended outside the event log (a boot component tampered with)
    DRIVER = "driver"  # the GPU driver downgraded to one below NVIDIA's security bulletins
    ECC = "ecc"  # uncorrected ECC errors on one GPU
    REPLAY = "replay"  # an earlier quote sent again with fresh claims
    CLOCK = "clock"  # the TPM clock rolled back without a reset
    STORM = "storm"  # a share of the fleet disconnects at once and reconnects
    RESTART = "restart"  # the verifier restarts, every replica (embedded verifier only)
    KILL = "kill"  # one replica killed (SIGKILL), started again a few seconds later
    DRAIN = "drain"  # one replica drains (SIGTERM) and is started again
    PGRESTART = "pgrestart"  # the replicas' PostgreSQL restarts (a throwaway one only)
    # A simulated GPU's own attestation (--gpu-attest; swtpm/gpu_sim.py GpuFault):
    GPU_MEASUREMENT = "gpu-measurement"  # one measurement block differs from its RIM
    GPU_REPLAY = "gpu-replay"  # a GPU report made for an earlier challenge sent again
    GPU_REVOKED = "gpu-revoked"  # a GPU whose attestation certificate the CRL revokes


DEVICE_FAULTS = (FaultKind.PCR, FaultKind.DRIVER, FaultKind.ECC, FaultKind.REPLAY, FaultKind.CLOCK)
# Device faults of the simulated GPUs' own attestation: planned only with --gpu-attest
# (``plan(..., gpu=True)``), on devices whose GPUs attest (Hopper and later).
GPU_FAULTS = (FaultKind.GPU_MEASUREMENT, FaultKind.GPU_REPLAY, FaultKind.GPU_REVOKED)
FLEET_FAULTS = (
    FaultKind.STORM,
    FaultKind.RESTART,
    FaultKind.KILL,
    FaultKind.DRAIN,
    FaultKind.PGRESTART,
)
# The faults whose devices must move to another replica: each device's move (from the
# fault to its first challenge from another replica) is timed against the agent's backoff
# bound (reconnect_max_s).
MOVES = frozenset({FaultKind.KILL, FaultKind.DRAIN})
# Where in the run's window each fleet fault is injected (a fraction of the window): apart,
# so that each one's devices have settled before the next.
FLEET_AT: Mapping[FaultKind, float] = {
    FaultKind.KILL: 0.25,
    FaultKind.PGRESTART: 0.45,
    FaultKind.RESTART: 0.6,
    FaultKind.DRAIN: 0.8,
}
# The agent's watch sees these (NVML events, the driver's files) and tells the verifier at
# once, which challenges at once: detected within a second. The others wait for the next
# challenge, up to the attestation interval.
WATCHED = frozenset({FaultKind.DRIVER, FaultKind.ECC})
# The finding that shows the verifier caught a device fault.
FINDINGS: Mapping[FaultKind, str] = {
    FaultKind.PCR: "eventlog.replay_mismatch",
    FaultKind.DRIVER: "gpu.driver.security_bulletins",
    FaultKind.ECC: "gpu.ecc_uncorrected",
    FaultKind.REPLAY: "tpm.quote.qualifying_data_mismatch",
    FaultKind.CLOCK: "tpm.clock.backwards",
    FaultKind.GPU_MEASUREMENT: "gpu.measurement.mismatch",
    FaultKind.GPU_REPLAY: "gpu.report.nonce_mismatch",
    FaultKind.GPU_REVOKED: "gpu.certificate.revoked",
}
# A storm takes down this many devices per... the same rate as the device faults; one storm
# per STORM_EVERY_S of the run (at least one); one restart, kill, drain and database restart
# per run, each at its FLEET_AT.
STORM_EVERY_S = 120.0


def fleet_faults(*, embedded: bool, replicas: int, own_database: bool) -> frozenset[FaultKind]:
    """The fleet faults a run can inject: a storm always; a restart of verifiers it started;
    a kill or a drain only with another replica to move to; a database restart of the
    PostgreSQL it started itself (``--postgres``)."""
    kinds = {FaultKind.STORM}
    if embedded:
        kinds.add(FaultKind.RESTART)
        if replicas > 1:
            kinds |= {FaultKind.KILL, FaultKind.DRAIN}
        if own_database:
            kinds.add(FaultKind.PGRESTART)
    return frozenset(kinds)


@dataclass(frozen=True)
class FaultSpec:
    """``--faults``: a rate (a fraction, 0.01 for 1%) and the kinds it applies to."""

    rate: float = 0.0
    kinds: tuple[FaultKind, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.rate > 0 and bool(self.kinds)

    def describe(self) -> str:
        if not self.enabled:
            return "none"
        return f"{self.rate * 100:g}% of devices, each of: {', '.join(k.value for k in self.kinds)}"


FAULT_SPEC_FORMS = "RATE% or RATE%:KIND,KIND (e.g. 1% or 0.5%:pcr,driver; 0 for none)"


def parse_faults(text: str) -> FaultSpec:
    """``1%`` (every kind), ``1%:pcr,driver`` (those), ``0`` or ``none`` (no faults)."""
    text = text.strip()
    if text.lower() in ("", "0", "0%", "none"):
        return FaultSpec()
    rate_text, _, kinds_text = text.partition(":")
    rate_text = rate_text.strip()
    if not rate_text.endswith("%"):
        raise ValueError(f"--faults {text!r}: the rate needs a % sign: {FAULT_SPEC_FORMS}")
    try:
        rate = float(rate_text[:-1]) / 100.0
    except ValueError:
        raise ValueError(
            f"--faults {text!r}: {rate_text!r} is not a rate: {FAULT_SPEC_FORMS}"
        ) from None
    if not math.isfinite(rate) or not 0 <= rate <= 1:
        raise ValueError(f"--faults {text!r}: the rate must be between 0% and 100%")
    if not kinds_text or kinds_text.strip().lower() == "all":
        kinds = tuple(FaultKind)
    else:
        known = {k.value: k for k in FaultKind}
        picked: list[FaultKind] = []
        for word in kinds_text.split(","):
            name = word.strip().lower()
            if name not in known:
                raise ValueError(
                    f"--faults {text!r}: {name!r} is not a fault kind: give some of "
                    f"{', '.join(known)} (or all)"
                )
            if known[name] not in picked:
                picked.append(known[name])
        kinds = tuple(picked)
    return FaultSpec(rate, kinds) if rate > 0 else FaultSpec()


@dataclass(frozen=True)
class Injection:
    """One fault to inject ``at`` seconds into the run: on ``devices`` (indices), or on the
    fleet (a storm's devices; none for a restart)."""

    at: float
    kind: FaultKind
    devices: tuple[int, ...] = ()


def plan(
    spec: FaultSpec,
    *,
    devices: int,
    start: float,
    end: float,
    rng: random.Random,
    fleet: Iterable[FaultKind] = (FaultKind.STORM, FaultKind.RESTART),
    gpu: bool = False,
) -> list[Injection]:
    """Every injection of a run, in time order, within [start, end).

    Device faults: ``rate`` of the fleet gets each kind (at least one device per kind), each
    device at most one fault in the run, at times spread uniformly; the GPU attestation
    faults too when the run's GPUs attest (``gpu``). Storms: one per
    ``STORM_EVERY_S`` of the window, each disconnecting ``rate`` of the fleet at once.
    A restart, a kill, a drain, a database restart: one each, at its ``FLEET_AT`` of the
    window, when the run can inject it (``fleet``, from ``fleet_faults``)."""
    possible = frozenset(fleet)
    if not spec.enabled or devices <= 0 or end <= start:
        return []
    out: list[Injection] = []
    per_kind = faults_per_kind(spec, devices)
    device_kinds = [k for k in spec.kinds if k in DEVICE_FAULTS or (gpu and k in GPU_FAULTS)]
    pool = list(range(devices))
    rng.shuffle(pool)
    n = 0
    for kind in device_kinds:
        for _ in range(per_kind):
            if n >= len(pool):
                break
            out.append(Injection(rng.uniform(start, end), kind, (pool[n],)))
            n += 1
    width = end - start
    if FaultKind.STORM in spec.kinds and FaultKind.STORM in possible:
        storms = max(1, int(width // STORM_EVERY_S))
        for i in range(storms):
            at = start + width * (i + 0.35) / storms
            out.append(
                Injection(at, FaultKind.STORM, tuple(sorted(rng.sample(range(devices), per_kind))))
            )
    for kind, fraction in FLEET_AT.items():
        if kind in spec.kinds and kind in possible:
            out.append(Injection(start + width * fraction, kind))
    out.sort(key=lambda i: i.at)
    return out


def faults_per_kind(spec: FaultSpec, devices: int) -> int:
    """How many devices ``plan`` gives each device fault kind (the revoked GPUs a run makes
    before its verifier starts, whose certificates its CRL lists)."""
    return max(1, math.ceil(spec.rate * devices))


def without_gpu_faults(spec: FaultSpec) -> FaultSpec:
    """``spec`` for a run whose GPUs do not attest: every kind but the GPU ones."""
    return FaultSpec(spec.rate, tuple(k for k in spec.kinds if k not in GPU_FAULTS))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class KindFigures:
    """One fault kind's figures: injected, detected (a device fault's finding seen; a storm's
    or restart's devices attesting again), and the seconds each detection took."""

    injected: int = 0
    detected: int = 0
    seconds: list[float] = field(default_factory=list)
    # A device fault's detections whose fault came while the verifier served: not between a
    # restart and the fleet's recovery from it, when every device waits for its turn.
    serving_seconds: list[float] = field(default_factory=list)
    # Device faults undone once detected (the device rebooted, its driver or clock put
    # back): a later result without the finding. The verifier lets the device back in.
    recovered: int = 0
    # A kill or a drain (MOVES): each device's seconds from the fault to its first challenge
    # from another replica, the bound it must move within (the agent's reconnect_max_s),
    # and the devices that never moved.
    moves: list[float] = field(default_factory=list)
    bound_s: float | None = None
    unmoved: int = 0

    @property
    def late(self) -> int:
        """Devices that did not move within the bound: slower ones, and those never moved."""
        if self.bound_s is None:
            return 0
        return self.unmoved + sum(1 for s in self.moves if s > self.bound_s)

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "injected": self.injected,
            "detected": self.detected,
            "missed": self.injected - self.detected,
            "recovered": self.recovered,
            "time_to_detect_p50_s": _round(percentile(self.seconds, 50)),
            "time_to_detect_p99_s": _round(percentile(self.seconds, 99)),
            "time_to_detect_max_s": _round(max(self.seconds) if self.seconds else None),
            "detected_while_serving": len(self.serving_seconds),
            "time_to_detect_p50_s_while_serving": _round(percentile(self.serving_seconds, 50)),
            "time_to_detect_p99_s_while_serving": _round(percentile(self.serving_seconds, 99)),
        }
        if self.bound_s is not None:
            doc |= {
                "moved": len(self.moves),
                "move_p50_s": _round(percentile(self.moves, 50)),
                "move_p99_s": _round(percentile(self.moves, 99)),
                "move_max_s": _round(max(self.moves) if self.moves else None),
                "move_bound_s": self.bound_s,
                "not_moved_within_bound": self.late,
            }
        return doc


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass
class Figures:
    """What a run ends with; ``as_dict`` is ``--json``'s document, ``table`` the screen's."""

    devices: int = 0
    soft_tpms: int = 0
    swtpms: int = 0
    duration_s: float = 0.0
    interval_s: float = 0.0
    faults: str = "none"
    enrolled: int = 0
    enroll_seconds: float = 0.0
    tiers: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, KindFigures] = field(default_factory=dict)
    results: int = 0
    silent: int = 0  # enrolled devices that never got a result
    window_results: int = 0  # results within the run's duration (the drain's are not)
    evidence_sent: int = 0
    latency_s: list[float] = field(default_factory=list)
    stored: int | None = None  # decisions in the verifier's store; None: not checked
    lost: int | None = None
    duplicated: int | None = None
    errors: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0  # streams that failed and were opened again (restarts, storms)
    verifier: str = ""
    replicas: int = 1
    database: str = ""  # the store's kind: SQLite, PostgreSQL (throwaway or given)
    # Replica processes found exited that the run did not stop or kill (a database restart
    # must not take a verifier down).
    replicas_exited: int = 0
    # SIGTERMs a replica did not exit after within its drain bound (10 s, and 2 s to exit).
    forced_stops: int = 0
    # The verifiers' metrics, scraped and checked against the store (None: not scraped,
    # a verifier named with --verifier).
    metrics: MetricsFigures | None = None

    @property
    def rate(self) -> float:
        return self.window_results / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "soft_tpms": self.soft_tpms,
            "swtpms": self.swtpms,
            "duration_s": round(self.duration_s, 3),
            "interval_s": self.interval_s,
            "faults": self.faults,
            "verifier": self.verifier,
            "replicas": self.replicas,
            "database": self.database,
            "replicas_exited_unexpectedly": self.replicas_exited,
            "replica_stops_overran": self.forced_stops,
            "enrolled": self.enrolled,
            "enroll_seconds": round(self.enroll_seconds, 3),
            "tiers": dict(self.tiers),
            "fault_kinds": {k: v.as_dict() for k, v in self.kinds.items()},
            "results": self.results,
            "evidence_sent": self.evidence_sent,
            "devices_without_a_result": self.silent,
            "attestations_per_s": round(self.rate, 2),
            "latency_p50_s": _round(percentile(self.latency_s, 50)),
            "latency_p99_s": _round(percentile(self.latency_s, 99)),
            "stored_decisions": self.stored,
            "lost_results": self.lost,
            "duplicated_results": self.duplicated,
            "errors": dict(self.errors),
            "stream_failures_reconnected": self.reconnects,
            "metrics": self.metrics.as_dict() if self.metrics is not None else None,
        }

    @staticmethod
    def _serving(name: str, k: dict[str, Any]) -> str:
        if name in _FLEET_NAMES:
            return "-"
        return (
            f"{k['detected_while_serving']:,}, {_seconds(k['time_to_detect_p50_s_while_serving'])}"
            f", {_seconds(k['time_to_detect_p99_s_while_serving'])}"
        )

    @staticmethod
    def _recovered(name: str, kind: KindFigures) -> str:
        if name in _FLEET_NAMES:
            return "-"
        return f"{kind.recovered:,}"

    def table(self) -> str:
        d = self.as_dict()
        lines = [
            f"devices      {self.devices:,} ({self.soft_tpms:,} soft TPM, {self.swtpms:,} swtpm), "
            f"{self.enrolled:,} enrolled in {self.enroll_seconds:.1f} s",
            f"run          {self.duration_s:.0f} s at a {self.interval_s:g} s interval; faults: "
            f"{self.faults}",
            f"verifier     {self.replicas} replica{'s' if self.replicas != 1 else ''} on "
            f"{self.database or '?'}: {self.verifier}"
            + (f"; {self.replicas_exited} exited unexpectedly" if self.replicas_exited else "")
            + (f"; {self.forced_stops} stops overran the drain bound" if self.forced_stops else ""),
            "tiers        "
            + "  ".join(f"{tier} {n:,}" for tier, n in sorted(self.tiers.items(), key=_tier_order)),
        ]
        if self.kinds:
            w = max(12, *(len(name) for name in self.kinds))  # gpu-measurement: 15
            lines.append(
                f"{'fault':<{w}} {'injected':>8} {'detected':>8} {'missed':>6} "
                f"{'detect p50':>10} {'detect p99':>10} {'recovered':>9}   "
                "while the verifier served: n, p50, p99"
            )
            for name, kind in self.kinds.items():
                k = kind.as_dict()
                lines.append(
                    f"{name:<{w}} {k['injected']:>8,} {k['detected']:>8,} {k['missed']:>6,} "
                    f"{_seconds(k['time_to_detect_p50_s']):>10} "
                    f"{_seconds(k['time_to_detect_p99_s']):>10} {self._recovered(name, kind):>9}"
                    f"   {self._serving(name, k)}"
                )
            for name, kind in self.kinds.items():
                if kind.bound_s is None:
                    continue
                lines.append(
                    f"{name + ' moves':<12} {len(kind.moves):,} devices to another replica: "
                    f"p50 {_seconds(percentile(kind.moves, 50))}, p99 "
                    f"{_seconds(percentile(kind.moves, 99))}, max "
                    f"{_seconds(max(kind.moves) if kind.moves else None)} (bound "
                    f"{_seconds(kind.bound_s)}); {kind.late:,} not within it"
                )
        silent = f"; {self.silent:,} devices got none" if self.silent else ""
        lines.append(
            f"results      {self.results:,} ({d['attestations_per_s']:,.1f}/s), latency p50 "
            f"{_seconds(d['latency_p50_s'])}, p99 {_seconds(d['latency_p99_s'])} (each "
            f"device's first result apart){silent}"
        )
        if self.stored is None:
            lines.append("store        not checked (no access to the verifier's database)")
        else:
            lines.append(
                f"store        {self.stored:,} decisions; lost {self.lost:,}, duplicated "
                f"{self.duplicated:,}"
            )
        if self.metrics is not None:
            lines.append(self.metrics.line())
        errors = ", ".join(f"{k} {v:,}" for k, v in sorted(self.errors.items())) or "none"
        lines.append(f"errors       {errors}; {self.reconnects:,} stream failures reconnected")
        return "\n".join(lines)


TIER_ORDER = ("affirming", "warning", "contraindicated", "none")
_FLEET_NAMES = frozenset(k.value for k in FLEET_FAULTS)


def _tier_order(item: tuple[str, int]) -> int:
    return TIER_ORDER.index(item[0]) if item[0] in TIER_ORDER else len(TIER_ORDER)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s"


def count_tiers(tiers: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for tier in tiers:
        out[tier] = out.get(tier, 0) + 1
    return out
