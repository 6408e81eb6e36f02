"""The audit chain's pure part (verifier/audit_chain.py): the encoding, the link, the
events and actors, and the check of a stored chain naming the first broken record for each
way a chain can be tampered with. Each check of ``check_chain`` has a case here that fails
when the check is removed."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json

import pytest

from devtrust.verifier import audit_chain as ac
from devtrust.verifier.audit_chain import GENESIS, Broken, Entry, Event, Mark, Stored

DEVICE = "ab" * 32
T0 = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)


def entry(seq: int, *, chain: str = DEVICE, detail: str = "") -> Entry:
    at = ac.canonical_at(T0 + datetime.timedelta(minutes=seq))
    return Entry(
        chain=chain,
        seq=seq,
        at=at,
        device_id=chain if chain not in ac.NAMED_CHAINS else "",
        event="appraisal" if chain not in ac.NAMED_CHAINS else "policy_changed",
        actor="device" if chain not in ac.NAMED_CHAINS else "operator/alice",
        tier="hardware",
        detail=detail or ac.detail_text({"n": seq}),
    )


def chain_of(n: int, *, chain: str = DEVICE) -> list[Stored]:
    rows, prev = [], GENESIS
    for seq in range(1, n + 1):
        e = entry(seq, chain=chain)
        digest = ac.link(prev, e)
        rows.append(Stored(id=seq * 10, entry=e, prev_hash=prev, hash=digest))
        prev = digest
    return rows


def head_of(rows: list[Stored]) -> Mark:
    return Mark(rows[-1].entry.seq, rows[-1].hash)


def check(
    rows: list[Stored], *, head: Mark | None = None, checkpoints: dict[int, Mark] | None = None
) -> ac.Break | None:
    return ac.check_chain(
        DEVICE, iter(rows), head=head or head_of(rows), checkpoints=checkpoints or {}
    )


# --- encoding ------------------------------------------------------------------------------


def test_the_encoding_starts_with_its_version_and_frames_every_field() -> None:
    e = entry(1)
    data = ac.encode(e)
    assert data[0] == ac.VERSION == 1
    assert data[1:5] == len(DEVICE).to_bytes(4, "big")
    assert data[5 : 5 + 64] == DEVICE.encode()
    # Moving a character between two fields changes the encoding (lengths frame them).
    a = dataclasses.replace(e, event="ab", actor="c")
    b = dataclasses.replace(e, event="a", actor="bc")
    assert ac.encode(a) != ac.encode(b)


def test_the_hash_is_sha256_of_the_previous_hash_and_the_encoding() -> None:
    e = entry(1)
    expected = hashlib.sha256(bytes(32) + ac.encode(e)).hexdigest()
    assert ac.link(GENESIS, e) == expected
    for field in ("chain", "at", "device_id", "event", "actor", "tier", "detail"):
        changed = dataclasses.replace(e, **{field: getattr(e, field) + "x"})
        assert ac.link(GENESIS, changed) != expected, field
    assert ac.link(GENESIS, dataclasses.replace(e, seq=2)) != expected
    assert ac.link("11" * 32, e) != expected


def test_times_hash_the_same_whatever_form_the_database_returns() -> None:
    when = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)
    forms: list[str | datetime.datetime] = [
        when,
        when.isoformat(),
        "2026-12-01T13:00:00+01:00",
        "2026-12-01T12:00:00.000000+00:00",
    ]
    assert {ac.canonical_at(f) for f in forms} == {"2026-12-01T12:00:00.000000+00:00"}
    with pytest.raises(ValueError, match="no time zone"):
        ac.canonical_at("2026-12-01T12:00:00")
    text = '{"b": [1, 2.5], "a": {"y": null, "x": "\\u00e9"}}'
    assert ac.detail_text(json.loads(text)) == '{"a":{"x":"\\u00e9","y":null},"b":[1,2.5]}'


# --- events and actors ---------------------------------------------------------------------


def test_every_event_has_its_type() -> None:
    assert set(ac.EVENTS) == set(Event)
    shards = {f"chains/{digit}" for digit in "0123456789abcdef"}
    assert {"policy", "roles", "audit", "chains"} | shards == ac.NAMED_CHAINS
    assert {"chains"} | shards == ac.ANNOUNCING
    assert {"audit", "chains"} | shards == ac.UNPRUNED


def test_a_chain_is_announced_on_the_shard_its_name_hashes_to() -> None:
    """Sixteen announcing chains, by the first hex digit of sha256(name): a burst of new
    chains spreads over sixteen heads; a shard is announced on the root "chains"."""
    assert hashlib.sha256(DEVICE.encode()).hexdigest()[0] == "2"
    assert ac.announced_on(DEVICE) == "chains/2"
    assert ac.announced_on("policy") == f"chains/{hashlib.sha256(b'policy').hexdigest()[0]}"
    assert ac.announced_on("chains/2") == "chains"
    spread = {ac.announced_on(f"{n:064x}") for n in range(200)}
    assert spread == ac.ANNOUNCING - {"chains"}
    detail = ac.detail_text({"chain": DEVICE, "first": "ab" * 32})
    assert ac.chain_of("", "chain_started", detail) == "chains/2"
    assert ac.chain_of("", "chain_started", "not json") == ac.LEGACY_CHAIN
    with pytest.raises(ValueError, match="names no chain"):
        ac.place(device_id="", event="chain_started", actor="", detail="{}")


@pytest.mark.parametrize(
    ("device_id", "event", "actor", "chain", "named"),
    [
        (DEVICE, "appraisal", "", DEVICE, "device"),
        (DEVICE, "enrolled:pending_approval", "", DEVICE, "device"),
        (DEVICE, "assigned:inventory", "", DEVICE, "verifier"),
        (DEVICE, "revoked", "operator/alice", DEVICE, "operator/alice"),
        (DEVICE, "revoked", "", DEVICE, ""),
        (DEVICE, "certificates_revoked", "verifier", DEVICE, "verifier"),
        ("", "policy_changed", "operator/alice", "policy", "operator/alice"),
        ("", "role_changed", "local/root", "roles", "local/root"),
        ("", "audit_pruned", "local/root", "audit", "local/root"),
        ("", "chain_started", "", "chains/2", "verifier"),
    ],
)
def test_an_entry_is_placed_on_its_chain_with_its_actor(
    device_id: str, event: str, actor: str, chain: str, named: str
) -> None:
    detail = ac.detail_text({"chain": DEVICE, "first": "ab" * 32})
    placed = ac.place(device_id=device_id, event=event, actor=actor, detail=detail)
    assert placed == ac.Placed(chain, named)


@pytest.mark.parametrize(
    ("device_id", "event", "actor", "problem"),
    [
        (DEVICE, "enrolled", "device", "audit event 'enrolled' is not one of"),
        (DEVICE, "test", "", "audit event 'test' is not one of"),
        (DEVICE, "revoked", "device", "is made by local, operator, not 'device'"),
        (DEVICE, "appraisal", "operator/alice", "is made by device"),
        (DEVICE, "revoked", "operator/", "not operator/NAME, device, verifier or local/USER"),
        (DEVICE, "revoked", "root", "not operator/NAME"),
        (DEVICE, "revoked", "operator/a b", "not operator/NAME"),
        ("", "revoked", "operator/alice", "is about a device, got ''"),
        (DEVICE, "policy_changed", "operator/alice", "is about no device"),
    ],
)
def test_append_refuses_what_is_not_a_typed_event(
    device_id: str, event: str, actor: str, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        ac.place(device_id=device_id, event=event, actor=actor)


def test_entries_of_unknown_events_from_before_the_types_still_have_a_chain() -> None:
    assert ac.chain_of(DEVICE, "enrolled") == DEVICE
    assert ac.chain_of("", "role_changed") == "roles"
    assert ac.chain_of("", "something_old") == ac.LEGACY_CHAIN


# --- checking a chain: each way of tampering, named at its first broken record ------------


def test_an_intact_chain_passes() -> None:
    rows = chain_of(5)
    assert check(rows) is None
    assert check(rows, checkpoints={3: Mark(3, rows[2].hash)}) is None


def test_an_edited_entry_is_named() -> None:
    rows = chain_of(5)
    rows[2] = dataclasses.replace(rows[2], entry=dataclasses.replace(rows[2].entry, tier="none"))
    found = check(rows)
    assert found is not None
    assert (found.seq, found.id, found.kind) == (3, 30, Broken.EDITED)
    assert (
        found.line()
        == "chain "
        + DEVICE
        + " seq 3 (id 30): edited: its content does not hash to its stored hash"
    )


def test_an_edit_with_its_hash_recomputed_breaks_the_next_link() -> None:
    rows = chain_of(5)
    e = dataclasses.replace(rows[2].entry, tier="none")
    rows[2] = dataclasses.replace(rows[2], entry=e, hash=ac.link(rows[2].prev_hash, e))
    found = check(rows)
    assert found is not None
    assert (found.seq, found.id, found.kind) == (4, 40, Broken.EDITED)
    assert "its prev_hash is not the hash of seq 3 (id 30)" in found.what


def test_a_rewritten_first_link_is_named() -> None:
    rows = chain_of(3)
    e = rows[0].entry
    rows[0] = Stored(10, e, "11" * 32, ac.link("11" * 32, e))
    rows[1] = dataclasses.replace(rows[1], prev_hash=rows[0].hash)
    rows[1] = dataclasses.replace(rows[1], hash=ac.link(rows[0].hash, rows[1].entry))
    found = check(rows[:2])
    assert found is not None
    assert (found.seq, found.kind) == (1, Broken.EDITED)
    assert found.what == "its prev_hash is not the genesis hash"


def test_a_deleted_entry_is_named() -> None:
    rows = chain_of(5)
    del rows[2]
    found = check(rows)
    assert found is not None
    assert (found.seq, found.id, found.kind) == (3, 0, Broken.MISSING)
    assert found.what.startswith("entries 3..3 are gone (seq 2 is followed by seq 4, id 40)")


def test_deleted_first_entries_are_named() -> None:
    rows = chain_of(5)[2:]
    found = check(rows)
    assert found is not None
    assert (found.seq, found.kind) == (3, Broken.MISSING)
    assert "entries 1..2 are gone" in found.what


def test_reordered_rows_are_named() -> None:
    rows = chain_of(5)
    rows[1], rows[2] = dataclasses.replace(rows[1], id=30), dataclasses.replace(rows[2], id=20)
    found = check(rows)
    assert found is not None
    assert (found.seq, found.id, found.kind) == (3, 20, Broken.OUT_OF_ORDER)


def test_an_entry_moved_to_another_chain_is_named() -> None:
    rows = chain_of(3)
    other = "cd" * 32
    e = dataclasses.replace(rows[1].entry, device_id=other)
    rows[1] = dataclasses.replace(rows[1], entry=e, hash=ac.link(rows[1].prev_hash, e))
    found = check(rows)
    assert found is not None
    assert (found.seq, found.kind) == (2, Broken.UNCHAINED)


def test_a_truncated_tail_shows_against_the_head() -> None:
    rows = chain_of(5)
    found = check(rows[:3], head=head_of(rows))
    assert found is not None
    assert (found.seq, found.id, found.kind) == (4, 0, Broken.MISSING)
    assert found.what == "entries 4..5 are gone: the head is at seq 5, the last entry at seq 3"


def test_a_truncated_tail_with_its_head_rewritten_shows_against_a_checkpoint() -> None:
    rows = chain_of(5)
    marks = {4: Mark(4, rows[3].hash)}
    assert check(rows, checkpoints=marks) is None
    found = check(rows[:3], head=head_of(rows[:3]), checkpoints=marks)
    assert found is not None
    assert (found.seq, found.kind) == (4, Broken.MISSING)
    assert "a checkpoint at seq 4 lies past the last entry (seq 3)" in found.what


def test_a_head_that_is_not_the_last_entry_is_named() -> None:
    rows = chain_of(3)
    found = check(rows, head=Mark(3, "22" * 32))
    assert found is not None
    assert (found.seq, found.id, found.kind) == (3, 30, Broken.HEAD)
    found = check(rows, head=Mark(2, rows[1].hash))
    assert found is not None
    assert found.kind is Broken.HEAD
    found = ac.check_chain(DEVICE, iter(rows), head=None, checkpoints={})
    assert found is not None
    assert found.what == "the chain has no head row"
    found = ac.check_chain(DEVICE, iter([]), head=Mark(3, rows[2].hash), checkpoints={})
    assert found is not None
    assert (found.seq, found.kind) == (1, Broken.MISSING)


def test_a_checkpoint_that_holds_another_hash_is_named() -> None:
    rows = chain_of(5)
    found = check(rows, checkpoints={2: Mark(2, rows[3].hash)})
    assert found is not None
    assert (found.seq, found.id, found.kind) == (2, 20, Broken.CHECKPOINT)


def test_a_pruned_chain_verifies_from_its_pruning_checkpoint() -> None:
    rows = chain_of(6)
    pruned = {3: Mark(3, rows[2].hash, pruned=True, vouched=True)}
    assert check(rows[3:], head=head_of(rows), checkpoints=pruned) is None
    # One more deleted after the pruning: the chain no longer starts at the checkpoint.
    found = check(rows[4:], head=head_of(rows), checkpoints=pruned)
    assert found is not None
    assert (found.seq, found.kind) == (5, Broken.MISSING)
    # A periodic checkpoint does not account for deleted entries: only retention's does.
    found = check(rows[3:], head=head_of(rows), checkpoints={3: Mark(3, rows[2].hash)})
    assert found is not None
    assert (found.seq, found.kind) == (4, Broken.MISSING)
    # The first remaining entry must link to the checkpoint's hash.
    forged = {3: Mark(3, "33" * 32, pruned=True, vouched=True)}
    found = check(rows[3:], head=head_of(rows), checkpoints=forged)
    assert found is not None
    assert (found.seq, found.kind) == (4, Broken.EDITED)
    assert found.what == "its prev_hash is not the checkpoint at seq 3"


def test_a_pruning_checkpoint_no_prune_record_names_is_named() -> None:
    """A prefix deleted and a pruning checkpoint inserted with the first remaining entry's
    prev_hash (review H2): no audit_pruned entry vouches for it."""
    rows = chain_of(6)
    faked = {3: Mark(3, rows[3].prev_hash, pruned=True)}
    found = check(rows[3:], head=head_of(rows), checkpoints=faked)
    assert found is not None
    assert (found.seq, found.id, found.kind) == (4, 40, Broken.MISSING)
    assert "the pruning checkpoint at seq 3 is named by no audit_pruned entry" in found.what


def test_a_recorded_head_before_the_first_entry_needs_a_recorded_pruning() -> None:
    """A head recorded earlier (--against) at seq 2, and the chain now starts at seq 4
    behind an unvouched pruning checkpoint: the recorded head is named."""
    rows = chain_of(6)
    marks = {
        2: Mark(2, rows[1].hash, recorded=True),
        3: Mark(3, rows[2].hash, pruned=True),
    }
    found = check(rows[3:], head=head_of(rows), checkpoints=marks)
    assert found is not None
    assert (found.seq, found.kind) == (4, Broken.MISSING)
    assert found.what.startswith("the head recorded earlier at seq 2 lies before the chain's")
    # A pruning that an audit_pruned entry names accounts for it.
    marks[3] = Mark(3, rows[2].hash, pruned=True, vouched=True)
    assert check(rows[3:], head=head_of(rows), checkpoints=marks) is None


def test_a_hash_that_is_no_hex_is_named_not_a_crash() -> None:
    """A forged pruning checkpoint holding 'zz' and a first entry whose prev_hash is 'zz'
    (review L1): link() cannot read it, the check names it."""
    rows = chain_of(4)
    bad = dataclasses.replace(rows[2], prev_hash="zz")
    marks = {2: Mark(2, "zz", pruned=True, vouched=True)}
    found = check([bad, rows[3]], head=head_of(rows), checkpoints=marks)
    assert found is not None
    assert (found.seq, found.kind, found.what) == (
        3, Broken.EDITED, "its prev_hash or hash is not a sha256 in hex"
    )  # fmt: skip
