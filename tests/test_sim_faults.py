"""The simulator's fault specs, plans and figures (swtpm/sim_faults.py), table by table."""

# ruff: noqa: S311 - seeded plans, not secrets

from __future__ import annotations

import random

import pytest

from devtrust.agent.config import AgentConfig
from devtrust.swtpm.sim_faults import (
    DEVICE_FAULTS,
    FLEET_AT,
    FLEET_FAULTS,
    FaultKind,
    FaultSpec,
    Figures,
    KindFigures,
    fleet_faults,
    parse_faults,
    percentile,
    plan,
)
from devtrust.swtpm.sim_fleet import Fleet
from devtrust.swtpm.simulate import succeeded


@pytest.mark.parametrize(
    ("text", "rate", "kinds"),
    [
        ("1%", 0.01, tuple(FaultKind)),
        ("1%:all", 0.01, tuple(FaultKind)),
        ("0.5%:pcr,driver", 0.005, (FaultKind.PCR, FaultKind.DRIVER)),
        (" 2% : Driver , PCR ", 0.02, (FaultKind.DRIVER, FaultKind.PCR)),
        ("1%:ecc,ecc", 0.01, (FaultKind.ECC,)),
        ("100%:storm", 1.0, (FaultKind.STORM,)),
    ],
)
def test_fault_specs(text: str, rate: float, kinds: tuple[FaultKind, ...]) -> None:
    spec = parse_faults(text)
    assert spec.rate == pytest.approx(rate)
    assert spec.kinds == kinds
    assert spec.enabled


@pytest.mark.parametrize("text", ["0", "none", "", "0%", "0%:pcr"])
def test_no_faults(text: str) -> None:
    assert not parse_faults(text).enabled


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("1", "needs a % sign"),
        ("x%", "is not a rate"),
        ("101%", "between 0% and 100%"),
        ("-1%", "between 0% and 100%"),
        ("nan%", "between 0% and 100%"),
        ("1%:pcr,bios", "'bios' is not a fault kind"),
    ],
)
def test_bad_fault_specs_say_what_to_write(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_faults(text)


def test_plan_gives_each_kind_its_share_on_distinct_devices_within_the_window() -> None:
    spec = parse_faults("1%")
    injections = plan(spec, devices=1000, start=5.0, end=295.0, rng=random.Random(7))
    device_faults = [i for i in injections if i.kind in DEVICE_FAULTS]
    for kind in DEVICE_FAULTS:
        assert sum(1 for i in device_faults if i.kind is kind) == 10
    devices = [d for i in device_faults for d in i.devices]
    assert len(devices) == len(set(devices)) == 50, "one fault per device"
    assert all(5.0 <= i.at < 295.0 for i in injections)
    assert [i.at for i in injections] == sorted(i.at for i in injections)
    storms = [i for i in injections if i.kind is FaultKind.STORM]
    assert len(storms) == 2
    assert all(len(s.devices) == 10 for s in storms)
    assert [i.kind for i in injections].count(FaultKind.RESTART) == 1


def test_plan_without_an_embedded_verifier_has_no_restart() -> None:
    fleet = fleet_faults(embedded=False, replicas=1, own_database=False)
    injections = plan(
        parse_faults("1%"), devices=100, start=0, end=60, rng=random.Random(1), fleet=fleet
    )
    assert {i.kind for i in injections} & set(FLEET_FAULTS) == {FaultKind.STORM}


@pytest.mark.parametrize(
    ("embedded", "replicas", "own_database", "kinds"),
    [
        (False, 1, False, {"storm"}),
        (True, 1, False, {"storm", "restart"}),
        # A kill or a drain needs another replica to move to.
        (True, 2, False, {"storm", "restart", "kill", "drain"}),
        # A database restart, the run's own PostgreSQL (--postgres), not one it was given.
        (True, 1, True, {"storm", "restart", "pgrestart"}),
        (True, 3, True, {"storm", "restart", "kill", "drain", "pgrestart"}),
    ],
)
def test_the_fleet_faults_a_run_can_inject(
    embedded: bool, replicas: int, own_database: bool, kinds: set[str]
) -> None:
    found = fleet_faults(embedded=embedded, replicas=replicas, own_database=own_database)
    assert {k.value for k in found} == kinds


def test_plan_puts_each_fault_of_the_verifiers_apart_once() -> None:
    fleet = fleet_faults(embedded=True, replicas=2, own_database=True)
    injections = plan(
        parse_faults("1%"), devices=2000, start=10.0, end=590.0, rng=random.Random(1), fleet=fleet
    )
    at = {i.kind: i.at for i in injections if i.kind in FLEET_AT}
    assert at == {kind: 10.0 + 580.0 * fraction for kind, fraction in FLEET_AT.items()}
    # One each; a kill and a drain pick their replica when injected, no device named.
    for kind in FLEET_AT:
        assert [i.kind for i in injections].count(kind) == 1
    assert all(not i.devices for i in injections if i.kind in FLEET_AT)
    # Asked for by name only: a spec without them plans none.
    only = plan(
        parse_faults("1%:pcr"), devices=100, start=0, end=60, rng=random.Random(1), fleet=fleet
    )
    assert {i.kind for i in only} == {FaultKind.PCR}


def test_plan_gives_a_small_fleet_one_fault_of_each_kind() -> None:
    injections = plan(
        parse_faults("1%:pcr,clock"), devices=5, start=0, end=10, rng=random.Random(2)
    )
    assert sorted(i.kind.value for i in injections) == ["clock", "pcr"]


def test_plan_of_no_faults_is_empty() -> None:
    assert plan(FaultSpec(), devices=100, start=0, end=10, rng=random.Random(0)) == []


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 50, None),
        ([3.0], 99, 3.0),
        ([1, 2, 3, 4], 50, 2),
        ([1, 2, 3, 4], 99, 4),
        (list(range(1, 101)), 99, 99),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


