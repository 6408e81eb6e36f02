"""`devtrust simulate` against verifier replicas on one PostgreSQL, for real: a replica killed
(SIGKILL), PostgreSQL restarted under load, a replica drained (SIGTERM); every device moves
to the other replica within its backoff bound, and nothing it was told is lost or doubled."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtrust.swtpm import swtpm_available
from devtrust.swtpm.pgserver import PgServer
from tests.test_simulate import simulate

MOVES = ("kill", "drain")


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[PgServer]:
    server = PgServer(tmp_path / "pg").start()
    yield server
    server.close()


@pytest.mark.skipif(not swtpm_available(), reason="swtpm is not installed")
def test_replicas_survive_a_kill_a_database_restart_and_a_drain(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    run = simulate(
        "--devices", "20", "--swtpm", "1", "--duration", "20", "--interval", "3",
        "--replicas", "2", "--postgres", "--faults", "5%:kill,pgrestart,drain", "--seed", "3",
        "--json", str(out), "--work", str(tmp_path / "work"),
        timeout=90,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert doc["replicas"] == 2
    assert doc["database"].startswith("PostgreSQL (throwaway")
    assert doc["replicas_exited_unexpectedly"] == 0
    assert doc["enrolled"] == 20
    assert doc["devices_without_a_result"] == 0
    kinds = doc["fault_kinds"]
    assert set(kinds) == {"kill", "pgrestart", "drain"}
    for name, kind in kinds.items():
        assert kind["injected"] >= 1, name
        assert kind["detected"] == kind["injected"], (name, kind)
    # The database restart: every attesting device got a decision afterwards, stored by the
    # same verifier processes (none exited; the run restarts none for it).
    assert kinds["pgrestart"]["injected"] >= 19
    for name in MOVES:
        kind = kinds[name]
        assert kind["moved"] == kind["injected"], (name, kind)
        assert kind["not_moved_within_bound"] == 0, (name, kind)
        assert kind["move_max_s"] <= kind["move_bound_s"], (name, kind)
    # A drained replica tells its streams to go at once (at most a second's jitter).
    assert kinds["drain"]["move_p50_s"] < 2.0
    assert doc["lost_results"] == 0
    assert doc["duplicated_results"] == 0
    assert doc["stored_decisions"] >= doc["results"] > 40
    assert doc["errors"] == {}
    assert "2 replicas on PostgreSQL" in run.stdout
    assert "kill moves" in run.stdout
    assert "lost 0, duplicated 0" in run.stdout


def test_replicas_on_a_given_database_keep_its_other_data(
    tmp_path: Path, postgres: PgServer
) -> None:
    """--database URL: an existing PostgreSQL; a second run's check counts its own devices
    only, with the first run's decisions still in the database."""
    name = postgres.create_database("sim")
    url = postgres.url(name)
    docs = []
    for i in range(2):
        out = tmp_path / f"figures-{i}.json"
        run = simulate(
            "--devices", "6", "--duration", "8", "--interval", "2", "--replicas", "2",
            "--database", url, "--json", str(out), "--work", str(tmp_path / f"work-{i}"),
            timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        docs.append(json.loads(out.read_text()))
    for doc in docs:
        assert doc["database"] == "PostgreSQL (--database)"
        assert doc["lost_results"] == 0
        assert doc["duplicated_results"] == 0
        assert doc["devices_without_a_result"] == 0
        assert doc["stored_decisions"] >= doc["results"] >= 6
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM audit WHERE event = 'appraisal'").fetchone()
    assert row is not None
    assert row[0] == docs[0]["stored_decisions"] + docs[1]["stored_decisions"]
    assert postgres.password not in (tmp_path / "figures-1.json").read_text()
