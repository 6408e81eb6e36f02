"""The audit trail's hash chains (issue 12, item 4): which events exist, who may make them,
which chain an entry joins, its canonical encoding and hash, and the check of a chain as
stored. Pure: no database, no clock; the storage (``storage/audit_rows.py``) and
``devtrust audit`` do the I/O.

Every entry is on one chain: a device's own (chain = its device id) or a named chain for
what concerns the fleet (``policy``, ``roles``, ``audit``). Entry n of a chain holds the hash
of entry n-1 (``prev_hash``; the first holds ``GENESIS``) and its own hash,
sha256(prev_hash || encode(entry)), so an entry edited, deleted or moved breaks the chain at
that entry. Chains are independent: replicas appending to different devices share no lock,
only the head row of the one chain they extend.

A chain's head (its last seq and hash, kept in a table of its own, updated with every entry)
shows a deleted tail; checkpoints (the hash at a seq, written every N entries and when old
entries are pruned) show a deletion they cover and let a pruned chain verify from the
checkpoint at the last entry removed. Named chains vouch for the others: the announcing
chains (``chains/0``..``chains/f``, by the first hex digit of the sha256 of the announced
chain's name, and the root ``chains`` announcing those) announce each chain's first entry
(chain_started: its name and first hash), so a chain deleted whole, or rewritten from its
first entry, shows; ``audit`` records each pruning
(audit_pruned: each chain's pruning checkpoint, seq and hash), so a pruning checkpoint
inserted to cover a deleted prefix shows. Retention prunes neither.

What a chain cannot show: someone able to write the database may rewrite a chain from the
point they changed and every hash after it, its head and its checkpoints. Compare the heads
``devtrust audit verify --json`` printed earlier (kept elsewhere) to catch that.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

# The encoding's version, its first byte: a new encoding gets a new number and verifiers
# keep reading the old one (an entry's version is part of what its hash covers).
VERSION = 1
# The prev_hash of a chain's first entry.
GENESIS = "0" * 64
# A checkpoint every this many entries of a chain.
CHECKPOINT_EVERY = 1000


class Event(StrEnum):
    """Every audit event (append refuses any other name)."""

    APPRAISAL = "appraisal"
    ENROLLED = "enrolled:enrolled"
    ENROLLED_PENDING = "enrolled:pending_approval"
    APPROVED = "approved"
    ASSIGNED_APPROVAL = "assigned:approval"
    ASSIGNED_OPERATOR = "assigned:operator"
    ASSIGNED_INVENTORY = "assigned:inventory"
    REVOKED = "revoked"
    CERTIFICATES_REVOKED = "certificates_revoked"
    POLICY_CHANGED = "policy_changed"
    ROLE_CHANGED = "role_changed"
    AUDIT_PRUNED = "audit_pruned"
    CHAIN_STARTED = "chain_started"


class Actor(StrEnum):
    """Who made a change, by kind: "operator/NAME" (through the Query API), "device" (its
    own evidence or enrollment), "verifier" (its own rule or configuration), "local/USER"
    (a command run against the database on the verifier's host)."""

    OPERATOR = "operator"
    DEVICE = "device"
    VERIFIER = "verifier"
    LOCAL = "local"


@dataclass(frozen=True)
class EventType:
    """``chain``: the named chain of a fleet-wide event (device_id ""), None for a device's
    own; ``actors``: the kinds that may make it; ``default_actor``: the actor of a caller
    that names none (the one kind that makes it)."""

    chain: str | None
    actors: frozenset[Actor]
    default_actor: str = ""


_OPS = frozenset({Actor.OPERATOR, Actor.LOCAL})
EVENTS: Mapping[Event, EventType] = {
    Event.APPRAISAL: EventType(None, frozenset({Actor.DEVICE}), "device"),
    Event.ENROLLED: EventType(None, frozenset({Actor.DEVICE}), "device"),
    Event.ENROLLED_PENDING: EventType(None, frozenset({Actor.DEVICE}), "device"),
    Event.APPROVED: EventType(None, _OPS),
    Event.ASSIGNED_APPROVAL: EventType(None, _OPS),
    Event.ASSIGNED_OPERATOR: EventType(None, _OPS),
    Event.ASSIGNED_INVENTORY: EventType(None, frozenset({Actor.VERIFIER}), "verifier"),
    Event.REVOKED: EventType(None, _OPS),
    Event.CERTIFICATES_REVOKED: EventType(None, _OPS | {Actor.VERIFIER}),
    Event.POLICY_CHANGED: EventType("policy", _OPS | {Actor.VERIFIER}),
    Event.ROLE_CHANGED: EventType("roles", _OPS | {Actor.VERIFIER}),
    Event.AUDIT_PRUNED: EventType("audit", _OPS),
    Event.CHAIN_STARTED: EventType("chains", frozenset({Actor.VERIFIER}), "verifier"),
}
# Every chain's first entry is announced (chain_started: the chain's name and first hash),
# in the transaction that writes it, so that a chain deleted whole still shows: on one of
# SHARDS announcing chains "chains/0".."chains/f" (``announced_on``), so that a burst of
# first enrollments rarely extends one head; each shard's own first entry is announced on
# the root "chains" (at most SHARDS entries, ever), so that a shard deleted whole, with
# the chains it announced, shows too. The root itself is announced nowhere.
CHAINS = "chains"
SHARDS = 16
ANNOUNCING = frozenset({CHAINS} | {f"{CHAINS}/{digit:x}" for digit in range(SHARDS)})
NAMED_CHAINS = frozenset(t.chain for t in EVENTS.values() if t.chain is not None) | ANNOUNCING
# Where retention records what it deleted (audit_pruned: each pruned chain's seq and
# hash): a pruning checkpoint no entry here names is a forged one.
AUDIT = "audit"
# Chains retention never prunes: what they hold vouches for the others.
UNPRUNED = ANNOUNCING | {AUDIT}
# The chain of an entry written before the chains (schema step 7) with no device and an
# event this code does not know: sealed there, never appended to.
LEGACY_CHAIN = "legacy"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


def actor_kind(actor: str) -> Actor:
    """The kind of ``actor``; ValueError for one that is none of the four forms."""
    kind, _, name = actor.partition("/")
    if actor in (Actor.DEVICE, Actor.VERIFIER):
        return Actor(actor)
    if kind in (Actor.OPERATOR, Actor.LOCAL) and _NAME.fullmatch(name):
        return Actor(kind)
    raise ValueError(f"audit actor {actor!r}: not operator/NAME, device, verifier or local/USER")


def announced_on(chain: str) -> str:
    """The chain whose chain_started entry announces ``chain``: the root ``chains`` for a
    shard (and for the root, which nothing announces: callers skip it), else the shard
    ``chains/X``, X the first hex digit of the sha256 of the chain's name (UTF-8)."""
    if chain in ANNOUNCING:
        return CHAINS
    return f"{CHAINS}/{hashlib.sha256(chain.encode()).hexdigest()[0]}"


def announced(detail: str) -> str | None:
    """The chain a chain_started entry's detail (as stored) announces; None when it names
    none, or the root."""
    try:
        value = json.loads(detail)
    except ValueError:
        return None
    name = value.get("chain") if isinstance(value, dict) else None
    return name if isinstance(name, str) and name != CHAINS else None


def event_type(event: str) -> EventType:
    """ValueError for an event that is not one of ``Event``."""
    try:
        return EVENTS[Event(event)]
    except ValueError:
        raise ValueError(f"audit event {event!r} is not one of {', '.join(Event)}") from None


@dataclass(frozen=True)
class Placed:
    """Where a new entry goes and who it names: checked by ``place``."""

    chain: str
    actor: str


def place(*, device_id: str, event: str, actor: str, detail: str = "") -> Placed:
    """The chain and actor of a new entry; ValueError for an unknown event, an actor of a
    kind the event does not allow, a device event without its device or a fleet event with
    one, a chain_started whose ``detail`` (as stored) names no chain. A caller naming no
    actor gets the event's default; where it has none the actor stays '' (unknown), as
    before the actors were recorded: only test code changes a device's state without naming
    who (Devices.set_state has no actor)."""
    kind = event_type(event)
    actor = actor or kind.default_actor
    if actor and actor_kind(actor) not in kind.actors:
        allowed = ", ".join(sorted(kind.actors))
        raise ValueError(f"audit event {event!r} is made by {allowed}, not {actor!r}")
    if (kind.chain is None) != bool(device_id):
        where = "a device" if kind.chain is None else "no device (device_id '')"
        raise ValueError(f"audit event {event!r} is about {where}, got {device_id!r}")
    chain = chain_of(device_id, event, detail)
    if chain == LEGACY_CHAIN:
        raise ValueError(f"audit event {event!r}: its detail names no chain it announces")
    return Placed(chain=chain, actor=actor)


def device_of(chain: str) -> str:
    """The device_id of the entries of ``chain`` ('' for a named chain)."""
    return "" if chain in NAMED_CHAINS or chain == LEGACY_CHAIN else chain


def chain_of(device_id: str, event: str, detail: str = "") -> str:
    """The chain an entry belongs on, known event or not (entries written before the
    events were typed are sealed too): the device's, else the event's named chain; for a
    chain_started, the one that announces the chain its ``detail`` (as stored) names
    (``announced_on``; ``LEGACY_CHAIN`` when it names none)."""
    if device_id:
        return device_id
    if event == Event.CHAIN_STARTED:
        name = announced(detail)
        return LEGACY_CHAIN if name is None else announced_on(name)
    try:
        return event_type(event).chain or LEGACY_CHAIN
    except ValueError:
        return LEGACY_CHAIN


# --- the encoding --------------------------------------------------------------------------


def canonical_at(value: str | datetime.datetime) -> str:
    """A time as the hash covers it: UTC, microseconds always written, whatever form the
    database returns (ISO text from SQLite, a datetime from a timestamp column)."""
    when = value if isinstance(value, datetime.datetime) else datetime.datetime.fromisoformat(value)
    if when.tzinfo is None:
        raise ValueError(f"audit time {value!r} has no time zone")
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def detail_text(value: Mapping[str, Any]) -> str:
    """The JSON text a detail given as a dict is stored (and hashed) as: sorted keys, no
    spaces. The hash covers the detail's text as stored (a detail given as text, the
    appraisal's result, is stored as given): every backend keeps it as TEXT."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class Entry:
    """What an entry's hash covers (``at`` in its canonical form, ``detail`` as stored)."""

    chain: str
    seq: int
    at: str
    device_id: str
    event: str
    actor: str
    tier: str
    detail: str


def encode(entry: Entry) -> bytes:
    """The entry as hashed: the version byte, then each field as a 4-byte big-endian length
    and its UTF-8 bytes, in a fixed order (no separator a field could contain)."""
    fields = (
        entry.chain,
        str(entry.seq),
        entry.at,
        entry.device_id,
        entry.event,
        entry.actor,
        entry.tier,
        entry.detail,
    )
    parts = [bytes([VERSION])]
    for text in fields:
        data = text.encode("utf-8")
        parts += (len(data).to_bytes(4, "big"), data)
    return b"".join(parts)


def link(prev_hash: str, entry: Entry) -> str:
    """The entry's hash (hex) after ``prev_hash`` (hex)."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + encode(entry)).hexdigest()


_HASH = re.compile(r"[0-9a-f]{64}")


def is_hash(text: str) -> bool:
    """A sha256 as stored: 64 lower-case hex digits (anything else was edited in)."""
    return _HASH.fullmatch(text) is not None


# --- checking a chain ----------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """An entry as read back: its row id, what its hash covers, and the two hashes."""

    id: int
    entry: Entry
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class Mark:
    """A chain's head, or a checkpoint (``pruned``: written when the entries up to it were
    deleted by retention, so the chain may start after it; ``recorded``: a head recorded
    outside the database, by an earlier ``devtrust audit verify --json``; ``vouched``: a
    pruning checkpoint that an audit_pruned entry on the chain ``audit`` names, seq and
    hash: only such a one accounts for the entries before it; ``announced``: the first hash
    a chain_started entry on the chain ``chains`` gave, at seq 1)."""

    seq: int
    hash: str
    pruned: bool = False
    recorded: bool = False
    vouched: bool = False
    announced: bool = False


class Broken(StrEnum):
    EDITED = "edited"
    MISSING = "missing"
    OUT_OF_ORDER = "out of order"
    HEAD = "head mismatch"
    CHECKPOINT = "checkpoint mismatch"
    UNCHAINED = "not on its chain"
    UNANNOUNCED = "not announced"


@dataclass(frozen=True)
class Break:
    """The first broken record of a chain: its chain, seq and row id (0 where the record is
    gone), what is wrong and how it shows."""

    chain: str
    seq: int
    id: int
    kind: Broken
    what: str

    def line(self) -> str:
        where = f"chain {self.chain} seq {self.seq}" + (f" (id {self.id})" if self.id else "")
        return f"{where}: {self.kind}: {self.what}"


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def check_chain(
    chain: str,
    entries: Iterable[Stored],
    *,
    head: Mark | None,
    checkpoints: Mapping[int, Mark],
) -> Break | None:
    """The first broken record of ``chain``, None when it is intact. ``entries``: the chain's
    entries in seq order (read lazily: one is held at a time). Each entry: 1. it is on the
    chain its device and event name; 2. its seq follows the one before (the first: 1, or the
    seq after a pruning checkpoint); 3. its prev_hash is the hash before it; 4. its row id is
    above the one before (rows keep the order they were written in); 5. its hash is that of
    its content; 6. a checkpoint at its seq holds its hash. The first entry after seq 1
    needs a pruning checkpoint an audit_pruned entry vouches for, which also accounts for a
    head recorded earlier that lies before it. Then 7. the head is the last entry, and 8.
    no checkpoint lies past it. A hash that is no sha256 in hex is an edit."""
    last: Stored | None = None
    for row in entries:
        found = next(_entry_breaks(chain, row, last, checkpoints), None)
        if found is not None:
            return found
        last = row
    return next(_end_breaks(chain, last, head, checkpoints), None)


def _entry_breaks(
    chain: str, row: Stored, last: Stored | None, checkpoints: Mapping[int, Mark]
) -> Iterator[Break]:
    """What is wrong with ``row`` after ``last`` (None: it is the first), in check order."""
    e = row.entry

    def broken(kind: Broken, what: str, seq: int = e.seq, at_id: int = row.id) -> Break:
        return Break(chain, seq, at_id, kind, what)

    if chain_of(e.device_id, e.event, e.detail) != chain:  # 1
        yield broken(Broken.UNCHAINED, f"its device and event ({e.device_id!r}, {e.event!r}) "
                     "belong on another chain")  # fmt: skip
    if not (is_hash(row.prev_hash) and is_hash(row.hash)):
        yield broken(Broken.EDITED, "its prev_hash or hash is not a sha256 in hex")
        return
    if last is None:  # 2, 3 for the first entry
        start = checkpoints.get(e.seq - 1)
        accounted = e.seq == 1 or (start is not None and start.pruned and start.vouched)
        early = [m.seq for m in checkpoints.values() if m.recorded and m.seq < e.seq]
        if early and not accounted:
            yield broken(Broken.MISSING, f"the head recorded earlier at seq {min(early)} lies "
                         f"before the chain's first entry (seq {e.seq}) and no recorded "
                         "pruning accounts for it")  # fmt: skip
        if e.seq != 1 and (start is None or not start.pruned):
            yield broken(Broken.MISSING, f"entries 1..{e.seq - 1} are gone and no pruning "
                         f"checkpoint at seq {e.seq - 1} accounts for them")  # fmt: skip
        elif not accounted:
            yield broken(Broken.MISSING, f"entries 1..{e.seq - 1} are gone and the pruning "
                         f"checkpoint at seq {e.seq - 1} is named by no audit_pruned entry "
                         "(a pruning not done by devtrust audit prune)")  # fmt: skip
        expected = GENESIS if start is None or e.seq == 1 else start.hash
        if not _same(row.prev_hash, expected):
            what = "the genesis hash" if e.seq == 1 else f"the checkpoint at seq {e.seq - 1}"
            yield broken(Broken.EDITED, f"its prev_hash is not {what}")
    else:
        if e.seq != last.entry.seq + 1:  # 2
            gone = last.entry.seq + 1
            yield broken(Broken.MISSING, f"entries {gone}..{e.seq - 1} are gone (seq "
                         f"{last.entry.seq} is followed by seq {e.seq}, id {row.id})",
                         seq=gone, at_id=0)  # fmt: skip
        if not _same(row.prev_hash, last.hash):  # 3
            yield broken(Broken.EDITED, f"its prev_hash is not the hash of seq "
                         f"{last.entry.seq} (id {last.id}): one of the two was "
                         "rewritten")  # fmt: skip
        if row.id <= last.id:  # 4
            yield broken(Broken.OUT_OF_ORDER, f"its row id is below that of seq "
                         f"{last.entry.seq} (id {last.id})")  # fmt: skip
    if not _same(link(row.prev_hash, e), row.hash):  # 5
        yield broken(Broken.EDITED, "its content does not hash to its stored hash")
    mark = checkpoints.get(e.seq)
    if mark is not None and not _same(mark.hash, row.hash):  # 6
        what = (
            "the head recorded earlier"
            if mark.recorded
            else "the chain_started announcement"
            if mark.announced
            else "the checkpoint"
        )
        yield broken(Broken.CHECKPOINT, f"{what} at seq {e.seq} holds another hash")


def _end_breaks(
    chain: str, last: Stored | None, head: Mark | None, checkpoints: Mapping[int, Mark]
) -> Iterator[Break]:
    end = last.entry.seq if last is not None else 0
    last_id = last.id if last is not None else 0
    if head is None:  # 7
        yield Break(chain, end, last_id, Broken.HEAD, "the chain has no head row")
        return
    if head.seq > end:
        gone = f"{end + 1}..{head.seq}" if end + 1 < head.seq else f"{head.seq}"
        yield Break(chain, end + 1, 0, Broken.MISSING,
                    f"entries {gone} are gone: the head is at seq {head.seq}, the last "
                    f"entry at seq {end}")  # fmt: skip
    if last is not None and (head.seq != end or not _same(head.hash, last.hash)):
        yield Break(chain, end, last_id, Broken.HEAD,
                    f"the head (seq {head.seq}) does not hold the last entry's hash "
                    f"(seq {end})")  # fmt: skip
    past = [seq for seq in checkpoints if seq > end]  # 8
    if past:
        yield Break(chain, end + 1, 0, Broken.MISSING,
                    f"a checkpoint at seq {min(past)} lies past the last entry "
                    f"(seq {end})")  # fmt: skip