def test_figures_table_and_json_agree() -> None:
    figures = Figures(devices=3, soft_tpms=2, swtpms=1, duration_s=10.0, interval_s=5.0)
    figures.enrolled = 3
    figures.tiers = {"warning": 1, "affirming": 2}
    figures.kinds["pcr"] = KindFigures(injected=2, detected=1, seconds=[4.0])
    figures.results = figures.window_results = 30
    figures.latency_s = [0.01, 0.02]
    figures.stored, figures.lost, figures.duplicated = 30, 0, 0
    doc = figures.as_dict()
    assert doc["attestations_per_s"] == 3.0
    assert doc["fault_kinds"]["pcr"] == {
        "injected": 2,
        "detected": 1,
        "missed": 1,
        "recovered": 0,
        "time_to_detect_p50_s": 4.0,
        "time_to_detect_p99_s": 4.0,
        "time_to_detect_max_s": 4.0,
        "detected_while_serving": 0,
        "time_to_detect_p50_s_while_serving": None,
        "time_to_detect_p99_s_while_serving": None,
    }
    table = figures.table()
    assert "affirming 2  warning 1" in table  # tiers best first
    assert "pcr" in table
    assert "4.00 s" in table
    assert "lost 0, duplicated 0" in table


def test_faults_injected_during_a_restart_are_counted_apart() -> None:
    figures = Figures()
    fleet = Fleet(AgentConfig(), b"", figures)
    fleet.restarts = [[100.0, 160.0], [250.0, None]]
    fleet.detections = [
        (FaultKind.DRIVER, 50.0, 0.02),  # before the first restart
        (FaultKind.DRIVER, 120.0, 40.0),  # while the fleet came back
        (FaultKind.DRIVER, 200.0, 0.03),  # after it
        (FaultKind.DRIVER, 260.0, 30.0),  # after a restart never wholly recovered from
    ]
    fleet.split_by_service(end=300.0)
    assert figures.kinds["driver"].serving_seconds == [0.02, 0.03]


def test_a_move_is_late_past_the_bound_or_when_it_never_came() -> None:
    kind = KindFigures(injected=4, detected=3, moves=[0.5, 2.0, 10.5], bound_s=10.0, unmoved=1)
    assert kind.late == 2
    doc = kind.as_dict()
    assert doc["moved"] == 3
    assert doc["move_p50_s"] == 2.0
    assert doc["move_max_s"] == 10.5
    assert doc["move_bound_s"] == 10.0
    assert doc["not_moved_within_bound"] == 2
    # Other kinds have no bound and no move figures.
    assert "moved" not in KindFigures(injected=1, detected=1).as_dict()


def test_the_table_names_replicas_the_database_and_moves() -> None:
    figures = Figures(devices=2, enrolled=2, replicas=2, database="PostgreSQL (--database)")
    figures.verifier = "replica 0 embedded (pid 1); replica 1 embedded (pid 2)"
    figures.kinds["kill"] = KindFigures(
        injected=1, detected=1, seconds=[0.8], moves=[0.4], bound_s=10.0
    )
    figures.stored, figures.lost, figures.duplicated = 4, 0, 0
    table = figures.table()
    assert "2 replicas on PostgreSQL (--database)" in table
    assert "kill moves   1 devices to another replica: p50 400 ms" in table
    assert "(bound 10.00 s); 0 not within it" in table
    doc = figures.as_dict()
    assert (doc["replicas"], doc["database"]) == (2, "PostgreSQL (--database)")
    assert doc["replicas_exited_unexpectedly"] == 0


@pytest.mark.parametrize(
    ("move_s", "exited", "ok"),
    [
        (1.0, 0, True),
        (11.0, 0, False),  # a device moved past its backoff bound
        (1.0, 1, False),  # a verifier died of a database restart
    ],
)
def test_a_run_fails_on_a_late_move_or_a_replica_that_died(
    move_s: float, exited: int, ok: bool
) -> None:
    figures = Figures(devices=1, enrolled=1, lost=0, duplicated=0, replicas_exited=exited)
    figures.kinds["kill"] = KindFigures(injected=1, detected=1, moves=[move_s], bound_s=10.0)
    assert succeeded(figures) is ok


def test_the_table_names_replica_stops_that_overran_the_drain_bound() -> None:
    figures = Figures(devices=1, enrolled=1, replicas=2, database="SQLite", forced_stops=1)
    assert "1 stops overran the drain bound" in figures.table()
    assert figures.as_dict()["replica_stops_overran"] == 1
    assert "overran" not in Figures(devices=1, replicas=2).table()
