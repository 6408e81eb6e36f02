"""The RIM store (issue 14): RIMs verified when added, kept as their original files and a
JSON index, found by exact version; a changed file, a broken entry and a broken index each
give a clear message naming them, and the rest of the store still loads."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from devtrust.core.errors import ConfigError
from devtrust.verifier.errors import NotFound
from devtrust.verifier.gpu.rim import RimSignatureError, load_rim
from devtrust.verifier.gpu.rim_store import (
    INDEX,
    MAX_ENTRIES,
    MAX_INDEX_BYTES,
    RimStore,
    RimStoreError,
)
from devtrust.verifier.gpu.types import RimKind
from tests.test_gpu_rim import (
    DRIVER,
    RIM_ROOT,
    VBIOS,
    VBIOS_PROD,
    WHEN,
    RimPki,
    hash_name,
    resource,
    sign,
    unsigned,
)

LATER = datetime(2026, 1, 1, tzinfo=UTC)  # NVIDIA's RIM signer has expired


def filled(path: Path) -> RimStore:
    store = RimStore.open(path)
    store.add(DRIVER.read_bytes(), roots=[RIM_ROOT], at=WHEN, source=DRIVER.name)
    store.add(VBIOS.read_bytes(), roots=[RIM_ROOT], at=WHEN, source=VBIOS.name)
    return store


def index_of(path: Path) -> dict[str, Any]:
    document = json.loads((path / INDEX).read_text())
    assert isinstance(document, dict)
    return document


def test_round_trip_keeps_the_files_and_the_values(tmp_path: Path) -> None:
    path = tmp_path / "rims"
    filled(path)
    files = sorted(p.name for p in path.iterdir() if p.suffix == ".swidtag")
    assert files == sorted(
        f"{hashlib.sha256(f.read_bytes()).hexdigest()}.swidtag" for f in (DRIVER, VBIOS)
    )
    entry = next(e for e in index_of(path)["rims"] if e["kind"] == "driver")
    assert entry["version"] == "545.00"
    assert entry["verified_at"] == "2024-06-01T00:00:00Z"
    assert entry["source"] == DRIVER.name
    assert entry["signer"].startswith("CN=HCC RIM L4 Signer")
    assert entry["sha256"] == hashlib.sha256(DRIVER.read_bytes()).hexdigest()
    assert entry["measurements"][0]["alternatives"][0].startswith("0e0ee161")

    # Opened later, after the signer expired: no signature is verified again.
    store = RimStore.open(path)
    assert store.problems == ()
    assert [(s.rim.kind, s.rim.version) for s in store.list()] == [
        (RimKind.DRIVER, "545.00"),
        (RimKind.VBIOS, "96.00.5E.00.01"),
    ]
    driver = store.find(RimKind.DRIVER, "545.00")
    assert driver == load_rim(DRIVER.read_bytes(), roots=[RIM_ROOT], at=WHEN, source=DRIVER.name)
    stored = store.list()[0]
    assert stored.verified_at == WHEN
    assert stored.file == entry["sha256"] + ".swidtag"


def test_find_is_by_exact_version(tmp_path: Path) -> None:
    store = filled(tmp_path / "rims")
    assert store.find(RimKind.VBIOS, "96.00.5e.00.01") is not None  # hex digits, any case
    assert store.find(RimKind.VBIOS, "96.00.9F.00.01") is None
    assert store.find(RimKind.DRIVER, "545.0") is None
    assert store.find(RimKind.DRIVER, "550.90.07") is None
    assert store.find(RimKind.VBIOS, "545.00") is None


def test_an_absent_store_is_empty_and_is_not_created(tmp_path: Path) -> None:
    store = RimStore.open(tmp_path / "none")
    assert store.list() == ()
    assert store.problems == ()
    assert not (tmp_path / "none").exists()


def test_add_refuses_what_does_not_verify_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "rims"
    store = RimStore.open(path)
    with pytest.raises(RimSignatureError, match="expired"):
        store.add(DRIVER.read_bytes(), roots=[RIM_ROOT], at=LATER)
    assert not path.exists() or not any(path.glob("*.swidtag"))
    assert RimStore.open(path).list() == ()


def test_another_rim_of_the_same_kind_and_version_is_refused_unless_replace(
    tmp_path: Path,
) -> None:
    """NVIDIA's PROD and test VBIOS RIMs for 96.00.5E.00.01 both verify under its root, share
    tag id, product and signer, and differ at 4 indices: which one is compared is the
    operator's choice (review M2), never the last file added; the same file again is no
    change."""
    path = tmp_path / "rims"
    store = filled(path)
    with pytest.raises(RimStoreError, match=r"another vbios RIM for 96.00.5E.00.01.*--replace"):
        store.add(VBIOS_PROD.read_bytes(), roots=[RIM_ROOT], at=WHEN, source=VBIOS_PROD.name)
    kept = RimStore.open(path).find(RimKind.VBIOS, "96.00.5E.00.01")
    assert kept is not None
    assert kept.source != VBIOS_PROD.name
    store.add(VBIOS.read_bytes(), roots=[RIM_ROOT], at=WHEN, source=VBIOS.name)  # the same
    store.add(
        VBIOS_PROD.read_bytes(), roots=[RIM_ROOT], at=WHEN, source=VBIOS_PROD.name, replace=True
    )
    reopened = RimStore.open(path)
    assert len(reopened.list()) == 2
    found = reopened.find(RimKind.VBIOS, "96.00.5E.00.01")
    assert found is not None
    assert found.source == VBIOS_PROD.name
    # the replaced file is gone
    assert not (path / f"{hashlib.sha256(VBIOS.read_bytes()).hexdigest()}.swidtag").exists()


def test_remove(tmp_path: Path) -> None:
    path = tmp_path / "rims"
    store = filled(path)
    gone = store.remove(RimKind.VBIOS, "96.00.5e.00.01")
    assert gone.rim.version == "96.00.5E.00.01"
    assert not (path / gone.file).exists()
    assert store.find(RimKind.VBIOS, "96.00.5E.00.01") is None
    assert RimStore.open(path).find(RimKind.VBIOS, "96.00.5E.00.01") is None
    assert RimStore.open(path).find(RimKind.DRIVER, "545.00") is not None
    with pytest.raises(NotFound, match=r"expected a vbios RIM for 96.00.5E.00.01, found driver"):
        store.remove(RimKind.VBIOS, "96.00.5E.00.01")


def test_a_tampered_file_is_named_and_the_rest_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "rims"
    filled(path)
    digest = hashlib.sha256(DRIVER.read_bytes()).hexdigest()
    stored = path / f"{digest}.swidtag"
    stored.write_bytes(stored.read_bytes().replace(b"0e0ee161", b"1e0ee161"))
    store = RimStore.open(path)
    assert store.find(RimKind.DRIVER, "545.00") is None
    assert store.find(RimKind.VBIOS, "96.00.5E.00.01") is not None
    (problem,) = store.problems
    assert f"driver RIM 545.00 ({digest}.swidtag): expected sha256 {digest}, found " in problem
    assert "changed after it was added" in problem


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "rims"
    filled(path)
    (path / f"{hashlib.sha256(VBIOS.read_bytes()).hexdigest()}.swidtag").unlink()
    store = RimStore.open(path)
    (problem,) = store.problems
    assert "vbios RIM 96.00.5E.00.01" in problem
    assert "cannot read" in problem
    assert store.find(RimKind.DRIVER, "545.00") is not None


def test_a_changed_index_value_is_caught_when_opened_with_roots(tmp_path: Path) -> None:
    """Without roots the index is trusted as the directory is; with them, the values come
    from each file, verified again at the time it was added."""
    path = tmp_path / "rims"
    filled(path)
    document = index_of(path)
    entry = next(e for e in document["rims"] if e["kind"] == "driver")
    entry["measurements"][0]["alternatives"][0] = "ff" * 48
    (path / INDEX).write_text(json.dumps(document))
    trusting = RimStore.open(path).find(RimKind.DRIVER, "545.00")
    assert trusting is not None
    assert trusting.measurements[0].alternatives[0] == b"\xff" * 48
    checked = RimStore.open(path, roots=[RIM_ROOT])
    assert checked.problems == ()
    driver = checked.find(RimKind.DRIVER, "545.00")
    assert driver is not None
    assert driver.measurements[0].alternatives[0].hex().startswith("0e0ee161")
    assert driver.source == DRIVER.name


def test_opened_with_roots_a_file_from_another_signer_is_left_out(tmp_path: Path) -> None:
    pki = RimPki.create()
    doc = unsigned(DRIVER.read_bytes())
    resource(doc, 7).set(hash_name(0), "ab" * 48)
    path = tmp_path / "rims"
    RimStore.open(path).add(sign(doc, pki), roots=[pki.root], at=WHEN, source="test.swidtag")
    store = RimStore.open(path, roots=[RIM_ROOT])
    assert store.find(RimKind.DRIVER, "545.00") is None
    (problem,) = store.problems
    assert "does not verify at 2024-06-01T00:00:00Z" in problem
    assert RimStore.open(path, roots=[pki.root]).find(RimKind.DRIVER, "545.00") is not None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        pytest.param(
            lambda e: e.update(sha256="../../etc/passwd"), "sha256: expected 64", id="path"
        ),
        pytest.param(lambda e: e.update(kind="firmware"), "firmware", id="kind"),
        pytest.param(lambda e: e.pop("version"), "version: expected a string", id="version"),
        pytest.param(lambda e: e.update(verified_at="2024-06-01T00:00:00"), "its zone", id="naive"),
        pytest.param(
            lambda e: e["measurements"][0].update(alternatives=["ab"]),
            "expected 48-byte hex alternatives",
            id="short-value",
        ),
        pytest.param(lambda e: e.update(measurements={}), "measurements: expected a list", id="ms"),
    ],
)
def test_a_broken_entry_is_named_and_the_rest_still_loads(
    tmp_path: Path, change: Any, match: str
) -> None:
    path = tmp_path / "rims"
    filled(path)
    document = index_of(path)
    driver = next(n for n, e in enumerate(document["rims"]) if e["kind"] == "driver")
    change(document["rims"][driver])
    (path / INDEX).write_text(json.dumps(document))
    store = RimStore.open(path)
    (problem,) = store.problems
    assert problem.startswith(f"{INDEX} entry {driver}: ")
    assert match in problem
    assert store.find(RimKind.VBIOS, "96.00.5E.00.01") is not None


def test_a_duplicated_entry_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "rims"
    filled(path)
    document = index_of(path)
    document["rims"].append(dict(document["rims"][0]))
    (path / INDEX).write_text(json.dumps(document))
    store = RimStore.open(path)
    (problem,) = store.problems
    assert "a second" in problem
    assert len(store.list()) == 2


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("{", "expected JSON", id="not-json"),
        pytest.param("[" * 100_000, "expected JSON", id="deep"),
        pytest.param("[]", "expected an object with format 1, found list", id="list"),
        pytest.param('{"format": 2, "rims": []}', "with format 1, found 2", id="format"),
        pytest.param('{"format": 1, "rims": {}}', "rims: expected a list", id="rims"),
        pytest.param(
            json.dumps({"format": 1, "rims": [{}] * (MAX_ENTRIES + 1)}),
            f"at most {MAX_ENTRIES}, found {MAX_ENTRIES + 1} entries",
            id="too-many",
        ),
    ],
)
def test_a_broken_index_is_one_clear_error(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "rims"
    path.mkdir()
    (path / INDEX).write_text(text)
    with pytest.raises(RimStoreError, match=match) as caught:
        RimStore.open(path)
    assert str(path / INDEX) in str(caught.value)
    assert isinstance(caught.value, ConfigError)


def test_an_index_past_its_byte_bound_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "rims"
    path.mkdir()
    with (path / INDEX).open("wb") as handle:
        handle.truncate(MAX_INDEX_BYTES + 1)
    with pytest.raises(RimStoreError, match=f"expected at most {MAX_INDEX_BYTES} bytes"):
        RimStore.open(path)


def test_a_file_where_the_store_should_be(tmp_path: Path) -> None:
    (tmp_path / "rims").write_text("")
    with pytest.raises(RimStoreError, match="expected a directory, found a file"):
        RimStore.open(tmp_path / "rims")


def test_the_entry_count_is_bounded_on_add(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from devtrust.verifier.gpu import rim_store

    monkeypatch.setattr(rim_store, "MAX_ENTRIES", 1)
    path = tmp_path / "rims"
    store = RimStore.open(path)
    store.add(DRIVER.read_bytes(), roots=[RIM_ROOT], at=WHEN)
    with pytest.raises(RimStoreError, match="expected at most 1 RIMs"):
        store.add(VBIOS.read_bytes(), roots=[RIM_ROOT], at=WHEN)
    store.add(DRIVER.read_bytes(), roots=[RIM_ROOT], at=WHEN)  # a replacement still fits


def test_concurrent_adds_keep_both(tmp_path: Path) -> None:
    """Two writers (threads here; processes share the flock the same way) never lose
    each other's entry."""
    path = tmp_path / "rims"
    errors: list[BaseException] = []

    def add(data: bytes) -> None:
        try:
            RimStore.open(path).add(data, roots=[RIM_ROOT], at=WHEN)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(f.read_bytes(),)) for f in (DRIVER, VBIOS) * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(RimStore.open(path).list()) == 2
