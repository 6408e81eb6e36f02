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


class FaultKind(enum.Enum):
    """What can go wrong, and what each does to a simulated device or the fleet."""

    PCR = "pcr"  # a PCR extended outside the event log (a boot component tampered with)
    DRIVER = "driver"  # the GPU driver downgraded to one below NVIDIA's security bulletins
    ECC = "ecc"  # uncorrected ECC errors on one GPU
    REPLAY = "replay"  # an earlier quote sent again with fresh claims
    CLOCK = "clock"  # the TPM clock rolled back without a reset
    STORM = "storm"  # a share of the fleet disconnects at once and reconnects
    RESTART = "restart"  # the verifier restarts (embedded verifier only)


DEVICE_FAULTS = (FaultKind.PCR, FaultKind.DRIVER, FaultKind.ECC, FaultKind.REPLAY, FaultKind.CLOCK)
FLEET_FAULTS = (FaultKind.STORM, FaultKind.RESTART)
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
}
# A storm takes down this many devices per... the same rate as the device faults; one storm
# per STORM_EVERY_S of the run (at least one), one verifier restart per run.
STORM_EVERY_S = 120.0


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
    restart: bool = True,
) -> list[Injection]:
    """Every injection of a run, in time order, within [start, end).

    Device faults: ``rate`` of the fleet gets each kind (at least one device per kind), each
    device at most one fault in the run, at times spread uniformly. Storms: one per
    ``STORM_EVERY_S`` of the window, each disconnecting ``rate`` of the fleet at once.
    A restart: one, at 60% of the window, when ``restart`` (an embedded verifier)."""
    if not spec.enabled or devices <= 0 or end <= start:
        return []
    out: list[Injection] = []
    per_kind = max(1, math.ceil(spec.rate * devices))
    device_kinds = [k for k in spec.kinds if k in DEVICE_FAULTS]
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
    if FaultKind.STORM in spec.kinds:
        storms = max(1, int(width // STORM_EVERY_S))
        for i in range(storms):
            at = start + width * (i + 0.35) / storms
            out.append(
                Injection(at, FaultKind.STORM, tuple(sorted(rng.sample(range(devices), per_kind))))
            )
    if FaultKind.RESTART in spec.kinds and restart:
        out.append(Injection(start + width * 0.6, FaultKind.RESTART))
    out.sort(key=lambda i: i.at)
    return out


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

    def as_dict(self) -> dict[str, Any]:
        return {
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
        }

    @staticmethod
    def _serving(name: str, k: dict[str, Any]) -> str:
        if name in (FaultKind.STORM.value, FaultKind.RESTART.value):
            return "-"
        return (
            f"{k['detected_while_serving']:,}, {_seconds(k['time_to_detect_p50_s_while_serving'])}"
            f", {_seconds(k['time_to_detect_p99_s_while_serving'])}"
        )

    @staticmethod
    def _recovered(name: str, kind: KindFigures) -> str:
        if name in (FaultKind.STORM.value, FaultKind.RESTART.value):
            return "-"
        return f"{kind.recovered:,}"

    def table(self) -> str:
        d = self.as_dict()
        lines = [
            f"devices      {self.devices:,} ({self.soft_tpms:,} soft TPM, {self.swtpms:,} swtpm), "
            f"{self.enrolled:,} enrolled in {self.enroll_seconds:.1f} s",
            f"run          {self.duration_s:.0f} s at a {self.interval_s:g} s interval; faults: "
            f"{self.faults}; verifier: {self.verifier}",
            "tiers        "
            + "  ".join(f"{tier} {n:,}" for tier, n in sorted(self.tiers.items(), key=_tier_order)),
        ]
        if self.kinds:
            lines.append(
                f"{'fault':<12} {'injected':>8} {'detected':>8} {'missed':>6} "
                f"{'detect p50':>10} {'detect p99':>10} {'recovered':>9}   "
                "while the verifier served: n, p50, p99"
            )
            for name, kind in self.kinds.items():
                k = kind.as_dict()
                lines.append(
                    f"{name:<12} {k['injected']:>8,} {k['detected']:>8,} {k['missed']:>6,} "
                    f"{_seconds(k['time_to_detect_p50_s']):>10} "
                    f"{_seconds(k['time_to_detect_p99_s']):>10} {self._recovered(name, kind):>9}"
                    f"   {self._serving(name, k)}"
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
        errors = ", ".join(f"{k} {v:,}" for k, v in sorted(self.errors.items())) or "none"
        lines.append(f"errors       {errors}; {self.reconnects:,} stream failures reconnected")
        return "\n".join(lines)


TIER_ORDER = ("affirming", "warning", "contraindicated", "none")


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
